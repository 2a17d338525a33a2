"""The :class:`Volume` that travels through the engine.

Conventions (the same everywhere in the Lib):

* ``array`` is indexed **(z, y, x)** = (k, j, i), as ``SimpleITK.GetArrayFromImage``
  returns it.
* ``spacing`` and ``origin`` are given in **(x, y, z)** order, in millimetres.
* ``origin`` and ``direction`` are in **LPS** physical coordinates (ITK, DICOM), *not*
  RAS (Slicer, NIfTI). ``direction`` is a 3x3 matrix whose *columns* are the physical
  directions of the i, j and k array axes (ITK convention).

So the LPS position of voxel index (i, j, k) is
``origin + direction @ (spacing * (i, j, k))``. Use :meth:`Volume.ijk_to_lps` and
:meth:`Volume.ijk_to_ras` instead of writing that out again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


#: How far from orthonormal (|D^T D - I|, elementwise) a direction matrix may be.
ORTHONORMAL_TOLERANCE = 1e-3


@dataclass
class Volume:
    """A 3D image with its full geometry.

    Attributes:
        array: voxel values indexed (z, y, x).
        spacing: voxel size in mm, (x, y, z) order.
        origin: LPS position in mm of the centre of voxel (0, 0, 0).
        direction: 3x3 LPS direction cosines, columns = i, j, k axes.
    """

    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    # -- geometry -------------------------------------------------------------------
    @property
    def shape_xyz(self) -> tuple:
        """Size in voxels in (x, y, z) order."""
        z, y, x = self.array.shape[:3]
        return (x, y, z)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) indices to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) indices to RAS mm (Slicer)."""
        m = self.ijk_to_lps()
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        return flip @ m

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> "Volume":
        """Build a volume from a (z, y, x) array and a 4x4 IJK-to-RAS matrix (Slicer)."""
        m = np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4)
        lps = LPS_TO_RAS @ m[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        if np.any(spacing <= 0):
            from .errors import InputError

            raise InputError("The IJK-to-RAS matrix has a zero-length axis; the volume geometry is invalid.")
        direction = lps / spacing
        origin = LPS_TO_RAS @ m[:3, 3]
        return cls(array=array, spacing=tuple(spacing), origin=tuple(origin), direction=direction)

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry with other voxel values (same (z, y, x) shape)."""
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(f"shape {array.shape} does not match {self.array.shape}")
        return Volume(array=array, spacing=self.spacing, origin=self.origin, direction=self.direction.copy())

    def is_orthonormal(self, tol: float = ORTHONORMAL_TOLERANCE) -> bool:
        """True when the direction's columns are unit length and at right angles (to
        ``tol``): voxel volumes and distances are then products of spacings. A gantry
        tilt or a shear is not; nor are direction columns that carry the spacing."""
        d = np.asarray(self.direction, dtype=np.float64)
        return bool(np.all(np.isfinite(d)) and np.allclose(d.T @ d, np.eye(3), atol=tol))

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when both volumes share size, spacing, origin and direction."""
        return (
            self.array.shape[:3] == other.array.shape[:3]
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    # -- SimpleITK bridge -----------------------------------------------------------
    def to_sitk(self):
        """A SimpleITK image with this geometry (the array is copied)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.flatten()))
        return img

    @classmethod
    def from_sitk(cls, img) -> "Volume":
        """A Volume from a 3D scalar SimpleITK image."""
        import SimpleITK as sitk

        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=np.array(img.GetDirection()).reshape(3, 3),
        )

"""Closed surface meshes of label classes, in physical LPS millimetres.

Marching cubes runs on the (padded, cropped) voxel grid; vertex positions are then
mapped through the volume's IJK-to-LPS matrix, so anisotropic spacing and oblique or
flipped directions are honoured. Triangles are wound counter-clockwise seen from
outside (normals point out of the object), also when the direction matrix is a
reflection.

Backends (both optional): scikit-image's ``marching_cubes`` when importable, else VTK's
``vtkDiscreteFlyingEdges3D``. Decimation needs VTK and is skipped with a warning
without it.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .atomic import atomic_write_bytes, atomic_write_text
from .boxes import bounding_box, class_mask
from .errors import InputError, LiverTumorSegError
from .volume import Volume

DEFAULT_SURFACE_CLASSES = {"liver": (1, 2), "tumor": (2,)}
TAUBIN_LAMBDA = 0.5
TAUBIN_MU = -0.53
STL_HEADER = b"LiverTumorSeg SPACE=LPS"
_STL_DTYPE = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])


@dataclass
class Mesh:
    """A triangle mesh.

    Attributes:
        vertices: (N, 3) float64 vertex positions in LPS mm.
        faces: (M, 3) int64 vertex indices per triangle, counter-clockwise seen from
            outside (outward normals).
    """

    vertices: np.ndarray
    faces: np.ndarray

    @property
    def n_triangles(self) -> int:
        """Number of triangles."""
        return int(len(self.faces))


# -- extraction ---------------------------------------------------------------------
def label_surface(
    mask: np.ndarray,
    geometry: Volume,
    *,
    smoothing_iterations: int = 0,
    decimation: float = 0.0,
    backend: str = "auto",
) -> Mesh | None:
    """Closed outward-oriented surface of a binary mask, in LPS mm.

    Args:
        mask: boolean array indexed (z, y, x) on ``geometry``'s grid.
        geometry: volume giving spacing, origin and direction (LPS).
        smoothing_iterations: Taubin (lambda/mu) smoothing passes; 0 keeps the raw
            marching-cubes surface. Taubin smoothing keeps the volume of objects a few
            voxels across, but collapses smaller ones (10 passes: one voxel to a point,
            2x2x2 voxels to 46 % of their volume), so components of fewer than
            :data:`SMOOTH_MIN_VOXELS` voxels (small lesions) are left unsmoothed.
        decimation: fraction of triangles to remove, in [0, 1); needs VTK.
        backend: "auto" (scikit-image, else VTK), "skimage" or "vtk".

    Returns:
        The mesh, or ``None`` when the mask is empty.

    Raises:
        InputError: if the mask does not match the geometry's grid.
        LiverTumorSegError: if no marching-cubes backend is installed, or a parameter
            is out of range.
    """
    mask = np.asarray(mask)
    if mask.shape != geometry.array.shape[:3]:
        raise InputError(f"The mask shape {mask.shape} does not match the volume grid {geometry.array.shape[:3]}.")
    if not 0.0 <= decimation < 1.0:
        raise LiverTumorSegError(f"decimation must be a fraction in [0, 1); got {decimation}.")
    if smoothing_iterations < 0:
        raise LiverTumorSegError(f"smoothing_iterations must be >= 0; got {smoothing_iterations}.")
    if smoothing_iterations:
        from .postprocess import small_components

        small = small_components(mask, SMOOTH_MIN_VOXELS)
        if small.any():
            parts = [label_surface(mask & ~small, geometry, smoothing_iterations=smoothing_iterations,
                                   backend=backend),
                     label_surface(small, geometry, backend=backend)]
            mesh = _join([m for m in parts if m is not None])
            return decimate(mesh, decimation) if mesh is not None and decimation > 0.0 else mesh
    box = bounding_box(mask)
    if box is None:
        return None
    padded = np.pad(mask[box].astype(np.uint8, copy=False), 1)
    vertices, faces = _marching_cubes(padded, backend)
    if len(faces) == 0:
        return None
    if _signed_volume(vertices, faces) < 0:
        faces = faces[:, ::-1]
    vertices += np.array([box[2].start - 1, box[1].start - 1, box[0].start - 1], dtype=np.float64)
    matrix = geometry.ijk_to_lps()
    vertices = vertices @ matrix[:3, :3].T + matrix[:3, 3]
    if np.linalg.det(matrix[:3, :3]) < 0:
        faces = faces[:, ::-1]
    mesh = Mesh(vertices=vertices, faces=np.ascontiguousarray(faces, dtype=np.int64))
    if smoothing_iterations:
        mesh = taubin_smooth(mesh, smoothing_iterations)
    if decimation > 0.0:
        mesh = decimate(mesh, decimation)
    return mesh


#: Components of fewer voxels are not smoothed (Taubin smoothing collapses them).
SMOOTH_MIN_VOXELS = 27


def _join(meshes: list) -> "Mesh | None":
    """One mesh holding all of ``meshes`` (faces renumbered)."""
    if not meshes:
        return None
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    return Mesh(vertices=np.concatenate([m.vertices for m in meshes]),
                faces=np.concatenate([m.faces + o for m, o in zip(meshes, offsets)]))


def surfaces_for_labels(
    labels: Volume,
    classes: Mapping | None = None,
    *,
    smoothing_iterations: int = 0,
    decimation: float = 0.0,
) -> dict:
    """One mesh per class of a label map, in LPS mm.

    Args:
        labels: label map (z, y, x) with its geometry.
        classes: name -> label values forming the class; defaults to
            :data:`DEFAULT_SURFACE_CLASSES` (liver = 1 | 2, the whole organ; tumor = 2).
        smoothing_iterations, decimation: as in :func:`label_surface`.

    Returns:
        ``{name: Mesh}``; classes with no voxel are left out.
    """
    classes = DEFAULT_SURFACE_CLASSES if classes is None else classes
    meshes = {}
    for name, values in classes.items():
        mask = class_mask(labels.array, values)
        mesh = label_surface(mask, labels, smoothing_iterations=smoothing_iterations, decimation=decimation)
        if mesh is not None:
            meshes[name] = mesh
    return meshes


def _marching_cubes(padded: np.ndarray, backend: str) -> tuple:
    """Iso-surface at 0.5 of a (z, y, x) uint8 array; vertices as float64 (i, j, k) indices."""
    if backend not in ("auto", "skimage", "vtk"):
        raise LiverTumorSegError(f"Unknown surface backend {backend!r}; use 'auto', 'skimage' or 'vtk'.")
    if backend in ("auto", "skimage"):
        try:
            from skimage.measure import marching_cubes
        except ImportError:
            if backend == "skimage":
                raise LiverTumorSegError(
                    "scikit-image is not installed; install it or use the 'vtk' backend."
                ) from None
        else:
            verts, faces, _normals, _values = marching_cubes(padded.astype(np.float32), level=0.5)
            return verts[:, ::-1].astype(np.float64), faces.astype(np.int64)
    try:
        return _vtk_flying_edges(padded)
    except ImportError:
        raise LiverTumorSegError(
            "Building surfaces needs scikit-image or VTK; install one of them "
            "(pip install scikit-image)."
        ) from None


def _vtk_flying_edges(padded: np.ndarray) -> tuple:
    """Discrete flying edges (VTK) on a (z, y, x) uint8 array; vertices in (i, j, k)."""
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D

    image = vtkImageData()
    nz, ny, nx = padded.shape
    image.SetDimensions(nx, ny, nz)
    scalars = numpy_to_vtk(np.ascontiguousarray(padded).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    extractor = vtkDiscreteFlyingEdges3D()
    extractor.SetInputData(image)
    extractor.SetValue(0, 1)
    extractor.ComputeNormalsOff()
    extractor.ComputeGradientsOff()
    extractor.ComputeScalarsOff()
    extractor.Update()
    poly = extractor.GetOutput()
    if poly.GetNumberOfPoints() == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    vertices = vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)
    faces = vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).astype(np.int64).reshape(-1, 3)
    return vertices, faces


# -- processing ---------------------------------------------------------------------
def taubin_smooth(mesh: Mesh, iterations: int, lam: float = TAUBIN_LAMBDA, mu: float = TAUBIN_MU) -> Mesh:
    """Taubin lambda/mu smoothing (umbrella Laplacian), which keeps the volume of objects
    a few voxels across (it collapses smaller ones: see :func:`label_surface`).

    Each iteration moves every vertex by ``lam`` times its Laplacian, then by ``mu``
    (negative) times the new Laplacian. Coordinates stay in the mesh's own space (mm).
    """
    n = len(mesh.vertices)
    edges = np.concatenate([mesh.faces[:, [0, 1]], mesh.faces[:, [1, 2]], mesh.faces[:, [2, 0]]])
    edges.sort(axis=1)
    keys = np.sort(edges[:, 0] * n + edges[:, 1])  # each undirected edge once (sort + neighbour test:
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]  # much faster than np.unique's hashing)
    a, b = keys // n, keys % n
    src = np.concatenate([a, b])
    dst = np.concatenate([b, a])
    degree = np.bincount(src, minlength=n).astype(np.float64)
    used = degree > 0  # a vertex on no triangle has no neighbours and stays where it is
    degree[~used] = 1.0
    points = mesh.vertices.astype(np.float64, copy=True)

    def laplacian(p: np.ndarray) -> np.ndarray:
        out = np.empty_like(p)
        for axis in range(3):
            out[:, axis] = np.bincount(src, weights=p[dst, axis], minlength=n) / degree - p[:, axis] * used
        return out

    for _ in range(iterations):
        points += lam * laplacian(points)
        points += mu * laplacian(points)
    return Mesh(vertices=points, faces=mesh.faces.copy())


def decimate(mesh: Mesh, fraction: float) -> Mesh:
    """Remove about ``fraction`` of the triangles with VTK's quadric decimation.

    Without VTK the mesh is returned unchanged and a warning is issued.
    """
    try:
        from vtkmodules.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray, vtk_to_numpy
        from vtkmodules.vtkCommonCore import vtkPoints
        from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData
        from vtkmodules.vtkFiltersCore import vtkQuadricDecimation
    except ImportError:
        warnings.warn("VTK is not installed; the surface was not decimated.", stacklevel=2)
        return mesh
    points = vtkPoints()
    points.SetData(numpy_to_vtk(np.ascontiguousarray(mesh.vertices), deep=True))
    cells = vtkCellArray()
    offsets = np.arange(0, 3 * len(mesh.faces) + 1, 3, dtype=np.int64)
    cells.SetData(numpy_to_vtkIdTypeArray(offsets, deep=True),
                  numpy_to_vtkIdTypeArray(np.ascontiguousarray(mesh.faces.ravel()), deep=True))
    poly = vtkPolyData()
    poly.SetPoints(points)
    poly.SetPolys(cells)
    decimator = vtkQuadricDecimation()
    decimator.SetInputData(poly)
    decimator.SetTargetReduction(float(fraction))
    decimator.VolumePreservationOn()
    decimator.Update()
    out = decimator.GetOutput()
    vertices = vtk_to_numpy(out.GetPoints().GetData()).astype(np.float64)
    faces = vtk_to_numpy(out.GetPolys().GetConnectivityArray()).astype(np.int64).reshape(-1, 3)
    if _signed_volume(vertices, faces) < 0:
        faces = faces[:, ::-1]
    return Mesh(vertices=vertices, faces=np.ascontiguousarray(faces))


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed enclosed volume (divergence theorem) in the vertices' units cubed."""
    if len(faces) == 0:
        return 0.0
    centre = vertices.mean(axis=0)
    v0 = vertices[faces[:, 0]] - centre
    v1 = vertices[faces[:, 1]] - centre
    v2 = vertices[faces[:, 2]] - centre
    return float(np.einsum("ij,ij->i", v0, np.cross(v1, v2)).sum() / 6.0)


def mesh_volume_ml(mesh: Mesh) -> float:
    """Enclosed volume in mL (signed: positive for a closed, outward-oriented mesh in mm)."""
    return _signed_volume(mesh.vertices, mesh.faces) / 1000.0


def face_normals(mesh: Mesh) -> np.ndarray:
    """(M, 3) unit normals of the triangles (zero for degenerate triangles)."""
    v = mesh.vertices
    n = np.cross(v[mesh.faces[:, 1]] - v[mesh.faces[:, 0]], v[mesh.faces[:, 2]] - v[mesh.faces[:, 0]])
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, length, out=np.zeros_like(n), where=length > 0)


# -- output -------------------------------------------------------------------------
def write_stl(mesh: Mesh, path: str | os.PathLike) -> None:
    """Write a binary STL (coordinates in LPS mm, header "LiverTumorSeg SPACE=LPS"), atomically.

    Raises:
        OutputError: if the file cannot be written.
    """
    records = np.zeros(len(mesh.faces), dtype=_STL_DTYPE)
    records["normal"] = face_normals(mesh)
    records["vertices"] = mesh.vertices[mesh.faces]
    header = STL_HEADER.ljust(80, b" ")
    count = np.array([len(records)], dtype="<u4").tobytes()

    atomic_write_bytes(Path(path), header + count + records.tobytes())


def write_obj(mesh: Mesh, path: str | os.PathLike) -> None:
    """Write a Wavefront OBJ (coordinates in LPS mm, comment "# SPACE=LPS"), atomically.

    Raises:
        OutputError: if the file cannot be written.
    """
    buffer = io.StringIO()
    buffer.write("# SPACE=LPS\n# LiverTumorSeg surface, coordinates in mm\n")
    np.savetxt(buffer, mesh.vertices, fmt="v %.6f %.6f %.6f")
    np.savetxt(buffer, mesh.faces + 1, fmt="f %d %d %d")
    atomic_write_text(Path(path), buffer.getvalue())

"""Preprocessing: check the CT, resample it onto the model's grid, scale intensities.

The model grid is axis-aligned in the card's orientation (``"LPS"``: i to patient
left, j to posterior, k to superior) at the card's spacing, and covers the physical
bounding box of the input, so any input direction (flipped, permuted or oblique) and
any spacing works. Resampling is linear; outside the input is air (-1024 HU).
"""

from __future__ import annotations

import numpy as np

from .boxes import bounding_box
from .errors import InputError
from .model.card import IntensityTransform, ModelCard, direction_from_orientation
from .volume import Volume

AIR_HU = -1024.0
BODY_THRESHOLD_HU = -500.0
PADDING_BELOW_HU = -3100.0


#: Voxel types the engine reads (SimpleITK resamples them); others are refused with a hint.
VOXEL_TYPES = tuple(np.dtype(t) for t in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                                          "float32", "float64"))


def check_volume(volume) -> None:
    """Refuse (:class:`InputError`) what is not a 3D :class:`Volume` the engine can
    resample: another type (a bare array, a path), an array that is not 3D or of a voxel
    type SimpleITK cannot take, or a geometry that is not 3 positive finite spacings, 3
    finite origin values and an orthonormal 3x3 direction. Python API users get one line
    instead of an error from deep inside numpy or ITK. Byte order and float16 are
    accepted (:func:`as_resamplable` converts them)."""
    if not isinstance(volume, Volume):
        raise InputError(f"expected a Volume, not {type(volume).__name__}: read a file with "
                         "LiverTumorSegLib.read_volume(path), or wrap an array as "
                         "Volume(array_zyx, spacing_xyz, origin_xyz, direction)")
    a = volume.array
    if not isinstance(a, np.ndarray):
        raise InputError(f"Volume.array must be a numpy array, not {type(a).__name__}")
    if a.ndim != 3:
        raise InputError(f"the volume must be 3D (z, y, x); its array has shape {a.shape}")
    if a.dtype == np.bool_:
        raise InputError("the volume is boolean (a mask), not a CT in Hounsfield units")
    if a.dtype.newbyteorder("=") not in VOXEL_TYPES + (np.dtype(np.float16),):
        raise InputError(f"voxel type {a.dtype} is not supported: convert it first, e.g. "
                         "Volume(array.astype(numpy.float32), ...)")
    spacing, origin = np.asarray(volume.spacing, dtype=float), np.asarray(volume.origin, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"spacing must be 3 positive values in mm (x, y, z), not {volume.spacing}")
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise InputError(f"origin must be 3 finite values in mm (x, y, z), not {volume.origin}")
    direction = np.asarray(volume.direction, dtype=float)
    if direction.shape != (3, 3) or not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(f"direction must be an invertible 3x3 matrix of direction cosines, not "
                         f"{direction.round(4).tolist()}")
    if not volume.is_orthonormal():
        raise InputError(f"direction must be orthonormal (unit columns at right angles; spacing goes in "
                         f"Volume.spacing), not {direction.round(4).tolist()}: a sheared grid, such as a "
                         "gantry tilt, would give wrong volumes and distances; resample it first (e.g. "
                         "3D Slicer's DICOM import corrects a gantry tilt)")


def as_resamplable(volume: Volume) -> Volume:
    """``volume`` with an array SimpleITK takes: native byte order (big-endian arrays come
    from some NIfTI and Analyze files) and float16 as float32; the same object when it
    already is."""
    a = volume.array
    half = a.dtype.kind == "f" and a.dtype.itemsize == 2  # either byte order
    wanted = np.dtype(np.float32) if half else a.dtype.newbyteorder("=")
    return volume if a.dtype == wanted else volume.with_array(a.astype(wanted))


def validate_ct(volume: Volume, *, allow_non_ct: bool = False) -> None:
    """Refuse volumes that cannot be a CT in Hounsfield units.

    Checks: a 3D :class:`Volume` (:func:`check_volume`), finite voxels, not constant,
    spacing in a sane range, and (unless
    ``allow_non_ct``) intensities that look like HU: some voxels at or below -500
    (air or lung, present in every abdominal CT field of view) and values within
    [-3100, 32767].
    """
    check_volume(volume)
    a = volume.array
    if a.size == 0:
        raise InputError("the volume is empty (no voxels)")
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            bad = int(a.size - np.count_nonzero(finite))
            raise InputError(f"the volume has {bad} NaN or Inf voxels; fix or crop the image before segmenting")
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        raise InputError(f"the volume is constant (every voxel is {lo:g}); there is nothing to segment")
    check_spacing(volume.spacing)
    if not allow_non_ct:
        if 0 <= lo and hi < 256 and np.issubdtype(a.dtype, np.integer):
            values = _label_values(a, int(hi))
            if values is not None:
                shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
                raise InputError(
                    f"this looks like a label map ({len(values)} distinct value{'s' if len(values) > 1 else ''}: "
                    f"{shown}), not a CT in Hounsfield units; pass the CT image itself (a label map is the "
                    "output, not the input)")
        # Below -3100 HU is no tissue nor air: outside-field-of-view padding (-32768,
        # -3024...) is common, but then real air must be there too.
        if lo > BODY_THRESHOLD_HU or (lo < PADDING_BELOW_HU and not _has_air(a)):
            raise InputError(
                f"intensities range {lo:g}..{hi:g}, which does not look like a CT in Hounsfield units "
                "(no air between -3100 and -500 HU). Is this an MR or a rescaled image? Use --allow-non-ct to run "
                "anyway."
            )


def check_spacing(spacing) -> None:
    """Refuse a voxel spacing no CT has (e.g. a NIfTI whose units say metres); checked
    from the header too, before the memory estimate, which such a spacing inflates."""
    if min(spacing) < 0.05 or max(spacing) > 50:
        raise InputError(f"voxel spacing {tuple(float(s) for s in spacing)} mm is implausible for a CT "
                         "(are the header's units right?)")


def _has_air(a: np.ndarray) -> bool:
    """Whether some voxel lies in [-3100, -500] HU (air, lung), slab by slab."""
    for slab in (a if a.ndim > 1 else a[None]):
        if np.count_nonzero((slab >= PADDING_BELOW_HU) & (slab <= BODY_THRESHOLD_HU)):
            return True
    return False


def _label_values(a: np.ndarray, hi: int, most: int = 16):
    """The distinct values of a non-negative integer array below 256 when there are at most
    ``most`` of them, else None. A random sample of about a million voxels rules most images
    out at once; otherwise the whole array is counted slab by slab (no full-size copy)."""
    rng = np.random.default_rng(0)
    sample = a.flat[rng.integers(0, a.size, size=min(a.size, 1 << 20))]
    if np.count_nonzero(np.bincount(sample, minlength=hi + 1)) > most:
        return None
    counts = np.zeros(hi + 1, dtype=np.int64)
    for slab in (a if a.ndim > 1 else a[None]):  # one slab at a time: copies stay slab-sized
        counts += np.bincount(slab.ravel(), minlength=hi + 1)
    values = np.flatnonzero(counts)
    return values if len(values) <= most else None


#: An extent this fraction of a model voxel over a whole number of voxels gets no extra
#: voxel: spacings that differ in the last digits (3.0 in DICOM, 3.0000925 from float
#: positions or a float32 NIfTI header) then give one grid, not grids half a voxel apart.
GRID_SLACK = 0.01


def model_grid_for(volume: Volume, card: ModelCard) -> Volume:
    """An empty (zero-size array) geometry template for the model grid of ``volume``.

    Returns a Volume whose ``array`` has the model grid's shape (uint8 zeros are not
    allocated: a broadcast view) with the card's spacing and orientation, covering the
    physical bounding box of ``volume`` (to within :data:`GRID_SLACK` of a voxel).
    """
    direction = direction_from_orientation(card.orientation)
    spacing = np.asarray(card.spacing_mm, dtype=np.float64)
    corners_ijk = np.array([[i, j, k] for i in (-0.5, volume.shape_xyz[0] - 0.5)
                            for j in (-0.5, volume.shape_xyz[1] - 0.5)
                            for k in (-0.5, volume.shape_xyz[2] - 0.5)])
    m = volume.ijk_to_lps()
    corners = corners_ijk @ m[:3, :3].T + m[:3, 3]
    local = corners @ direction  # coordinates along the model axes (direction is orthonormal)
    lo, hi = local.min(axis=0), local.max(axis=0)
    size = np.maximum(np.ceil((hi - lo) / spacing - GRID_SLACK).astype(int), 1)
    centre = (lo + hi) / 2.0
    first_centre_local = centre - (size - 1) * spacing / 2.0
    origin = direction @ first_centre_local
    shape_zyx = (int(size[2]), int(size[1]), int(size[0]))
    template = np.broadcast_to(np.zeros((), dtype=np.uint8), shape_zyx)
    return Volume(array=template, spacing=tuple(spacing), origin=tuple(origin), direction=direction)


def resample_to(volume: Volume, reference: Volume, *, interpolation: str = "linear",
                default_value: float = AIR_HU, dtype=np.float32) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid (physical alignment, LPS)."""
    import SimpleITK as sitk

    ref = sitk.Image([int(s) for s in reference.shape_xyz], sitk.sitkUInt8)
    ref.SetSpacing(reference.spacing)
    ref.SetOrigin(reference.origin)
    ref.SetDirection(tuple(reference.direction.flatten()))
    src = volume.to_sitk()
    if src.GetPixelID() not in (sitk.sitkFloat32,) and dtype == np.float32:
        src = sitk.Cast(src, sitk.sitkFloat32)
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolation]
    out = sitk.Resample(src, ref, sitk.Transform(), interp, float(default_value), src.GetPixelID())
    return reference.with_array(sitk.GetArrayFromImage(out).astype(dtype, copy=False))


def to_model_grid(volume: Volume, card: ModelCard) -> Volume:
    """Resample a CT (HU) onto the model grid; returns float32 HU."""
    template = model_grid_for(volume, card)
    if template.same_grid(volume):
        return volume.with_array(volume.array.astype(np.float32, copy=False))
    return resample_to(volume, template)


def resolve_intensity(hu: np.ndarray, transform: IntensityTransform) -> IntensityTransform:
    """The fixed window ``transform`` amounts to for the volume ``hu``: itself in
    ``"window"`` mode; in ``"minmax"`` mode a window on ``hu``'s own min..max. Scaling a
    crop of a volume with the window resolved on the whole volume scales it as training
    did (the whole volume's min..max), whatever the crop leaves out."""
    if transform.mode == "window":
        return transform
    lo, hi = float(hu.min()), float(hu.max())
    if hi <= lo:
        hi = lo + 1.0
    return IntensityTransform("window", (lo, hi), tuple(transform.output_range))


def scale_intensity(hu: np.ndarray, transform: IntensityTransform) -> np.ndarray:
    """Map HU to network input as the card's intensity transform says (float32); in
    ``"minmax"`` mode on ``hu``'s own min..max (see :func:`resolve_intensity`)."""
    out_lo, out_hi = transform.output_range
    lo, hi = resolve_intensity(hu, transform).window_hu
    scale = (out_hi - out_lo) / (hi - lo)
    out = np.empty_like(hu, dtype=np.float32, subok=False)  # keeps the input's memory layout
    np.clip(hu, lo, hi, out=out)
    out -= lo
    out *= scale
    out += out_lo
    return out


def air_value(transform: IntensityTransform) -> float:
    """The network input value of air (-1024 HU), with which patches are padded beyond
    the image (inference, and validation during training). In ``"minmax"`` mode, the
    bottom of the output range: the volume's minimum, as training pads its subjects."""
    return float(scale_intensity(np.array([-1024.0], np.float32), transform)[0])


def body_bounding_box(hu: np.ndarray, margin: int = 4, threshold: float = BODY_THRESHOLD_HU):
    """Slices (z, y, x) of the box around voxels denser than ``threshold`` HU, grown by
    ``margin`` voxels; None when no voxel is that dense (an empty scan)."""
    return bounding_box(hu > threshold, margin)

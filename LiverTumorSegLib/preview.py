"""A quick-look PNG: axial and coronal CT slices with the liver and tumor overlaid.

Display follows radiological convention whatever the storage order of the volume:
axial with the patient's right on the image's left and anterior up; coronal with
superior up and the patient's right on the image's left. The orientation is derived
from the direction matrix (nearest axis permutation and flips, as DICOM viewers do for
oblique volumes), using array views so no full-volume copy is made. Pixels are
resampled to squares in mm. The PNG is written with SimpleITK (no matplotlib or PIL).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import InputError, OutputError
from .volume import Volume

LIVER_RGB = (230, 60, 40)
TUMOR_RGB = (60, 230, 60)
TUMOR_OUTLINE_RGB = (255, 240, 0)
LIVER_ALPHA = 0.35
TUMOR_ALPHA = 0.5
OUTLINE_ALPHA = 0.9
MAX_PANEL_PIXELS = 768
MIN_PANEL_PIXELS = 384
GAP_PIXELS = 4


def write_preview_png(
    ct: Volume,
    labels: Volume,
    path: str | os.PathLike,
    *,
    window: tuple = (-160, 240),
) -> None:
    """Write one PNG with an axial and a coronal slice side by side, labels overlaid.

    Both slices pass through the centre of mass of the largest lesion (26-connected
    tumor component), else of the liver (labels 1 and 2), else through the middle of
    the volume. The CT is mapped to
    grey over ``window`` = (lowest, highest) HU; liver is tinted red, tumor green with a
    yellow outline.

    Args:
        ct: CT volume in HU.
        labels: label map (0 background, 1 liver parenchyma, 2 tumor) on the CT grid.
        path: output ``.png`` file; written atomically.
        window: display window (low, high) in HU.

    Raises:
        InputError: if the volumes are not 3D on the same grid or the window is empty.
        OutputError: if the file cannot be written.
    """
    if np.asarray(ct.array).ndim != 3 or not labels.same_grid(ct):
        raise InputError("The preview needs a 3D CT and a label map on the same grid.")
    low, high = float(window[0]), float(window[1])
    if high <= low:
        raise InputError(f"The display window must have low < high HU; got {window}.")

    ct_view, spacing = _radiological_view(np.asarray(ct.array), ct.direction, ct.spacing)
    lab_view, _ = _radiological_view(np.asarray(labels.array), ct.direction, ct.spacing)
    s_index, p_index = _focus(lab_view)
    sp_s, sp_p, sp_l = spacing
    extent = max(n * s for n, s in zip(lab_view.shape, spacing))
    pixel = min(max(min(sp_l, sp_p), extent / MAX_PANEL_PIXELS), extent / MIN_PANEL_PIXELS)

    axial = _panel(ct_view[s_index], lab_view[s_index], (sp_p, sp_l), pixel, low, high)
    coronal = _panel(ct_view[::-1, p_index], lab_view[::-1, p_index], (sp_s, sp_l), pixel, low, high)
    height = max(axial.shape[0], coronal.shape[0])
    canvas = np.zeros((height, axial.shape[1] + GAP_PIXELS + coronal.shape[1], 3), dtype=np.uint8)
    canvas[:axial.shape[0], :axial.shape[1]] = axial
    canvas[:coronal.shape[0], axial.shape[1] + GAP_PIXELS:] = coronal
    _write_png(canvas, path)


def _radiological_view(array: np.ndarray, direction: np.ndarray, spacing: tuple) -> tuple:
    """View of a (z, y, x) array reordered to (S, P, L) axes, and its (S, P, L) spacing in mm.

    Index increases toward superior, posterior and the patient's left along the three
    axes of the view. Each i, j, k axis goes to the LPS axis it is closest to (the
    permutation with the largest total alignment), flipped where it points the other way.
    """
    d = np.asarray(direction, dtype=np.float64)
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[p[i], i]) for i in range(3)))
    axes, flips, out_spacing = [], [], []
    for lps_axis in (2, 1, 0):
        ijk_axis = best.index(lps_axis)
        axes.append(2 - ijk_axis)
        flips.append(d[lps_axis, ijk_axis] < 0)
        out_spacing.append(float(spacing[ijk_axis]))
    view = np.transpose(array, axes)
    view = view[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return view, tuple(out_spacing)


def _largest_lesion(labels: np.ndarray) -> np.ndarray:
    """Mask of the largest 26-connected tumor component (found inside the tumor's box;
    with several lesions, their joint centre of mass can lie in healthy liver)."""
    from .boxes import bounding_box
    from .postprocess import largest_component

    mask = np.zeros(labels.shape, dtype=bool)
    box = bounding_box(labels == 2)
    if box is not None:
        mask[box] = largest_component(labels[box] == 2)
    return mask


def _focus(labels: np.ndarray) -> tuple:
    """(S, P) indices of the largest lesion's, else the liver's, centre of mass, else the middle."""
    for mask in (_largest_lesion(labels), labels != 0):
        s_counts = np.count_nonzero(mask, axis=(1, 2))
        total = s_counts.sum()
        if total:
            p_counts = np.count_nonzero(mask, axis=(0, 2))
            s = int(round(float(np.dot(s_counts, np.arange(len(s_counts)))) / total))
            p = int(round(float(np.dot(p_counts, np.arange(len(p_counts)))) / total))
            return s, p
    return labels.shape[0] // 2, labels.shape[1] // 2


def _panel(ct: np.ndarray, labels: np.ndarray, spacing: tuple, pixel: float, low: float, high: float) -> np.ndarray:
    """RGB uint8 image of one 2D slice, resampled to square ``pixel``-mm pixels."""
    shape = tuple(max(1, int(round(n * s / pixel))) for n, s in zip(ct.shape, spacing))
    grey = _resample(np.asarray(ct, dtype=np.float32), shape, linear=True)
    lab = _resample(np.asarray(labels), shape, linear=False)
    grey = np.clip((grey - low) / (high - low), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    _blend(rgb, lab != 0, LIVER_RGB, LIVER_ALPHA)
    _blend(rgb, lab == 2, TUMOR_RGB, TUMOR_ALPHA)
    _blend(rgb, _outline(lab != 0), LIVER_RGB, OUTLINE_ALPHA)
    _blend(rgb, _outline(lab == 2), TUMOR_OUTLINE_RGB, OUTLINE_ALPHA)
    return np.round(rgb).astype(np.uint8)


def _resample(image: np.ndarray, shape: tuple, linear: bool) -> np.ndarray:
    """Resize a 2D array to ``shape`` (pixel centres aligned), linear or nearest."""
    out = image
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
        if not linear:
            out = np.take(out, np.round(pos).astype(np.intp), axis=axis)
            continue
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        weight = (pos - lo).astype(np.float32)
        weight = weight[:, None] if axis == 0 else weight[None, :]
        out = np.take(out, lo, axis=axis) * (1 - weight) + np.take(out, hi, axis=axis) * weight
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _blend(rgb: np.ndarray, mask: np.ndarray, color: tuple, alpha: float) -> None:
    """Alpha-blend ``color`` over ``rgb`` (float, in place) where ``mask`` is true."""
    if mask.any():
        rgb[mask] = rgb[mask] * (1.0 - alpha) + np.asarray(color, dtype=np.float64) * alpha


def _write_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    """Write an (H, W, 3) uint8 array as PNG via SimpleITK, atomically."""
    import SimpleITK as sitk

    target = Path(path)
    try:
        with atomic_path(target) as tmp:
            sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp))
    except (OSError, RuntimeError) as exc:
        raise OutputError(f"Cannot write {target}: {exc}. Choose a writable output folder.") from exc

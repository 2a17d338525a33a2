"""Overlay pictures shared by TensorBoard logging and the evaluation report.

Colours: liver green, tumor red, blended over the grey CT slice. Arrays are 2D
(rows, columns) slices of (z, y, x) volumes; images come back as uint8 RGB.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

COLOURS = {1: (0.1, 0.85, 0.2), 2: (0.95, 0.1, 0.1)}


def grey(slice_2d: np.ndarray, low: Optional[float] = None, high: Optional[float] = None) -> np.ndarray:
    """Map a slice onto [0, 1] between ``low`` and ``high`` (default: its min and max)."""
    a = np.asarray(slice_2d, dtype=np.float32)
    lo = float(a.min()) if low is None else float(low)
    hi = float(a.max()) if high is None else float(high)
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def overlay_rgb(grey_2d: np.ndarray, labels_2d: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend label colours over a [0, 1] grey slice; returns (H, W, 3) uint8."""
    rgb = np.repeat(np.asarray(grey_2d, dtype=np.float32)[..., None], 3, axis=2)
    for label, colour in COLOURS.items():
        mask = labels_2d == label
        if mask.any():
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def side_by_side(grey_2d: np.ndarray, reference_2d: np.ndarray, prediction_2d: np.ndarray) -> np.ndarray:
    """Reference overlay | prediction overlay, separated by a white bar; (H, 2W+2, 3) uint8."""
    left = overlay_rgb(grey_2d, reference_2d)
    right = overlay_rgb(grey_2d, prediction_2d)
    bar = np.full((left.shape[0], 2, 3), 255, dtype=np.uint8)
    return np.concatenate([left, bar, right], axis=1)


def most_informative_slice(labels: np.ndarray) -> int:
    """Index along axis 0 of the slice with the most tumor (else liver) voxels; the
    middle slice when there is neither."""
    for label in (2, 1):
        counts = (labels == label).reshape(labels.shape[0], -1).sum(axis=1)
        if counts.max() > 0:
            return int(np.argmax(counts))
    return labels.shape[0] // 2


def enlarge(picture: np.ndarray, min_height: int = 256) -> np.ndarray:
    """Repeat pixels (an integer factor) until the picture is at least ``min_height`` tall."""
    factor = max(1, int(np.ceil(min_height / max(picture.shape[0], 1))))
    return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)

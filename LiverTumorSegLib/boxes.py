"""Bounding boxes of masks, as slices of (z, y, x) arrays."""

from __future__ import annotations

from typing import Optional

import numpy as np


def bounding_box(mask: np.ndarray, margin: int = 0) -> Optional[tuple]:
    """Slices around the True voxels of ``mask``, grown by ``margin`` voxels and
    clipped to the array; None when the mask is empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)

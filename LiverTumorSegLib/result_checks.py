"""Checks of a result that turn into warnings (stderr, ``stats.json``'s ``run.warnings``,
Slicer's status line): figures that would look plausible but need a look. Plain numpy,
no torch: the Slicer module runs them when statistics are updated from edited segments.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .preprocess import BODY_THRESHOLD_HU


#: Above this share of the found liver in air, the result is flagged (see below).
LIVER_IN_AIR_WARNING = 0.10


def liver_in_air_warning(labels: np.ndarray, hu: np.ndarray) -> Optional[str]:
    """A warning when much of the found liver lies in air (below -500 HU): what a scan
    that misses the liver (a thin slab, a crop outside the abdomen) or a non-CT image
    gives, where the numbers would otherwise look plausible. None when all is well."""
    liver = labels > 0
    found = int(np.count_nonzero(liver))
    if not found:
        return None
    in_air = int(np.count_nonzero(hu[liver] < BODY_THRESHOLD_HU))
    if in_air <= LIVER_IN_AIR_WARNING * found:
        return None
    return (f"{100.0 * in_air / found:.0f} % of the liver found lies in air (below -500 HU): the scan may not cover "
            "the liver, or not be an abdominal CT in HU; check the result before using its figures")


#: Above this share of the kept liver, liver-labelled parts left out are flagged.
LEFT_OUT_WARNING = 0.05


def left_out_warning(left_out_ml: float, liver_ml: float) -> Optional[str]:
    """A warning when postprocessing left out liver-labelled parts of more than 5 % of
    the liver kept: a lobe that looks disconnected at the model's resolution, or a
    large false positive elsewhere. Either way, the volume needs a look."""
    if left_out_ml <= LEFT_OUT_WARNING * max(liver_ml, 0.0):
        return None
    return (f"{left_out_ml:.1f} mL labelled liver apart from the liver region kept ({liver_ml:.1f} mL) was left "
            "out: a lobe the model sees as disconnected, or a false positive; check the liver volume")


def image_edge_warning(stats: dict) -> Optional[str]:
    """A warning when the liver found reaches the edge of the image (a scan that stops
    inside the liver, a crop): its volume is then a lower bound. None otherwise."""
    edges = stats["liver"].get("image_edges") or []
    if not edges:
        return None
    return (f"the liver reaches the {', '.join(edges)} edge{'s' if len(edges) > 1 else ''} of the image: it may go on "
            f"outside the scan, so its volume ({stats['liver']['volume_ml']:.1f} mL) is a lower bound")


def result_warnings(labels: np.ndarray, hu: np.ndarray, stats: dict,
                    left_out_ml: Optional[float] = None) -> list:
    """Every warning about a result: the liver in air, reaching the image's edge, and
    (when postprocessing ran: ``left_out_ml``) much liver left out."""
    found = (liver_in_air_warning(labels, hu), image_edge_warning(stats),
             None if left_out_ml is None else left_out_warning(left_out_ml, stats["liver"]["volume_ml"]))
    return [warning for warning in found if warning]

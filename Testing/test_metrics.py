"""Evaluation metrics against hand-computed values: overlap, surface distances in mm,
LiTS-style lesion detection by diameter, and the engine-based scoring of one case."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "Training") not in sys.path:
    sys.path.insert(0, str(REPO / "Training"))

pytest.importorskip("scipy", reason="scipy is needed for surface distances")

from livertumorseg_training.metrics import detection_summary, lesion_detection, mean_of, overlap_metrics  # noqa: E402

from LiverTumorSegLib.volume import Volume  # noqa: E402


def _box(shape, z, y, x):
    m = np.zeros(shape, dtype=bool)
    m[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return m


def test_overlap_counts_and_rates():
    ref = _box((10, 10, 10), (2, 6), (2, 6), (2, 6))      # 64 voxels
    pred = _box((10, 10, 10), (2, 6), (2, 6), (4, 8))     # 64 voxels, 32 shared
    m = overlap_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(0.5)
    assert m["iou"] == pytest.approx(32 / 96)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx((1000 - 96) / (1000 - 64))


def test_surface_distances_are_in_millimetres():
    ref = _box((20, 20, 20), (5, 10), (5, 10), (5, 10))
    shifted = _box((20, 20, 20), (5, 10), (5, 10), (7, 12))  # 2 voxels along x
    m = overlap_metrics(shifted, ref, (1.0, 1.0, 3.0))      # x voxels are 3 mm
    assert m["hd95_mm"] == pytest.approx(6.0)
    assert 0.0 < m["assd_mm"] < 6.0
    same = overlap_metrics(ref, ref, (1.0, 1.0, 3.0))
    assert same["dice"] == 1.0 and same["hd95_mm"] == 0.0 and same["assd_mm"] == 0.0


def test_empty_masks_follow_the_conventions():
    empty = np.zeros((5, 5, 5), dtype=bool)
    some = _box((5, 5, 5), (1, 3), (1, 3), (1, 3))
    both = overlap_metrics(empty, empty, (1, 1, 1))
    assert both["dice"] == 1.0 and both["iou"] == 1.0 and both["hd95_mm"] is None and both["assd_mm"] is None
    missed = overlap_metrics(empty, some, (1, 1, 1))
    assert missed["dice"] == 0.0 and missed["hd95_mm"] is None and missed["sensitivity"] == 0.0
    assert mean_of([1.0, None, 0.0]) == 0.5 and mean_of([None]) is None


def test_lesion_detection_by_size():
    shape = (40, 40, 40)
    geometry = Volume(np.zeros(shape, np.uint8), spacing=(1.0, 1.0, 1.0))
    big = _box(shape, (2, 27), (2, 27), (2, 27))          # ~41.6 mm diagonal: > 20 mm
    small = _box(shape, (32, 36), (32, 36), (32, 36))     # ~5.2 mm: < 10 mm
    medium = _box(shape, (2, 10), (30, 38), (30, 38))      # ~12.1 mm: 10-20 mm
    reference = big | small | medium
    prediction = _box(shape, (3, 27), (2, 27), (2, 27)) | _box(shape, (33, 36), (33, 36), (33, 36)) \
        | _box(shape, (30, 34), (2, 6), (2, 6))            # hit, weak hit (IoU 27/64), false positive
    result = lesion_detection(prediction, reference, geometry, iou_threshold=0.5)
    detected = sorted((round(r["diameter_mm"]), r["detected"]) for r in result["reference"])
    assert detected == [(5, False), (12, False), (42, True)]
    assert sum(p["true_positive"] for p in result["predicted"]) == 1 and len(result["predicted"]) == 3

    summary = detection_summary([result])
    assert summary["overall"]["recall"] == pytest.approx(1 / 3)
    assert summary["overall"]["precision"] == pytest.approx(1 / 3)
    assert summary["overall"]["f1"] == pytest.approx(1 / 3)
    assert summary["by_diameter"][">20mm"]["recall"] == 1.0
    assert summary["by_diameter"]["<10mm"]["reference_lesions"] == 1
    assert summary["by_diameter"]["10-20mm"]["predicted_lesions"] == 0
    any_overlap = detection_summary([result], iou_threshold=0.0)
    assert any_overlap["overall"]["recall"] == pytest.approx(2 / 3)


def test_score_case_liver_is_the_whole_organ():
    from livertumorseg_training.evaluation import score_case

    shape = (20, 20, 20)
    ref = np.zeros(shape, np.uint8)
    ref[4:16, 4:16, 4:16] = 1
    ref[8:12, 8:12, 8:12] = 2
    pred = ref.copy()
    pred[8:12, 8:12, 8:12] = 1                              # tumor called liver
    scores = score_case(Volume(pred, (2.0, 2.0, 2.0)), Volume(ref, (2.0, 2.0, 2.0)))
    assert scores["liver"]["dice"] == 1.0
    assert scores["tumor"]["dice"] == 0.0
    assert scores["lesions"]["reference"][0]["detected"] is False
    liver_only = score_case(Volume(pred, (2.0, 2.0, 2.0)), Volume((ref > 0).astype(np.uint8), (2.0, 2.0, 2.0)),
                            liver_only=True)
    assert set(liver_only) == {"liver"}


def test_means_say_which_cases_their_surface_distances_leave_out():
    """A missed tumour has no HD95; the mean over the others must not pass for all cases."""
    from livertumorseg_training.evaluation import failed_cases, mean_metrics, score_case

    spacing = (2.0, 2.0, 2.0)
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[4:16, 4:16, 4:16] = 1
    ref[8:12, 8:12, 8:12] = 2
    found, missed, healthy = ref.copy(), ref.copy(), ref.copy()
    missed[ref == 2] = 1                     # the tumour called liver: missed
    healthy_ref = (ref > 0).astype(np.uint8)
    healthy[5:7, 5:7, 5:7] = 2               # a tumour found in a healthy liver
    per_case = {"a": score_case(Volume(found, spacing), Volume(ref, spacing)),
                "b": score_case(Volume(missed, spacing), Volume(ref, spacing)),
                "c": score_case(Volume(healthy, spacing), Volume(healthy_ref, spacing))}
    tumor = mean_metrics(per_case)["tumor"]
    assert tumor["cases"] == 3 and tumor["hd95_mm_cases"] == 1 and tumor["assd_mm_cases"] == 1
    assert tumor["missed"] == 1 and tumor["false_positive"] == 1 and tumor["both_empty"] == 0
    none_found = {"d": score_case(Volume(healthy_ref, spacing), Volume(healthy_ref, spacing))}  # no tumor, none found
    tumor_free = mean_metrics({**per_case, **none_found})["tumor"]
    assert tumor_free["both_empty"] == 1 and tumor_free["hd95_mm_cases"] == 1 and tumor_free["hd95_mm"] == 0.0
    assert tumor_free["dice"] == pytest.approx(2.0 / 4.0)  # a tumor-free case found tumor-free counts as Dice 1
    assert tumor["hd95_mm"] == 0.0 and tumor["dice"] == pytest.approx(1.0 / 3.0)
    assert failed_cases(per_case, "tumor") == {"missed": ["b"], "false_positive": ["c"]}
    assert mean_metrics(per_case)["liver"]["missed"] == 0

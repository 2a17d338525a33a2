"""Evaluation metrics against hand-computed values: overlap, surface distances in mm,
LiTS-style lesion detection by diameter, and the engine-based scoring of one case."""

from __future__ import annotations

import csv
import io
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


# -- from a mutation review: surface distances, rates, lesion matching, the report ----


def _oracle_surface_distances(a, b, spacing_zyx):
    """Brute force: surface = voxels with a 6-neighbour outside the mask (outside the
    array counts as outside); every surface voxel of one to every one of the other."""
    def surface(m):
        p = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(p, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing_zyx, dtype=float)

    pa, pb = surface(a), surface(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


def test_hd95_and_assd_equal_a_brute_force_oracle_on_asymmetric_anisotropic_masks():
    """HD95 and ASSD equal a brute-force computation on asymmetric masks with three
    different spacings: another percentile, the maximum, the smaller of the two
    directions, a spacing reversed, a 26-connected surface or a crop from one mask
    alone would each differ."""
    shape = (22, 24, 26)
    spacing = (2.5, 0.8, 1.3)  # (z, y, x), all different
    idx = np.indices(shape, dtype=float)
    ref = (((idx[0] - 11) / 8) ** 2 + ((idx[1] - 12) / 9) ** 2 + ((idx[2] - 13) / 10) ** 2) <= 1.0
    pred = (((idx[0] - 10) / 5) ** 2 + ((idx[1] - 13) / 6) ** 2 + ((idx[2] - 12) / 7) ** 2) <= 1.0
    pred |= _box(shape, (9, 11), (11, 13), (21, 23))  # a small protrusion: directed p95 != max
    d_pr, d_rp = _oracle_surface_distances(pred, ref, spacing)
    want_hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    want_assd = (d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size)
    got = overlap_metrics(pred, ref, spacing)
    assert got["hd95_mm"] == pytest.approx(want_hd95, rel=1e-9)
    assert got["assd_mm"] == pytest.approx(want_assd, rel=1e-9)
    # the argument order does not matter (HD95 is symmetric by definition)
    assert overlap_metrics(ref, pred, spacing)["hd95_mm"] == pytest.approx(want_hd95, rel=1e-9)


def test_specificity_and_sensitivity_with_unequal_errors_and_no_reference():
    """Specificity is tn / (tn + fp), here where fp and fn differ; sensitivity is
    undefined (None) without reference voxels, so tumour-free cases do not raise the
    mean tumour sensitivity."""
    from livertumorseg_training.evaluation import mean_metrics

    ref = _box((10, 10, 10), (2, 6), (2, 6), (2, 6))                    # 64 voxels
    pred = _box((10, 10, 10), (2, 4), (2, 6), (2, 6)) | _box((10, 10, 10), (8, 9), (0, 2), (0, 4))  # 32 in, 8 out
    m = overlap_metrics(pred, ref, (1, 1, 1))
    assert m["sensitivity"] == pytest.approx(32 / 64)
    assert m["specificity"] == pytest.approx((1000 - 72) / (1000 - 64))
    empty = np.zeros((10, 10, 10), bool)
    assert overlap_metrics(empty, empty, (1, 1, 1))["sensitivity"] is None
    rows = {"a": {"tumor": m}, "b": {"tumor": overlap_metrics(empty, empty, (1, 1, 1))}}
    assert mean_metrics(rows)["tumor"]["sensitivity"] == pytest.approx(0.5)


def test_lesion_matching_connectivity_split_predictions_ties_bins_and_volumes():
    """Lesions are 26-connected; a reference lesion's IoU counts every predicted
    component touching it; precision counts true-positive predictions; an IoU exactly
    at the threshold detects; a 10 mm lesion is in the 10-20 mm bin; each lesion has
    its own volume; a bin without reference lesions has no recall."""
    shape = (30, 30, 40)
    geometry = Volume(np.zeros(shape, np.uint8), spacing=(1.0, 1.0, 2.0))  # voxels 0.002 mL
    # reference lesion 1: two cubes touching only at a corner -> ONE lesion (26-connected)
    corner = _box(shape, (1, 4), (1, 4), (1, 4)) | _box(shape, (4, 7), (4, 7), (4, 7))
    # reference lesion 2: 4x4x9, predicted as two 4x4x4 halves with a one-voxel gap
    long_ref = _box(shape, (10, 14), (10, 14), (0, 9))
    halves = _box(shape, (10, 14), (10, 14), (0, 4)) | _box(shape, (10, 14), (10, 14), (5, 9))
    # reference lesion 3: 4x4x4, predicted by its half: IoU exactly 0.5
    tie_ref = _box(shape, (20, 24), (20, 24), (20, 24))
    tie_pred = _box(shape, (20, 24), (20, 24), (20, 22))
    reference = corner | long_ref | tie_ref
    prediction = corner | halves | tie_pred
    result = lesion_detection(prediction, reference, geometry, iou_threshold=0.5)
    refs = sorted(result["reference"], key=lambda r: r["volume_ml"])
    assert len(refs) == 3
    assert [r["volume_ml"] for r in refs] == pytest.approx([54 * 0.002, 64 * 0.002, 144 * 0.002])
    by_volume = {round(r["volume_ml"] / 0.002): r for r in refs}
    assert by_volume[54]["detected"] and by_volume[54]["iou"] == 1.0
    assert by_volume[144]["iou"] == pytest.approx(128 / 144, abs=1e-4) and by_volume[144]["detected"]
    assert by_volume[64]["iou"] == 0.5 and by_volume[64]["detected"]  # "reaches" the threshold
    preds = result["predicted"]
    assert len(preds) == 4
    assert sum(p["true_positive"] for p in preds) == 2  # corner, tie; each half has IoU 64/144
    summary = detection_summary([result])["overall"]
    assert summary["recall"] == 1.0 and summary["precision"] == pytest.approx(2 / 4)

    # a lesion exactly 10 mm long is in the 10-20 mm bin; empty bins have no recall
    line = np.zeros((5, 5, 20), bool)
    line[2, 2, 2:13] = True  # 11 voxel centres 1 mm apart: 10.0 mm
    r = lesion_detection(line, line, Volume(np.zeros(line.shape, np.uint8), spacing=(1.0, 1.0, 1.0)))
    assert r["reference"][0]["diameter_mm"] == 10.0
    s = detection_summary([r])
    assert s["by_diameter"]["10-20mm"]["reference_lesions"] == 1
    assert s["by_diameter"][">20mm"]["recall"] is None and s["by_diameter"][">20mm"]["precision"] is None




def test_score_case_measures_surface_distances_in_mm_on_an_anisotropic_grid():
    """Surface distances in mm on an anisotropic grid: the Volume's (x, y, z) spacing
    must not be taken as (z, y, x). Every LiTS CT is anisotropic."""
    from livertumorseg_training.evaluation import score_case

    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:10, 5:10, 5:10] = 1
    pred = np.zeros_like(ref)
    pred[5:10, 5:10, 7:12] = 1  # shifted 2 voxels along x (the array's last axis)
    spacing_xyz = (3.0, 1.0, 1.0)  # x voxels are 3 mm
    scores = score_case(Volume(pred, spacing_xyz), Volume(ref, spacing_xyz), liver_only=True)
    assert scores["liver"]["hd95_mm"] == pytest.approx(6.0)


def test_mean_metrics_global_dice_undefined_distances_and_misplaced_predictions():
    """Global Dice has its factor 2; an undefined HD95 (no prediction) is left out of
    the mean, not averaged as 0 mm; a prediction in the wrong place is not 'missed'."""
    from livertumorseg_training.evaluation import failed_cases, mean_metrics

    shape = (20, 20, 20)
    ref = _box(shape, (2, 7), (2, 7), (2, 6))             # 100 voxels
    pred = _box(shape, (2, 7), (2, 7), (3, 7))            # 100 voxels, 75 shared
    far = _box(shape, (12, 17), (12, 17), (12, 16))       # 100 voxels, disjoint
    none = np.zeros(shape, bool)
    spacing = (1.0, 1.0, 1.0)
    per_case = {"hit": {"tumor": overlap_metrics(pred, ref, spacing)},
                "missed": {"tumor": overlap_metrics(none, ref, spacing)},
                "misplaced": {"tumor": overlap_metrics(far, ref, spacing)}}
    tumor = mean_metrics(per_case)["tumor"]
    assert tumor["global_dice"] == pytest.approx(2 * 75 / (200 + 100 + 200))
    hd = [per_case[c]["tumor"]["hd95_mm"] for c in ("hit", "misplaced")]
    assert tumor["hd95_mm"] == pytest.approx(sum(hd) / 2) and tumor["hd95_mm_cases"] == 2
    assert failed_cases(per_case, "tumor") == {"missed": ["missed"], "false_positive": []}
    # every case is either measured or counted as left out
    assert tumor["hd95_mm_cases"] + tumor["missed"] + tumor["false_positive"] + tumor["both_empty"] == tumor["cases"]


def test_detection_report_any_overlap_is_rethresholded_at_zero():
    """``any_overlap`` is the detection at IoU > 0, not at the main threshold."""
    from livertumorseg_training.evaluation import _detection

    lesions = [{"reference": [{"diameter_mm": 5.0, "iou": 0.2, "detected": False},
                              {"diameter_mm": 25.0, "iou": 0.9, "detected": True}],
                "predicted": [{"diameter_mm": 5.0, "iou": 0.2, "true_positive": False}]}]
    report = _detection(lesions, 0.5)
    assert report["overall"]["recall"] == 0.5
    assert report["any_overlap"]["overall"]["recall"] == 1.0 and report["any_overlap"]["overall"]["precision"] == 1.0


def test_evaluation_csv_and_lesion_counts_per_case(tmp_path):
    """A case's lesion counts and the CSV's columns: detected reference lesions differ
    from true-positive predictions when a lesion is found in two pieces, and the CSV
    keeps predicted and detected apart (evaluation with a stub segmenter)."""
    from types import SimpleNamespace

    from livertumorseg_training.dataset import Case
    from livertumorseg_training.evaluation import _evaluate_into

    from LiverTumorSegLib.io import write_volume

    shape = (16, 20, 24)
    ref = np.zeros(shape, np.uint8)
    ref[2:14, 2:18, 2:22] = 1
    ref[4:8, 4:8, 4:8] = 2          # found (IoU 1)
    ref[4:8, 4:8, 12:16] = 2        # found by two halves: detected, but neither half a TP
    ref[10:12, 12:14, 16:18] = 2    # missed
    pred = ref.copy()
    pred[10:12, 12:14, 16:18] = 1
    pred[4:8, 4:8, 13:15] = 1       # the second lesion found as two 4x4x1 slabs (x = 12 and 15)
    pred[10:12, 4:6, 4:6] = 2       # a false positive
    spacing = (0.8, 0.8, 2.5)
    ct = Volume(np.zeros(shape, np.int16), spacing=spacing)
    write_volume(ct, tmp_path / "c1_ct.nii.gz")
    write_volume(Volume(ref, spacing=spacing), tmp_path / "c1_label.nii.gz")

    class Stub:
        card = SimpleNamespace(name="stub", version="0", weights_sha256="0")
        model = SimpleNamespace(folder=tmp_path)
        options = SimpleNamespace(device="cpu")
        device, precision_name = "cpu", "fp32"

        def segment(self, volume):
            return SimpleNamespace(labels=volume.with_array(pred.copy()))

    case = Case("c1", tmp_path / "c1_ct.nii.gz", tmp_path / "c1_label.nii.gz")
    report = _evaluate_into(tmp_path / "out", Stub(), [case], False, 0.5, None, False, False)
    counts = report["cases"]["c1"]["lesion_counts"]
    # lesion 2 vs its two slabs: IoU 32/64 -> detected; each slab IoU 16/64 -> not a true positive,
    # so detected references (2) differ from true-positive predictions (1)
    assert counts == {"reference": 3, "predicted": 4, "detected": 2}
    row = next(csv.DictReader(io.StringIO((tmp_path / "out" / "metrics.csv").read_text(encoding="utf-8"))))
    assert (row["reference_lesions"], row["predicted_lesions"], row["detected_lesions"]) == ("3", "4", "2")
    assert float(row["tumor_dice"]) == pytest.approx(report["cases"]["c1"]["tumor"]["dice"], rel=1e-5)

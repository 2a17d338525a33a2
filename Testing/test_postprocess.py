"""Postprocessing steps tested on their own: small lesions dropped (--min-lesion-ml)."""

from __future__ import annotations

import json

import numpy as np

from LiverTumorSegLib.postprocess import LIVER, TUMOR, drop_small_lesions

from .oracle import TUMOR_HU, analytic_ct, oracle_model


def test_lesions_under_the_minimum_volume_become_liver_in_place():
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:18, 2:18, 2:18] = LIVER
    labels[4, 4, 4] = TUMOR  # 1 voxel: 0.002 mL at 2 uL per voxel
    labels[10:12, 8:13, 8:13] = TUMOR  # 50 voxels: 0.1 mL
    before = labels.copy()
    assert drop_small_lesions(labels, 0.002, 0.01) == 1  # in place; returns how many
    assert labels[4, 4, 4] == LIVER
    assert (labels[10:12, 8:13, 8:13] == TUMOR).all() and np.count_nonzero(labels == TUMOR) == 50
    assert (labels == 0).sum() == (before == 0).sum() and (labels[before == 0] == 0).all()  # background untouched
    assert np.array_equal(labels[before != TUMOR], before[before != TUMOR])
    assert drop_small_lesions(labels, 0.002, 0.2) == 1 and not (labels == TUMOR).any()  # 0.1 mL < 0.2 mL
    kept = before.copy()
    assert drop_small_lesions(kept, 0.002, 0.0) == 0 and np.array_equal(kept, before)  # 0 turns it off


def test_stats_json_counts_the_lesions_dropped(tmp_path):
    """What the command line writes: ``run.small_lesions_dropped`` in stats.json is the
    number of tumor components turned into liver, and the tumor count drops by as many."""
    from LiverTumorSegLib.outputs import write_outputs
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    ct, truth = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    liver = np.argwhere(truth.array == 1)
    centre = liver.mean(axis=0)
    tumor = np.argwhere(truth.array == 2).mean(axis=0)
    far = liver[np.linalg.norm(liver - tumor, axis=1) > 6]  # over 18 mm from the tumor
    inner = far[np.argsort(np.linalg.norm(far - centre, axis=1))]
    one = tuple(inner[0])
    two = next(tuple(p) for p in inner if np.abs(p - np.array(one)).max() > 3)
    ct.array[one] = TUMOR_HU  # a one-voxel lesion (0.027 mL)
    ct.array[two] = ct.array[two[0], two[1], two[2] + 1] = TUMOR_HU  # a two-voxel one (0.054 mL)
    model = oracle_model(spacing=(3.0, 3.0, 3.0))
    kept = Segmenter(model, SegmentOptions(device="cpu", precision="fp32", min_lesion_ml=0.0)).segment(ct)
    result = Segmenter(model, SegmentOptions(device="cpu", precision="fp32", min_lesion_ml=0.1)).segment(ct)
    assert kept.stats["tumor"]["count"] == result.stats["tumor"]["count"] + 2 and kept.info["small_lesions_dropped"] == 0
    assert result.labels.array[one] == LIVER and result.labels.array[two] == LIVER
    write_outputs(result, ct, tmp_path / "out", surfaces=False, preview=False)
    run = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))["run"]
    assert run["small_lesions_dropped"] == 2 and run["min_lesion_ml"] == 0.1

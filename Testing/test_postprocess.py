"""Postprocessing steps tested on their own: small lesions dropped (--min-lesion-ml)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from LiverTumorSegLib.postprocess import LIVER, TUMOR, drop_small_lesions
from LiverTumorSegLib.volume import Volume

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


# -- from a mutation review: connectivity, mapping conventions, small lesions ------------


def test_a_liver_whose_parts_touch_only_along_an_edge_or_corner_stays_whole():
    """The largest component is 26-connected: at 1.5-3 mm a liver lobe joined to the
    rest by a thin oblique bridge touches it only at edges or corners."""
    from LiverTumorSegLib.postprocess import LIVER, clean_labels

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = LIVER
    labels[10:14, 10:14, 10:14] = LIVER  # touches the first only at the corner (9,9,9)-(10,10,10)
    cleaned, left_out = clean_labels(labels)
    assert left_out == 0 and np.array_equal(cleaned > 0, labels > 0)


def test_mapping_a_compact_label_box_equals_resampling_the_whole_grid():
    """Mapping only the labels' box gives what resampling the whole grid gives: the
    crop keeps a one-voxel margin, without which ITK would extend the edge value half
    a voxel outward and labels would grow at the faces of their box."""
    import SimpleITK as sitk

    from LiverTumorSegLib.postprocess import TUMOR, to_input_grid

    ct = Volume(np.zeros((40, 50, 60), np.int16), spacing=(0.9, 0.8, 2.0), origin=(-20.0, 10.0, 5.0))
    model = Volume(np.zeros((30, 45, 40), np.uint8), spacing=(1.5, 1.5, 1.5), origin=(-30.0, -5.0, -10.0))
    model.array[8:20, 10:30, 12:25] = 1
    model.array[12:15, 15:20, 15:19] = TUMOR

    def whole(mask):
        ref = ct.with_array(np.zeros(ct.array.shape, np.uint8)).to_sitk()
        img = model.with_array(mask.astype(np.float32)).to_sitk()
        return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32)) >= 0.5

    region, tumor = whole(model.array > 0), whole(model.array == TUMOR)
    expected = region.astype(np.uint8)
    expected[region & tumor] = TUMOR
    assert np.array_equal(to_input_grid(model, ct, small_lesion_voxels=0), expected)


def test_the_half_way_voxels_of_an_aligned_half_size_grid_are_labelled():
    """The rule is 'at least 0.5': on an input grid of half the model's spacing whose
    centres fall half way between model centres (a 1.5 mm CT with an odd number of
    slices), every face voxel interpolates to exactly 0.5 and is labelled. A
    convention, pinned: 'above 0.5' would take a layer off the liver."""
    from LiverTumorSegLib.postprocess import to_input_grid

    model = Volume(np.zeros((10, 10, 10), np.uint8), spacing=(3.0, 3.0, 3.0))
    model.array[2:5, 2:5, 2:5] = 1  # centres 6, 9, 12 mm on every axis
    ct = Volume(np.zeros((20, 20, 20), np.int16), spacing=(1.5, 1.5, 1.5))
    out = to_input_grid(model, ct, small_lesion_voxels=0)
    assert np.array_equal(np.flatnonzero(out.any(axis=(0, 1))), np.arange(3, 10))  # 4.5 .. 13.5 mm


def test_small_components_are_those_with_fewer_voxels_than_the_bound():
    """Small components have fewer voxels than the bound, not at most as many."""
    from LiverTumorSegLib.postprocess import small_components

    mask = np.zeros((12, 12, 12), bool)
    mask[1:9, 1:6, 1:6] = True   # 200 voxels
    mask[10, 10, 10] = True
    got = small_components(mask, 200)
    assert got[10, 10, 10] and not got[1:9, 1:6, 1:6].any()


def test_drop_small_lesions_keeps_one_exactly_at_the_minimum_and_counts_diagonal_ones_whole():
    """A lesion of exactly --min-lesion-ml is kept; a lesion whose parts touch only
    at a corner is one lesion, measured whole, not dropped part by part."""
    from LiverTumorSegLib.postprocess import LIVER, TUMOR, drop_small_lesions

    labels = np.zeros((16, 16, 16), np.uint8)
    labels[1:15, 1:15, 1:15] = LIVER
    labels[2:4, 2:4, 2:4] = TUMOR        # 8 voxels
    labels[4:6, 4:6, 4:6] = TUMOR        # 8 voxels touching the first at a corner: one 16-voxel lesion
    labels[10:12, 10:12, 10:12] = TUMOR  # 8 voxels: exactly the minimum below
    before = labels.copy()
    assert drop_small_lesions(labels, 0.125, 1.0) == 0  # 8 x 0.125 mL = 1.0 mL: not below
    assert np.array_equal(labels, before)
    assert drop_small_lesions(labels, 0.125, 1.5) == 1 and labels[10, 10, 10] == LIVER
    assert (labels[2:6, 2:6, 2:6] == before[2:6, 2:6, 2:6]).all()  # 2.0 mL: kept


def test_a_cavity_open_only_through_a_corner_is_not_filled():
    """Holes are filled against a 26-connected background: a cavity that reaches the
    outside through corner steps is not a hole. A convention, pinned."""
    from LiverTumorSegLib.postprocess import fill_holes

    m = np.zeros((9, 9, 9), bool)
    m[1:8, 1:8, 1:8] = True
    m[3:6, 3:6, 3:6] = False
    closed = fill_holes(m)
    m[2, 2, 2] = m[1, 1, 1] = False  # corner steps from the cavity to the outside
    assert closed[4, 4, 4] and not fill_holes(m)[4, 4, 4]


@pytest.mark.parametrize("spacing, origin", [((1.0, 1.0, 1.0), (-0.6, -0.3, -0.2)),
                                            ((0.7, 0.7, 5.0), (0.2, 0.1, -1.3)),
                                            ((0.8, 0.8, 0.8), (0.1, 0.2, 0.3))])
def test_a_small_lesion_connected_through_corners_is_mapped_as_one(spacing, origin):
    """Three model voxels on a diagonal are one (26-connected) lesion, and come back as
    one on the input grid: on finer grids the 0.5 rule maps them to pieces apart,
    which must be joined (before, stats.json counted such a lesion two or three times)."""
    import SimpleITK as sitk

    from LiverTumorSegLib.postprocess import LIVER, TUMOR, to_input_grid

    model = Volume(np.zeros((20, 20, 20), np.uint8), spacing=(3.0, 3.0, 3.0))
    model.array[2:18, 2:18, 2:18] = LIVER
    for i in (8, 9, 10):
        model.array[i, i, i] = TUMOR
    shape = tuple(int(60 / s) for s in spacing[::-1])
    ct = Volume(np.zeros(shape, np.int16), spacing=spacing, origin=origin)
    out = to_input_grid(model, ct)
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray((out == TUMOR).astype(np.uint8)), True)
    assert int(sitk.GetArrayFromImage(cc).max()) == 1
    assert np.count_nonzero(out == TUMOR) * ct.voxel_volume_ml == pytest.approx(3 * 0.027, rel=0.05)


def test_small_lesions_of_random_shapes_come_back_as_one_lesion_each():
    """Random lesions of 2-6 model voxels, each step to a face, edge or corner
    neighbour, on random grids from 0.7 to 2.5 mm (slices 0.8 to 5 mm): each maps to
    exactly one lesion, of about its model volume (0.93 to 1.16 of it). Before the
    pieces were joined, 5 of these 40 came back as two lesions."""
    import SimpleITK as sitk

    from LiverTumorSegLib.postprocess import LIVER, TUMOR, to_input_grid

    rng = np.random.default_rng(1)
    for _ in range(40):
        model = Volume(np.zeros((20, 20, 20), np.uint8), spacing=(3.0, 3.0, 3.0))
        model.array[2:18, 2:18, 2:18] = LIVER
        at = np.array([9, 9, 9])
        model.array[tuple(at)] = TUMOR
        for _ in range(rng.integers(1, 6)):
            step = rng.integers(-1, 2, 3)
            step[0] = step[0] or (0 if step.any() else 1)
            at = at + step
            model.array[tuple(at)] = TUMOR
        inplane = float(rng.choice([0.7, 0.8, 1.0, 1.5, 2.0, 2.5]))
        spacing = (inplane, inplane, float(rng.choice([0.8, 1.0, 2.0, 3.0, 5.0])))
        ct = Volume(np.zeros(tuple(int(60 / s) for s in spacing[::-1]), np.int16), spacing=spacing,
                    origin=tuple(rng.uniform(-1, 1, 3)))
        out = to_input_grid(model, ct)
        pieces = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((out == TUMOR).astype(np.uint8)),
                                                                True))
        assert pieces.max() == 1, (spacing, int(np.count_nonzero(model.array == TUMOR)))
        ratio = np.count_nonzero(out == TUMOR) * ct.voxel_volume_ml / (np.count_nonzero(model.array == TUMOR) * 0.027)
        assert 0.85 <= ratio <= 1.25, (spacing, ratio)


@pytest.mark.parametrize("small_lesion_voxels", [0, 10])
def test_a_large_lesion_joined_at_a_corner_comes_back_as_one_lesion(small_lesion_voxels):
    """Lesions above the small-lesion bound (or with that mapping off) are mapped by the
    0.5 rule alone; two blocks touching at a corner, one lesion on the model grid, come
    back as one on finer grids too, their volume kept to within a few voxels."""
    import SimpleITK as sitk

    from LiverTumorSegLib.postprocess import LIVER, TUMOR, to_input_grid

    model = Volume(np.zeros((20, 20, 20), np.uint8), spacing=(1.5, 1.5, 1.5))
    model.array[2:18, 2:18, 2:18] = LIVER
    model.array[5:8, 5:8, 5:8] = TUMOR
    model.array[8:11, 8:11, 8:11] = TUMOR  # 54 voxels, one 26-connected lesion
    for spacing, origin in (((0.7, 0.7, 0.8), (0.3, -0.2, 0.1)), ((0.6, 0.6, 1.0), (-0.4, 0.1, 0.2))):
        ct = Volume(np.zeros(tuple(int(30 / s) for s in spacing[::-1]), np.int16), spacing=spacing, origin=origin)
        out = to_input_grid(model, ct, small_lesion_voxels=small_lesion_voxels)
        pieces = sitk.ConnectedComponent(sitk.GetImageFromArray((out == TUMOR).astype(np.uint8)), True)
        assert int(sitk.GetArrayFromImage(pieces).max()) == 1, spacing
        assert np.count_nonzero(out == TUMOR) * ct.voxel_volume_ml == pytest.approx(54 * 1.5 ** 3 / 1000, rel=0.25)


def test_small_lesions_are_measured_in_the_input_grids_voxels():
    """The labels are dropped on the input grid, so each voxel counts the input's voxel
    volume: with the model's (8 times larger here) a 3 mL lesion looked like 24 mL and
    escaped --min-lesion-ml 10."""
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    ct, truth = analytic_ct((2.0, 2.0, 2.0), np.eye(3))
    model = oracle_model(spacing=(4.0, 4.0, 4.0))
    lesion_ml = float((truth.array == 2).sum()) * ct.voxel_volume_ml  # about 3 mL
    assert 10.0 / 8 < lesion_ml < 10.0 and lesion_ml > 1.0
    kept = Segmenter(model, SegmentOptions(device="cpu", fast=True, min_lesion_ml=1.0)).segment(ct)
    dropped = Segmenter(model, SegmentOptions(device="cpu", fast=True, min_lesion_ml=10.0)).segment(ct)
    assert kept.stats["tumor"]["count"] == 1 and kept.info["small_lesions_dropped"] == 0
    assert dropped.stats["tumor"]["count"] == 0 and dropped.info["small_lesions_dropped"] == 1

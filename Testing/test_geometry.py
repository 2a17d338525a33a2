"""Geometry round trip: every storage form of the same anatomy gives the same physical
segmentation, aligned with the input's own voxels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.model.card import IntensityTransform
from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter
from LiverTumorSegLib.preprocess import (GRID_SLACK, air_value, body_bounding_box, check_spacing, model_grid_for,
                                         resample_to, scale_intensity, to_model_grid)
from LiverTumorSegLib.volume import Volume

from .oracle import ThresholdNet, analytic_ct, dice, oracle_model, rotation

FLIP_RAS = np.diag([-1.0, -1.0, 1.0])
PERMUTED = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
FORMS = {
    "lps": ((1.5, 1.5, 1.5), np.eye(3)),
    "ras": ((1.5, 1.5, 1.5), FLIP_RAS),
    "oblique": ((1.5, 1.5, 1.5), rotation("z", 17.0) @ rotation("x", -9.0)),
    "anisotropic": ((0.8, 0.8, 4.0), np.eye(3)),
    "permuted-flipped": ((1.2, 2.5, 1.0), PERMUTED @ FLIP_RAS),
}


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(oracle_model(), SegmentOptions(device="cpu", precision="fp32", min_lesion_ml=0.0))


@pytest.fixture(scope="module")
def results(segmenter):
    out = {}
    for name, (spacing, direction) in FORMS.items():
        ct, truth = analytic_ct(spacing, direction)
        out[name] = (ct, truth, segmenter.segment(ct))
    return out


@pytest.mark.parametrize("name", list(FORMS))
def test_labels_come_back_in_the_input_grid_and_aligned(results, name):
    ct, truth, result = results[name]
    assert result.labels.same_grid(ct)
    assert result.labels.array.dtype == np.uint8
    liver_region = result.labels.array > 0
    assert dice(liver_region, truth.array > 0) > 0.95, name
    assert dice(result.labels.array == 2, truth.array == 2) > 0.85, name


@pytest.mark.parametrize("name", list(FORMS))
def test_same_physical_volumes_in_every_form(results, name):
    reference = results["lps"][2].stats
    ct, truth, result = results[name]
    stats = result.stats
    truth_liver_ml = float((truth.array > 0).sum()) * ct.voxel_volume_ml
    assert stats["liver"]["volume_ml"] == pytest.approx(truth_liver_ml, rel=0.03)
    assert stats["liver"]["volume_ml"] == pytest.approx(reference["liver"]["volume_ml"], rel=0.03)
    ball_ml = 4.0 / 3.0 * np.pi * 9.0 ** 3 / 1000.0  # the analytic tumor, radius 9 mm
    assert stats["tumor"]["volume_ml"] == pytest.approx(ball_ml, rel=0.12)
    assert stats["tumor"]["count"] == 1
    centroid = np.array(stats["tumor"]["lesions"][0]["centroid_mm"])
    expected_ras = np.array([10.0, 18.0, 15.0])  # the ball's LPS centre (-10, -18, 15) in RAS
    assert np.linalg.norm(centroid - expected_ras) < 2.0, (name, centroid)


def test_same_physical_segmentation_on_a_common_grid(results):
    ct0, _, r0 = results["lps"]
    common = model_grid_for(ct0, oracle_model(spacing=(1.0, 1.0, 1.0)).card)
    base = resample_to(r0.labels, common, interpolation="nearest", default_value=0, dtype=np.uint8).array
    for name, (_, _, result) in results.items():
        other = resample_to(result.labels, common, interpolation="nearest", default_value=0, dtype=np.uint8).array
        assert dice(base > 0, other > 0) > 0.95, name


def test_ijk_to_ras_round_trip():
    direction = rotation("y", 23.0) @ FLIP_RAS
    v = Volume(np.zeros((4, 5, 6)), spacing=(0.7, 0.9, 3.0), origin=(-12.0, 30.5, 7.0), direction=direction)
    back = Volume.from_ijk_to_ras(v.array, v.ijk_to_ras())
    assert back.same_grid(v, tol=1e-9)
    ras = v.ijk_to_ras() @ np.array([1, 2, 3, 1.0])
    lps = v.ijk_to_lps() @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(ras[:3], lps[:3] * [-1, -1, 1])


@pytest.mark.parametrize("spacing,extent", [((0.5, 0.5, 0.5), (130.0, 110.0, 104.0)), ((6.0, 6.0, 6.0), (150.0, 130.0, 120.0)),
                                            ((0.6, 0.6, 6.0), (150.0, 130.0, 120.0))])
def test_spacing_extremes(segmenter, spacing, extent):
    ct, truth = analytic_ct(spacing, np.eye(3), extent_mm=extent)
    result = segmenter.segment(ct)
    assert result.labels.same_grid(ct)
    truth_ml = float((truth.array > 0).sum()) * ct.voxel_volume_ml
    assert result.stats["liver"]["volume_ml"] == pytest.approx(truth_ml, rel=0.12)
    assert dice(result.labels.array > 0, truth.array > 0) > 0.85


@pytest.mark.parametrize("direction", ["identity", "oblique"])
def test_mapping_labels_back_only_where_they_reach_equals_the_whole_grid(direction):
    """``to_input_grid`` resamples only the box the labels can reach; the result must
    equal resampling the whole input grid."""
    import SimpleITK as sitk

    from LiverTumorSegLib.postprocess import TUMOR, to_input_grid

    rng = np.random.default_rng(0)
    matrix = np.eye(3) if direction == "identity" else rotation("z", 15.0) @ rotation("x", 10.0)
    ct = Volume(np.zeros((40, 50, 60), np.int16), spacing=(0.9, 0.8, 2.0), origin=(-20.0, 10.0, 5.0),
                direction=matrix)
    model = Volume(np.zeros((30, 45, 40), np.uint8), spacing=(1.5, 1.5, 1.5), origin=(-30.0, -5.0, -10.0))
    model.array[8:20, 10:30, 12:25] = 1
    model.array[12:15, 15:20, 15:19] = TUMOR
    model.array[rng.random(model.array.shape) < 0.002] = 1  # specks that reach the box's edges
    got = to_input_grid(model, ct, small_lesion_voxels=0)  # the plain linear mapping, everywhere

    def whole(mask):
        ref = ct.with_array(np.zeros(ct.array.shape, np.uint8)).to_sitk()
        img = model.with_array(mask.astype(np.float32)).to_sitk()
        out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out) >= 0.5

    region, tumor = whole(model.array > 0), whole(model.array == TUMOR)
    expected = region.astype(np.uint8)
    expected[region & tumor] = TUMOR
    assert expected.any() and np.array_equal(got, expected)


def test_class_mask_matches_isin():
    from LiverTumorSegLib.boxes import class_mask

    labels = np.random.default_rng(1).integers(0, 4, (20, 30, 40)).astype(np.uint8)
    for values in ((1, 2), (2,), (0, 3), (7,)):
        assert np.array_equal(class_mask(labels, values), np.isin(labels, values))
    assert np.array_equal(class_mask(labels.astype(np.int32), (1, 2)), np.isin(labels, (1, 2)))


def test_labels_that_reach_the_scan_edge_keep_the_edge_slices():
    """ITK's linear interpolation reaches half a source voxel beyond the corner voxel
    centres; on a fine input grid (0.5 mm) the first and last slices lie in that half
    voxel, and the reachable box used to leave them out."""
    from LiverTumorSegLib.postprocess import to_input_grid

    ct = Volume(np.zeros((30, 12, 12), np.int16), spacing=(1.0, 1.0, 0.5), origin=(0.0, 0.0, 0.0))
    model = Volume(np.ones((5, 4, 4), np.uint8), spacing=(3.0, 3.0, 3.0), origin=(1.5, 1.5, 1.25))
    got = to_input_grid(model, ct)
    per_slice = np.count_nonzero(got, axis=(1, 2))
    assert per_slice[0] == per_slice[len(per_slice) // 2] == per_slice[-1] > 0, per_slice


def test_cleaning_fills_a_tumor_core_as_tumor_and_reports_what_it_left_out():
    from LiverTumorSegLib.postprocess import LIVER, TUMOR, clean_labels

    labels = np.zeros((20, 20, 30), np.uint8)
    labels[2:18, 2:18, 2:18] = LIVER
    labels[6:14, 6:14, 6:14] = TUMOR
    labels[8:12, 8:12, 8:12] = 0  # a necrotic core the network calls background
    labels[5:9, 5:9, 22:27] = LIVER  # a separate part: 80 voxels
    labels[12:16, 12:16, 22:27] = TUMOR  # tumor apart from the liver region: 80 voxels
    cleaned, left_out = clean_labels(labels)
    assert np.all(cleaned[8:12, 8:12, 8:12] == TUMOR)
    assert left_out == 160 and not cleaned[5:9, 5:9, 22:27].any() and not cleaned[12:16, 12:16, 22:27].any()
    assert np.count_nonzero(cleaned == TUMOR) == 8 ** 3


def test_the_liver_region_is_the_one_in_tissue_not_a_larger_one_in_air():
    """A network's false liver in a large frame of air (padding around an oblique scan)
    once won the largest-component step over the real liver: Dice 0.87 -> 0."""
    from LiverTumorSegLib.postprocess import LIVER, clean_labels

    labels = np.zeros((20, 20, 40), np.uint8)
    labels[2:10, 2:10, 2:10] = LIVER  # the liver: 512 voxels, in tissue
    labels[1:19, 1:19, 20:39] = LIVER  # 6156 voxels in air
    tissue = np.zeros(labels.shape, bool)
    tissue[:, :, :15] = True
    assert clean_labels(labels)[0][1:19, 1:19, 20:39].all()  # without tissue: the largest
    cleaned, left_out = clean_labels(labels, tissue)
    assert cleaned[2:10, 2:10, 2:10].all() and not cleaned[:, :, 20:].any() and left_out == 18 * 18 * 19


class _AirIsLiverNet(ThresholdNet):
    """The oracle, but it also calls air liver, as a poorly trained network can."""

    def forward(self, x):
        logits = super().forward(x)
        logits[:, 1:2][x < -0.99] = 10.0
        return logits


def test_segment_keeps_the_liver_in_tissue_when_the_network_calls_air_liver():
    from LiverTumorSegLib.pipeline import Segmenter

    ct, truth = analytic_ct((3.0, 3.0, 3.0), np.eye(3), extent_mm=(330.0, 300.0, 300.0))
    model = oracle_model(spacing=(3.0, 3.0, 3.0))
    model.network = _AirIsLiverNet()
    result = Segmenter(model).segment(ct)
    assert dice(result.labels.array >= 1, truth.array >= 1) > 0.95
    assert result.info["liver_left_out_ml"] > 1000.0  # the air, left out and reported


def test_small_lesions_keep_their_volume_on_a_finer_input_grid():
    """Linear interpolation at 0.5 trims convex corners: a lesion of one 3 mm model
    voxel kept about a fifth of its volume on a 0.8x0.8x1 mm grid (and then fell under
    --min-lesion-ml), a 6 mm sphere 63 %. Small components now keep their model volume."""
    from LiverTumorSegLib.postprocess import LIVER, TUMOR, to_input_grid

    model = Volume(np.zeros((24, 24, 40), np.uint8), spacing=(3.0, 3.0, 3.0))
    model.array[2:22, 2:22, 2:38] = LIVER
    idx = np.indices(model.array.shape, dtype=float)
    lesions = {"one voxel": (np.s_[6, 6, 6], 1)}
    for n, (diameter, cx) in enumerate(((6.0, 14), (10.0, 22), (20.0, 31))):
        sphere = ((idx - np.array([12.0, 12.0, cx])[:, None, None, None]) ** 2).sum(0) <= (diameter / 6.0) ** 2
        lesions[f"{diameter:g} mm"] = (sphere, int(sphere.sum()))
    for mask, _ in lesions.values():
        model.array[mask] = TUMOR
    ct = Volume(np.zeros((78, 78, 130), np.int16), spacing=(0.8, 0.8, 1.0), origin=(-1.1, -1.1, -1.0))
    out = to_input_grid(model, ct)
    in_ml = ct.voxel_volume_ml
    import SimpleITK as sitk

    cc = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(
        sitk.GetImageFromArray((out == TUMOR).astype(np.uint8)), True)))
    volumes = sorted(np.bincount(cc.ravel())[1:] * in_ml)
    expected = sorted(n * 0.027 for _, n in lesions.values())
    assert len(volumes) == len(expected)  # no lesion lost
    for got, want in zip(volumes, expected):
        assert abs(got - want) <= 0.12 * want, (volumes, expected)
    # grown around their centres: each lesion's centroid stays within a millimetre of the model's
    def centroids(array, geometry):
        image = sitk.GetImageFromArray((array == TUMOR).astype(np.uint8))
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        shape = sitk.LabelShapeStatisticsImageFilter()
        shape.Execute(sitk.ConnectedComponent(image, True))
        return np.array([shape.GetCentroid(label) for label in shape.GetLabels()])

    wanted = centroids(model.array, model)
    for centre in centroids(out, ct):
        assert np.linalg.norm(wanted - centre, axis=1).min() < 1.0
    plain = to_input_grid(model, ct, small_lesion_voxels=0)
    assert np.count_nonzero(plain == TUMOR) * in_ml < 0.95 * sum(expected)  # what the plain mapping loses


def test_growing_small_lesions_keeps_them_apart_and_counts_only_what_is_in_the_scan():
    """Two 4-voxel lesions one model voxel apart stay two lesions (growth never touches
    another lesion), ties on aligned grids do not inflate a lesion, and a lesion cut by
    the scan's edge gets the volume of its part inside the scan."""
    import SimpleITK as sitk

    from LiverTumorSegLib.postprocess import LIVER, TUMOR, to_input_grid

    def lesions(mask):
        return int(sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)),
                                                                  True)).max())

    model = Volume(np.zeros((22, 22, 22), np.uint8), spacing=(1.5, 1.5, 1.5))
    model.array[2:20, 2:20, 2:20] = LIVER
    model.array[8:10, 8:9, 8:10] = TUMOR
    model.array[8:10, 8:10, 11:12] = TUMOR
    ct = Volume(np.zeros((33, 33, 26), np.int16), spacing=(1.25, 1.0, 1.0), origin=(0.63, -0.99, 0.71))
    out = to_input_grid(model, ct)
    assert lesions(out == TUMOR) == 2
    assert np.count_nonzero(out == TUMOR) * ct.voxel_volume_ml == pytest.approx(8 * 0.003375, rel=0.1)

    aligned = Volume(np.zeros((20, 20, 20), np.uint8), spacing=(3.0, 3.0, 3.0))
    aligned.array[2:18, 2:18, 2:18] = LIVER
    aligned.array[6, 6, 6] = TUMOR        # one voxel, inside
    aligned.array[0, 10, 10] = TUMOR      # one voxel on the first slice: a third of it lies outside the scan
    fine = Volume(np.zeros((58, 60, 60), np.int16), spacing=(1.0, 1.0, 1.0), origin=(-1.0, -1.0, 0.0))
    got = to_input_grid(aligned, fine)
    inside, edge = np.count_nonzero(got[10:, :, :] == TUMOR), np.count_nonzero(got[:10] == TUMOR)
    assert inside == 27 and edge == 18  # 1 mm voxels: a 3 mm voxel is 27 of them, its in-scan part 18


@pytest.mark.parametrize("spacing, tilted", [((3.1, 3.1, 3.1), False), ((5.0, 5.0, 5.0), False),
                                             ((0.7, 0.7, 5.0), False), ((0.7, 0.7, 5.0), True)])
def test_small_lesions_survive_the_mapping_onto_any_grid_wherever_it_falls(spacing, tilted):
    """On grids a little coarser than the model's, no input voxel centre may land close
    enough to a lesion of one to three model voxels for the 0.5 rule: most were lost,
    more or fewer by where the grid fell (the lesion count changed with the origin).
    Every lesion now keeps at least one voxel, and its volume where the voxels allow."""
    import SimpleITK as sitk

    from LiverTumorSegLib.postprocess import LIVER, TUMOR, to_input_grid

    model = Volume(np.zeros((30, 30, 30), np.uint8), spacing=(3.0, 3.0, 3.0))
    model.array[2:28, 2:28, 2:28] = LIVER
    voxels = []
    for n, (z, y, x) in enumerate((z, y, x) for z in (6, 14, 22) for y in (6, 14, 22) for x in (6, 14, 22)):
        model.array[z, y, x:x + n % 3 + 1] = TUMOR
        voxels.append(n % 3 + 1)
    rng = np.random.default_rng(0)
    # tilted: thick slices at 30 degrees about z and 20 about x, where growth once split a lesion in two
    direction = rotation("z", 30.0) @ rotation("x", 20.0) if tilted else np.eye(3)
    for _ in range(3):
        shape = tuple(int((150 if tilted else 90) / s) for s in spacing[::-1])
        centre = np.array([43.5, 43.5, 43.5]) + rng.uniform(-3.0, 3.0, 3)
        origin = centre - direction @ (np.array(shape[::-1]) * np.array(spacing) / 2.0)
        ct = Volume(np.zeros(shape, np.int16), spacing=spacing, origin=tuple(origin), direction=direction)
        out = to_input_grid(model, ct)
        cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((out == TUMOR).astype(np.uint8)),
                                                            True))
        assert cc.max() == len(voxels)  # every lesion, each one apart
        ratio = np.count_nonzero(out == TUMOR) * ct.voxel_volume_ml / (0.027 * sum(voxels))
        if min(spacing) < 3.0:  # in-plane voxels finer than the model's: the volume is kept
            assert 0.95 <= ratio <= 1.15
        else:  # at least one input voxel each, so never less
            assert ratio >= 0.99


def test_a_small_lesion_mostly_outside_the_scan_is_not_given_a_whole_coarse_voxel():
    """At least one input voxel per lesion holds only for lesions at least half inside
    the scan: a tenth of a 3 mm voxel inside would otherwise become a 10 mm voxel."""
    from LiverTumorSegLib.postprocess import LIVER, TUMOR, to_input_grid

    model = Volume(np.zeros((12, 12, 12), np.uint8), spacing=(3.0, 3.0, 3.0))
    model.array[:, 1:11, 1:11] = LIVER
    model.array[0, 5, 5] = TUMOR  # spans z -1.5..1.5 mm
    for scan_starts, kept in ((1.2, 0), (-0.3, 1)):  # a tenth of it inside; 60 % of it
        ct = Volume(np.zeros((3, 4, 4), np.int16), spacing=(10.0, 10.0, 10.0), origin=(0.0, 0.0, scan_starts + 5.0))
        assert np.count_nonzero(to_input_grid(model, ct) == TUMOR) == kept


@pytest.mark.parametrize("permuted", [False, True])
def test_a_lesion_between_two_thick_slices_gets_the_voxel_holding_its_centre(permuted):
    """No input voxel centre is near a one-voxel lesion 2.5 or 3.5 mm from the nearest 7
    mm slice centre, so the interpolated mask is 0 on every one; it gets the voxel that
    holds it (also with the thick axis stored first, a permuted direction)."""
    from LiverTumorSegLib.postprocess import LIVER, TUMOR, to_input_grid

    model = Volume(np.zeros((40, 50, 60), np.uint8), spacing=(1.0, 1.0, 1.0))
    model.array[1:-1, 1:-1, 1:-1] = LIVER
    lesions = [(17, 23, 31), (25, 11, 44)]  # (z, y, x) model voxels, at z = 17 and 25 mm
    for lesion in lesions:
        model.array[lesion] = TUMOR
    origin = (0.3, -0.2, -13.5)  # slice centres at z = ..., 14.5, 21.5, 28.5 mm
    if permuted:  # i along z (7 mm), j along x, k along y
        ct = Volume(np.zeros((100, 100, 8), np.int16), spacing=(7.0, 0.7, 0.6), origin=origin,
                    direction=[[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    else:
        ct = Volume(np.zeros((8, 100, 100), np.int16), spacing=(0.7, 0.6, 7.0), origin=origin)
    out = to_input_grid(model, ct)
    found = np.argwhere(out == TUMOR)
    assert len(found) == len(lesions)
    m = ct.ijk_to_lps()
    points = found[:, ::-1] @ m[:3, :3].T + m[:3, 3]
    for lesion in lesions:
        where = np.array(lesion[::-1], dtype=float)
        nearest = np.abs(points - where).max(axis=1).min()  # within half an input voxel on every axis
        assert nearest <= 3.5 + 1e-6


def test_spacings_that_differ_in_the_last_digits_give_one_model_grid():
    """3.0 mm slices from a DICOM header and 3.0000925 mm from float positions (or a
    float32 NIfTI header) must not put the model grid half a voxel apart."""
    card = oracle_model(spacing=(3.0, 3.0, 3.0)).card
    array = np.zeros((69, 40, 40), dtype=np.int16)
    exact = model_grid_for(Volume(array, (3.0, 3.0, 3.0)), card)
    nearly = model_grid_for(Volume(array, (3.0, 3.0, 3.0000925)), card)
    assert exact.array.shape == nearly.array.shape == (69, 40, 40)
    assert np.allclose(exact.origin, nearly.origin, atol=0.01)
    longer = model_grid_for(Volume(array, (3.0, 3.0, 3.05)), card)  # 210.45 mm: 70.15 voxels need 71
    assert longer.array.shape[0] == 71


# -- from a mutation review: same_grid, the model grid, intensities, spacing bounds -----
def test_same_grid_tells_every_geometry_attribute_apart():
    """same_grid guards stats, the MRML export and the resampling short-cuts: each of
    size, spacing, origin (sign included) and direction must count."""
    base = Volume(np.zeros((4, 5, 6)), spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0))
    assert base.same_grid(Volume(np.zeros((4, 5, 6)), spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0)))
    others = {
        "origin mirrored (RAS read as LPS)": dict(origin=(-10.0, 20.0, 30.0)),
        "origin half a voxel off": dict(origin=(10.4, -20.0, 30.0)),
        "spacing reversed": dict(spacing=(2.5, 0.9, 0.8)),
        "direction flipped": dict(direction=np.diag([-1.0, -1.0, 1.0])),
        "direction permuted": dict(direction=PERMUTED),
    }
    for why, kw in others.items():
        geometry = dict(spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0)) | kw
        assert not base.same_grid(Volume(np.zeros((4, 5, 6)), **geometry)), why


def test_a_permuted_cube_on_the_model_spacing_is_still_resampled():
    """A cube at the card's spacing whose axes are permuted (no flip) has the template's
    size, spacing and origin: only the direction differs, so the short-cut in
    to_model_grid must not hand the array over as if it were already LPS."""
    card = oracle_model(spacing=(2.0, 2.0, 2.0)).card
    array = np.random.default_rng(0).normal(0, 100, size=(6, 6, 6)).astype(np.float32)
    ct = Volume(array, spacing=(2.0, 2.0, 2.0), origin=(-5.0, 7.0, 11.0), direction=PERMUTED)
    hu = to_model_grid(ct, card)
    assert np.allclose(hu.direction, np.eye(3))
    # model voxel (x=a, y=b, z=c) lies at input (i=b, j=c, k=a): out[c, b, a] = in[a, c, b]
    np.testing.assert_allclose(hu.array, array.transpose(1, 2, 0), atol=1e-3)


def _physical_box(v: Volume):
    n = np.array(v.shape_xyz)
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5)
                        for k in (-0.5, n[2] - 0.5)]) @ v.ijk_to_lps().T
    return corners[:, :3].min(axis=0), corners[:, :3].max(axis=0)


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "LAI"])
def test_the_model_grid_is_centred_on_the_input_and_covers_it(orientation):
    """For any card orientation the model grid covers the input's box, centred on it
    (a half-voxel shift or an origin not put through the card's direction misplaces it)."""
    card = dataclasses.replace(oracle_model(spacing=(2.0, 2.0, 3.0)).card, orientation=orientation)
    ct = Volume(np.zeros((17, 23, 29), np.int16), spacing=(0.7, 0.9, 2.5), origin=(-40.0, 25.0, -300.0),
                direction=rotation("z", 17.0) @ np.diag([-1.0, 1.0, 1.0]))
    grid = model_grid_for(ct, card)
    lo_in, hi_in = _physical_box(ct)
    lo, hi = _physical_box(grid)
    np.testing.assert_allclose((lo + hi) / 2, (lo_in + hi_in) / 2, atol=1e-6)
    slack = GRID_SLACK * np.array(card.spacing_mm)
    assert np.all(lo <= lo_in + slack) and np.all(hi >= hi_in - slack)


def test_resampling_onto_its_own_oblique_grid_changes_nothing():
    """resample_to must hand the reference's direction to ITK as ITK reads it (row-major);
    a transposed direction only shows for a non-symmetric (oblique) reference."""
    rng = np.random.default_rng(1)
    v = Volume(rng.normal(0, 100, size=(8, 9, 10)).astype(np.float32), spacing=(1.0, 1.2, 2.0),
               origin=(3.0, -4.0, 5.0), direction=rotation("x", 20.0) @ rotation("z", 30.0))
    out = resample_to(v, v)
    np.testing.assert_allclose(out.array, v.array, atol=1e-3)


def test_window_scaling_clips_and_maps_linearly():
    """Bone, contrast and metal above the window (and padding below it) must be clipped:
    a network trained on [-1, 1] never saw 20."""
    t = IntensityTransform("window", (-200.0, 250.0), (-1.0, 1.0))
    hu = np.array([-3024.0, -1024.0, -200.0, 25.0, 250.0, 3000.0], np.float32)
    np.testing.assert_allclose(scale_intensity(hu, t), [-1.0, -1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)
    t01 = IntensityTransform("window", (-100.0, 300.0), (0.0, 1.0))
    np.testing.assert_allclose(scale_intensity(np.array([-100.0, 100.0, 300.0], np.float32), t01), [0.0, 0.5, 1.0],
                               atol=1e-6)


def test_air_value_is_minus_1024_hu_through_the_transform():
    assert air_value(IntensityTransform("window", (-200.0, 250.0), (-1.0, 1.0))) == pytest.approx(-1.0)
    # a window reaching below air: air is not the bottom of the output range
    assert air_value(IntensityTransform("window", (-2000.0, 2000.0), (-1.0, 1.0))) == pytest.approx(-0.512)


def test_body_box_keeps_its_margin():
    hu = np.full((30, 30, 30), -1000.0, np.float32)
    hu[10:13, 15, 20] = 40.0
    assert body_bounding_box(hu) == (slice(6, 17), slice(11, 20), slice(16, 25))
    assert body_bounding_box(hu, margin=0) == (slice(10, 13), slice(15, 16), slice(20, 21))
    assert body_bounding_box(np.full((5, 5, 5), -1000.0)) is None


def test_spacing_bounds_both_ends():
    """Spacing in metres (x1000 too small) or micrometres (x1000 too large) is refused."""
    for bad in [(0.0008, 0.0008, 0.0025), (0.01, 0.8, 0.8), (800.0, 800.0, 2500.0), (0.8, 0.8, 60.0)]:
        with pytest.raises(InputError, match="implausible"):
            check_spacing(bad)
    for fine in [(0.05, 0.05, 0.05), (0.3, 0.3, 10.0), (1.0, 1.0, 50.0)]:
        check_spacing(fine)

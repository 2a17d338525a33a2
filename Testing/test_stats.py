"""Tests of LiverTumorSegLib.stats against analytic phantoms and the real LiTS labels."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.stats import (
    ROW_COLUMNS,
    compute_statistics,
    max_diameter_mm,
    stats_to_rows,
    summary_text,
    write_stats_csv,
    write_stats_json,
)
from LiverTumorSegLib.volume import Volume

from .helpers import real_data


def oblique_direction() -> np.ndarray:
    """A proper rotation (det +1) that is not axis-aligned."""
    a, b = 0.4, 0.3
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def sphere(radius_mm: float) -> float:
    """Volume in mL of a ball of radius ``radius_mm``."""
    return 4.0 / 3.0 * np.pi * radius_mm ** 3 / 1000.0


def physical_grid(shape_zyx: tuple, spacing: tuple) -> tuple:
    """(x, y, z) mm coordinates of voxel centres relative to voxel (0, 0, 0)."""
    k, j, i = np.indices(shape_zyx, dtype=np.float64)
    return i * spacing[0], j * spacing[1], k * spacing[2]


def brute_force_diameter(zyx: np.ndarray, geometry: Volume) -> float:
    """Largest distance between voxel centres, all pairs, in mm."""
    lps = zyx[:, ::-1] @ (geometry.direction @ np.diag(geometry.spacing)).T
    best = 0.0
    for start in range(0, len(lps), 512):
        d = lps[start:start + 512, None, :] - lps[None, :, :]
        best = max(best, float((d ** 2).sum(-1).max()))
    return float(np.sqrt(best))


@pytest.fixture(scope="module")
def sphere_phantom():
    """Liver sphere (r 30 mm) with tumor spheres of r 8 mm and 5 mm, 0.5x0.55x0.6 mm grid."""
    spacing = (0.5, 0.55, 0.6)
    shape = (112, 122, 134)
    x, y, z = physical_grid(shape, spacing)
    centre = np.array([33.0, 33.0, 33.0])
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(x - 33) ** 2 + (y - 33) ** 2 + (z - 33) ** 2 <= 30.0 ** 2] = 1
    tumors = [((43.0, 33.0, 33.0), 8.0), ((20.0, 30.0, 40.0), 5.0)]
    for (cx, cy, cz), r in tumors:
        labels[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r ** 2] = 2
    ct = np.where(labels == 2, 40.0, np.where(labels == 1, 110.0, -50.0))
    ct = ct + np.random.default_rng(0).normal(0.0, 10.0, shape)
    geometry = dict(spacing=spacing, origin=(-12.0, 7.0, 100.0))
    return Volume(labels, **geometry), Volume(ct.astype(np.int16), **geometry), centre, tumors


def test_sphere_volumes_and_burden(sphere_phantom):
    labels, ct, _, tumors = sphere_phantom
    stats = compute_statistics(labels, ct)
    tumor_ml = sum(sphere(r) for _, r in tumors)
    assert stats["liver"]["volume_ml"] == pytest.approx(sphere(30.0), rel=0.01)
    assert stats["tumor"]["volume_ml"] == pytest.approx(tumor_ml, rel=0.01)
    assert stats["liver"]["parenchyma_volume_ml"] == pytest.approx(sphere(30.0) - tumor_ml, rel=0.01)
    assert stats["tumor"]["count"] == 2
    lesions = stats["tumor"]["lesions"]
    assert [lesion["id"] for lesion in lesions] == [1, 2]
    assert lesions[0]["volume_ml"] == pytest.approx(sphere(8.0), rel=0.01)
    assert lesions[1]["volume_ml"] == pytest.approx(sphere(5.0), rel=0.01)
    burden = 100.0 * stats["tumor"]["voxels"] / stats["liver"]["voxels"]
    assert stats["tumor"]["burden_percent"] == pytest.approx(burden)
    assert stats["tumor"]["burden_percent"] == pytest.approx(100 * tumor_ml / sphere(30.0), rel=0.02)
    for lesion, (_, r) in zip(lesions, tumors):
        assert abs(lesion["max_diameter_mm"] - 2 * r) <= float(np.linalg.norm(labels.spacing))
    assert stats["voxel_volume_ml"] == pytest.approx(0.5 * 0.55 * 0.6 / 1000)
    assert stats["grid"] == {"size_xyz": [134, 122, 112], "spacing_mm": [0.5, 0.55, 0.6]}
    assert stats["coordinate_system"] == "RAS" and stats["schema_version"] == 1


def test_sphere_centroids_in_ras(sphere_phantom):
    labels, _, _, tumors = sphere_phantom
    stats = compute_statistics(labels)
    for lesion, (centre, _) in zip(stats["tumor"]["lesions"], tumors):
        lps = np.asarray(labels.origin) + np.asarray(centre)
        expected = [-lps[0], -lps[1], lps[2]]
        np.testing.assert_allclose(lesion["centroid_mm"], expected, atol=0.05)


def test_hu_statistics_match_numpy(sphere_phantom):
    labels, ct, _, _ = sphere_phantom
    stats = compute_statistics(labels, ct)
    hu = ct.array.astype(np.float64)
    for region, mask in (
        (stats["liver"]["hu"], labels.array > 0),
        (stats["liver"]["parenchyma_hu"], labels.array == 1),
        (stats["tumor"]["hu"], labels.array == 2),
    ):
        values = hu[mask]
        assert region["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert region["std"] == pytest.approx(values.std(), rel=1e-9)
        assert region["min"] == values.min() and region["max"] == values.max()
    for lesion in stats["tumor"]["lesions"]:
        assert 30.0 < lesion["mean_hu"] < 50.0


def test_no_ct_gives_null_hu(sphere_phantom):
    labels, _, _, _ = sphere_phantom
    stats = compute_statistics(labels)
    assert stats["liver"]["hu"] == {"mean": None, "std": None, "min": None, "max": None}
    assert all(lesion["mean_hu"] is None for lesion in stats["tumor"]["lesions"])


@pytest.mark.parametrize(
    "second, expected",
    [
        ((3, 3, 3), 1),  # corner-touching: one lesion with 26-connectivity
        ((3, 3, 2), 1),  # edge-touching
        ((4, 4, 4), 2),  # one empty voxel between: two lesions
        ((2, 2, 4), 2),
    ],
)
def test_lesion_count_26_connectivity(second, expected):
    labels = np.ones((8, 8, 8), dtype=np.uint8)
    labels[2, 2, 2] = 2
    labels[second] = 2
    stats = compute_statistics(Volume(labels))
    assert stats["tumor"]["count"] == expected
    assert stats["tumor"]["voxels"] == 2


def test_lesions_sorted_by_volume():
    labels = np.ones((10, 10, 30), dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = 2  # 8 voxels
    labels[1:4, 1:4, 10:14] = 2  # 36 voxels
    labels[5, 5, 25] = 2  # 1 voxel
    lesions = compute_statistics(Volume(labels, spacing=(1.0, 2.0, 3.0)))["tumor"]["lesions"]
    assert [lesion["voxels"] for lesion in lesions] == [36, 8, 1]
    assert [lesion["id"] for lesion in lesions] == [1, 2, 3]
    assert lesions[0]["volume_ml"] == pytest.approx(36 * 6.0 / 1000)
    assert lesions[2]["max_diameter_mm"] == 0.0


def test_centroid_oblique_direction():
    direction = oblique_direction()
    geometry = Volume(np.zeros((20, 20, 20), dtype=np.uint8), spacing=(0.7, 0.9, 2.0),
                      origin=(15.0, -40.0, 220.0), direction=direction)
    labels = np.ones((20, 20, 20), dtype=np.uint8)
    labels[4:7, 10:12, 3:8] = 2  # centre (i, j, k) = (5, 10.5, 5)
    stats = compute_statistics(geometry.with_array(labels))
    lps = np.asarray(geometry.origin) + direction @ (np.asarray(geometry.spacing) * [5.0, 10.5, 5.0])
    np.testing.assert_allclose(stats["tumor"]["lesions"][0]["centroid_mm"], [-lps[0], -lps[1], lps[2]], atol=1e-9)
    corner = np.array([[4, 10, 3], [6, 11, 7]], dtype=float)
    expected = brute_force_diameter(np.argwhere(labels == 2).astype(float), geometry)
    assert stats["tumor"]["lesions"][0]["max_diameter_mm"] == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(brute_force_diameter(corner, geometry), rel=1e-9)


def test_max_diameter_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(42)
    for trial in range(30):
        shape = tuple(rng.integers(3, 12, size=3))
        mask = rng.random(shape) < rng.uniform(0.05, 0.6)
        if not mask.any():
            continue
        direction = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        geometry = Volume(np.zeros(shape), spacing=tuple(rng.uniform(0.3, 3.0, size=3)),
                          origin=tuple(rng.uniform(-100, 100, size=3)), direction=direction)
        expected = brute_force_diameter(np.argwhere(mask).astype(float), geometry)
        assert max_diameter_mm(mask, geometry) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_max_diameter_of_big_sphere_compares_few_candidates_and_is_exact():
    """Exact without comparing every pair: only hull candidates are compared (a few
    thousand of 200k voxels; every pair would be 2e10 distances). Counted, not timed."""
    from LiverTumorSegLib.stats import _hull_candidates

    r = 36.3  # about 200k voxels
    idx = np.indices((76, 76, 76), dtype=np.float64) - 37.5
    mask = (idx ** 2).sum(0) <= r * r
    geometry = Volume(np.zeros(mask.shape, dtype=np.uint8), spacing=(0.8, 0.8, 2.5))
    diameter = max_diameter_mm(mask, geometry)
    assert mask.sum() > 190_000
    assert len(_hull_candidates(mask)) < 0.05 * mask.sum()
    # Exact answer: the farthest pair lies on the boundary; check on boundary voxels only.
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    boundary = np.argwhere(mask & ~inner).astype(float)
    top = boundary[np.abs(boundary[:, 0] - 37.5) > 30]  # the z extremes dominate at 2.5 mm
    assert diameter == pytest.approx(brute_force_diameter(top, geometry), rel=1e-9)


def test_empty_labels():
    stats = compute_statistics(Volume(np.zeros((4, 5, 6), dtype=np.uint8)), Volume(np.zeros((4, 5, 6))))
    assert stats["liver"]["volume_ml"] == 0.0 and stats["tumor"]["count"] == 0
    assert stats["tumor"]["burden_percent"] == 0.0 and stats["tumor"]["lesions"] == []
    assert stats["liver"]["hu"]["mean"] is None
    rows = stats_to_rows(stats)
    assert len(rows) == 3 and all(row["percent_of_liver"] is None for row in rows)  # no liver: no share
    assert summary_text(stats) == "liver 0.0 mL, tumor 0.0 mL in 0 lesion(s), burden 0.0 %"


def test_grid_mismatch_raises():
    labels = Volume(np.zeros((4, 5, 6), dtype=np.uint8))
    with pytest.raises(InputError):
        compute_statistics(labels, Volume(np.zeros((4, 5, 7))))
    with pytest.raises(InputError):
        compute_statistics(labels, Volume(np.zeros((4, 5, 6)), spacing=(1.0, 1.0, 2.0)))
    with pytest.raises(InputError):  # only the direction differs: the CT lies elsewhere in the patient
        compute_statistics(labels, Volume(np.zeros((4, 5, 6)), direction=np.diag([-1.0, -1.0, 1.0])))
    with pytest.raises(InputError):
        compute_statistics(Volume(np.full((2, 2, 2), 3, dtype=np.uint8)))
    interpolated = np.ones((5, 5, 5), np.float32)
    interpolated[0, 0, 0], interpolated[4, 4, 4] = 0.5, 1.5  # labels resampled linearly by mistake
    with pytest.raises(InputError, match="only 0"):
        compute_statistics(Volume(interpolated))
    exact = compute_statistics(Volume(np.round(interpolated).astype(np.float32)))  # whole numbers as floats: fine
    assert exact["liver"]["voxels"] == 124 and exact["tumor"]["voxels"] == 1  # 0.5 rounds to 0, 1.5 to 2


def test_same_grid_compares_size_spacing_origin_and_direction():
    grid = Volume(np.zeros((4, 5, 6), np.uint8), spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0),
                  direction=oblique_direction())
    assert grid.same_grid(grid.with_array(np.ones((4, 5, 6), np.float32)))
    flipped = grid.direction.copy()
    flipped[:, 2] *= -1.0  # k runs the other way: same size, spacing and origin
    other = Volume(grid.array, spacing=grid.spacing, origin=grid.origin, direction=flipped)
    assert not grid.same_grid(other) and not other.same_grid(grid)
    assert not grid.same_grid(Volume(grid.array, spacing=grid.spacing, origin=(10.0, -20.0, 31.0),
                                     direction=grid.direction))


def test_lesion_intensities_are_each_lesions_own(sphere_phantom):
    labels, ct, _, _ = sphere_phantom
    stats = compute_statistics(labels, ct)
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(
        (labels.array == 2).astype(np.uint8)), True))
    by_size = sorted(range(1, components.max() + 1), key=lambda i: -np.count_nonzero(components == i))
    for lesion, label in zip(stats["tumor"]["lesions"], by_size):
        values = ct.array[components == label].astype(np.float64)
        assert lesion["voxels"] == values.size
        assert lesion["mean_hu"] == pytest.approx(values.mean(), rel=1e-9)
        assert lesion["std_hu"] == pytest.approx(values.std(), rel=1e-9)  # population, as the segments' rows
        assert (lesion["min_hu"], lesion["max_hu"]) == (values.min(), values.max())
    assert compute_statistics(labels)["tumor"]["lesions"][0]["std_hu"] is None  # no CT, no intensities


def test_image_edges_are_named_by_the_patients_sides_and_lesions_flagged():
    labels = np.zeros((20, 30, 40), dtype=np.uint8)
    labels[0:12, 5:25, 10:39] = 1  # reaches k = 0 and the last i column
    labels[3:6, 10:14, 12:16] = 2  # inside
    labels[8:11, 20:24, 36:40] = 2  # reaches the last i column too
    flipped = np.diag([-1.0, 1.0, -1.0])  # i towards the right, k towards inferior
    for direction, expected in ((np.eye(3), ["inferior", "left"]), (flipped, ["superior", "right"])):
        stats = compute_statistics(Volume(labels, (1.0, 1.0, 2.0), direction=direction))
        assert stats["liver"]["image_edges"] == expected and stats["liver"]["touches_image_edge"] is True
        assert [lesion["touches_image_edge"] for lesion in stats["tumor"]["lesions"]] == [False, True]
    inside = np.pad(labels[:, :, :36], 1)
    assert compute_statistics(Volume(inside))["liver"]["image_edges"] == []
    assert compute_statistics(Volume(np.zeros((4, 4, 4), np.uint8)))["liver"]["touches_image_edge"] is False


@pytest.mark.parametrize("thickness, minimum", [(1.0, 10.0), (5.0, 10.0), (6.0, 12.0)])
def test_recist_measurability_follows_the_slice_thickness(thickness, minimum):
    """RECIST 1.1: measurable from 10 mm on slices of 5 mm or thinner, else from twice the thickness."""
    labels = np.zeros((9, 40, 40), dtype=np.uint8)
    labels[1:8, 2:38, 2:38] = 1
    labels[4, 5:16, 5:6] = 2  # an 11 mm long lesion on 1 mm pixels (10 mm centre to centre)
    labels[4, 20:31, 20:30] = 2  # 10 x 9 pixels: 13.5 mm across its diagonal
    stats = compute_statistics(Volume(labels, (1.0, 1.0, thickness)))
    assert stats["tumor"]["recist_min_diameter_mm"] == minimum
    axial = [lesion["max_axial_diameter_mm"] for lesion in stats["tumor"]["lesions"]]
    measurable = [lesion["recist_measurable"] for lesion in stats["tumor"]["lesions"]]
    assert measurable == [d >= minimum for d in axial] and stats["tumor"]["count_measurable"] == sum(measurable)
    assert measurable == ([True, True] if minimum == 10.0 else [True, False])


def test_rows_csv_and_json_agree(sphere_phantom, tmp_path):
    labels, ct, _, _ = sphere_phantom
    stats = compute_statistics(labels, ct)
    rows = stats_to_rows(stats)
    assert [row["name"] for row in rows] == ["Liver", "Liver parenchyma", "Tumor", "Lesion 1", "Lesion 2"]
    assert all(tuple(row) == ROW_COLUMNS for row in rows)
    assert rows[0]["volume_ml"] == stats["liver"]["volume_ml"]
    assert rows[3]["max_diameter_mm"] == stats["tumor"]["lesions"][0]["max_diameter_mm"]
    assert rows[3]["centroid_s_mm"] == stats["tumor"]["lesions"][0]["centroid_mm"][2]
    assert rows[3]["std_hu"] == stats["tumor"]["lesions"][0]["std_hu"] and rows[0]["centroid_r_mm"] is None
    assert rows[0]["touches_image_edge"] is False and rows[0]["recist_measurable"] is None
    assert rows[3]["recist_measurable"] is True and rows[1]["touches_image_edge"] is None
    assert rows[0]["percent_of_liver"] == 100.0
    assert rows[2]["percent_of_liver"] == pytest.approx(stats["tumor"]["burden_percent"], rel=1e-12)
    assert rows[1]["percent_of_liver"] + rows[2]["percent_of_liver"] == pytest.approx(100.0)
    lesion_share = 100.0 * stats["tumor"]["lesions"][0]["voxels"] / stats["liver"]["voxels"]
    assert rows[3]["percent_of_liver"] == pytest.approx(lesion_share, rel=1e-12)
    assert summary_text(stats) == (f"liver {round(stats['liver']['volume_ml'], 1)} mL, tumor "
                                   f"{round(stats['tumor']['volume_ml'], 2)} mL in 2 lesion(s), burden "
                                   f"{round(stats['tumor']['burden_percent'], 2)} %")

    write_stats_json(stats, tmp_path / "stats.json")
    write_stats_csv(stats, tmp_path / "stats.csv")
    assert json.loads((tmp_path / "stats.json").read_text(encoding="utf-8")) == stats
    with open(tmp_path / "stats.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows)
    for written, row in zip(table, rows):
        assert list(written) == list(ROW_COLUMNS)
        for key, value in row.items():
            if value is None:
                assert written[key] == ""
            elif isinstance(value, bool):
                assert written[key] == ("yes" if value else "no")
            elif isinstance(value, str):
                assert written[key] == value
            else:
                assert float(written[key]) == pytest.approx(value, rel=1e-12)
                assert len(written[key].lstrip("-").replace(".", "").lstrip("0")) <= 15 or "e" in written[key]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_real_lits_labels_match_direct_computation():
    label_path = real_data("lits117_crop_label.nii.gz")
    ct_path = real_data("lits117_crop_ct.nii.gz")
    import SimpleITK as sitk

    labels = Volume.from_sitk(sitk.ReadImage(str(label_path)))
    ct = Volume.from_sitk(sitk.ReadImage(str(ct_path)))
    stats = compute_statistics(labels, ct)

    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    arr, hu = labels.array, ct.array.astype(np.float64)
    assert stats["liver"]["voxels"] == int(np.count_nonzero(arr))
    assert stats["liver"]["volume_ml"] == pytest.approx(np.count_nonzero(arr) * voxel_ml)
    assert stats["tumor"]["volume_ml"] == pytest.approx(np.count_nonzero(arr == 2) * voxel_ml)
    assert stats["liver"]["hu"]["mean"] == pytest.approx(hu[arr > 0].mean())

    try:
        from scipy import ndimage
    except ImportError:
        ndimage = None
    if ndimage is not None:
        components, count = ndimage.label(arr == 2, structure=np.ones((3, 3, 3)))
    else:
        cc = sitk.ConnectedComponent(sitk.GetImageFromArray((arr == 2).astype(np.uint8)), True)
        components = sitk.GetArrayFromImage(cc)
        count = int(components.max())
    assert stats["tumor"]["count"] == count
    ids = components[components > 0]
    sizes = np.bincount(ids)[1:]
    means = np.bincount(ids, weights=hu[components > 0])[1:] / sizes
    expected = sorted(zip((-sizes).tolist(), np.round(means, 6).tolist()))
    got = sorted((-lesion["voxels"], round(lesion["mean_hu"], 6)) for lesion in stats["tumor"]["lesions"])
    assert got == expected
    assert [lesion["volume_ml"] for lesion in stats["tumor"]["lesions"]] == pytest.approx(
        sorted((sizes * voxel_ml).tolist(), reverse=True))

    small = sorted((lesion["voxels"], lesion["max_diameter_mm"]) for lesion in stats["tumor"]["lesions"]
                   if lesion["voxels"] <= 1500)
    direct = sorted(
        (int(sizes[label - 1]), brute_force_diameter(np.argwhere(components == label).astype(float), labels))
        for label in np.flatnonzero(sizes <= 1500) + 1
    )
    assert [v for v, _ in small] == [v for v, _ in direct]
    np.testing.assert_allclose([d for _, d in small], [d for _, d in direct], rtol=1e-6)


def test_max_axial_diameter_is_the_longest_in_slice_distance_nearest_to_axial():
    """RECIST's long axis: within single slices of the grid axis nearest to S; checked by
    brute force on random blobs, on axial and on sagittal-stored oblique grids."""
    from LiverTumorSegLib.stats import max_axial_diameter_mm

    rng = np.random.default_rng(7)
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # k along L: j is nearest to S
    for direction in (np.eye(3), rotation_about_s(0.3), sagittal @ rotation_about_s(0.2)):
        axis_xyz = int(np.argmax(np.abs(direction[2])))
        for _ in range(10):
            shape = tuple(int(n) for n in rng.integers(3, 10, size=3))
            mask = rng.random(shape) < rng.uniform(0.1, 0.5)
            if not mask.any():
                continue
            geometry = Volume(np.zeros(shape), spacing=tuple(rng.uniform(0.5, 3.0, size=3)), direction=direction)
            points = np.argwhere(mask).astype(float)  # (z, y, x)
            column = 2 - axis_xyz
            expected = max((brute_force_diameter(points[points[:, column] == v], geometry)
                            for v in np.unique(points[:, column]) if (points[:, column] == v).sum() > 1), default=0.0)
            assert max_axial_diameter_mm(mask, geometry) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # an ellipsoid long in S: the 3D diameter is its S length, the axial one its width
    idx = np.indices((30, 12, 12), dtype=float)
    mask = ((idx[0] - 14.5) / 14.0) ** 2 + ((idx[1] - 5.5) / 5.0) ** 2 + ((idx[2] - 5.5) / 5.0) ** 2 <= 1.0
    geometry = Volume(np.zeros(mask.shape), spacing=(1.0, 1.0, 2.0))
    assert max_axial_diameter_mm(mask, geometry) < 12.0 < 50.0 < max_diameter_mm(mask, geometry)
    stats = compute_statistics(geometry.with_array(mask.astype(np.uint8) * 2))
    assert stats["tumor"]["lesions"][0]["max_axial_diameter_mm"] == max_axial_diameter_mm(mask, geometry)


def rotation_about_s(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _in_plane_mask(shape: tuple, spacing: tuple, direction: np.ndarray, inside) -> tuple:
    """(mask, geometry): voxels whose centre (LPS mm, relative to the grid's centre) ``inside``
    takes; ``inside(x, y, z)`` gets arrays."""
    geometry = Volume(np.zeros(shape), spacing=spacing, direction=direction)
    k, j, i = np.indices(shape, dtype=float)
    centre = (np.array(shape[::-1], dtype=float) - 1) / 2
    ijk = np.stack([i - centre[0], j - centre[1], k - centre[2]])
    x, y, z = np.tensordot(direction @ np.diag(spacing), ijk, axes=1)
    return inside(x, y, z), geometry


#: Grids stored sagittally (i along P, j along S, k along L) and coronally (i along L,
#: j along S, k along P): their axial slices are (i, k) planes.
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


@pytest.mark.parametrize("angle", [0.0, 30.0, 45.0, 70.0])
@pytest.mark.parametrize("spacing,direction,shape", [
    ((0.5, 0.5, 2.0), np.eye(3), (3, 100, 100)), ((0.6, 0.9, 2.5), np.eye(3), (3, 100, 100)),
    ((0.7, 0.7, 3.0), rotation_about_s(0.5), (3, 100, 100)),
    ((0.6, 2.0, 0.9), SAGITTAL, (60, 3, 90)), ((0.9, 2.5, 0.6), CORONAL, (90, 3, 60))])
def test_short_axis_is_the_longest_diameter_perpendicular_to_the_axial_long_axis(angle, spacing, direction, shape):
    """An elliptic cylinder 40 x 16 mm in axial planes, turned in-plane by ``angle``, on
    isotropic, anisotropic, turned, sagittal and coronal grids: long and short axis
    within two pixels."""
    from LiverTumorSegLib.stats import axial_axes_mm

    a = np.radians(angle)
    along, across = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])

    def ellipse(x, y, z):
        return ((x * along[0] + y * along[1]) / 20.0) ** 2 + ((x * across[0] + y * across[1]) / 8.0) ** 2 <= 1.0

    mask, geometry = _in_plane_mask(shape, spacing, direction, ellipse)
    long_axis, short_axis = axial_axes_mm(mask, geometry)
    superior = int(np.argmax(np.abs(direction[2])))
    pixel = max(s for axis, s in enumerate(spacing) if axis != superior)
    assert 40.0 - 2 * pixel <= long_axis <= 40.0  # centre to centre: up to a pixel short at each end
    assert 16.0 - 2 * pixel <= short_axis <= 16.0 + 0.5 * pixel
    stats = compute_statistics(geometry.with_array(mask.astype(np.uint8) * 2))
    lesion = stats["tumor"]["lesions"][0]
    assert (lesion["max_axial_diameter_mm"], lesion["short_axis_mm"]) == (long_axis, short_axis)
    assert stats_to_rows(stats)[3]["short_axis_mm"] == short_axis


def test_short_axis_of_slices_that_share_the_long_axis_is_the_largest_of_theirs():
    """Two axial slices with the same 40 mm long axis (ellipses 40 x 8 and 40 x 20 mm whose
    tips are single voxels): the short axis is the wider one's, whichever slice is first."""
    from LiverTumorSegLib.stats import axial_axes_mm

    def ellipses(x, y, z):
        b = np.where(z < 0, 4.0, 10.0)
        return (x / 20.0) ** 2 + (y / b) ** 2 <= 1.0

    mask, geometry = _in_plane_mask((2, 61, 101), (0.5, 0.5, 2.0), np.eye(3), ellipses)
    assert axial_axes_mm(mask[:1], geometry) == (pytest.approx(40.0), pytest.approx(8.0))
    assert axial_axes_mm(mask, geometry) == (pytest.approx(40.0), pytest.approx(20.0))
    assert axial_axes_mm(mask[::-1], geometry) == (pytest.approx(40.0), pytest.approx(20.0))


@pytest.mark.parametrize("direction,spacing,shape", [
    (np.eye(3), (0.5, 0.5, 2.0), (1, 61, 141)), (SAGITTAL, (0.5, 2.0, 0.5), (141, 1, 61))])
def test_short_axis_bands_are_one_pixel_wide(direction, spacing, shape):
    """A 60 mm line one voxel thin with a 10 mm block above it left of its middle and one
    below it from the middle on, in neighbouring columns: each perpendicular chord is
    10 mm, and only a band two pixels wide would join the blocks into 20 mm."""
    from LiverTumorSegLib.stats import axial_axes_mm

    def blocks(x, y, z):
        line = (np.abs(x) <= 30.01) & (np.abs(y) < 0.01)
        above = (x >= -4.01) & (x <= -0.49) & (y >= -0.01) & (y <= 10.01)
        below = (x >= -0.01) & (x <= 4.01) & (y <= 0.01) & (y >= -10.01)
        return (line | above | below) & (np.abs(z) < 1)

    mask, geometry = _in_plane_mask(shape, spacing, direction, blocks)
    assert axial_axes_mm(mask, geometry) == (pytest.approx(60.0), pytest.approx(10.0))


def test_short_axis_is_a_chord_across_the_lesion_not_its_width():
    """A 60 x 4 mm bar with a 8 x 10 mm block above it near one end and one below it near
    the other: 24 mm wide across the long axis, yet no perpendicular chord is longer than
    14 mm. One voxel thick it has no short axis; one voxel has no axes at all."""
    from LiverTumorSegLib.stats import axial_axes_mm

    def shape(x, y, z):
        bar = (np.abs(x) <= 30) & (np.abs(y) <= 2)
        above = (np.abs(x + 20) <= 4) & (y >= 2) & (y <= 12)
        below = (np.abs(x - 20) <= 4) & (y <= -2) & (y >= -12)
        return (bar | above | below) & (np.abs(z) < 1)

    mask, geometry = _in_plane_mask((1, 120, 140), (0.5, 0.5, 2.0), np.eye(3), shape)
    long_axis, short_axis = axial_axes_mm(mask, geometry)
    assert long_axis == pytest.approx(np.hypot(59.5, 3.5))  # voxel centres: a pixel short
    assert 13.0 <= short_axis <= 14.5
    line = np.zeros((1, 3, 9), dtype=bool)
    line[0, 1, 2:8] = True
    assert axial_axes_mm(line, Volume(np.zeros(line.shape), spacing=(0.8, 0.8, 2.0))) == (pytest.approx(4.0), 0.0)
    assert axial_axes_mm(line[:, :, :3], Volume(np.zeros((1, 3, 3)))) == (0.0, 0.0)


def test_readme_lists_every_csv_column_in_order():
    """The README's stats.csv table names exactly the columns written, in their order."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### `stats.csv` columns", 1)[1].split("\n## ", 1)[0]
    listed = [name for line in section.splitlines() if line.startswith("| `")
              for name in re.findall(r"`([a-z_]+)`", line.split("|")[1])]
    assert listed == list(ROW_COLUMNS)


def test_recist_measurability_is_judged_on_the_axial_long_axis_not_the_3d_one():
    """A lesion 15 mm long in S but 1.4 mm across in axial slices is not measurable."""
    labels = np.zeros((20, 8, 8), dtype=np.uint8)
    labels[1:19, 1:7, 1:7] = 1
    labels[2:18, 3:5, 3:5] = 2
    lesion = compute_statistics(Volume(labels, spacing=(1.0, 1.0, 1.0)))["tumor"]["lesions"][0]
    assert lesion["max_diameter_mm"] > 15.0 > 1.5 > lesion["max_axial_diameter_mm"]
    assert lesion["recist_measurable"] is False


def test_diameters_of_a_straight_row_and_of_many_hull_candidates():
    from scipy.spatial.distance import pdist

    from LiverTumorSegLib.stats import _brute_force_diameter

    row = np.zeros((7, 3, 3), dtype=bool)
    row[1:6, 1, 1] = True  # two hull candidates only
    assert max_diameter_mm(row, Volume(np.zeros(row.shape), spacing=(0.8, 0.8, 2.0))) == pytest.approx(8.0)
    points = np.random.default_rng(3).normal(size=(300, 3)) * [1.0, 5.0, 2.0]
    for chunk in (7, 64, 2048):  # the farthest pair in different chunks
        assert _brute_force_diameter(points, chunk=chunk) == pytest.approx(pdist(points).max())


def test_a_slice_beaten_to_the_long_axis_gives_no_short_axis():
    """A 10 x 10 voxel square (long axis 12.7 mm) then a 21-voxel line (20 mm): the line's
    slice holds the long axis, and a line has no short axis."""
    from LiverTumorSegLib.stats import axial_axes_mm

    mask = np.zeros((2, 15, 25), dtype=bool)
    mask[0, 1:11, 1:11] = True
    mask[1, 4, 2:23] = True
    assert axial_axes_mm(mask, Volume(np.zeros(mask.shape), spacing=(1.0, 1.0, 2.0))) == \
        (pytest.approx(20.0), pytest.approx(0.0))


def test_short_axis_bands_on_unequal_in_plane_spacing():
    """0.4 x 1.0 mm pixels: the bands are as wide as the larger spacing and centred on the
    long axis' end, so two 3-pixel spurs in neighbouring columns, on either side of the
    row, make one 6 mm chord."""
    from LiverTumorSegLib.stats import axial_axes_mm

    mask = np.zeros((1, 15, 51), dtype=bool)
    mask[0, 7, :] = True
    mask[0, 8:11, 22] = True
    mask[0, 4:7, 23] = True
    assert axial_axes_mm(mask, Volume(np.zeros(mask.shape), spacing=(0.4, 1.0, 2.0))) == \
        (pytest.approx(20.0), pytest.approx(6.0))


def test_negative_labels_are_refused_and_a_tumour_free_liver_reports_its_edges():
    labels = np.zeros((6, 6, 6), dtype=np.int8)
    labels[0:3, 1:4, 1:4] = 1
    assert compute_statistics(Volume(labels))["liver"]["image_edges"] == ["inferior"]
    labels[5, 5, 5] = -1
    with pytest.raises(InputError, match="only 0"):
        compute_statistics(Volume(labels))


def test_the_long_axis_alone_costs_no_short_axis():
    from LiverTumorSegLib import stats

    z, y, x = np.indices((40, 30, 30))
    prism = (np.abs(y - 14.5) <= 10) & (np.abs(x - 14.5) <= 10)  # every slice shares the long axis
    geometry = Volume(np.zeros(prism.shape), spacing=(0.8, 0.8, 1.0))
    long_axis, short_axis = stats.axial_axes_mm(prism, geometry)
    assert stats.max_axial_diameter_mm(prism, geometry) == long_axis and short_axis == pytest.approx(long_axis)
    assert stats.axial_axes_mm(prism, geometry, short=False) == (long_axis, 0.0)

"""Tests of the synthetic CT phantom generator (LiverTumorSegLib.phantom)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.errors import LiverTumorSegError
from LiverTumorSegLib.phantom import (
    ORIENTATIONS,
    case_seed,
    make_geometry_variants,
    make_phantom,
    write_dataset,
)


def _erode(mask: np.ndarray) -> np.ndarray:
    """6-neighbour binary erosion (voxels on the array border are dropped)."""
    out = mask.copy()
    out[0], out[-1], out[:, 0], out[:, -1], out[:, :, 0], out[:, :, -1] = False, False, False, False, False, False
    for axis in range(3):
        sl_lo = [slice(None)] * 3
        sl_hi = [slice(None)] * 3
        sl_lo[axis], sl_hi[axis] = slice(1, None), slice(None, -1)
        out[tuple(sl_lo)] &= mask[tuple(sl_hi)]
        out[tuple(sl_hi)] &= mask[tuple(sl_lo)]
    return out


def _liver_stats(case) -> tuple:
    """(liver volume in ml, liver centroid in LPS mm) from the label volume (liver + tumour)."""
    lab = case.labels
    idx = np.argwhere(lab.array > 0)[:, ::-1].astype(np.float64)
    m = lab.ijk_to_lps()
    return len(idx) * lab.voxel_volume_ml, m[:3, :3] @ idx.mean(axis=0) + m[:3, 3]


def _lps_of_voxels(vol) -> np.ndarray:
    """LPS position (mm) of every voxel, shape (z, y, x, 3)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in vol.array.shape), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    m = vol.ijk_to_lps()
    return ijk @ m[:3, :3].T + m[:3, 3]


@pytest.fixture(scope="module")
def coarse():
    return make_phantom(7, preset="coarse", n_tumors=3, tumor_diameters_mm=(40.0, 25.0, 12.0))


def test_same_seed_is_bit_identical_and_other_seed_differs():
    a = make_phantom(3, preset="coarse")
    b = make_phantom(3, preset="coarse")
    c = make_phantom(4, preset="coarse")
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert a.info == b.info
    assert a.image.same_grid(b.image)
    assert a.image.array.shape != c.image.array.shape or not np.array_equal(a.image.array, c.image.array)


def test_types_grid_and_sizes(coarse):
    img, lab = coarse.image, coarse.labels
    assert img.array.dtype == np.int16 and lab.array.dtype == np.uint8
    assert img.same_grid(lab)
    assert set(np.unique(lab.array)) <= {0, 1, 2}
    assert all(2.4 <= s <= 4.1 for s in img.spacing)
    assert 50_000 < img.array.size < 1_500_000
    extent = np.asarray(img.shape_xyz) * np.asarray(img.spacing)
    assert np.allclose(img.direction.T @ img.direction, np.eye(3), atol=1e-9)
    assert (np.abs(img.direction) @ extent)[0] > 280.0  # field of view across the body (LPS x), in mm
    assert coarse.info["shape"] == img.shape_xyz and tuple(coarse.info["spacing"]) == img.spacing


def test_hounsfield_units_per_tissue(coarse):
    hu, lab = coarse.image.array.astype(np.float64), coarse.labels.array
    parenchyma = _erode(lab == 1)
    assert 40.0 <= hu[parenchyma].mean() <= 70.0
    corners = np.concatenate([hu[:3, :3, :3].ravel(), hu[-3:, -3:, -3:].ravel(), hu[:3, -3:, :3].ravel()])
    assert corners.mean() < -950.0
    assert (hu > 300).sum() > 200 and hu.max() > 400  # spine and ribs
    assert (np.abs(hu + 100) < 30).sum() > 1000  # fat
    liver_mean = hu[parenchyma].mean()
    pos = _lps_of_voxels(coarse.image)
    for t in coarse.info["tumors"]:
        near = np.linalg.norm(pos - np.asarray(t["centre_lps_mm"]), axis=-1) < t["diameter_mm"] / 4.0
        assert near.sum() > 0 and np.all(lab[near] == 2), "tumour centre (LPS mm) must fall on tumour voxels"
        core = hu[near].mean()
        assert core < liver_mean - 10 if t["kind"] == "hypo" else core > liver_mean + 10


def test_tumours_lie_inside_the_liver(coarse):
    clean = make_phantom(7, preset="coarse", n_tumors=0)
    assert clean.info["tumors"] == [] and not np.any(clean.labels.array == 2)
    assert clean.image.same_grid(coarse.image)
    assert np.array_equal(clean.labels.array > 0, coarse.labels.array > 0), "tumours must not change the liver"
    assert len(coarse.info["tumors"]) == 3
    assert (coarse.labels.array == 2).sum() * coarse.labels.voxel_volume_ml > 5.0


def test_tumour_count_and_size_come_from_the_seed():
    counts = []
    for seed in range(16):
        info = make_phantom(seed, spacing=(8.0, 8.0, 8.0), preset="coarse").info
        counts.append(len(info["tumors"]))
        assert all(3.0 <= t["diameter_mm"] <= 60.0 and t["kind"] in ("hypo", "hyper") for t in info["tumors"])
    assert 0 in counts and max(counts) >= 2


def test_every_orientation_renders_the_same_liver():
    ref = None
    for kind in ORIENTATIONS:
        case = make_phantom(5, preset="coarse", orientation=kind, noise_hu=0.0)
        assert case.info["orientation"] == kind
        d = case.image.direction
        assert np.allclose(d.T @ d, np.eye(3), atol=1e-9)
        if kind == "permuted":
            assert not np.allclose(np.abs(d), np.eye(3))
        if kind == "oblique":
            assert np.abs(d).max(axis=0).min() < 0.999
        volume, centre = _liver_stats(case)
        if ref is None:
            ref = (volume, centre)
        assert volume == pytest.approx(ref[0], rel=0.05)
        assert np.linalg.norm(centre - ref[1]) < 2.0 * max(case.image.spacing)


def test_geometry_variants_share_physical_anatomy():
    cases = make_geometry_variants(2)
    assert set(cases) == {"lps", "ras", "oblique", "anisotropic"}
    assert np.allclose(cases["ras"].image.direction, np.diag([-1.0, -1.0, 1.0]))
    spacing = cases["anisotropic"].image.spacing
    assert spacing[2] == 5.0 and 0.9 <= spacing[0] == spacing[1] < 1.2
    volume, centre = _liver_stats(cases["lps"])
    assert volume > 800.0
    for name, case in cases.items():
        assert case.image.array.size < 2_000_000, name
        assert case.image.same_grid(case.labels)
        assert case.info["tumors"] == cases["lps"].info["tumors"]
        v, c = _liver_stats(case)
        assert v == pytest.approx(volume, rel=0.03), name
        assert np.linalg.norm(c - centre) < 2.0 * min(case.image.spacing), name


def test_explicit_spacing_and_shape_are_used():
    case = make_phantom(1, spacing=(4.0, 4.5, 5.0), shape=(80, 60, 40), orientation="ras", noise_hu=12.0)
    assert case.image.spacing == (4.0, 4.5, 5.0) and case.image.shape_xyz == (80, 60, 40)
    assert case.labels.array.shape == (40, 60, 80)
    assert case.info["noise_hu"] == 12.0


@pytest.mark.parametrize("kwargs", [
    {"preset": "tiny"},
    {"preset": "coarse", "orientation": "sideways"},
    {"spacing": (1.0, 1.0)},
    {"shape": (10, 0, 10)},
    {"n_tumors": -1},
    {"n_tumors": 3, "tumor_diameters_mm": (5.0, 6.0, 7.0, 8.0)},
])
def test_bad_arguments_raise_a_lib_error(kwargs):
    with pytest.raises(LiverTumorSegError, match="."):
        make_phantom(0, **kwargs)


def test_write_dataset_msd_layout(tmp_path):
    seen = []
    root = write_dataset(tmp_path / "ds", 2, seed=9, preset="coarse", progress=lambda d, t: seen.append((d, t)))
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "cancer"}
    assert "synthetic" in meta["description"].lower()
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    assert meta["training"][0] == {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}
    assert meta["test"] == ["./imagesTs/liver_2.nii.gz"]
    for entry in meta["training"]:
        assert (root / entry["image"]).is_file() and (root / entry["label"]).is_file()
    assert all((root / p).is_file() for p in meta["test"])
    assert not (root / "labelsTs").exists()
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert sorted(p.name for p in root.rglob("*") if p.is_file() and "partial" in p.name) == []
    expected = make_phantom(case_seed(9, 0), preset="coarse")
    img = sitk.ReadImage(str(root / "imagesTr" / "liver_0.nii.gz"))
    lab = sitk.ReadImage(str(root / "labelsTr" / "liver_0.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(img), expected.image.array)
    assert np.array_equal(sitk.GetArrayFromImage(lab), expected.labels.array)
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(img.GetOrigin(), expected.image.origin, atol=1e-3)
    assert np.allclose(img.GetSpacing(), expected.image.spacing, atol=1e-5)
    assert np.allclose(np.reshape(img.GetDirection(), (3, 3)), expected.image.direction, atol=1e-5)


def test_a_smaller_set_written_over_a_larger_one_leaves_no_stale_case(tmp_path):
    """liver_1 was a training case of the first set and is the test case of the second:
    left in imagesTr, a tool scanning the folder would train on its test case."""
    root = write_dataset(tmp_path / "ds", 2, seed=3, preset="coarse")
    (root / "imagesTr" / "notes.txt").write_text("the user's")
    write_dataset(root, 1, seed=3, preset="coarse")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["dataset.json", "imagesTr/liver_0.nii.gz", "imagesTr/notes.txt", "imagesTs/liver_1.nii.gz",
                     "labelsTr/liver_0.nii.gz"]


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_stopped_phantom_run_leaves_the_earlier_data_set_as_it_was(tmp_path):
    from LiverTumorSegLib.errors import Cancelled

    root = write_dataset(tmp_path / "ds", 2, seed=1, test_cases=1, preset="coarse")
    before = {name: (root / name).read_bytes() for name in _files(root)}

    def stop_after_the_first_case(done, total):
        if done == 1:
            raise Cancelled("stopped")

    with pytest.raises(Cancelled):
        write_dataset(root, 3, seed=2, test_cases=1, preset="coarse", progress=stop_after_the_first_case)
    assert {name: (root / name).read_bytes() for name in _files(root)} == before
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]
    with pytest.raises(Cancelled):  # into a new folder: nothing at all
        write_dataset(tmp_path / "new", 3, seed=2, preset="coarse", progress=stop_after_the_first_case)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_a_folder_not_written_by_the_phantom_command_is_refused(tmp_path, capsys):
    """`phantom ~/data/Task03_Liver` must not overwrite the real liver_0.nii.gz there."""
    from LiverTumorSegLib.cli import main
    from LiverTumorSegLib.errors import OutputError

    real = tmp_path / "Task03_Liver"
    (real / "imagesTr").mkdir(parents=True)
    (real / "imagesTr" / "liver_0.nii.gz").write_bytes(b"a real case")
    (real / "dataset.json").write_text('{"name": "Liver", "training": []}')
    with pytest.raises(OutputError, match="holds no data set written by the phantom command"):
        write_dataset(real, 1, seed=0, preset="coarse")
    assert main(["phantom", str(real), "--cases", "1", "--preset", "coarse"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no data set written by the phantom command" in err and "Traceback" not in err
    assert _files(real) == ["dataset.json", "imagesTr/liver_0.nii.gz"]
    browsed = tmp_path / "made-in-finder"  # a folder a file manager has shown is still empty
    browsed.mkdir()
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._x"):
        (browsed / name).write_bytes(b"metadata")
    assert (write_dataset(browsed, 1, seed=0, preset="coarse") / "dataset.json").is_file()
    assert (real / "imagesTr" / "liver_0.nii.gz").read_bytes() == b"a real case"
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)  # empty folders (an older run killed at once) are no data
    write_dataset(empty, 1, seed=0, test_cases=0, preset="coarse")
    assert _files(empty) == ["dataset.json", "imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz"]



"""Readers keep the full geometry: NIfTI, NRRD, MHA/MHD and DICOM series (compressed too)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.preprocess import resample_to
from LiverTumorSegLib.io import input_name, read_header, read_volume, write_volume
from LiverTumorSegLib.volume import Volume

from .oracle import rotation


def _volume() -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, size=(6, 20, 24)).astype(np.int16)
    return Volume(array, spacing=(0.7, 0.8, 2.5), origin=(-100.0, 50.0, 12.5),
                  direction=rotation("z", 12.0) @ np.diag([-1.0, 1.0, 1.0]))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_file_formats_round_trip_geometry(tmp_path, suffix):
    v = _volume()
    path = tmp_path / f"ct{suffix}"
    write_volume(v, path)
    back = read_volume(path)
    assert back.same_grid(v, tol=1e-4)
    np.testing.assert_array_equal(back.array, v.array)
    assert read_header(path) == (v.shape_xyz, pytest.approx(v.spacing))
    assert input_name(path) == "ct"
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def _write_dicom_series(folder, v: Volume, compressor=None):
    folder.mkdir()
    image = v.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = v.direction
    orientation = "\\".join(f"{c:.6f}" for c in list(direction[:, 0]) + list(direction[:, 1]))
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        position = v.ijk_to_lps() @ np.array([0, 0, k, 1.0])
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
                "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{c:.6f}" for c in position[:3]),
                "0020|0037": orientation, "0018|0050": str(v.spacing[2]), "0028|1052": "0", "0028|1053": "1"}
        for key, value in tags.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        if compressor:
            writer.SetUseCompression(True)
            writer.SetCompressor(compressor)
        writer.Execute(s)


@pytest.mark.parametrize("compressor,syntax", [(None, None), ("JPEG2000", b"1.2.840.10008.1.2.4.9"),
                                                ("JPEG", b"1.2.840.10008.1.2.4.")])
def test_dicom_series_folder(tmp_path, compressor, syntax):
    v = _volume()
    folder = tmp_path / "series"
    _write_dicom_series(folder, v, compressor)
    if syntax:  # the files really use a compressed transfer syntax
        assert syntax in (folder / "slice000.dcm").read_bytes()[:2000]
    back = read_volume(folder)
    assert back.array.shape == v.array.shape
    np.testing.assert_allclose(back.spacing, v.spacing, atol=1e-3)
    # GDCM may store the slices in the other order (k flipped, origin at the far end);
    # what must hold is the physical position of every voxel.
    corners = np.array([[0, 0, 0, 1], [23, 19, 5, 1], [23, 0, 5, 1], [0, 19, 0, 1]], dtype=float).T
    world = np.sort((v.ijk_to_lps() @ corners)[:3].T, axis=0)
    back_corners = corners.copy()
    np.testing.assert_allclose(np.sort((back.ijk_to_lps() @ back_corners)[:3].T, axis=0)[[0, -1]],
                               world[[0, -1]], atol=1e-3)
    same = resample_to(back, v, interpolation="nearest", default_value=-2000, dtype=np.int16).array
    np.testing.assert_array_equal(same, v.array)  # both codecs are lossless here


def test_folder_without_dicom_is_a_clear_error(tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="DICOM"):
        read_volume(tmp_path)
    assert "WARNING" not in capfd.readouterr().err  # ITK's own warning would precede our one-line reason


def test_single_frame_4d_image_is_accepted_as_3d(tmp_path):
    array = np.random.default_rng(1).integers(-1000, 500, size=(1, 5, 6, 7)).astype(np.int16)
    path = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), str(path))
    assert read_volume(path).array.shape == (5, 6, 7)

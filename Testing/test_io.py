"""Readers keep the full geometry: NIfTI, NRRD, MHA/MHD and DICOM series (compressed too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.errors import InputError, OutputError
from LiverTumorSegLib.preprocess import resample_to
from LiverTumorSegLib.io import input_name, read_dicom_series, read_header, read_volume, write_volume
from LiverTumorSegLib.volume import Volume

from .oracle import rotation


def _volume(depth: int = 6) -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, size=(depth, 20, 24)).astype(np.int16)
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


def _write_dicom_series(folder, v: Volume, compressor=None, *, skip=(), duplicate=None, tilt_mm=0.0,
                        series_uid="1.2.826.0.1.3680043.2.1125.2", description="", small_slice=None,
                        drift_mm=0.0, decimals=6, prefix=""):
    """One file per slice; ``skip`` leaves slices out, ``duplicate`` writes slice k
    twice, ``tilt_mm`` shifts each slice's position that far along the rows (a gantry
    tilt), ``small_slice`` writes slice k at half size, ``drift_mm`` lengthens each
    step by that much more than the one before, ``decimals`` rounds the positions."""
    folder.mkdir(parents=True, exist_ok=True)
    image = v.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = v.direction
    orientation = "\\".join(f"{c:.6f}" for c in list(direction[:, 0]) + list(direction[:, 1]))
    slices = [k for k in range(image.GetDepth()) if k not in skip] + ([duplicate] if duplicate is not None else [])
    for n, k in enumerate(slices):
        s = image[:, :, k] if k != small_slice else image[::2, ::2, k]
        position = v.ijk_to_lps() @ np.array([0, 0, k, 1.0])
        position[:3] += tilt_mm * k * direction[:, 1] + drift_mm * k * (k - 1) / 2 * direction[:, 2]
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
                "0008|103e": description, "0008|0018": f"{series_uid}.{n + 1}",
                "0020|0013": str(n + 1), "0020|0032": "\\".join(f"{c:.{decimals}f}" for c in position[:3]),
                "0020|0037": orientation, "0018|0050": str(v.spacing[2]), "0028|1052": "0", "0028|1053": "1"}
        for key, value in tags.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{series_uid[-1]}slice{n:03d}.dcm"))
        if compressor:
            writer.SetUseCompression(True)
            writer.SetCompressor(compressor)
        writer.Execute(s)


@pytest.mark.parametrize("compressor,syntax", [(None, None), ("JPEG2000", b"1.2.840.10008.1.2.4.9"),
                                                ("JPEG", b"1.2.840.10008.1.2.4.")])
def test_dicom_series_folder(tmp_path, compressor, syntax):
    v = _volume(12)
    folder = tmp_path / "series"
    _write_dicom_series(folder, v, compressor)
    if syntax:  # the files really use a compressed transfer syntax
        assert syntax in (folder / "2slice000.dcm").read_bytes()[:2000]
    back = read_volume(folder)
    assert back.array.shape == v.array.shape
    np.testing.assert_allclose(back.spacing, v.spacing, atol=1e-3)
    # GDCM may store the slices in the other order (k flipped, origin at the far end);
    # what must hold is the physical position of every voxel.
    corners = np.array([[0, 0, 0, 1], [23, 19, 11, 1], [23, 0, 11, 1], [0, 19, 0, 1]], dtype=float).T
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


def _nifti(tmp_path, name, array, sform=None, scode=1, qform=None, qcode=1, **kw):
    nib = pytest.importorskip("nibabel", reason="nibabel writes the odd headers (training extra)")
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    image = nib.Nifti1Image(array, None)
    image.set_sform(affine if sform is None else sform, code=scode)
    image.set_qform(affine if qform is None else qform, code=qcode)
    for key, value in kw.items():
        image.header[key] = value
    path = tmp_path / name
    nib.save(image, str(path))
    return path


def test_nifti_geometry_readers_disagree_on_is_refused(tmp_path, capfd):
    """ITK (and so this reader) and nibabel/FSL take different transforms from such
    headers: the labels would overlay in one tool and be misplaced in the other."""
    array = np.random.default_rng(2).integers(-1000, 500, size=(12, 10, 8)).astype(np.int16)
    shifted = np.diag([0.8, 0.8, 2.0, 1.0])
    shifted[0, 3] = 40.0
    with pytest.raises(InputError, match=r"sform \(code 2\) and qform \(code 1\) place the image up to 40.0 mm apart"):
        read_volume(_nifti(tmp_path, "a.nii.gz", array, scode=2, qform=shifted))
    sheared = np.diag([0.8, 0.8, 2.0, 1.0])
    sheared[0, 1] = 0.5
    with pytest.raises(InputError, match="non-orthogonal"):
        read_volume(_nifti(tmp_path, "b.nii.gz", array, sform=sheared))
    read_header(tmp_path / "b.nii.gz")
    assert "WARNING" not in capfd.readouterr().err  # ITK's "unexpected scales in sform" would precede the reason
    with pytest.raises(InputError, match="no orientation"):
        read_volume(_nifti(tmp_path, "c.nii", array, scode=0, qcode=0))
    # agreeing transforms, either alone, and a qform with qfac -1 are read as before
    for name, kw in {"d.nii.gz": {}, "e.nii.gz": {"qcode": 0}, "f.nii.gz": {"scode": 0},
                     "g.nii.gz": {"sform": np.diag([-0.8, 0.8, -2.0, 1.0]), "qform": np.diag([-0.8, 0.8, -2.0, 1.0])}}.items():
        back = read_volume(_nifti(tmp_path, name, array, **kw))
        np.testing.assert_allclose(back.spacing, (0.8, 0.8, 2.0), rtol=1e-6)


def test_nifti_nan_voxels_are_refused_not_zeroed(tmp_path):
    """SimpleITK's NIfTI reader turns NaN into 0 (soft tissue for the network)."""
    array = np.random.default_rng(3).normal(-300, 400, size=(12, 10, 8)).astype(np.float32)
    array[0, :3, :3] = np.nan
    array[-1, -1, -1] = np.inf
    for name in ("nan.nii.gz", "nan.nii"):
        with pytest.raises(InputError, match="has 10 NaN or Inf voxels"):
            read_volume(_nifti(tmp_path, name, array))
    big_endian = _nifti(tmp_path, "be.nii", array.astype(">f8"))
    with pytest.raises(InputError, match="has 10 NaN or Inf voxels"):
        read_volume(big_endian)
    array[np.isnan(array) | np.isinf(array)] = -1000
    assert read_volume(_nifti(tmp_path, "fine.nii.gz", array)).array.shape == (8, 10, 12)


def test_nifti2_is_named(tmp_path):
    nib = pytest.importorskip("nibabel", reason="nibabel writes NIfTI-2 (training extra)")
    array = np.zeros((6, 6, 6), np.int16) - 1000
    path = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti2Image(array, np.eye(4)), str(path))
    with pytest.raises(InputError, match="NIfTI-2 file, which this reader does not support"):
        read_volume(path)


def _tall_volume() -> Volume:
    rng = np.random.default_rng(4)
    array = rng.integers(-1000, 1500, size=(14, 12, 10)).astype(np.int16)
    return Volume(array, spacing=(0.8, 0.8, 2.5), origin=(-10.0, 5.0, 20.0), direction=np.eye(3))


@pytest.mark.parametrize("fault,message", [
    ({"skip": (6,)}, r"not evenly spaced: 5.00 mm between the slices at .* 2.50 mm elsewhere \(a missing slice\?\)"),
    ({"duplicate": 4}, r"two slices at the same position \(30.00 mm along the slice normal\)"),
    ({"tilt_mm": 0.67}, r"gantry-tilted by 15.0 degrees"),
    ({"small_slice": 3}, r"mixes slices of different sizes \(5x6 and 10x12 pixels\)"),
])
def test_dicom_series_that_is_not_one_regular_grid_is_refused(tmp_path, fault, message, capfd):
    """The reader would average the spacing, misplace slices by up to tens of mm, or dump
    ITK's internals; each gets one line that names the fault."""
    _write_dicom_series(tmp_path / "s", _tall_volume(), **fault)
    with pytest.raises(InputError, match=message):
        read_volume(tmp_path / "s")
    assert "WARNING" not in capfd.readouterr().err


def test_dicom_folder_with_two_ct_series_asks_which(tmp_path):
    v = _tall_volume()
    _write_dicom_series(tmp_path / "study", v, series_uid="1.2.3.1", description="ARTERIAL")
    venous = v.with_array((v.array + 7).astype(np.int16))
    _write_dicom_series(tmp_path / "study", venous, series_uid="1.2.3.2", description="VENOUS")
    with pytest.raises(InputError, match=r"holds 2 CT series; choose one with --series UID .*1\.2\.3\.1 "
                                         r"\('ARTERIAL', 14 slices\); 1\.2\.3\.2 \('VENOUS', 14 slices\)"):
        read_volume(tmp_path / "study")
    np.testing.assert_array_equal(np.sort(read_volume(tmp_path / "study", series_uid="1.2.3.2").array, axis=0),
                                  np.sort(venous.array, axis=0))
    with pytest.raises(InputError, match="holds no DICOM series 9.9"):
        read_volume(tmp_path / "study", series_uid="9.9")
    # a scout (few slices) beside the CT is not a second series to choose from
    scout = Volume(v.array[:2], spacing=v.spacing, origin=v.origin, direction=v.direction)
    _write_dicom_series(tmp_path / "ct_and_scout", v, series_uid="1.2.3.1")
    _write_dicom_series(tmp_path / "ct_and_scout", scout, series_uid="1.2.3.3")
    assert read_volume(tmp_path / "ct_and_scout").array.shape == v.array.shape


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_oblique_nifti_written_from_one_affine_is_accepted(tmp_path, axis):
    """The qform's float32 quaternion of a tilted axial CT (about 180 degrees from RAS)
    used to be decoded 0.1-0.3 mm off at the far corners of a 512x512x300 scan, and
    such files, the engine's own output among them, were refused as 'sform and qform
    disagree'. Checked on headers of that size (no voxels needed), then read back."""
    nib = pytest.importorskip("nibabel", reason="nibabel writes the headers (training extra)")
    from LiverTumorSegLib.io import _check_nifti_geometry, _nifti_header

    for angle in np.arange(0.01, 45.0, 0.37):
        lps = rotation(axis, float(angle)) @ np.diag([0.78, 0.78, 1.25])
        affine = np.eye(4)
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps  # RAS, as NIfTI stores it
        affine[:3, 3] = (180.0, 200.0, -900.0)
        header = nib.Nifti1Header()
        header.set_data_shape((512, 512, 300))
        header.set_sform(affine, code=1)
        header.set_qform(affine, code=1)
        _check_nifti_geometry(_nifti_header(header.binaryblock), f"tilt {angle:.2f}")
    v = Volume(np.zeros((30, 40, 40), np.int16) - 1000, spacing=(0.78, 0.78, 1.25), direction=rotation(axis, 20.0))
    write_volume(v, tmp_path / "tilted.nii.gz")
    assert read_volume(tmp_path / "tilted.nii.gz").same_grid(v, tol=1e-3)


def test_the_series_read_is_recorded(tmp_path, tiny_model):
    """stats.json says which series of a DICOM folder was segmented (UID, description)."""
    import json

    from LiverTumorSegLib.cli import main
    from .oracle import analytic_ct

    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    ct = ct.with_array(np.asarray(ct.array, dtype=np.int16))
    _write_dicom_series(tmp_path / "study", ct, series_uid="1.2.3.1", description="ARTERIAL")
    _write_dicom_series(tmp_path / "study", ct, series_uid="1.2.3.2", description="VENOUS")
    assert main(["segment", str(tmp_path / "study"), "--series", "1.2.3.2", "-o", str(tmp_path / "out"),
                 "--model", str(tiny_model), "--progress", "none", "--fast", "--no-surfaces", "--no-preview"]) == 0
    run = json.loads((tmp_path / "out" / "stats.json").read_text())["run"]
    assert run["series"] == {"uid": "1.2.3.2", "number": "", "description": "VENOUS", "slices": ct.array.shape[0]}


def test_dicom_series_with_drifting_spacing_or_too_few_slices_is_refused(tmp_path, capfd):
    """Steps 2.5, 2.508, 2.516 ... mm: each within 5 % of the median, yet read as evenly
    spaced the middle slices would sit 0.8 mm away from where they are."""
    tall = _tall_volume()
    longer = Volume(np.concatenate([tall.array, tall.array, tall.array[:2]]), tall.spacing, tall.origin)
    _write_dicom_series(tmp_path / "drift", longer, drift_mm=0.008)  # 30 slices
    with pytest.raises(InputError, match=r"slice spacing .* drifts \(2\.50 to 2\.72 mm\).* placed 0\.8\d mm away"):
        read_volume(tmp_path / "drift")
    _write_dicom_series(tmp_path / "few", Volume(_tall_volume().array[:4], (0.8, 0.8, 2.5)))
    with pytest.raises(InputError, match="has only 4 slices: a scout, localizer or dose report"):
        read_volume(tmp_path / "few")
    # positions rounded to 0.1 mm pass, without ITK's warning about the uneven steps
    v = _tall_volume()
    _write_dicom_series(tmp_path / "rounded", Volume(v.array, (0.8, 0.8, 2.55), v.origin), decimals=1)
    assert read_volume(tmp_path / "rounded").spacing[2] == pytest.approx(2.55, abs=0.01)  # steps of 2.5 and 2.6
    assert "WARNING" not in capfd.readouterr().err


def test_dicom_slices_without_position_or_orientation_are_refused(tmp_path, monkeypatch):
    """Without them the reader takes 1 mm slices: a wrong volume, silently."""
    import LiverTumorSegLib.io as io

    _write_dicom_series(tmp_path / "s", _tall_volume())
    real = io._dicom_tags
    monkeypatch.setattr(io, "_dicom_tags", lambda path, *tags: tuple(
        "" if tag == "0020|0032" else value for tag, value in zip(tags, real(path, *tags))))
    with pytest.raises(InputError, match=r"14 slice\(s\) .* carry no Image Position/Orientation"):
        read_volume(tmp_path / "s")


def test_a_localizer_inside_the_ct_series_is_named(tmp_path):
    v = _tall_volume()
    _write_dicom_series(tmp_path / "s", v)
    sideways = Volume(v.array[:1], v.spacing, v.origin, direction=np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]))
    _write_dicom_series(tmp_path / "s", sideways, prefix="scout")
    with pytest.raises(InputError, match=r"mixes slice orientations: 1 image\(s\), e\.g\. scout2slice000\.dcm, lie in "
                                         r"another plane than the other 14 \(a localizer\?\)"):
        read_volume(tmp_path / "s")


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian DICOM element (a sequence's value: its items)."""
    import struct

    if vr == b"SQ":
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    value += b"\0" * (len(value) % 2)
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _item(content: bytes) -> bytes:
    import struct

    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _part10(sop_class: str, dataset: bytes) -> bytes:
    """A DICOM file: preamble, file meta (class, explicit VR little endian) and ``dataset``."""
    meta = (_element(2, 2, b"UI", sop_class.encode()) + _element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1"))
    return (b"\0" * 128 + b"DICM" + _element(2, 0, b"UL", len(meta).to_bytes(4, "little")) + meta
            + _element(8, 0x16, b"UI", sop_class.encode()) + dataset)


@pytest.mark.parametrize("slice_,cut,kind", [
    (0, "uid", "ours"), (13, "uid", "ours"), (6, "uid", "ours"), (13, -10, "ours"),  # its UID can be read
    (13, 150, "maybe"), (13, 130, "maybe"), (13, 0, "maybe"), (13, "zeros", "maybe")])  # it cannot
def test_a_slice_the_reader_cannot_parse_is_not_silently_left_out(tmp_path, slice_, cut, kind):
    """A file cut short by a copy (inside the data, the header, the preamble; empty; or
    zero-filled) is in no series GDCM lists: at either end of the stack the series read
    without it shows no gap, and one slice of anatomy would be lost."""
    v = _tall_volume()
    folder = tmp_path / "s"
    _write_dicom_series(folder, v, series_uid="1.2.3.7")
    assert read_volume(folder).array.shape == v.array.shape
    victim = sorted(folder.glob("*.dcm"))[slice_]
    data = victim.read_bytes()
    if cut == "zeros":
        victim.write_bytes(b"\0" * len(data))
    else:  # just after the series' UID (0020,000E), or at a byte count (negative: from the end)
        victim.write_bytes(data[:data.index(b"\x20\x00\x0e\x00") + 16 if cut == "uid" else cut])
    message = (rf"1 file\(s\) of the DICOM series 1\.2\.3\.7 in .* \(e\.g\. {victim.name}\) cannot be read "
               r"\(cut short or corrupt\?\)" if kind == "ours" else
               rf"1 file\(s\) in .*, beside the DICOM series 1\.2\.3\.7 \(e\.g\. {victim.name}\), cannot be read "
               r".* and may be slices of it")
    with pytest.raises(InputError, match=message):
        read_volume(folder)


def test_a_hidden_slice_is_named_as_hidden_not_as_corrupt(tmp_path):
    """The DICOM reader skips hidden files (names starting with '.'): a whole slice
    hidden by a rename would be left out, and the message must say why."""
    v = _tall_volume()
    folder = tmp_path / "s"
    _write_dicom_series(folder, v, series_uid="1.2.3.7")
    victim = sorted(folder.glob("*.dcm"))[6]
    victim.rename(folder / f".{victim.name}")
    with pytest.raises(InputError, match=rf"1 file\(s\) of the DICOM series 1\.2\.3\.7 in .* \(e\.g\. "
                                         rf"\.{victim.name}\) are hidden .* rename them without the leading"):
        read_volume(folder)


def test_a_cut_slice_in_the_second_folder_of_a_split_series_is_found(tmp_path):
    v = _tall_volume()
    _write_dicom_series(tmp_path / "whole", v, series_uid="1.2.3.7")
    for n, name in enumerate(sorted((tmp_path / "whole").iterdir())):
        part = tmp_path / "cd" / ("SE2" if n >= 7 else "SE1")
        part.mkdir(parents=True, exist_ok=True)
        (part / name.name).write_bytes(name.read_bytes()[:500] if n == 13 else name.read_bytes())
    with pytest.raises(InputError, match=r"in .*SE2, beside the DICOM series 1\.2\.3\.7 \(e\.g\. 7slice013\.dcm\)"):
        read_volume(tmp_path / "cd")


def test_a_split_series_whose_folders_share_a_slice_is_read(tmp_path):
    """Joining drops the second copy of a slice found in two folders; that copy is no
    unparsed file of the series."""
    v = _tall_volume()
    _write_dicom_series(tmp_path / "whole", v, series_uid="1.2.3.7")
    for n, name in enumerate(sorted((tmp_path / "whole").iterdir())):
        for part in (["SE1"] if n < 7 else ["SE2"]) + (["SE2"] if n == 6 else []):
            (tmp_path / "cd" / part).mkdir(parents=True, exist_ok=True)
            (tmp_path / "cd" / part / name.name).write_bytes(name.read_bytes())
    np.testing.assert_array_equal(read_volume(tmp_path / "cd").array, read_volume(tmp_path / "whole").array)


def test_the_unparsed_file_check_fails_clearly_and_without_inode_numbers(tmp_path, monkeypatch):
    """A series folder gone by the time it is listed again gives a one-line reason; on a
    file system without inode numbers (st_ino 0) a cut slice is still found; a cut CT image
    carrying the series' UID beside another one (its own, or one it refers to) may be ours."""
    import os

    import LiverTumorSegLib.io as io

    v = _tall_volume()
    folder = tmp_path / "s"
    _write_dicom_series(folder, v, series_uid="1.2.3.7")
    victim = sorted(folder.glob("*.dcm"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:data.index(b"\x20\x00\x0e\x00") + 16])
    real_stat = os.stat

    def no_inodes(path, *args, **kwargs):
        values = list(real_stat(path, *args, **kwargs))
        values[1] = 0
        return os.stat_result(values)

    with monkeypatch.context() as patch:
        patch.setattr(io.os, "stat", no_inodes)
        with pytest.raises(InputError, match=rf"\(e\.g\. {victim.name}\) cannot be read"):
            read_volume(folder)
    refers = _element(8, 0x1115, b"SQ", _item(_element(0x20, 0xE, b"UI", b"1.2.3.7")))
    victim.write_bytes(_part10("1.2.840.10008.5.1.4.1.1.2.2", refers + _element(0x20, 0xE, b"UI", b"1.2.3.9")))
    with pytest.raises(InputError, match=rf"\(e\.g\. {victim.name}\), cannot be read .* may be slices of it"):
        read_volume(folder)
    victim.unlink()
    real_scandir, calls = os.scandir, []

    def vanished(path="."):
        calls.append(path)
        if len(calls) > 1 and str(path) == str(folder):
            raise FileNotFoundError(2, "No such file or directory")
        return real_scandir(path)

    monkeypatch.setattr(io.os, "scandir", vanished)
    with pytest.raises(InputError, match=r"cannot list the DICOM folder .*s \(it was read a moment ago\): No such"):
        read_volume(folder)


def test_files_beside_the_series_that_are_no_slice_of_it_are_left_alone(tmp_path, monkeypatch):
    """What real exports put beside a CT series: objects that reference it (key images, a
    dose report: GDCM lists neither), a DICOMDIR under another name, an empty LOCKFILE,
    notes, a cut slice of another series. None is refused; a file named like a slice that
    cannot be opened is."""
    import LiverTumorSegLib.io as io

    v = _tall_volume()
    folder = tmp_path / "s"
    _write_dicom_series(folder, v, series_uid="1.2.3.7")
    scout = Volume(v.array[:3], spacing=v.spacing, origin=v.origin, direction=v.direction)
    _write_dicom_series(folder, scout, series_uid="1.2.3.8", prefix="scout")
    cut = folder / "scout8slice002.dcm"
    cut.write_bytes(cut.read_bytes()[:600])  # another series' slice, its own UID readable
    assert b"1.2.3.8" in cut.read_bytes()
    refers = _element(8, 0x1115, b"SQ", _item(_element(0x20, 0xE, b"UI", b"1.2.3.7")))  # Referenced Series
    for name, sop_class in (("KO000001.dcm", "1.2.840.10008.5.1.4.1.1.88.59"),
                            ("SR000001.dcm", "1.2.840.10008.5.1.4.1.1.88.67")):
        (folder / name).write_bytes(_part10(sop_class, _element(0x20, 0xE, b"UI", b"1.2.3.99") + refers))
        assert b"1.2.3.7\0" in (folder / name).read_bytes()
    (folder / "DICOMDIR.BAK").write_bytes(_part10("1.2.840.10008.1.3.10", refers))
    (folder / "LOCKFILE").write_bytes(b"")
    (folder / "notes.txt").write_text("series 1.2.3.7")
    (folder / "7slice014.dcm").write_bytes(b"not DICOM")  # named like a slice, but no DICOM
    assert read_volume(folder).array.shape == v.array.shape
    real_open, locked = open, {"LOCKFILE"}

    def unreadable(path, *args, **kwargs):
        if Path(path).name in locked:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(io, "open", unreadable, raising=False)
    assert read_volume(folder).array.shape == v.array.shape  # a locked file not named like a slice
    locked.add("7slice014.dcm")
    with pytest.raises(InputError, match=r"1 file\(s\) in .* \(e\.g\. 7slice014\.dcm\), cannot be read"):
        read_volume(folder)


def test_element_texts_reads_uids_in_every_encoding():
    import struct

    from LiverTumorSegLib.io import _element_texts

    uid = b"1.2.3.7\0"
    explicit = struct.pack("<HH2sH", 0x20, 0xE, b"UI", len(uid)) + uid
    implicit = struct.pack("<HHI", 0x20, 0xE, len(uid)) + uid
    big = struct.pack(">HH2sH", 0x20, 0xE, b"UI", len(uid)) + uid
    too_long = struct.pack("<HH2sH", 0x20, 0xE, b"UI", 66) + b"1" * 66
    for data in (explicit, implicit, big, b"junk" + explicit + b"more"):
        assert _element_texts(data, 0x20, 0xE) == ["1.2.3.7"]
    assert _element_texts(too_long + explicit[:-2], 0x20, 0xE) == []  # too long; cut inside its value


def test_a_pacs_export_is_searched_below_the_folder_given(tmp_path, tiny_model):
    """DICOMDIR plus PATIENT/STUDY/SERIES folders: the series is found; two are listed."""
    v = _tall_volume()
    root = tmp_path / "export"
    _write_dicom_series(root / "PA000000" / "ST000000" / "SE000001", v, series_uid="1.2.3.1", description="VENOUS")
    (root / "DICOMDIR").write_bytes(b"not a series")
    back = read_volume(root)
    np.testing.assert_array_equal(np.sort(back.array, axis=0), np.sort(v.array, axis=0))
    _write_dicom_series(root / "PA000000" / "ST000000" / "SE000002", v, series_uid="1.2.3.2", description="ARTERIAL")
    with pytest.raises(InputError, match=r"holds 2 CT series; choose one with --series UID .*'VENOUS'.*'ARTERIAL'"):
        read_volume(root)
    assert read_volume(root, series_uid="1.2.3.2").array.shape == v.array.shape
    with pytest.raises(InputError, match="without a readable DICOM series .*subfolders were searched"):
        read_volume((tmp_path / "empty" / "a" / "b").mkdir(parents=True) or tmp_path / "empty")


def test_a_series_split_over_folders_is_joined_in_slice_order(tmp_path):
    """CDs that cap the files per folder split a series; half a volume must not be read."""
    import shutil

    v = _tall_volume()
    _write_dicom_series(tmp_path / "whole", v)
    names = sorted((tmp_path / "whole").iterdir())
    for n, name in enumerate(names):  # every other slice in each folder, names in no useful order
        part = tmp_path / "cd" / ("SE0001" if n % 2 else "SE0002")
        part.mkdir(parents=True, exist_ok=True)
        shutil.copy(name, part / f"IM{(7 * n) % 31:04d}")
    back, record = read_dicom_series(tmp_path / "cd")
    assert back.same_grid(read_volume(tmp_path / "whole"), tol=1e-4) and record["slices"] == 14
    np.testing.assert_array_equal(back.array, read_volume(tmp_path / "whole").array)
    assert record["folders"] == [str(tmp_path / "cd" / "SE0001"), str(tmp_path / "cd" / "SE0002")]
    shutil.copytree(tmp_path / "cd" / "SE0001", tmp_path / "cd" / "SE0001 copy")  # the same images twice
    assert np.array_equal(read_volume(tmp_path / "cd").array, back.array)
    # a half the search cannot enter must not leave the other half passing as the whole series
    import os

    import LiverTumorSegLib.io as io

    real = os.scandir
    hidden = str(tmp_path / "cd" / "SE0002")

    def scandir(path):
        if str(path) == hidden:
            raise PermissionError(13, "Permission denied")
        return real(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(io.os, "scandir", scandir)
        with pytest.raises(InputError, match=r"DICOM folder .*SE0002, beside the series' folder .*SE0001, could not "
                                             r"be searched"):
            read_volume(tmp_path / "cd")


def test_a_scout_beside_the_ct_folder_does_not_hide_it_and_unreadable_folders_are_skipped(tmp_path, monkeypatch):
    import os

    import LiverTumorSegLib.io as io

    v = _tall_volume()
    _write_dicom_series(tmp_path / "study", Volume(v.array[:3], v.spacing, v.origin), series_uid="1.2.3.9")
    _write_dicom_series(tmp_path / "study" / "CT", v, series_uid="1.2.3.1")
    (tmp_path / "study" / "System Volume Information").mkdir()
    real = os.scandir

    def scandir(path):
        if str(path).endswith(("System Volume Information", "reports")):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(io.os, "scandir", scandir)
    assert read_volume(tmp_path / "study").array.shape == v.array.shape  # a drive's system folder: never searched
    (tmp_path / "study" / "CT" / "reports").mkdir()  # below the series' folder, not beside it: no matter
    assert read_volume(tmp_path / "study").array.shape == v.array.shape


def test_names_that_are_not_utf8_are_refused_before_the_image_library_aborts(tmp_path, capsys):
    """SimpleITK's C++ ends the process (no message, exit -6) on such a name."""
    import os

    from LiverTumorSegLib.cli import main

    latin1 = os.fsdecode(tmp_path.as_posix().encode() + b"/M\xfcller")
    try:
        os.mkdir(latin1)
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take names that are not UTF-8")
    good = tmp_path / "ct.nii.gz"
    write_volume(_volume(), good)
    with pytest.raises(InputError, match=r"input path .*M\ufffdller/ct\.nii\.gz holds characters that are not valid UTF-8"):
        read_volume(Path(latin1) / "ct.nii.gz")
    assert read_header(Path(latin1) / "ct.nii.gz") is None
    with pytest.raises(OutputError, match="not valid UTF-8"):
        write_volume(_volume(), Path(latin1) / "labels.nii.gz")
    assert main(["segment", str(good), "-o", str(Path(latin1) / "out"), "--progress", "none"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err and os.listdir(latin1) == []
    _write_dicom_series(tmp_path / "series", _tall_volume())
    beside = os.fsdecode(os.fsencode(tmp_path / "series") + b"/Befund_M\xfcller.pdf")
    Path(beside).write_bytes(b"%PDF-1.4 a report, not part of the series")
    assert read_volume(tmp_path / "series").array.shape[0] == 14  # a file beside the series is no matter
    os.rename(tmp_path / "series" / "2slice003.dcm", os.fsdecode(os.fsencode(tmp_path / "series") + b"/Bild\xe4.dcm"))
    with pytest.raises(InputError, match=r"DICOM file path .*Bild\ufffd\.dcm holds characters that are not valid UTF-8"):
        read_volume(tmp_path / "series")


def test_dicom_text_is_decoded_with_the_files_character_set():
    from LiverTumorSegLib.io import _dicom_text

    latin1 = "Abdomen \udcdcbersicht"  # how the reader hands over the Latin-1 byte 0xDC
    assert _dicom_text(latin1, "ISO_IR 100") == "Abdomen Übersicht"
    assert _dicom_text(latin1, "") == "Abdomen Übersicht"  # no character set named: Latin-1, not a surrogate
    assert _dicom_text("Leber é", "ISO_IR 192") == "Leber é"
    assert _dicom_text("plain", "") == "plain"


# -- from a mutation review: gantry tilt bounds, rescale slope and intercept -----------
@pytest.mark.parametrize("degrees", [1.0, 2.0, 5.0])
def test_a_small_gantry_tilt_is_refused_too(tmp_path, degrees):
    """The reader stacks tilted slices straight: over a 400 mm scan a 2 degree tilt shears
    the last slice 14 mm sideways. Only up to MAX_TILT_DEGREES (0.5) may pass."""
    tilt_mm = np.tan(np.radians(degrees)) * 2.5  # per slice, along the rows
    _write_dicom_series(tmp_path / "s", _tall_volume(), tilt_mm=tilt_mm)
    with pytest.raises(InputError, match=rf"gantry-tilted by {degrees:.1f} degrees"):
        read_volume(tmp_path / "s")


def test_a_tilt_within_tolerance_is_read(tmp_path):
    _write_dicom_series(tmp_path / "s", _tall_volume(), tilt_mm=np.tan(np.radians(0.3)) * 2.5)
    assert read_volume(tmp_path / "s").array.shape == (14, 12, 10)


def test_dicom_rescale_intercept_and_slope_give_hounsfield_units(tmp_path):
    """The suite's DICOM series all carry intercept 0, slope 1, so nothing checks that the
    stored values are turned into HU. Here the files store (HU + 1024) / 2 (checked in the
    raw pixel bytes) with intercept -1024 and slope 2; the volume read must be in HU."""
    import SimpleITK as sitk

    v = _tall_volume()
    v.array[:] = (v.array // 2) * 2  # even HU: exact with slope 2
    image, writer = v.to_sitk(), sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{c:.6f}" for c in list(v.direction[:, 0]) + list(v.direction[:, 1]))
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        position = v.ijk_to_lps() @ np.array([0, 0, k, 1.0])
        for key, value in {"0008|0060": "CT", "0020|000d": "1.2.3", "0020|000e": "1.2.3.4", "0008|0018": f"1.2.3.4.{k}",
                           "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{c:.6f}" for c in position[:3]),
                           "0020|0037": orientation, "0028|1052": "-1024", "0028|1053": "2"}.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    raw = (tmp_path / "slice000.dcm").read_bytes()[-v.array[0].size * 2:]
    stored = np.frombuffer(raw, "<u2").reshape(v.array[0].shape)
    np.testing.assert_array_equal(stored, (v.array[0].astype(np.int32) + 1024) // 2)  # not HU on disk
    back = read_volume(tmp_path)
    np.testing.assert_array_equal(back.array, v.array)
    assert back.same_grid(v, tol=1e-4)

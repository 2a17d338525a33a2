"""Every kind of bad input gets a clear one-line error, exit code 2, and nothing written."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.io import write_volume
from LiverTumorSegLib.volume import Volume

from .helpers import read_weights, write_weights
from .oracle import analytic_ct


@pytest.fixture()
def good_ct(tmp_path):
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    path = tmp_path / "ct.nii.gz"
    write_volume(ct, path)
    return path


def _run(capsys, tmp_path, input_path, *extra):
    out = tmp_path / "out"
    code = main(["segment", str(input_path), "-o", str(out), "--progress", "none", *extra])
    err = capsys.readouterr().err.strip()
    leftovers = [p.name for p in tmp_path.iterdir() if ".partial" in p.name]
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    return code, err, written, leftovers


def _assert_refused(result, *words):
    code, err, written, leftovers = result
    assert code == 2, err
    assert err.startswith("livertumorseg: error:") and len(err.splitlines()) == 1, err
    for word in words:
        assert word.lower() in err.lower(), err
    assert written == [] and leftovers == []


def _write_array(path, array, spacing=(1.0, 1.0, 1.0), is_vector=False):
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.SetSpacing((tuple(spacing) + (1.0,))[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def test_missing_file(capsys, tmp_path, tiny_model):
    _assert_refused(_run(capsys, tmp_path, tmp_path / "nope.nii.gz", "--model", str(tiny_model)), "not found")


def test_with_the_progress_bar_an_error_is_the_only_line_left(capsys, tmp_path, tiny_model):
    ct = Volume(np.full((8, 8, 8), -1000.0, dtype=np.float32), (2.0, 2.0, 2.0))
    write_volume(ct, tmp_path / "constant.nii.gz")
    code = main(["segment", str(tmp_path / "constant.nii.gz"), "-o", str(tmp_path / "out"), "--model", str(tiny_model)])
    err = capsys.readouterr().err
    # what a terminal shows: each line's text after its last carriage return
    shown = [line.split("\r")[-1].rstrip() for line in err.split("\n")]
    assert code == 2 and [line for line in shown if line] == [
        "livertumorseg: error: the volume is constant (every voxel is -1000); there is nothing to segment"], err


def test_corrupt_and_truncated_files(capsys, tmp_path, tiny_model, good_ct):
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good_ct.read_bytes()[:300])
    _assert_refused(_run(capsys, tmp_path, truncated, "--model", str(tiny_model)), "truncated")
    raw = tmp_path / "raw.nii"
    sitk.WriteImage(sitk.ReadImage(str(good_ct)), str(raw))
    half = tmp_path / "half.nii"
    half.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    _assert_refused(_run(capsys, tmp_path, half, "--model", str(tiny_model)), "truncated")
    mha = tmp_path / "ct.mha"
    sitk.WriteImage(sitk.ReadImage(str(good_ct)), str(mha))
    cut = tmp_path / "cut.mha"
    cut.write_bytes(mha.read_bytes()[: mha.stat().st_size // 2])
    _assert_refused(_run(capsys, tmp_path, cut, "--model", str(tiny_model)), "cannot read")
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(os.urandom(4000))
    _assert_refused(_run(capsys, tmp_path, garbage, "--model", str(tiny_model)), "cannot read")


def test_2d_image(capsys, tmp_path, tiny_model):
    path = _write_array(tmp_path / "slice.nii.gz", np.full((64, 64), -1000, np.int16))
    _assert_refused(_run(capsys, tmp_path, path, "--model", str(tiny_model)), "2D")


def test_4d_and_rgb_images(capsys, tmp_path, tiny_model):
    four = _write_array(tmp_path / "4d.nii.gz", np.zeros((3, 8, 8, 8), np.int16))
    _assert_refused(_run(capsys, tmp_path, four, "--model", str(tiny_model)), "4D")
    rgb = _write_array(tmp_path / "rgb.mha", np.zeros((8, 8, 8, 3), np.uint8), is_vector=True)
    _assert_refused(_run(capsys, tmp_path, rgb, "--model", str(tiny_model)), "components")


def test_a_sheared_direction_in_a_file_is_refused(capsys, tmp_path, tiny_model):
    """An MHA whose axes are not at right angles (a gantry tilt written into the header)
    would give wrong volumes; it is refused by the reader."""
    raw = tmp_path / "tilted.raw"
    ct = np.full((12, 12, 12), -1000, np.int16)
    ct[3:9, 3:9, 3:9] = 60
    raw.write_bytes(ct.tobytes())
    header = tmp_path / "tilted.mha"
    header.write_text("ObjectType = Image\nNDims = 3\nTransformMatrix = 1 0 0 0.5 0.866 0 0 0 1\n"
                      "Offset = 0 0 0\nElementSpacing = 1 1 1\nDimSize = 12 12 12\nElementType = MET_SHORT\n"
                      "ElementDataFile = tilted.raw\n")
    _assert_refused(_run(capsys, tmp_path, header, "--model", str(tiny_model)), "non-orthogonal direction")


def test_constant_volume(capsys, tmp_path, tiny_model):
    path = _write_array(tmp_path / "flat.nii.gz", np.full((10, 12, 14), -1000, np.int16))
    _assert_refused(_run(capsys, tmp_path, path, "--model", str(tiny_model)), "constant")


def test_nan_and_inf_voxels(capsys, tmp_path, tiny_model):
    array = np.full((10, 12, 14), -1000.0, np.float32)
    array[5, 5, 5] = np.nan
    array[2, 3, 4] = np.inf
    path = _write_array(tmp_path / "nan.mha", array)
    _assert_refused(_run(capsys, tmp_path, path, "--model", str(tiny_model)), "NaN")


def test_mr_like_intensities_refused_unless_overridden(capsys, tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    mr = rng.integers(0, 1200, size=(20, 24, 24)).astype(np.int16)
    path = _write_array(tmp_path / "t1.nii.gz", mr, spacing=(3.0, 3.0, 3.0))
    _assert_refused(_run(capsys, tmp_path, path, "--model", str(tiny_model)), "--allow-non-ct")
    code, err, written, _ = _run(capsys, tmp_path, path, "--model", str(tiny_model), "--allow-non-ct")
    assert code == 0, err
    assert "segmentation.nii.gz" in written


def test_a_label_map_given_as_the_input_is_named_as_such(capsys, tmp_path, tiny_model):
    labels = np.zeros((20, 24, 24), np.uint8)
    labels[5:15, 6:18, 6:18] = 1
    labels[8:11, 9:12, 9:12] = 2
    path = _write_array(tmp_path / "segmentation.nii.gz", labels, spacing=(3.0, 3.0, 3.0))
    _assert_refused(_run(capsys, tmp_path, path, "--model", str(tiny_model)), "label map (3 distinct values: 0, 1, 2)")


def test_label_map_values_are_counted_exactly_even_when_rare():
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.preprocess import validate_ct
    from LiverTumorSegLib.volume import Volume

    labels = np.zeros((512, 64, 64), np.uint8)  # 2 M voxels: more than the sample
    labels[100:200, 10:40, 10:40] = 1
    labels[300, 30, 30] = 2  # one voxel: almost surely not in the sample
    with pytest.raises(InputError, match=r"label map \(3 distinct values: 0, 1, 2\)"):
        validate_ct(Volume(labels))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 64)).astype(np.uint8)  # an 8-bit picture
    with pytest.raises(InputError, match="--allow-non-ct"):
        validate_ct(Volume(image))


def test_volume_over_the_memory_budget(capsys, tmp_path, tiny_model, good_ct):
    _assert_refused(_run(capsys, tmp_path, good_ct, "--model", str(tiny_model), "--memory-budget-gb", "0.5"),
                    "memory")


def test_budget_check_reads_only_the_header(tmp_path, monkeypatch, tiny_model):
    """A huge volume is refused from its header, before any voxel is read."""
    import LiverTumorSegLib.io as io

    huge = tmp_path / "huge.mha"
    huge.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 3000\nElementType = MET_SHORT\n"
                    "ElementSpacing = 0.5 0.5 0.5\nElementDataFile = huge.raw\n")
    monkeypatch.setattr(io, "read_volume", lambda p: pytest.fail("the voxels must not be read"))
    code = main(["segment", str(huge), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--progress", "none"])
    assert code == 2 and not (tmp_path / "out").exists()


def test_card_that_does_not_match_its_weights(capsys, tmp_path, tiny_model, good_ct):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    card = json.loads((model / "model.json").read_text(encoding="utf-8"))
    card["architecture"]["widths"] = [8, 16]
    (model / "model.json").write_text(json.dumps(card))
    _assert_refused(_run(capsys, tmp_path, good_ct, "--model", str(model)), "do not match")


def test_checksum_mismatch(capsys, tmp_path, tiny_model, good_ct):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    state = read_weights(model)
    next(iter(state.values())).add_(1.0)
    write_weights(model, state)
    _assert_refused(_run(capsys, tmp_path, good_ct, "--model", str(model)), "checksum")


def test_output_folder_not_writable(capsys, tmp_path, tiny_model, good_ct, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["segment", str(good_ct), "-o", str(blocker), "--model", str(tiny_model), "--progress", "none"])
    assert code == 2 and "not a folder" in capsys.readouterr().err
    code = main(["segment", str(good_ct), "-o", str(blocker / "sub"), "--model", str(tiny_model), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and f"{blocker} is a file, not a folder" in err and "permission" not in err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if "locked" in str(p) else real_access(p, mode))
    locked = tmp_path / "locked"
    locked.mkdir()
    code = main(["segment", str(good_ct), "-o", str(locked), "--model", str(tiny_model), "--progress", "none"])
    assert code == 2 and "permission denied" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


def test_failure_while_writing_leaves_nothing(capsys, tmp_path, tiny_model, good_ct, monkeypatch):
    import LiverTumorSegLib.preview as preview

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(preview, "write_preview_png", explode)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's own file")
    with pytest.raises(OSError):
        main(["segment", str(good_ct), "-o", str(out), "--model", str(tiny_model), "--progress", "none"])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    nested = tmp_path / "new" / "case"  # folders that do not exist yet are made only on success
    with pytest.raises(OSError):
        main(["segment", str(good_ct), "-o", str(nested), "--model", str(tiny_model), "--progress", "none"])
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    monkeypatch.undo()
    assert main(["segment", str(good_ct), "-o", str(nested), "--model", str(tiny_model), "--progress", "none"]) == 0
    assert (nested / "segmentation.nii.gz").is_file()
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_memory_estimate_follows_the_model_batch_and_precision(tiny_model):
    """The estimate grows with what a forward pass holds, so a small model on a small CT
    is not refused on a machine with little free memory (and fp32 is not underestimated)."""
    from LiverTumorSegLib.model.registry import DEFAULT_MODEL
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter
    from LiverTumorSegLib.resources import batch_activation_bytes

    def estimate(model, **kw):
        return Segmenter(model, SegmentOptions(device="cpu", **kw)).check_memory((256, 256, 128), (0.8, 0.8, 1.5))

    assert batch_activation_bytes((96,) * 3, 32, 2, False) == 2 * batch_activation_bytes((96,) * 3, 32, 1, False)
    assert batch_activation_bytes((96,) * 3, 32, 2, True) < batch_activation_bytes((96,) * 3, 32, 2, False)
    assert batch_activation_bytes((48,) * 3, 8, 2, False) * 32 == batch_activation_bytes((96,) * 3, 32, 2, False)
    assert estimate(DEFAULT_MODEL, precision="fp32") < 1 << 30  # the bundled demo model on a 256x256x128 CT
    assert estimate(DEFAULT_MODEL, precision="fp32", batch_size=8) > estimate(DEFAULT_MODEL, precision="fp32")
    # tiny_model: 32^3 patches at 3 mm, so this CT (a 70x70x65 model grid) has 3 x 3 x 3
    # windows at its 25 % overlap; a batch never holds more
    batch = {n: estimate(tiny_model, precision="fp32", batch_size=n) for n in (26, 27, 64)}
    assert batch[26] < batch[27] == batch[64]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from Linux /proc")
def test_memory_estimate_is_above_the_measured_peak(tmp_path):
    """One real run of the command line in a fresh process, with the bundled model in fp32."""
    import subprocess
    import sys

    from LiverTumorSegLib.io import read_header
    from LiverTumorSegLib.model.registry import DEFAULT_MODEL
    from LiverTumorSegLib.phantom import make_phantom
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    from .helpers import REPO

    path = tmp_path / "ct.nii.gz"
    write_volume(make_phantom(4, preset="coarse").image, path)
    code = ("import sys; from LiverTumorSegLib.cli import main; rc = main(sys.argv[1:]); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "segment", str(path), "-o", str(tmp_path / "out"),
                           "--progress", "none", "--precision", "fp32", "--device", "cpu"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stderr.strip().splitlines()[-1]) * 1024
    estimate = Segmenter(DEFAULT_MODEL, SegmentOptions(device="cpu", precision="fp32")).check_memory(*read_header(path))
    assert peak < estimate, (peak >> 20, estimate >> 20)


def test_spacing_in_the_wrong_units_is_named_before_the_memory_estimate(capsys, tmp_path, tiny_model):
    """A NIfTI whose units say metres has a spacing ~1000 times too large; its memory
    estimate (on the model grid) is huge, but the spacing is what to report."""
    array = np.full((10, 12, 14), -1000, np.int16)
    array[3:7, 4:8, 4:9] = 40
    path = _write_array(tmp_path / "metres.nii.gz", array, spacing=(3262.0, 3262.0, 3850.0))
    _assert_refused(_run(capsys, tmp_path, path, "--model", str(tiny_model)), "spacing", "implausible", "units")


def test_outside_field_of_view_padding_below_minus_3100_is_accepted_when_air_is_there():
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.preprocess import validate_ct

    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    padded = np.asarray(ct.array, dtype=np.int16).copy()
    padded[:, :4, :] = -32768  # some scanners' value outside the reconstruction circle
    validate_ct(ct.with_array(padded))
    no_air = np.where(padded < -3100, padded, np.maximum(padded, 100)).astype(np.int16)
    with pytest.raises(InputError, match="no air between -3100 and -500 HU"):
        validate_ct(ct.with_array(no_air))


def test_a_liver_found_in_air_is_flagged():
    """A scan that misses the liver (a thin slab, a crop outside the abdomen) can give a
    plausible-looking volume; most of that 'liver' then lies in air."""
    from LiverTumorSegLib.result_checks import liver_in_air_warning

    hu = np.full((10, 10, 10), 50.0, np.float32)
    hu[:, :, :5] = -1000.0
    labels = np.zeros(hu.shape, np.uint8)
    labels[2:8, 2:8, 3:7] = 1  # half of it in air
    message = liver_in_air_warning(labels, hu)
    assert message is not None and message.startswith("50 % of the liver found lies in air")
    labels[2:8, 2:8, 3:7] = 0
    labels[2:8, 2:8, 5:9] = 2  # all in tissue
    assert liver_in_air_warning(labels, hu) is None
    assert liver_in_air_warning(np.zeros_like(labels), hu) is None


def test_the_warning_reaches_stderr_and_stats_json(capsys, tmp_path, tiny_model, monkeypatch):
    from LiverTumorSegLib import result_checks

    monkeypatch.setattr(result_checks, "liver_in_air_warning", lambda labels, hu: "flagged for the test")
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nii.gz")
    code, err, written, _ = _run(capsys, tmp_path, tmp_path / "ct.nii.gz", "--model", str(tiny_model), "--fast")
    assert code == 0 and "livertumorseg: warning: flagged for the test" in err.splitlines()
    warnings = json.loads((tmp_path / "out" / "stats.json").read_text())["run"]["warnings"]
    assert warnings[0] == "flagged for the test" and f"livertumorseg: warning: {warnings[-1]}" in err.splitlines()

"""The command line end to end: files, geometry, schema, progress, cancel."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.cli import WRITE_START, main
from LiverTumorSegLib.io import read_volume, write_volume
from LiverTumorSegLib.volume import Volume
from LiverTumorSegLib.model.registry import BUNDLED_DIR, DEFAULT_MODEL

from .helpers import REPO, real_data
from .oracle import analytic_ct, oracle_model


def _model_for_real_data(tiny_model):
    bundled = BUNDLED_DIR / DEFAULT_MODEL
    return bundled if (bundled / "model.json").is_file() else tiny_model


def test_segment_real_3mm_abdomen_end_to_end(tmp_path, tiny_model, capsys):
    ct_path = real_data("abdomen_3mm_ct.nii.gz")
    out = tmp_path / "out"
    code = main(["segment", str(ct_path), "-o", str(out), "--model", str(_model_for_real_data(tiny_model)),
                 "--progress", "none"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    names = sorted(p.name for p in out.iterdir())
    assert {"segmentation.nii.gz", "stats.json", "stats.csv", "preview.png", "liver.stl"} <= set(names)
    assert ("tumor.stl" in names) == (json.loads((out / "stats.json").read_text(encoding="utf-8"))["tumor"]["count"] > 0)
    assert str(out) in printed.out

    ct, seg = read_volume(ct_path), read_volume(out / "segmentation.nii.gz")
    assert seg.same_grid(ct) and seg.array.dtype == np.uint8
    assert set(np.unique(seg.array)) <= {0, 1, 2}

    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    liver_voxels = int((seg.array > 0).sum())
    assert stats["liver"]["volume_ml"] == pytest.approx(liver_voxels * ct.voxel_volume_ml, rel=1e-6)
    for key in ("volume_ml", "count", "burden_percent", "lesions"):
        assert key in stats["tumor"]
    for lesion in stats["tumor"]["lesions"]:
        assert {"volume_ml", "max_diameter_mm", "centroid_mm"} <= set(lesion)
    rows = list(csv.DictReader((out / "stats.csv").open()))
    assert float(rows[0]["volume_ml"]) == pytest.approx(stats["liver"]["volume_ml"], rel=1e-6)
    assert stats["run"]["input"] == str(ct_path.resolve())
    relative = subprocess.run([sys.executable, "-m", "LiverTumorSegLib", "segment", os.path.relpath(ct_path, tmp_path),
                               "-o", "rel", "--model", str(tiny_model), "--progress", "none", "--no-surfaces",
                               "--no-preview"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert relative.returncode == 0, relative.stderr  # a path as typed depends on where the run was: recorded whole
    assert json.loads((tmp_path / "rel" / "stats.json").read_text())["run"]["input"] == str(ct_path.resolve())
    preview = sitk.ReadImage(str(out / "preview.png"))
    assert preview.GetNumberOfComponentsPerPixel() == 3


def test_json_progress_lines(tmp_path, tiny_model, capsys):
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nrrd")
    code = main(["segment", str(tmp_path / "ct.nrrd"), "-o", str(tmp_path / "o"), "--model", str(tiny_model),
                 "--progress", "json", "--no-surfaces", "--fast", "--window-grid", "body"])
    assert code == 0
    run = json.loads((tmp_path / "o" / "stats.json").read_text(encoding="utf-8"))["run"]
    assert run["window_grid"] == "body"
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress = [e["progress"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)
    # 1.0 means the files are in: segmenting ends before it, and only the last report reaches it
    messages = [e["message"] for e in events if e["event"] == "progress"]
    assert progress.count(1.0) == 1 and messages[-1] == "written"
    segmented = messages.index("segmented")
    assert progress[segmented] == pytest.approx(WRITE_START) and WRITE_START < 1.0
    assert "writing the segmentation" in messages[segmented:] and "writing the preview" in messages[segmented:]
    done = events[-1]
    assert done["event"] == "done" and set(done["outputs"]) >= {"segmentation", "stats_json", "preview"}
    assert not any(name.endswith(".stl") for name in os.listdir(tmp_path / "o"))


def test_sigterm_cancels_and_leaves_nothing(tmp_path):
    """A run stopped with SIGTERM (Cancel in Slicer) exits 130 and writes nothing."""
    from .helpers import make_tiny_model

    model = make_tiny_model(tmp_path / "m", widths=(8, 16), patch=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    ct, _ = analytic_ct((1.0, 1.0, 1.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "LiverTumorSegLib", "segment", str(tmp_path / "ct.nii.gz"), "-o", str(out),
         "--model", str(model), "--progress", "json", "--batch-size", "1", "--overlap", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and "inference" in event["message"]:
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    # keep reading: a child blocked writing progress into a full pipe would never stop
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not out.exists() or list(out.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_sigterm_while_the_weights_load_is_a_cancel_not_a_broken_model(tmp_path, tiny_model):
    """torch's load_state_dict catches Exception: a SIGTERM landing there used to be
    reported as weights that do not match the model (exit 2). It is a cancel (130)."""
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nii.gz")
    script = (  # the signal arrives during the first tensor copy into the network
        "import os, signal, sys, torch\n"
        "copy = torch.Tensor.copy_\n"
        "def copy_once(self, *a, **k):\n"
        "    torch.Tensor.copy_ = copy\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return copy(self, *a, **k)\n"
        "torch.Tensor.copy_ = copy_once\n"
        "from LiverTumorSegLib.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", script, "segment", str(tmp_path / "ct.nii.gz"), "-o", str(out),
                             "--model", str(tiny_model), "--progress", "none"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert result.returncode == 130, result.stderr
    assert "cancelled" in result.stderr and "do not match" not in result.stderr and not out.exists()


def test_a_signal_while_outputs_are_moved_in_waits_until_they_all_are(tmp_path, tiny_model):
    """SIGTERM between two renames used to leave one run's segmentation beside another's
    stats.json, and say 'nothing was written'. It is now held until the set is in place."""
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    base = ["segment", str(tmp_path / "ct.nii.gz"), "-o", str(out), "--model", str(tiny_model), "--progress", "none"]
    assert main(base + ["--min-lesion-ml", "0"]) == 0
    script = (  # the signal arrives as the first new file is moved in
        "import os, signal, sys\n"
        "import LiverTumorSegLib.atomic as atomic\n"
        "replace = os.replace\n"
        "def replace_once(a, b):\n"
        "    if os.path.dirname(b) == os.environ['OUTDIR']:  # a move into OUTDIR, i.e. publishing\n"
        "        atomic.os.replace = replace\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return replace(a, b)\n"
        "atomic.os.replace = replace_once\n"
        "from LiverTumorSegLib.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", script, *base, "--mesh-format", "obj", "--no-preview"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO), OUTDIR=str(out)),
                            timeout=120)
    assert result.returncode == 130 and "cancelled after every output was written" in result.stderr, result.stderr
    listed = json.loads((out / "stats.json").read_text())["run"]["outputs"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir())  # one run's files, all of them
    assert "preview.png" not in listed and not any(name.endswith(".stl") for name in listed)


def test_a_held_signal_is_not_lost_when_the_moves_fail_and_does_not_outlive_them():
    """A signal held during the moves, then a failing move: the run stops as cancelled
    (not as the move's error), and the next block starts with nothing held."""
    from LiverTumorSegLib.atomic import InterruptedAfterwards, defer_interrupt, uninterrupted

    with pytest.raises(KeyboardInterrupt) as info:
        with uninterrupted():
            assert defer_interrupt()  # the signal handler's call: held
            raise OSError("disk full")
    assert not isinstance(info.value, InterruptedAfterwards)
    with uninterrupted():
        pass  # nothing pending any more: no spurious interrupt
    assert not defer_interrupt()


def test_an_ignored_sigint_stays_ignored(monkeypatch):
    """A job started in the background of a script has SIGINT ignored: a Ctrl-C in that
    terminal must not cancel it."""
    import LiverTumorSegLib.cli as cli

    def models_while_ctrl_c_is_pressed():
        os.kill(os.getpid(), signal.SIGINT)
        return 0

    monkeypatch.setattr(cli, "run_models", models_while_ctrl_c_is_pressed)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["models"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_bad_option_values(tmp_path, tiny_model, capsys):
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nii.gz")
    code = main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "o"), "--model", str(tiny_model),
                 "--overlap", "1.2"])
    assert code == 2 and "--overlap" in capsys.readouterr().err
    code = main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "o"), "--model", str(tiny_model),
                 "--fast", "--overlap", "0.5"])  # used to run silently with no overlap
    assert code == 2 and "contradicts --overlap 0.5" in capsys.readouterr().err and not (tmp_path / "o").exists()
    for option, value in (("--threads", "-1"), ("--threads", "0"), ("--threads", "1.5"), ("--batch-size", "0"),
                          ("--min-lesion-ml", "-1"), ("--memory-budget-gb", "0"), ("--memory-budget-gb", "nan")):
        with pytest.raises(SystemExit) as exited:  # argparse's refusal: exit code 2, one line naming the option
            main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "o"), option, value])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exited.value.code == 2 and f"argument {option}: must be" in err and repr(value) in err, err
    assert not (tmp_path / "o").exists()


def test_python_api_refuses_unusable_option_values(tiny_model):
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    for field, value in (("threads", 0), ("batch_size", 0), ("min_lesion_ml", -0.5), ("memory_budget_gb", 0.0),
                         ("memory_budget_gb", float("nan")), ("threads", 1.5), ("batch_size", True),
                         ("overlap", 1.5), ("overlap", "0.5"), ("weighting", "gauss")):
        with pytest.raises(InputError, match=field):  # when the Segmenter is made, not once a CT is read
            Segmenter(tiny_model, SegmentOptions(**{field: value}))
    with pytest.raises(InputError, match="must be a SegmentOptions, not dict"):
        Segmenter(tiny_model, {"batch_size": 2})


def test_python_api_refuses_what_is_not_a_3d_volume_in_one_line(tiny_model, tmp_path):
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.pipeline import Segmenter

    segmenter = Segmenter(tiny_model)
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nii.gz")
    cases = [(ct.array, "expected a Volume, not ndarray.*read_volume"),
             (str(tmp_path / "ct.nii.gz"), "expected a Volume, not str"),
             (Volume(ct.array[0], (1.0, 1.0), (0.0, 0.0)), r"must be 3D.*shape \("),
             (Volume(ct.array[None], ct.spacing), "must be 3D"),
             (Volume(ct.array.astype(np.complex64), ct.spacing), "voxel type complex64 is not supported"),
             (Volume(ct.array, (1.0, 1.0)), "spacing must be 3 positive values"),
             (Volume(ct.array, (1.0, 0.0, 1.0)), "spacing must be 3 positive values"),
             (Volume(ct.array, ct.spacing, (0.0, float("nan"), 0.0)), "origin must be 3 finite"),
             (Volume(ct.array, ct.spacing, direction=np.zeros((3, 3))), "invertible 3x3"),
             # a 20-degree gantry tilt (k sheared towards y) and columns that carry the spacing
             (Volume(ct.array, ct.spacing, direction=[[1, 0, 0], [0, 1, np.sin(0.35)], [0, 0, np.cos(0.35)]]),
              "must be orthonormal.*gantry tilt"),
             (Volume(ct.array, (1.0, 1.0, 1.0), direction=np.diag(ct.spacing)), "must be orthonormal"),
             (Volume(ct.array > 0, ct.spacing), "boolean")]
    for volume, message in cases:
        with pytest.raises(InputError, match=message):
            segmenter.segment(volume)
    labels = segmenter.segment(ct).labels.array
    assert labels.shape == ct.array.shape  # the good one still runs
    # big-endian arrays (from some NIfTI and Analyze files) and float16 are converted, not refused;
    # on a grid other than the model's, so that SimpleITK resamples them
    other, _ = analytic_ct((2.0, 2.0, 2.5), np.eye(3))
    labels = segmenter.segment(other).labels.array
    for dtype in (">i2", ">f4", np.float16, ">f2"):
        np.testing.assert_array_equal(segmenter.segment(other.with_array(other.array.astype(dtype))).labels.array,
                                      labels)
    from LiverTumorSegLib.errors import OutputError
    from LiverTumorSegLib.outputs import write_outputs

    with pytest.raises(OutputError, match="takes the SegmentationResult.*not Volume"):
        write_outputs(ct, ct, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("per_thread", [True, False], ids=["openmp-like", "process-wide-like"])
def test_threads_apply_while_segmenting_and_torch_setting_is_put_back(tiny_model, per_thread, monkeypatch):
    import torch

    from LiverTumorSegLib import pipeline
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    monkeypatch.setattr(pipeline, "_threads_are_per_thread", lambda: per_thread)  # False: runs take turns

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    seen = []
    segmenter = Segmenter(tiny_model, SegmentOptions(threads=wanted))
    assert torch.get_num_threads() == before  # making a Segmenter changes nothing process-wide
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    result = segmenter.segment(ct, progress=lambda f, m: seen.append(torch.get_num_threads()) if "patch" in m else None)
    assert seen and set(seen) == {wanted} and result.info["threads"] == wanted
    assert torch.get_num_threads() == before
    result = Segmenter(tiny_model).segment(ct)
    assert result.info["threads"] == before  # what the run used, not another Segmenter's choice

    # runs in other threads, overlapping, each leave their own thread as they found it
    # (torch's OpenMP builds keep the setting per thread)
    from concurrent.futures import ThreadPoolExecutor
    import threading

    start = threading.Barrier(2)

    def run(threads):
        start.wait()
        found = torch.get_num_threads()
        used = Segmenter(tiny_model, SegmentOptions(threads=threads)).segment(ct).info["threads"]
        return found, used, torch.get_num_threads()

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(run, (1, 3)))
    assert [used for _, used, _ in outcomes] == [1, 3]
    assert all(after == found for found, _, after in outcomes) and torch.get_num_threads() == before


def test_a_rerun_into_the_same_folder_leaves_only_its_own_outputs(tmp_path, tiny_model, capsys):
    """Files the earlier run listed in its stats.json and this one does not write
    (another mesh format, the preview, surfaces) are removed; no other file is, even one
    named like an output."""
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "preview.png").write_bytes(b"the user's own picture")  # there before any run of ours
    base = ["segment", str(tmp_path / "ct.nii.gz"), "-o", str(out), "--model", str(tiny_model), "--progress", "none"]
    assert main(base + ["--no-preview"]) == 0
    assert (out / "preview.png").read_bytes() == b"the user's own picture"
    (out / "preview.png").unlink()
    assert main(base + ["--mesh-format", "obj"]) == 0
    document = json.loads((out / "stats.json").read_text())
    first = document["run"]["outputs"]
    assert first == sorted(p.name for p in out.iterdir()) and "liver.obj" in first and "preview.png" in first
    # the surfaces are LPS while the statistics are RAS: the record says so, naming the files
    assert document["coordinate_system"] == "RAS"
    assert document["surfaces"] == {"coordinate_system": "LPS", "units": "mm",
                                    "files": sorted(n for n in first if n.endswith(".obj"))}
    (out / "notes.txt").write_text("the user's own file")
    if "tumor.obj" not in first:  # a user file with an output's name, not listed by the earlier run
        (out / "tumor.obj").write_text("the user's own mesh")
    assert main(base + ["--no-preview"]) == 0
    second = {p.name for p in out.iterdir()}
    assert "preview.png" not in second and "liver.obj" not in second and "liver.stl" in second
    assert "notes.txt" in second and ("tumor.obj" in second) == ("tumor.obj" not in first)
    assert main(base + ["--no-surfaces", "--no-preview"]) == 0
    third = {p.name for p in out.iterdir()} - {"notes.txt", "tumor.obj"}
    assert third == {"segmentation.nii.gz", "stats.json", "stats.csv"}
    document = json.loads((out / "stats.json").read_text())
    assert document["run"]["outputs"] == sorted(third) and "surfaces" not in document
    capsys.readouterr()


def test_earlier_outputs_trusts_only_our_own_record(tmp_path):
    from LiverTumorSegLib.outputs import OUTPUT_NAMES, earlier_outputs

    folder = tmp_path / "out"
    folder.mkdir()
    assert earlier_outputs(folder) == []
    (folder / "stats.json").write_text('{"run": {"outputs": ["tumor.stl", "notes.txt", "../x"]}}')
    assert earlier_outputs(folder) == ["tumor.stl"]  # only names a run of ours writes
    (folder / "stats.json").write_text('{"schema_version": 1, "run": {"model": "m"}}')
    assert earlier_outputs(folder) == list(OUTPUT_NAMES)  # ours, from before the list existed
    (folder / "stats.json").write_text('{"someone": "else"}')
    assert earlier_outputs(folder) == []
    other = tmp_path / "elsewhere.json"
    other.write_text('{"run": {"outputs": ["preview.png"]}}')
    (folder / "stats.json").unlink()
    (folder / "stats.json").symlink_to(other)
    assert earlier_outputs(folder) == []  # a linked stats.json is not this folder's record


def test_write_progress_reaches_one_only_once_every_file_is_in(tmp_path, tiny_model):
    from LiverTumorSegLib.outputs import write_outputs
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    result = Segmenter(tiny_model, SegmentOptions(fast=True)).segment(ct)
    out = tmp_path / "out"
    seen = []

    def listen(fraction, message):
        seen.append((fraction, message, set(os.listdir(out)) if out.exists() else set()))

    written = write_outputs(result, ct, out, progress=listen)
    fractions = [fraction for fraction, _, _ in seen]
    assert fractions == sorted(fractions) and fractions.count(1.0) == 1 and fractions[-1] == 1.0
    assert not any("stats.json" in files for _, _, files in seen[:-1])  # nothing published before the end
    assert {Path(path).name for path in written.values()} <= seen[-1][2]


def test_outputs_publish_the_record_last_and_never_replace_a_folder(tmp_path, monkeypatch):
    import LiverTumorSegLib.atomic as atomic
    from LiverTumorSegLib.atomic import StagedOutput
    from LiverTumorSegLib.errors import OutputError

    moved = []
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real_replace(a, b)))
    out = tmp_path / "out"
    with StagedOutput(out, last="stats.json") as stage:
        for name in ("stats.json", "tumor.stl", "a.nii.gz"):
            (stage.path / name).write_text(name)
    assert moved == ["a.nii.gz", "tumor.stl", "stats.json"]
    (out / "preview.png").mkdir()  # a folder of the user's with an output's name
    with pytest.raises(OutputError, match="a folder of that name"):
        with StagedOutput(out, last="stats.json") as stage:
            (stage.path / "preview.png").write_text("new")
            (stage.path / "stats.json").write_text("new")
    assert (out / "preview.png").is_dir() and (out / "stats.json").read_text() == "stats.json"


def test_a_staging_folder_emptied_under_a_run_keeps_the_earlier_outputs(tmp_path):
    """A cleaner that deletes old files but not folders (tmpreaper, systemd-tmpfiles)
    empties the staging folder: publishing must refuse, not publish nothing and then
    remove the earlier run's files as replaced."""
    from LiverTumorSegLib.atomic import StagedOutput
    from LiverTumorSegLib.errors import OutputError

    out = tmp_path / "out"
    with StagedOutput(out, last="stats.json") as stage:
        for name in ("segmentation.nii.gz", "stats.json"):
            (stage.path / name).write_text("earlier")
    with pytest.raises(OutputError, match="lost its files"):
        with StagedOutput(out, replaces=["segmentation.nii.gz", "stats.json"], last="stats.json") as stage:
            (stage.path / "segmentation.nii.gz").write_text("new")
            (stage.path / "stats.json").write_text("new")
            (stage.path / "stats.json").unlink()  # the record gone, the folder still there
    assert {p.name: p.read_text() for p in out.iterdir()} == {"segmentation.nii.gz": "earlier",
                                                             "stats.json": "earlier"}


@pytest.mark.skipif(sys.platform == "win32", reason="staging folders are locked with flock, which Windows lacks")
def test_a_staging_folder_left_by_a_killed_run_is_removed_by_the_next_run_and_a_live_one_is_not(tmp_path):
    """A run killed outright (SIGKILL) leaves its hidden staging folder; the next run into
    the same folder removes it. A run that is still alive keeps its own."""
    from LiverTumorSegLib.atomic import StagedOutput

    out = tmp_path / "out[1]"  # a name with glob characters
    out.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\n"
         "from LiverTumorSegLib.atomic import StagedOutput\n"
         "with StagedOutput(Path(sys.argv[1])) as stage:\n"
         "    (stage.path / 'segmentation.nii.gz').write_text('half')\n"
         "    print(stage.path, flush=True)\n"
         "    time.sleep(60)\n", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        staging = Path(child.stdout.readline().strip())
        assert staging.parent == out and staging.name.startswith(".out[1].partial-")
        with StagedOutput(out) as stage:  # the child is alive: its folder stays
            (stage.path / "stats.json").write_text("{}")
        assert stage.swept == [] and (staging / "segmentation.nii.gz").read_text() == "half"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert staging.is_dir()  # what a SIGKILL leaves
        by_hand = tmp_path / ".out[1].partial-earlier"  # one beside it, as a run into a new folder leaves
        by_hand.mkdir()
        (by_hand / "liver.stl").write_text("half")
        with StagedOutput(out) as stage:
            (stage.path / "stats.json").write_text("{}")
        assert sorted(stage.swept) == sorted([staging, by_hand])
        assert not staging.exists() and not by_hand.exists()
        assert sorted(p.name for p in out.iterdir()) == ["stats.json"]
    finally:
        child.kill()
        child.wait(timeout=30)


def test_a_staging_folder_removed_under_a_run_changes_nothing_in_the_output(tmp_path):
    """Were a run's staging folder removed while it runs (by hand, or by a cleaner that
    cannot see its lock), publishing must not go on to remove the earlier run's files."""
    import shutil

    from LiverTumorSegLib.atomic import StagedOutput
    from LiverTumorSegLib.errors import OutputError

    out = tmp_path / "out"
    with StagedOutput(out, last="stats.json") as stage:
        (stage.path / "segmentation.nii.gz").write_text("earlier")
        (stage.path / "stats.json").write_text("earlier")
    with pytest.raises(OutputError, match="lost its files before they could be moved"):
        with StagedOutput(out, replaces=["segmentation.nii.gz", "stats.json"], last="stats.json") as stage:
            (stage.path / "stats.json").write_text("new")
            shutil.rmtree(stage.path)
    assert sorted(p.name for p in out.iterdir()) == ["segmentation.nii.gz", "stats.json"]
    assert (out / "stats.json").read_text() == "earlier"


def test_a_failed_rename_leaves_no_temporary_file_and_names_the_output(tmp_path, monkeypatch):
    import LiverTumorSegLib.atomic as atomic
    from LiverTumorSegLib.errors import OutputError

    (tmp_path / "stats.json").write_text("the earlier run's")

    def disk_full(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", disk_full)
    with pytest.raises(OutputError, match=r"cannot write .*stats\.json: .*No space left on device"):
        atomic.atomic_write_text(tmp_path / "stats.json", "new")
    assert os.listdir(tmp_path) == ["stats.json"] and (tmp_path / "stats.json").read_text() == "the earlier run's"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomically_written_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    """mkstemp makes 0600 files; outputs are chmod-ed to what open() would give (0666 less the umask)."""
    import stat

    from LiverTumorSegLib.atomic import atomic_write_text

    before = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "stats.json", "{}")
        (tmp_path / "plain.txt").write_text("{}")
    finally:
        os.umask(before)
    mode = stat.S_IMODE((tmp_path / "stats.json").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_an_output_folder_that_is_a_mount_point_takes_the_results(tmp_path, monkeypatch):
    """Docker's `-v host:/output ... -o /output`: nothing can be renamed into a mount point
    from outside it (EXDEV, even on one file system), so staging happens inside it."""
    import errno

    import LiverTumorSegLib.atomic as atomic
    from LiverTumorSegLib.atomic import StagedOutput

    out = tmp_path / "mounted"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    real_replace = os.replace

    def replace_within_the_mount(src, dst):
        inside = [Path(p).resolve().is_relative_to(out.resolve()) for p in (src, dst)]
        if inside[0] != inside[1]:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_within_the_mount)
    with StagedOutput(out, last="stats.json") as stage:
        for name in ("stats.json", "segmentation.nii.gz"):
            (stage.path / name).write_text(name)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "segmentation.nii.gz", "stats.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mounted"]


def test_two_runs_into_one_folder_leave_the_later_runs_set_not_a_mix(tmp_path, monkeypatch):
    """Both runs stage before either publishes (as two runs started together do). The
    later one must replace what the earlier one published, which it only learns when it
    publishes; and the two publishes must not interleave."""
    import threading
    import time as clock

    import LiverTumorSegLib.atomic as atomic
    from LiverTumorSegLib.atomic import StagedOutput
    from LiverTumorSegLib.outputs import earlier_outputs

    out = tmp_path / "out"

    def staged(names):
        stage = StagedOutput(out, replaces=lambda: earlier_outputs(out), last="stats.json").__enter__()
        for name in names:
            (stage.path / name).write_text(name)
        (stage.path / "stats.json").write_text(json.dumps({"run": {"outputs": [*names, "stats.json"]}}))
        return stage

    first, second = staged(["liver.stl", "preview.png"]), staged(["liver.obj"])
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert sorted(p.name for p in out.iterdir()) == ["liver.obj", "stats.json"]

    events, real_replace = [], os.replace

    def slow_replace(a, b):
        events.append((threading.current_thread().name, "start"))
        clock.sleep(0.05)
        real_replace(a, b)
        events.append((threading.current_thread().name, "end"))

    monkeypatch.setattr(atomic.os, "replace", slow_replace)
    stages = {"A": staged(["liver.stl"]), "B": staged(["preview.png"])}
    threads = [threading.Thread(target=stages[n].__exit__, args=(None, None, None), name=n) for n in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    order = [name for name, _ in events]
    assert order == sorted(order, key=lambda n: order.index(n))  # one publish entirely before the other
    winner = order[-1]
    assert sorted(p.name for p in out.iterdir()) == sorted([{"A": "liver.stl", "B": "preview.png"}[winner], "stats.json"])


def test_a_failing_stdout_is_one_line_and_a_closed_one_is_not_an_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "LiverTumorSegLib", "models"]
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
        assert result.returncode == 2 and "cannot write to standard output" in result.stderr
        assert "Traceback" not in result.stderr
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=120,
                            close_fds=True, preexec_fn=lambda: os.close(1) if os.name != "nt" else None)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_output_closed_by_its_reader_ends_quietly_and_keeps_the_outputs(tmp_path):
    """`livertumorseg segment ... | head -1`: no traceback; the files written stay."""
    from .helpers import make_tiny_model

    model = make_tiny_model(tmp_path / "m", widths=(8, 16), patch=(16, 16, 16), spacing=(3.0, 3.0, 3.0))
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is printed
    proc = subprocess.run(
        [sys.executable, "-m", "LiverTumorSegLib", "segment", str(tmp_path / "ct.nii.gz"), "-o", str(out),
         "--model", str(model), "--progress", "none"],
        stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "PYTHONPATH": str(REPO)})
    os.close(write_end)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr
    assert (out / "segmentation.nii.gz").is_file() and (out / "stats.json").is_file()


@pytest.mark.parametrize("mesh_format", ["stl", "obj"])
def test_written_surfaces_hold_the_format_named_and_the_whole_liver(tmp_path, mesh_format):
    """The liver surface encloses the whole organ, tumour included (as the Liver segment
    and the statistics do), each file holds the format its name says, and the paths
    returned are the published ones."""
    from LiverTumorSegLib.outputs import write_outputs
    from LiverTumorSegLib.pipeline import SegmentationResult
    from LiverTumorSegLib.stats import compute_statistics

    z, y, x = np.indices((40, 40, 40)) - 19.5
    labels = np.where(x ** 2 + y ** 2 + z ** 2 <= 15 ** 2, 1, 0).astype(np.uint8)
    labels[(x - 2) ** 2 + y ** 2 + z ** 2 <= 10 ** 2] = 2  # 30 % of the liver
    volume = Volume(labels, spacing=(1.0, 1.0, 1.0))
    stats = compute_statistics(volume)
    out = tmp_path / "out"
    written = write_outputs(SegmentationResult(volume, stats), volume.with_array(labels.astype(np.int16)), out,
                            mesh_format=mesh_format, preview=False, smoothing_iterations=0)
    assert all(Path(path).parent == out and Path(path).is_file() for path in written.values())
    enclosed = {}
    for name in ("liver", "tumor"):
        data = (out / f"{name}.{mesh_format}").read_bytes()
        if mesh_format == "stl":
            count = int(np.frombuffer(data[80:84], dtype="<u4")[0])
            assert len(data) == 84 + 50 * count
            records = np.frombuffer(data[84:], dtype=np.dtype([("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")]))
            triangles = records["v"].astype(np.float64)
        else:
            lines = data.decode("ascii").splitlines()
            assert lines[0] == "# SPACE=LPS"
            vertices = np.array([[float(v) for v in line.split()[1:]] for line in lines if line.startswith("v ")])
            faces = np.array([[int(f) - 1 for f in line.split()[1:]] for line in lines if line.startswith("f ")])
            triangles = vertices[faces]
        enclosed[name] = abs(np.einsum("ij,ij->i", triangles[:, 0], np.cross(triangles[:, 1], triangles[:, 2])).sum()
                             ) / 6000.0
    assert enclosed["liver"] == pytest.approx(stats["liver"]["volume_ml"], rel=0.1)
    assert enclosed["tumor"] == pytest.approx(stats["tumor"]["volume_ml"], rel=0.1)


# -- from a mutation review: pipeline.py (options, threads, memory, cancel, run record) --


def test_an_overlap_of_one_is_refused_when_the_segmenter_is_made(tiny_model):
    """overlap 1.0 (a stride of 0) used to pass the constructor's checks and fail only
    once a CT had been read and preprocessed; so did a boolean overlap (False is 0)."""
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    for value in (1.0, False):
        with pytest.raises(InputError, match="overlap must be a number in"):
            Segmenter(tiny_model, SegmentOptions(overlap=value))
    assert Segmenter(tiny_model, SegmentOptions(overlap=0.0, min_lesion_ml=0.0)).overlap() == 0.0  # the edges are fine


def test_the_overlap_used_is_the_options_then_the_cards_and_none_when_fast(tiny_model):
    """--overlap overrides the card's default_overlap (0.25 for tiny_model); --fast means
    no overlap whatever the card says, and stats.json's run records what was used."""
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    def used(**kw):
        segmenter = Segmenter(tiny_model, SegmentOptions(device="cpu", **kw))
        assert segmenter.label_settings()["overlap"] == segmenter.overlap()
        return segmenter.overlap()

    assert used() == 0.25 and used(overlap=0.5) == 0.5 and used(overlap=0.0) == 0.0
    assert used(fast=True) == 0.0
    assert Segmenter(tiny_model, SegmentOptions(crop_to_body=False)).label_settings()["window_grid"] == \
        "volume, uncropped"  # no crop: the windows lie on the whole volume whatever window_grid says
    assert Segmenter(tiny_model, SegmentOptions(window_grid="body")).label_settings()["window_grid"] == "body"


def test_a_process_wide_thread_setting_is_changed_under_the_lock(monkeypatch):
    """Where torch's thread count is process-wide, two runs setting it at once would
    put back each other's value: a block that sets it holds the lock; one that leaves
    it alone, or a per-thread (OpenMP) build, does not."""
    import threading

    from LiverTumorSegLib import pipeline

    def held_by_another_thread():
        seen = []

        def probe():
            got = pipeline._THREADS_LOCK.acquire(blocking=False)
            if got:
                pipeline._THREADS_LOCK.release()
            seen.append(not got)

        thread = threading.Thread(target=probe)
        thread.start()
        thread.join()
        return seen[0]

    monkeypatch.setattr(pipeline, "_threads_are_per_thread", lambda: False)
    with pipeline.torch_threads(1):
        assert held_by_another_thread()
    assert not held_by_another_thread()
    with pipeline.torch_threads(None):
        assert not held_by_another_thread()
    monkeypatch.setattr(pipeline, "_threads_are_per_thread", lambda: True)
    with pipeline.torch_threads(1):
        assert not held_by_another_thread()


def test_segment_refuses_a_volume_over_the_memory_budget_before_running(tiny_model):
    """The Python API (and the Slicer bridge in-process) checks the budget too, not only
    the command line on the header: a volume just over it is refused before inference."""
    from LiverTumorSegLib.errors import ResourceError
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    need = Segmenter(tiny_model, SegmentOptions(device="cpu", memory_budget_gb=64.0)).check_memory(ct.shape_xyz,
                                                                                                    ct.spacing)
    seen = []
    tight = Segmenter(tiny_model, SegmentOptions(device="cpu", memory_budget_gb=(need - 1) / 2 ** 30))
    with pytest.raises(ResourceError, match="Crop the volume"):
        tight.segment(ct, progress=lambda f, m: seen.append(m))
    assert seen == []  # refused before any stage started
    roomy = Segmenter(tiny_model, SegmentOptions(device="cpu", memory_budget_gb=need / 2 ** 30))
    assert roomy.segment(ct).labels.array.shape == ct.array.shape


def test_a_cancel_after_inference_still_stops_the_run():
    """Cancel pressed while postprocessing (after the last patch) must raise Cancelled,
    not hand back a result the user no longer wants."""
    from LiverTumorSegLib.errors import Cancelled
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    seen = []
    with pytest.raises(Cancelled):
        Segmenter(oracle_model(spacing=(3.0, 3.0, 3.0)), SegmentOptions(device="cpu", fast=True)).segment(
            ct, progress=lambda f, m: seen.append(m), cancel=lambda: "postprocess" in seen)
    assert "postprocess" in seen and "statistics" not in seen


def test_liver_left_out_is_reported_in_millilitres_of_the_model_grid(monkeypatch):
    """``liver_left_out_ml`` counts the model grid's voxels left out by the largest-
    component step times the model voxel's volume (all three spacings), and a large
    amount raises the left-out warning."""
    from LiverTumorSegLib import pipeline
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    real_clean = pipeline.clean_labels
    monkeypatch.setattr(pipeline, "clean_labels", lambda labels, tissue: (real_clean(labels, tissue)[0], 1000))
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    model = oracle_model(spacing=(2.0, 3.0, 4.0))  # a 24 uL model voxel
    result = Segmenter(model, SegmentOptions(device="cpu", fast=True)).segment(ct)
    assert result.info["liver_left_out_ml"] == pytest.approx(24.0)
    assert result.stats["liver"]["volume_ml"] * 0.05 < 24.0  # so over the warning's threshold
    assert any("24.0 mL labelled liver apart from the liver region kept" in w for w in result.info["warnings"])
    assert set(result.timings) == {"preprocess", "inference", "postprocess", "statistics"}

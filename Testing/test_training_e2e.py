"""End to end on a generated phantom set with smoke.yaml (CPU): train, loss goes down,
export, segment through the engine, evaluate, resume; and DDP with 2 CPU processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "Training"
if str(TRAINING) not in sys.path:
    sys.path.insert(0, str(TRAINING))

pytest.importorskip("lightning", reason="the training extras (pip install .[train]) are not installed")
pytest.importorskip("torchio", reason="the training extras (pip install .[train]) are not installed")

pytestmark = pytest.mark.slow


def _run(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(TRAINING / script), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from LiverTumorSegLib.phantom import write_dataset

    return write_dataset(tmp_path_factory.mktemp("phantoms"), 5, seed=11, test_cases=1, preset="coarse")


@pytest.fixture(scope="module")
def smoke_run(phantoms, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    _run("train.py", "--data-dir", phantoms, "--config", "smoke", "--out", run_dir,
         "--cache-dir", phantoms.parent / "cache")
    return run_dir


def test_smoke_training_writes_a_run_and_the_loss_decreases(smoke_run):
    from livertumorseg_training.plots import read_scalars

    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["global_step"] == 16
    assert (smoke_run / "checkpoints" / "last.ckpt").is_file() and (smoke_run / "config.yaml").is_file()
    scalars = read_scalars(smoke_run / "logs")
    epoch_losses = [v for _, v in scalars["train/loss_epoch"]]
    assert len(epoch_losses) == 2 and epoch_losses[-1] < epoch_losses[0]
    steps = [v for _, v in scalars["train/loss_step"]]
    assert np.mean(steps[-4:]) < np.mean(steps[:4])
    for tag in ("val/loss", "val/dice_liver", "val/dice_tumor", "lr-Adam"):
        assert tag in scalars, f"{tag} missing from TensorBoard; have {sorted(scalars)}"


def test_exported_model_loads_and_segments_through_the_engine(smoke_run, phantoms):
    from LiverTumorSegLib.io import read_volume
    from LiverTumorSegLib.model import load_model
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    loaded = load_model(smoke_run / "model")
    card = loaded.card
    assert card.spacing_mm == (4.0, 4.0, 4.0) and card.patch_size == (32, 32, 32)
    assert card.intensity.mode == "window" and card.architecture["widths"] == [4, 8, 16]
    prov = card.provenance
    assert prov["recipe"]["name"] == "smoke"
    assert prov["git_commit"] == "unknown" or len(prov["git_commit"]) == 40
    assert prov["data"]["training_cases"] == ["liver_0", "liver_1", "liver_2", "liver_3"]
    assert prov["data"]["validation_cases"] == ["liver_4"]
    assert "val/dice_liver" in card.metrics["validation"]
    ct = read_volume(phantoms / "imagesTs" / "liver_5.nii.gz")
    result = Segmenter(loaded, SegmentOptions(device="cpu", precision="fp32")).segment(ct)
    assert result.labels.array.shape == ct.array.shape and result.labels.same_grid(ct)
    assert set(np.unique(result.labels.array)) <= {0, 1, 2}


def test_export_cli_and_the_command_line_segment(smoke_run, phantoms, tmp_path):
    out = tmp_path / "exported"
    _run("export.py", smoke_run / "checkpoints" / "last.ckpt", out)
    card = json.loads((out / "model.json").read_text())
    assert card["provenance"]["training"]["global_step"] == 16 and card["weights"]["sha256"]
    command = [sys.executable, "-m", "LiverTumorSegLib", "segment", str(phantoms / "imagesTs" / "liver_5.nii.gz"),
               "-o", str(tmp_path / "seg"), "--model", str(out), "--no-surfaces", "--no-preview", "--progress", "none"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_export_with_safetensors_weights_loads_the_same_network(smoke_run, tmp_path):
    """For torch older than 2.6 (3D Slicer on macOS), which reads only safetensors
    weights outside the bundled models."""
    import torch

    pytest.importorskip("safetensors")
    from LiverTumorSegLib.model import load_model

    _run("export.py", smoke_run / "checkpoints" / "last.ckpt", tmp_path / "pt")
    _run("export.py", smoke_run / "checkpoints" / "last.ckpt", tmp_path / "st", "--weights-format", "safetensors")
    card = json.loads((tmp_path / "st" / "model.json").read_text())
    assert card["weights"]["file"] == "weights.safetensors" and card["weights"]["format"] == "safetensors"
    a, b = load_model(tmp_path / "pt").network.state_dict(), load_model(tmp_path / "st").network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_on_torch_older_than_2_6_the_export_is_safetensors_and_loads_back(smoke_run, tmp_path, monkeypatch):
    """Training is allowed on torch 2.2-2.5; its end-of-run export must be a model that
    torch can load there (pickled weights load only from the bundled models)."""
    import torch

    pytest.importorskip("safetensors")
    from livertumorseg_training.exporting import export_checkpoint

    from LiverTumorSegLib.model import load_model

    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    folder = export_checkpoint(smoke_run / "checkpoints" / "last.ckpt", tmp_path / "model")
    assert load_model(folder).card.weights_format == "safetensors"
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    assert load_model(export_checkpoint(smoke_run / "checkpoints" / "last.ckpt", tmp_path / "m2")).card.weights_format \
        == "torch-state-dict"


def test_evaluate_writes_metrics_plots_and_overlays(smoke_run, phantoms, tmp_path):
    out = tmp_path / "eval"
    _run("evaluate.py", "--model", smoke_run / "model", "--data-dir", phantoms, "--split", "all", "--out", out,
         "--device", "cpu", "--weighting", "constant", "--window-grid", "body")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["options"]["weighting"], metrics["options"]["window_grid"]) == ("constant", "body")
    assert sorted(metrics["cases"]) == [f"liver_{i}" for i in range(5)]
    for region in ("liver", "tumor"):
        for key in ("dice", "iou", "hd95_mm", "assd_mm", "sensitivity", "specificity"):
            assert key in metrics["mean"][region]
        assert 0.0 <= metrics["mean"][region]["dice"] <= 1.0
    assert set(metrics["detection"]["by_diameter"]) == {"<10mm", "10-20mm", ">20mm"}
    assert (out / "metrics.csv").read_text().count("\n") == 6
    for figure in ("dice_distribution", "detection_by_size", "loss_curves", "best_overlay", "worst_gif"):
        assert (out / metrics["figures"][figure]).is_file(), figure
    present = sorted(f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file())
    assert metrics["outputs"] == present
    # again into the same folder, with fewer cases and no figures: nothing of the first run stays
    (out / "notes.txt").write_text("the user's")
    _run("evaluate.py", "--model", smoke_run / "model", "--data-dir", phantoms, "--split", "val", "--out", out,
         "--device", "cpu", "--no-figures")
    again = json.loads((out / "metrics.json").read_text())
    assert 0 < len(again["cases"]) < 5 and "figures" not in again
    present = sorted(f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file())
    assert present == sorted([*again["outputs"], "notes.txt"])
    assert sorted(f.name for f in (out / "predictions").iterdir()) == sorted(f"{c}.nii.gz" for c in again["cases"])
    refused = subprocess.run([sys.executable, str(TRAINING / "evaluate.py"), "--model", str(smoke_run / "model"),
                              "--data-dir", str(phantoms), "--image", str(phantoms / "imagesTr" / "liver_0.nii.gz"),
                              "--label", str(phantoms / "labelsTr" / "liver_0.nii.gz"), "--out", str(tmp_path / "x")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "not both" in refused.stderr and not (tmp_path / "x").exists()


def test_export_refuses_clearly(smoke_run, tmp_path):
    def export(*args):
        result = subprocess.run([sys.executable, str(TRAINING / "export.py"), *map(str, args)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        return result.stderr

    a_file = tmp_path / "model"
    a_file.write_text("not a folder")
    assert "a file of that name exists" in export(smoke_run / "checkpoints" / "last.ckpt", a_file)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    err = export(text, tmp_path / "out")
    assert "not a PyTorch checkpoint written by train.py" in err and "weights_only" not in err
    assert not (tmp_path / "out").exists()
    err = export(smoke_run / "checkpoints", tmp_path / "out")  # the folder, not a file in it
    assert "is a folder; give a checkpoint file (it holds " in err and "last.ckpt" in err


def test_resume_continues_with_the_step_count_intact(smoke_run, phantoms, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(smoke_run, resumed)
    _run("train.py", "--data-dir", phantoms, "--out", resumed, "--resume", "--cache-dir", phantoms.parent / "cache",
         "--no-export", "trainer.max_epochs=3")
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["global_step"] == 24


def test_resume_refuses_another_recipe_or_split_before_writing_anything(smoke_run, phantoms, tmp_path):
    """--resume --config OTHER used to overwrite config.yaml, then crash in Lightning (and
    every plain --resume after it); another split trained on validation cases silently."""
    resumed = tmp_path / "resumed"
    shutil.copytree(smoke_run, resumed)
    before = {p.relative_to(resumed): p.read_bytes() for p in resumed.rglob("*") if p.is_file()}
    cache = phantoms.parent / "cache"

    def resume(*args, data_dir=phantoms):
        result = subprocess.run([sys.executable, str(TRAINING / "train.py"), "--data-dir", str(data_dir), "--out",
                                 str(resumed), "--resume", "--cache-dir", str(cache), "--no-export", *map(str, args)],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        return result.stderr

    assert "recipe differs" in resume("--config", "demo")
    assert "model.widths" in resume("model.widths=[8,16]") and "data.fold" in resume("--folds", "3", "--fold", "1")
    reordered = tmp_path / "reordered"
    shutil.copytree(phantoms, reordered)
    listing = json.loads((reordered / "dataset.json").read_text())
    listing["training"] = listing["training"][::-1]
    (reordered / "dataset.json").write_text(json.dumps(listing))
    assert "cases differ" in resume(data_dir=reordered)
    from LiverTumorSegLib.phantom import write_dataset

    other = write_dataset(tmp_path / "other", 5, seed=12, test_cases=1, preset="coarse")  # same names, other CTs
    err = resume(data_dir=other)
    assert "case(s) of" in err and "are not the ones" in err and f"another --data-dir ({phantoms.resolve()})" in err
    after = {p.relative_to(resumed): p.read_bytes() for p in resumed.rglob("*") if p.is_file()}
    assert after == before  # config.yaml and everything else untouched


def test_resume_check_names_every_differing_key_and_lets_the_caching_workers_change(smoke_run, tmp_path):
    """Another recipe named four keys and "12 more" (the network's among the hidden);
    data.cache_workers (how many processes cache, not what) was refused."""
    import copy

    from livertumorseg_training.config import load_config
    from livertumorseg_training.errors import ConfigError
    from livertumorseg_training.exporting import read_checkpoint
    from livertumorseg_training.run import check_resume

    checkpoint = smoke_run / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(checkpoint)["livertumorseg"]
    config = copy.deepcopy(saved["config"])
    config["data"]["cache_workers"], config["trainer"]["max_epochs"] = 1, 5
    check_resume(checkpoint, config, saved["data"])  # allowed changes go through
    with pytest.raises(ConfigError) as refused:
        check_resume(checkpoint, load_config("demo"), saved["data"])
    message = str(refused.value)
    assert "\n" not in message and "more" not in message
    for key in ("data.spacing_mm", "model.widths", "sampling.patch_size"):
        assert f"{key}" in message, key
    # a run started before recipes were type-checked kept optimizer.lr=3e-4 as the text
    # '3e-4' (PyYAML's reading); resumed now, its recipe reads 0.0003: the same recipe
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    text_lr = str(state["livertumorseg"]["config"]["optimizer"]["lr"])
    state["livertumorseg"]["config"]["optimizer"]["lr"] = text_lr
    older = tmp_path / "older.ckpt"
    torch.save(state, older)
    config = copy.deepcopy(saved["config"])
    config["optimizer"]["lr"] = float(text_lr)
    check_resume(older, config, saved["data"])


def test_stopped_and_resumed_run_trains_as_one_that_went_straight_through(smoke_run, phantoms, tmp_path):
    """Epoch 1 of a run resumed after epoch 0 sees the same patches and augmentation as
    an uninterrupted run's epoch 1 (it used to replay epoch 0's), so the weights agree."""
    import torch

    run_dir = tmp_path / "stopped"
    common = ["--data-dir", phantoms, "--out", run_dir, "--cache-dir", phantoms.parent / "cache", "--no-export"]
    _run("train.py", *common, "--config", "smoke", "trainer.max_epochs=1")
    _run("train.py", *common, "--resume", "trainer.max_epochs=2")

    def weights(path):
        return torch.load(path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]

    straight, resumed = weights(smoke_run), weights(run_dir)
    assert straight.keys() == resumed.keys()
    worst = max(float((straight[k].double() - resumed[k].double()).abs().max()) for k in straight)
    assert worst < 1e-5, f"the resumed run's weights differ by up to {worst}"


def test_a_new_run_refuses_a_folder_that_holds_another_run(smoke_run, phantoms):
    result = subprocess.run([sys.executable, str(TRAINING / "train.py"), "--data-dir", str(phantoms), "--config",
                             "smoke", "--out", str(smoke_run), "--cache-dir", str(phantoms.parent / "cache")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "already holds a run" in result.stderr and "--resume" in result.stderr
    assert not list((smoke_run / "checkpoints").glob("last-v*.ckpt"))


def test_resumed_with_more_epochs_the_schedule_follows_the_new_length(phantoms, tmp_path):
    import torch

    run_dir = tmp_path / "cosine"
    common = ["--data-dir", phantoms, "--out", run_dir, "--cache-dir", phantoms.parent / "cache", "--no-export"]
    _run("train.py", *common, "--config", "smoke", "schedule.name=cosine", "schedule.min_lr_ratio=0",
         "trainer.max_epochs=1")
    _run("train.py", *common, "--resume", "trainer.max_epochs=2")
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # steps 8-15 ran on the resumed run's 16-step schedule (3e-3 x LRFactor("cosine", 16)),
    # not at the floor of the first run's 8-step one, which the checkpoint used to bring back
    assert state["global_step"] == 16 and state["lr_schedulers"][0]["lr_lambdas"][0]["total"] == 16


def test_ddp_with_two_cpu_processes_runs_an_epoch(phantoms, tmp_path):
    run_dir = tmp_path / "ddp"
    _run("train.py", "--data-dir", phantoms, "--config", "smoke", "--out", run_dir, "--cache-dir",
         phantoms.parent / "cache", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-export",
         "trainer.max_epochs=1")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["global_step"] == 4  # each rank: 2 of the 4 training cases
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

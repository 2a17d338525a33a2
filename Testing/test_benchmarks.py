"""CI SMOKE TEST of the benchmark suite — not a timed test.

Runs ``python benchmarks/run.py --quick --json OUT.json`` (about 1.5 to 3 minutes on 2
CPU cores) and checks that the suite finishes and writes every key it promises. It
does NOT check that any speed or memory target is met: the quick run uses tiny inputs
on a shared machine, and targets are judged from full runs (see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("monai", reason="the benchmark compares against MONAI (test extra)")
pytest.importorskip("torchio", reason="the benchmark compares against TorchIO (test extra)")


def _get(document: dict, dotted: str):
    node = document
    for key in dotted.split("."):
        assert isinstance(node, dict) and key in node, f"benchmark JSON lacks {dotted!r}"
        node = node[key]
    return node


@pytest.mark.slow
def test_quick_benchmark_runs_and_writes_every_key(tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks.run import REQUIRED_KEYS

    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmp"  # the suite's temporary folders go here, and must be gone afterwards
    scratch.mkdir()
    env = dict(os.environ, LIVERTUMORSEG_BENCH_INPUTS=str(tmp_path / "inputs"),
               LIVERTUMORSEG_BENCH_WEIGHTS=str(tmp_path / "no-weights"), TMPDIR=str(scratch))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(scratch.glob("ltsbench-*")), "the benchmark left temporary folders behind"
    document = json.loads(out.read_text(encoding="utf-8"))
    for key in REQUIRED_KEYS:
        _get(document, key)
    assert document["quick"] is True
    assert document["model"]["weights"].startswith("random-init")  # no trained weights in CI
    for name in ("ratio_vs_monai", "ratio_vs_torchio"):
        assert _get(document, f"inference.{name}") > 0
    assert set(document["cli"]["stages_s_median"]) >= {"read", "preprocess", "inference", "postprocess",
                                                        "statistics", "surfaces", "write"}
    assert "not measured" in document["gpu"]["status"] or "GPU" in document["gpu"]["status"]
    assert "### Targets" in proc.stdout


def test_cached_weights_of_another_recipe_are_made_again(tmp_path, monkeypatch):
    """The default weights folder is reused only when the current recipe made it."""
    sys.path.insert(0, str(REPO))
    from benchmarks import weights

    folder = tmp_path / "bench-weights"
    monkeypatch.setenv("LIVERTUMORSEG_BENCH_WEIGHTS", str(folder))
    trained = []
    monkeypatch.setattr(weights, "train_bench_model", lambda out, log=print: trained.append(out) or out)
    weights.ensure_weights(log=lambda m: None)
    assert trained == [folder]  # missing: made
    folder.mkdir()
    card = {"name": "bench-phantom-w32", "provenance": {"recipe": dict(weights.RECIPE, steps=1)}}
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    weights.ensure_weights(log=lambda m: None)
    assert trained == [folder, folder]  # another recipe: made again
    card["provenance"]["recipe"] = json.loads(json.dumps(weights.RECIPE))  # as a card stores it
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    assert weights.ensure_weights(log=lambda m: None) == folder
    assert len(trained) == 2  # current recipe: reused
    assert weights.ensure_weights(folder, log=lambda m: None) == folder  # --weights: used as given


def test_training_patches_of_class_background_are_centred_where_asked():
    sys.path.insert(0, str(REPO))
    import numpy as np

    from benchmarks.weights import _Case

    hu = np.full((30, 30, 30), -1000.0, dtype=np.float32)
    hu[5:25, 5:25, 5:25] = 40.0  # body
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[10:20, 10:20, 10:20] = 1
    rng = np.random.default_rng(0)
    body = _Case(hu, labels, hu, background="body")
    centres = [body.centre(rng, 0) for _ in range(300)]
    assert all(hu[c] > -500.0 and labels[c] == 0 for c in centres)
    anywhere = _Case(hu, labels, hu, background="any")
    centres = [anywhere.centre(rng, 0) for _ in range(300)]
    assert all(labels[c] == 0 for c in centres)
    assert sum(hu[c] < -500.0 for c in centres) > 150  # air is most of this volume's background
    assert all(labels[body.centre(rng, 1)] == 1 for _ in range(50))


def test_bench_recipe_refuses_an_unknown_initialisation(tmp_path):
    from benchmarks import weights

    with pytest.raises(ValueError, match="init"):
        weights.train_bench_model(tmp_path / "m", {"init": "xavier"}, log=lambda m: None)
    assert not (tmp_path / "m").exists()  # refused before any work or any file


def test_ablation_rows_and_onnx_runtime_variant(tiny_model, tmp_path, monkeypatch):
    """The forward-pass ablation on a tiny model: every variant timed per patch, the
    larger batch counted as such, and ONNX Runtime's logits equal to the fp32 network's."""
    pytest.importorskip("onnxruntime", reason="the ONNX Runtime variant needs onnxruntime (bench and test extras)")
    pytest.importorskip("onnx", reason="exporting to ONNX needs onnx (bench and test extras)")
    import tempfile

    import numpy as np

    sys.path.insert(0, str(REPO))
    from benchmarks import ablation

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the exported file goes here, and must go
    from LiverTumorSegLib.model import load_model

    model = load_model(tiny_model)
    hu = np.random.default_rng(0).uniform(-1000, 400, size=(40, 40, 40)).astype(np.float32)
    result = ablation.run(model, hu, reps=1, batch=1, onnx_too=True, log=lambda m: None)
    rows = result["rows"]
    assert {"fp32", "default (bf16 weights, channels_last)", "default, 2 patches per call",
            "onnxruntime fp32 (CPU provider)"} <= set(rows)
    assert rows["default, 2 patches per call"]["patches_per_run"] == 2
    assert rows["fp32"]["patches_per_run"] == 1
    for row in rows.values():
        assert row["seconds_per_patch"] * row["patches_per_run"] == pytest.approx(row["seconds_median"])
    assert rows["fp32"]["speedup_vs_fp32"] == pytest.approx(1.0)
    assert 0.0 <= result["onnxruntime_max_abs_logit_diff_vs_fp32"] < 1e-3
    assert not list(tmp_path.glob("ltsbench-onnx-*")), "the exported file was left behind"


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="reads the total memory from /proc/meminfo (Linux)")
def test_machine_description_has_the_memory_without_psutil(monkeypatch):
    """The machine table names the memory even where psutil (bench extra) is absent."""
    sys.path.insert(0, str(REPO))
    from benchmarks import machine

    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    total_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
    assert machine.describe()["memory_gib"] == pytest.approx(total_kib / 2**20, rel=0.01)

"""Which torch the engine accepts, and which weights it reads with an older one.

torch 2.2.2 is the newest release for Intel macOS, so 3D Slicer's macOS build can have
nothing newer; before 2.6, ``torch.load(weights_only=True)`` could run code from a
crafted file (CVE-2025-32434). The engine then reads pickled weights only from the
bundled models and any other model from safetensors."""

from __future__ import annotations

import importlib.metadata
import shutil

import numpy as np
import pytest
import torch

from LiverTumorSegLib.errors import ModelError
from LiverTumorSegLib.model import load_model, resolve_model
from LiverTumorSegLib.model.loading import BUNDLED_DIR, pickle_is_safe
from LiverTumorSegLib.runner import missing_dependencies
from LiverTumorSegLib.torch_versions import TORCH_MINIMUM, TORCH_SAFE_PICKLE, release

from .helpers import make_tiny_model

OLD_TORCH = "2.2.2+cu121"


def _pretend_torch(monkeypatch, version: str) -> None:
    monkeypatch.setattr(torch, "__version__", version)


def test_release_numbers():
    assert release("2.5.1+cu121") == (2, 5) and release("2.13.0") == (2, 13) and release("3") == (3, 0)
    assert release("2.6.0a0+git1234") == (2, 6)
    assert TORCH_MINIMUM == (2, 2) and TORCH_SAFE_PICKLE == (2, 6)


def test_pickled_weights_are_safe_only_in_bundled_folders_before_2_6(tmp_path):
    bundled = BUNDLED_DIR / "demo-phantom" / "weights.pt"
    assert pickle_is_safe("2.5.1", bundled) and pickle_is_safe("2.6.0", tmp_path / "weights.pt")
    assert not pickle_is_safe("2.5.1", tmp_path / "weights.pt")
    link = tmp_path / "linked.pt"  # a link into the bundled folder counts as bundled, and the reverse not
    link.symlink_to(bundled)
    assert pickle_is_safe("2.2.2", link)


def test_old_torch_refuses_pickled_weights_of_a_local_model_and_reads_safetensors(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    pickled = make_tiny_model(tmp_path / "pt", seed=3, weights_format="torch-state-dict")
    safe = make_tiny_model(tmp_path / "st", seed=3, weights_format="safetensors")
    assert (safe / "weights.safetensors").is_file() and not (safe / "weights.pt").exists()
    expected = torch.load(pickled / "weights.pt", weights_only=True)  # written by this test: trusted
    _pretend_torch(monkeypatch, OLD_TORCH)
    with pytest.raises(ModelError, match=r"CVE-2025-32434.*--weights-format safetensors"):
        load_model(pickled)
    loaded = load_model(safe)
    assert loaded.card.weights_format == "safetensors"
    state = loaded.network.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_old_torch_still_runs_the_bundled_model(monkeypatch):
    _pretend_torch(monkeypatch, OLD_TORCH)
    model = load_model(resolve_model(None))
    assert model.card.weights_format == "torch-state-dict"


def test_a_bundled_looking_copy_outside_the_package_is_not_trusted(tmp_path, monkeypatch):
    copy = tmp_path / "demo-phantom"
    shutil.copytree(BUNDLED_DIR / "demo-phantom", copy)
    _pretend_torch(monkeypatch, OLD_TORCH)
    with pytest.raises(ModelError, match="only the bundled models"):
        load_model(copy)


def test_safetensors_weights_are_checked_like_pickled_ones(tmp_path):
    pytest.importorskip("safetensors")
    folder = make_tiny_model(tmp_path / "st", weights_format="safetensors")
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model(folder)


def test_missing_dependencies_asks_for_torch_2_2_not_2_6(monkeypatch):
    real_version = importlib.metadata.version
    for found, wanted in (("2.5.1+cu121", False), ("2.2.2", False), ("2.1.2+cpu", True), ("2.13.0", False)):
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name, v=found: v if name == "torch" else real_version(name))
        missing = missing_dependencies()
        assert bool(missing) == wanted, found
        if wanted:
            assert missing == [{"module": "torch", "pip": "torch>=2.2", "bundled": False, "found": found}]


def test_the_slicer_module_asks_for_the_engine_floor():
    from .helpers import REPO

    text = (REPO / "LiverTumorSeg" / "LiverTumorSegWidgetHelpers" / "dependencies.py").read_text()
    assert 'TORCH_REQUIREMENT = ">={}.{}"'.format(*TORCH_MINIMUM) in text
    requirement = next(line for line in (REPO / "pyproject.toml").read_text().splitlines() if '"torch>=' in line)
    assert '"torch>={}.{}"'.format(*TORCH_MINIMUM) in requirement
    assert np.all(np.array(TORCH_SAFE_PICKLE) >= np.array(TORCH_MINIMUM))

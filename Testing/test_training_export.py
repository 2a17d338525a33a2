"""Export (Training/export.py's engine, exporting.py) on hand-made checkpoints: what it
refuses and what it writes, without training a model (the end-to-end export runs in
test_training_e2e.py). From a mutation review."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .helpers import Exploit

TRAINING = Path(__file__).resolve().parents[1] / "Training"


@pytest.fixture()
def training(monkeypatch):
    pytest.importorskip("lightning")
    monkeypatch.syspath_prepend(str(TRAINING))
    from livertumorseg_training import exporting
    from livertumorseg_training.config import load_config

    return exporting, load_config


def test_a_crafted_checkpoint_is_never_unpickled(training, tmp_path):
    """A crafted checkpoint is never unpickled (its code never runs), and torch's advice
    to load with weights_only=False is never shown."""
    exporting, _ = training
    from livertumorseg_training.errors import ConfigError

    path = tmp_path / "evil.ckpt"
    torch.save({"livertumorseg": {"config": {}}, "state_dict": {}, "payload": Exploit()}, path)
    Exploit.ran = False
    with pytest.raises(ConfigError, match="not a PyTorch checkpoint written by train.py") as info:
        exporting.read_checkpoint(path)
    assert not Exploit.ran and "weights_only" not in str(info.value)


def test_a_plain_state_dict_is_not_taken_for_a_training_checkpoint(training, tmp_path):
    """A weights file given to export.py is named as not a training checkpoint, not a
    KeyError traceback."""
    exporting, _ = training
    from livertumorseg_training.errors import ConfigError

    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"network.x": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="not a LiverTumorSeg training checkpoint"):
        exporting.read_checkpoint(path)


def test_a_checkpoint_missing_a_tensor_is_not_exported(training):
    """A checkpoint lacking a tensor is not exported as a partly random model."""
    exporting, load_config = training
    from LiverTumorSegLib.model.unet import build_network
    from livertumorseg_training.module import architecture_of

    config = load_config("smoke")
    state = {f"network.{k}": v for k, v in build_network(architecture_of(config)).state_dict().items()}
    state.pop(sorted(state)[-1])
    with pytest.raises(RuntimeError, match="Missing key"):
        exporting.network_from_checkpoint({"livertumorseg": {"config": config}, "state_dict": state})


def test_the_card_keeps_an_anisotropic_recipe_spacing_in_x_y_z_order(training):
    """The card keeps the recipe's (x, y, z) spacing order; the smoke recipe's isotropic
    grid cannot tell."""
    exporting, load_config = training
    config = load_config("smoke")
    config["data"]["spacing_mm"] = [0.8, 0.9, 2.5]
    card = exporting.card_from_config(config, {}, {})
    assert card.spacing_mm == (0.8, 0.9, 2.5)


@pytest.mark.parametrize("content", [torch.zeros(3), 5])
def test_a_checkpoint_that_is_not_a_dict_is_named(training, tmp_path, content):
    """A bare tensor or number saved as a checkpoint is named, not a traceback."""
    exporting, _ = training
    from livertumorseg_training.errors import ConfigError

    path = tmp_path / "x.ckpt"
    torch.save(content, path)
    with pytest.raises(ConfigError, match="is not a LiverTumorSeg training checkpoint"):
        exporting.read_checkpoint(path)

"""Checkpoint -> model folder (``weights.pt`` + ``model.json``) that the engine loads.

The card's grid (spacing, orientation), intensity transform and patch size are the
recipe's, i.e. exactly what training used. Provenance holds the whole recipe, the data
the model saw (data set, split, case ids), the git commit, the commands and library
versions; ``metrics`` holds the validation metrics.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import torch

from LiverTumorSegLib.model import ModelCard, save_model
from LiverTumorSegLib.model.unet import build_network

from .errors import ConfigError
from .module import CHECKPOINT_KEY, architecture_of
from .provenance import command_line, git_state, now_utc
from .transforms import intensity_transform

LABELS = {"0": "background", "1": "liver", "2": "tumor"}
DEFAULT_INTENDED_USE = ("Research use only. Not a medical device; not for diagnosis, treatment planning "
                        "or any clinical decision.")


def read_checkpoint(path: Path) -> dict:
    """Load a Lightning checkpoint written by ``train.py`` (tensors and plain data only)."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.ckpt")) or sorted(path.glob("checkpoints/*.ckpt"))
        listed = f" (it holds {', '.join(str(f) for f in found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
        raise ConfigError(f"{path} is a folder; give a checkpoint file{listed}")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable or unsafe files
        # (torch's own text for a refused unpickle suggests weights_only=False: never shown)
        detail = "" if isinstance(exc, pickle.UnpicklingError) else f": {(str(exc).splitlines() or [''])[0][:200]}"
        raise ConfigError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint written by train.py, "
                          f"or it is damaged ({type(exc).__name__}{detail})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{path} is not a LiverTumorSeg training checkpoint (it holds a {type(checkpoint).__name__})")
    if CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a LiverTumorSeg training checkpoint (no '{CHECKPOINT_KEY}' section)")
    return checkpoint


def network_from_checkpoint(checkpoint: dict) -> torch.nn.Module:
    """The U-Net of a checkpoint, weights loaded, in eval mode."""
    config = checkpoint[CHECKPOINT_KEY]["config"]
    network = build_network(architecture_of(config))
    prefix = "network."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    network.load_state_dict(state, strict=True)
    return network.eval()


def card_from_config(config: dict, provenance: dict, metrics: dict) -> ModelCard:
    """The model card for a recipe (weights fields are filled in by ``save_model``)."""
    export = config["export"]
    return ModelCard(
        name=str(export["name"] or config["name"]),
        architecture=architecture_of(config),
        labels=dict(LABELS),
        spacing_mm=tuple(float(s) for s in config["data"]["spacing_mm"]),
        patch_size=tuple(int(p) for p in config["sampling"]["patch_size"]),
        weights_file="weights.pt",
        weights_sha256="",
        orientation=str(config["data"]["orientation"]).upper(),
        intensity=intensity_transform(config),
        default_overlap=float(export["default_overlap"]),
        version=str(export["version"]),
        description=str(config.get("description") or ""),
        intended_use=str(export["intended_use"] or DEFAULT_INTENDED_USE),
        provenance=provenance,
        metrics=metrics,
    )


def export_checkpoint(checkpoint_path: Path, out_dir: Path, *, extra_provenance: Optional[dict] = None,
                      extra_metrics: Optional[dict] = None, weights_format: Optional[str] = None) -> Path:
    """Write the model folder for a checkpoint into ``out_dir``; returns ``out_dir``.

    ``weights_format``: ``torch-state-dict`` (weights.pt) or ``safetensors``, which torch
    older than 2.6 can load too (:func:`LiverTumorSegLib.model.save_model`); None: the
    one this torch can load back (:func:`default_weights_format`)."""
    checkpoint = read_checkpoint(checkpoint_path)
    saved = checkpoint[CHECKPOINT_KEY]
    config = saved["config"]
    network = network_from_checkpoint(checkpoint)
    provenance = {
        "recipe_file": config.get("recipe_file", ""),
        "recipe": config,
        "data": saved.get("data", {}),
        "training": {**saved.get("provenance", {}), "epoch": int(checkpoint.get("epoch", -1)),
                     "global_step": int(checkpoint.get("global_step", -1))},
        "checkpoint": Path(checkpoint_path).name,
        "export": {"command": command_line(), "git": git_state(), "time_utc": now_utc()},
    }
    training_git = provenance["training"].get("git", {})
    provenance["git_commit"] = training_git.get("commit", provenance["export"]["git"]["commit"])
    provenance.update(extra_provenance or {})
    metrics = {"validation": dict(saved.get("val_metrics", {}))}
    metrics.update(extra_metrics or {})
    card = card_from_config(config, provenance, metrics)
    return save_model(Path(out_dir), network, card, weights_format=weights_format or default_weights_format())


def default_weights_format() -> str:
    """``torch-state-dict``, or ``safetensors`` on torch older than 2.6, whose engine
    loads pickled weights only from the bundled models (CVE-2025-32434): a model trained
    and exported there must load back there."""
    from LiverTumorSegLib.torch_versions import TORCH_SAFE_PICKLE, release

    return "torch-state-dict" if release(torch.__version__) >= TORCH_SAFE_PICKLE else "safetensors"


def update_card_metrics(model_dir: Path, metrics: dict) -> None:
    """Merge ``metrics`` into an exported model's ``model.json`` (weights unchanged)."""
    card = ModelCard.load(Path(model_dir))
    card.metrics.update(metrics)
    card.save(Path(model_dir))

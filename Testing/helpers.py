"""Shared test helpers: tiny models, paths to the shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.accuracy import REAL_DIR as REAL_DATA  # ../shared/data/real, or $LIVERTUMORSEG_SHARED_DATA/real

REPO = Path(__file__).resolve().parents[1]


def real_data(name: str) -> Path:
    """Path of a file in ../shared/data/real, or skip the test saying why."""
    path = REAL_DATA / name
    if not path.is_file():
        pytest.skip(f"shared real data not available: {path} is absent (it lives beside the checkout, never in the repo)")
    return path


def make_tiny_model(folder: Path, *, widths=(4, 8), patch=(32, 32, 32), spacing=(3.0, 3.0, 3.0),
                    seed: int = 0, window=(-200.0, 250.0), overlap: float = 0.25,
                    weights_format: str = "") -> Path:
    """A randomly initialised (untrained) small model folder for plumbing tests; its
    weights are pickled unless this torch is too old to read those (before 2.6)."""
    import torch

    from LiverTumorSegLib.torch_versions import TORCH_SAFE_PICKLE, release

    if not weights_format:
        weights_format = "torch-state-dict" if release(torch.__version__) >= TORCH_SAFE_PICKLE else "safetensors"

    from LiverTumorSegLib.model import ModelCard, save_model
    from LiverTumorSegLib.model.card import IntensityTransform
    from LiverTumorSegLib.model.unet import UNet3D

    torch.manual_seed(seed)
    net = UNet3D(widths=widths)
    card = ModelCard(
        name="tiny-test", architecture={"type": "unet3d", "in_channels": 1, "num_classes": 3,
                                        "widths": list(widths), "norm": "none"},
        labels={"0": "background", "1": "liver", "2": "tumor"}, spacing_mm=tuple(spacing),
        patch_size=tuple(patch), weights_file="weights.pt", weights_sha256="",
        intensity=IntensityTransform(window_hu=window), default_overlap=overlap,
        description="untrained test model",
    )
    return save_model(folder, net, card, weights_format=weights_format)


def weights_path(folder: Path) -> Path:
    """The weights file a model folder's card names (weights.pt or weights.safetensors)."""
    import json

    return Path(folder) / json.loads((Path(folder) / "model.json").read_text(encoding="utf-8"))["weights"]["file"]


def read_weights(folder: Path) -> dict:
    """A test model's state_dict, in whichever format its card names (written by the tests)."""
    import torch

    path = weights_path(folder)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def write_weights(folder: Path, state: dict) -> Path:
    """Overwrite a test model's weights in its card's format (the card's checksum is kept)."""
    import torch

    path = weights_path(folder)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


class Exploit:
    """A pickled object that runs code when unpickled (it sets ``Exploit.ran``): what a
    crafted weights file or checkpoint carries. Loading must never run it."""

    ran = False

    def __reduce__(self):
        return (Exploit._run, ())

    @staticmethod
    def _run():
        Exploit.ran = True
        return Exploit()

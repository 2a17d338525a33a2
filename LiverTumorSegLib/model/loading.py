"""Load a model folder safely: card, checksum, then weights without unpickling.

Weights are a PyTorch ``state_dict`` saved with ``torch.save``. The file is opened once;
through that one handle its SHA-256 is checked against ``model.json`` and then
``torch.load(weights_only=True)`` (which refuses arbitrary Python objects) reads it, so
a file swapped in between is not what gets loaded. ``model.json`` names the weights by
a path inside its folder (a link there may point elsewhere, as in DVC or Hugging Face
snapshot folders: the checksum guards the content), and every weight must be finite.
``safetensors`` files are read too when that package is installed.

With torch older than 2.6, whose ``weights_only=True`` could run code from a crafted file
(CVE-2025-32434), pickled weights are read only from the bundled model folders, which
ship with this code; other models need safetensors weights there
(:mod:`LiverTumorSegLib.torch_versions`).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..torch_versions import TORCH_SAFE_PICKLE, release
from .card import ModelCard, check_sha256

#: Model folders that ship with this code (the registry lists them as "bundled").
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return _sha256_of_handle(f, chunk)


def _sha256_of_handle(handle, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of what ``handle`` reads from its position to the end."""
    h = hashlib.sha256()
    for block in iter(lambda: handle.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A network with its card and the folder it came from."""

    card: ModelCard
    network: object  # torch.nn.Module, in eval mode, on the CPU
    folder: Path


def load_state_dict(path: Path, expected_sha256: str, fmt: str = "torch-state-dict") -> dict:
    """Read weights after checking their checksum; never unpickles arbitrary objects."""
    import torch

    path = Path(path)
    expected_sha256 = check_sha256(expected_sha256)  # an empty or cut one would check nothing
    if not path.is_file():
        raise ModelError(f"weights file {path} is missing")
    if fmt not in WEIGHTS_FORMATS:
        raise ModelError(f"unknown weights format {fmt!r} in model.json")
    if fmt == "torch-state-dict" and not pickle_is_safe(torch.__version__, path):
        raise ModelError(
            f"torch {torch.__version__} cannot read the pickled weights {path} safely: before torch 2.6, "
            "torch.load(weights_only=True) can run code from a crafted file (CVE-2025-32434), so only the "
            "bundled models load from .pt weights. Upgrade torch to 2.6 or newer (in 3D Slicer: the PyTorch "
            "Utils module), or export the model with safetensors weights "
            "(python Training/export.py --weights-format safetensors)")
    try:
        with open(path, "rb") as handle:
            actual = _sha256_of_handle(handle)
            if actual != expected_sha256:
                raise ModelError(
                    f"checksum mismatch for {path.name}: model.json says {expected_sha256[:16]}..., "
                    f"the file has {actual[:16]}...; the file is corrupt or was replaced — reinstall the model"
                )
            handle.seek(0)
            state = _read_state(handle, fmt, path.name)
    except OSError as exc:
        raise ModelError(f"cannot read weights {path}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path.name} does not hold a plain state_dict of tensors")
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelError(f"{path.name} holds NaN or infinite weights ({', '.join(bad[:3])}); the model is broken")
    return state


def pickle_is_safe(torch_version: str, weights: Path) -> bool:
    """Whether pickled weights at ``weights`` may be read with this torch: any on 2.6 or
    newer; before, only a file inside the bundled model folders (links resolved)."""
    if release(torch_version) >= TORCH_SAFE_PICKLE:
        return True
    return Path(weights).resolve().is_relative_to(BUNDLED_DIR.resolve())


def _read_state(handle, fmt: str, name: str) -> dict:
    import torch

    if fmt == "safetensors":
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError:
            raise ModelError("this model's weights are in safetensors format; install the 'safetensors' package "
                             "(in 3D Slicer's Python console: slicer.util.pip_install('safetensors'))") from None
        try:
            return load_safetensors(handle.read())
        except Exception as exc:  # the package raises its own error types
            raise ModelError(f"cannot read weights {name}: {str(exc)[:300]}") from None
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text suggests weights_only=False, i.e. running the file's code: never shown
        raise ModelError(f"cannot read weights {name}: it holds Python objects other than tensors, which are "
                         "never loaded; a model's weights must be a plain state_dict") from None
    except Exception as exc:  # torch raises several types for bad files
        text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read weights {name}: {text}") from None


def load_model(folder: Path) -> LoadedModel:
    """Load the model in ``folder``: parse the card, verify and load the weights.

    Raises :class:`ModelError` when the card is invalid, the checksum differs, or the
    weights do not fit the architecture the card describes.
    """
    from .unet import build_network

    folder = Path(folder)
    card = ModelCard.load(folder)
    state = load_state_dict(folder / card.weights_file, card.weights_sha256, card.weights_format)
    try:
        network = build_network(card.architecture)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{folder / 'model.json'}: bad architecture: {exc}") from None
    _check_dtypes(network, state, folder)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelError(
            f"the weights in {folder} do not match the architecture in its model.json "
            f"({' '.join(first)[:300]})"
        ) from None
    network.eval()
    return LoadedModel(card=card, network=network, folder=folder)


def _check_dtypes(network, state: dict, folder: Path) -> None:
    """Refuse integer, boolean or complex tensors where the network holds floating-point
    ones: ``load_state_dict`` would cast them silently, giving a network of whole-number
    (or truncated) weights. Half-precision weights are fine; integer buffers (a
    BatchNorm's batch count) are compared with integer buffers."""
    expected = network.state_dict()
    bad = [f"{name} ({str(tensor.dtype).replace('torch.', '')})" for name, tensor in state.items()
           if name in expected and expected[name].is_floating_point() and not tensor.is_floating_point()]
    if bad:
        raise ModelError(f"the weights in {folder} hold non-floating-point tensors where the network has "
                         f"floating-point ones: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
                         "the file was not written from a trained network's state_dict")


WEIGHTS_FORMATS = {"torch-state-dict": "weights.pt", "safetensors": "weights.safetensors"}


def save_model(folder: Path, network, card: ModelCard, weights_format: str = "torch-state-dict") -> Path:
    """Write ``network``'s weights and a card (with their SHA-256) into ``folder``.

    ``weights_format`` is ``torch-state-dict`` (``weights.pt``) or ``safetensors``
    (``weights.safetensors``, which any torch the engine runs on reads safely; needs the
    ``safetensors`` package). Used by the training package's export. The weights and the
    card are published together (:class:`~LiverTumorSegLib.atomic.StagedOutput`, the card
    last); an earlier export's card and weights in ``folder`` are replaced, so a weights
    file of the other format is not left beside the new one. Other files there are kept.
    The same weights give the same bytes, and so the same SHA-256, on every export.
    """
    import torch

    from ..atomic import StagedOutput
    from ..errors import OutputError
    from .card import CARD_NAME

    if weights_format not in WEIGHTS_FORMATS:
        raise ModelError(f"unknown weights format {weights_format!r}: use one of {', '.join(WEIGHTS_FORMATS)}")
    if weights_format == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ModelError("writing safetensors weights needs the 'safetensors' package (pip install safetensors)") \
                from None
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write the model folder {folder}: a file of that name exists")

    def earlier_export() -> list:  # read when publishing: a model card there makes it one
        return [CARD_NAME, *WEIGHTS_FORMATS.values()] if (folder / CARD_NAME).is_file() else []

    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    weights_name = WEIGHTS_FORMATS[weights_format]
    with StagedOutput(folder, replaces=earlier_export, last=CARD_NAME) as stage:
        # Saved under its final name in the private staging folder: torch names the
        # archive's records after the file, so a temporary name would make every export's
        # bytes (and SHA-256) differ.
        weights = stage.path / weights_name
        try:
            if weights_format == "safetensors":
                save_file(state, str(weights))
            else:
                torch.save(state, weights)
        except (OSError, RuntimeError) as exc:
            raise OutputError(f"cannot write the weights into {folder}: {exc}") from None
        card.weights_file = weights_name
        card.weights_format = weights_format
        card.weights_sha256 = sha256_of(weights)
        card.save(stage.path)
    return folder

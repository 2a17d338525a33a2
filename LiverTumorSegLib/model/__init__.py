"""Model code: the network, the model card, safe loading and the model registry.

Names load lazily so that listing models or reading a card does not import torch
(the Slicer module lists models before PyTorch may be installed).
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "ModelCard": ".card", "IntensityTransform": ".card",
    "LoadedModel": ".loading", "load_model": ".loading", "save_model": ".loading", "sha256_of": ".loading",
    "DEFAULT_MODEL": ".registry", "cache_dir": ".registry", "list_models": ".registry",
    "resolve_model": ".registry",
    "UNet3D": ".unet", "build_network": ".unet", "count_parameters": ".unet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

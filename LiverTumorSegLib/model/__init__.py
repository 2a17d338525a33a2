"""Model code: the network, the model card, safe loading and the model registry."""

from .card import ModelCard, IntensityTransform
from .loading import LoadedModel, load_model, save_model, sha256_of
from .registry import DEFAULT_MODEL, cache_dir, list_models, resolve_model
from .unet import UNet3D, build_network, count_parameters

__all__ = [
    "ModelCard", "IntensityTransform", "LoadedModel", "load_model", "save_model", "sha256_of",
    "DEFAULT_MODEL", "cache_dir", "list_models", "resolve_model", "UNet3D", "build_network",
    "count_parameters",
]

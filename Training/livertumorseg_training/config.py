"""Recipes: YAML files under ``Training/configs/`` merged over built-in defaults.

A recipe is a nested mapping. Every key must exist in :data:`DEFAULTS` (a typo is an
error, not a silently ignored setting). Command-line overrides use dotted keys, e.g.
``trainer.max_epochs=3`` or ``model.widths=[8,16]``; values are parsed as YAML.

Axis orders: ``spacing_mm`` and ``crop_or_pad`` are (x, y, z), like the engine's
spacing; ``patch_size`` is (z, y, x) voxels, like the model card's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

DEFAULTS: dict = {
    "name": "livertumorseg",
    "description": "",
    "seed": 42,
    "data": {
        "spacing_mm": [1.5, 1.5, 1.5],
        "orientation": "LPS",
        "crop_or_pad": None,
        "validation_fraction": 0.1,
        "folds": None,
        "fold": 0,
        "cache_workers": None,
    },
    "intensity": {"mode": "window", "window_hu": [-200.0, 250.0], "output_range": [-1.0, 1.0]},
    "sampling": {
        "patch_size": [96, 96, 96],
        "queue_length": 40,
        "samples_per_volume": 5,
        "label_probabilities": {0: 0.2, 1: 0.3, 2: 0.5},
        "num_workers": 4,
        "pad_half_patch": True,
    },
    "augmentation": {
        "affine_scales": [0.9, 1.1],
        "affine_degrees": 10.0,
        "hu_shift": 0.0,
        "hu_scale": [1.0, 1.0],
        "noise_std_hu": 0.0,
        "flip": False,
    },
    "model": {"widths": [32, 64, 128, 256], "norm": "none", "init_from": None},
    "loss": {"name": "ce", "dice_weight": 1.0, "class_weights": None},
    "optimizer": {"name": "adam", "lr": 1.0e-4, "weight_decay": 0.0},
    "schedule": {"name": "none", "warmup_steps": 0, "min_lr_ratio": 0.01},
    "trainer": {
        "max_epochs": 100,
        "max_steps": -1,
        "batch_size": 2,
        "precision": "32-true",
        "check_val_every_n_epoch": 1,
        "log_every_n_steps": 10,
        "gradient_clip_val": None,
        "deterministic": "warn",
        "accelerator": "auto",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "overlay_images": 2,
    },
    "validation": {"mode": "patches", "overlap": 0.25, "max_cases": None},
    "checkpoint": {"monitor": "val/loss", "mode": "min", "save_top_k": 10},
    "export": {"name": None, "version": "0.1.0", "default_overlap": 0.25, "intended_use": "",
               "evaluate_validation": True},
}


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = f"{where}{key}"
        if key not in base:
            known = ", ".join(sorted(str(k) for k in base))
            raise ConfigError(f"unknown recipe key {path!r}; known keys here: {known}")
        if isinstance(base[key], dict) and key != "label_probabilities":
            if not isinstance(value, dict):
                raise ConfigError(f"recipe key {path!r} must be a mapping")
            out[key] = _merge(base[key], value, f"{path}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config_path(spec: Optional[str]) -> Path:
    """A recipe given as a path, or as a name of ``Training/configs/`` (``seed``, ``default``)."""
    if spec is None:
        return CONFIG_DIR / "default.yaml"
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = CONFIG_DIR / (spec if spec.endswith(".yaml") else f"{spec}.yaml")
    if named.is_file():
        return named
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {spec!r} not found (neither a file nor one of {names})")


def load_config(spec: Optional[str] = None, overrides: Iterable[str] = ()) -> dict:
    """Read a recipe, merge it over the defaults, apply ``key.sub=value`` overrides, validate."""
    import yaml

    path = resolve_config_path(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must hold a mapping at the top level")
    recipe_file = data.pop("recipe_file", path.name)
    config = _merge(DEFAULTS, data)
    apply_overrides(config, overrides)
    config["recipe_file"] = recipe_file
    validate(config)
    return config


def apply_overrides(config: dict, overrides: Iterable[str]) -> None:
    """Apply ``dotted.key=value`` strings (values parsed as YAML) in place."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. trainer.max_epochs=3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = config
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section of the recipe")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse the value: {exc}") from None


#: Keys whose value may take more than the default's type (Lightning's own options).
_EITHER = {"trainer.precision": (str, int), "trainer.deterministic": (str, bool),
           "trainer.devices": (int, str, list)}
#: Keys whose default is null, with the type a value must have.
_OPTIONAL = {"data.folds": int, "data.cache_workers": int, "validation.max_cases": int,
             "trainer.gradient_clip_val": float, "loss.class_weights": list, "model.init_from": str,
             "export.name": str}


def _is_number(value: Any, integer: bool = False) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def _type_name(kind) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text",
            list: "a list", dict: "a mapping"}[kind]


def check_types(config: dict, defaults: dict = DEFAULTS, where: str = "", lenient: bool = False) -> None:
    """Refuse a value of the wrong kind (``optimizer.lr=fast``, ``widths: [4, 8, x]``,
    ``flip: 1``) with its key, before anything runs or is written; the defaults give the
    kinds. A number written as text (``1e-3``, which YAML reads as text for want of a
    dot) becomes that number, in place. ``lenient``: only those conversions, refusing
    nothing (a checkpoint's recipe, to compare it with a resumed run's)."""
    def refuse(message: str) -> None:
        if not lenient:
            raise ConfigError(message)

    for key, default in defaults.items():
        name, value = f"{where}{key}", config.get(key)
        if isinstance(default, dict) and key != "label_probabilities":
            if isinstance(value, dict):
                check_types(value, default, name + ".", lenient)
            else:
                refuse(f"{name} must be a section (a mapping of keys), not {value!r}")
            continue
        if key not in config:
            refuse(f"{name} is missing")
            continue
        if value is None:  # null: the setting off or left to its user (affine_scales: null); validate() has the rest
            continue
        kinds = _EITHER.get(name) or ((_OPTIONAL[name],) if name in _OPTIONAL else None)
        if kinds is None:
            if default is None:
                continue
            kinds = (float if isinstance(default, float) else type(default),)
        if isinstance(value, str) and (int in kinds or float in kinds) and str not in kinds:
            value = config[key] = _number(value, float in kinds)  # YAML reads 1e-3 (no dot) as text
        elif kinds == (str,) and _is_number(value):
            value = config[key] = str(value)  # export.version: 2, as the card's text "2"
        if isinstance(value, list) and isinstance(default, list) and default:
            value = config[key] = [_number(item, not isinstance(default[0], int)) if isinstance(item, str) else item
                                   for item in value]
        if not any(_fits(value, kind) for kind in kinds):
            refuse(f"{name} must be {' or '.join(_type_name(k) for k in kinds)}, not {value!r}")
        elif isinstance(value, list) and isinstance(default, list) and default:
            if not all(_is_number(item, isinstance(default[0], int)) for item in value):
                refuse(f"{name} must be a list of {'whole ' if isinstance(default[0], int) else ''}"
                       f"numbers, not {value!r}")
        elif isinstance(value, list) and name == "loss.class_weights":
            if not all(_is_number(item) for item in value):
                refuse(f"{name} must be a list of numbers, not {value!r}")
        elif isinstance(value, dict):
            if not all(_is_number(item) for item in value.values()):
                refuse(f"{name} must map each label to a number, not {value!r}")


def _number(text: str, real: bool):
    """``text`` as the number it spells (``1e-3``, ``3``), else unchanged."""
    try:
        return float(text) if real else int(text)
    except ValueError:
        return text


def _fits(value: Any, kind) -> bool:
    if kind in (int, float):
        return _is_number(value, integer=kind is int)
    return isinstance(value, kind)


def validate(config: dict) -> None:
    """Refuse recipes the engine or the sampler could not honour."""
    check_types(config)
    data, sampling, model = config["data"], config["sampling"], config["model"]
    _triple(data["spacing_mm"], "data.spacing_mm", float)
    _triple(sampling["patch_size"], "sampling.patch_size", int)
    if data["crop_or_pad"] is not None:
        _triple(data["crop_or_pad"], "data.crop_or_pad", int)
    divisor = 2 ** (len(model["widths"]) - 1)
    if any(int(p) % divisor for p in sampling["patch_size"]):
        raise ConfigError(f"sampling.patch_size {sampling['patch_size']} must be a multiple of {divisor} "
                          f"for a U-Net with {len(model['widths'])} levels")
    if config["intensity"]["mode"] not in ("window", "minmax"):
        raise ConfigError("intensity.mode must be 'window' or 'minmax'")
    if config["loss"]["name"] not in ("ce", "dice_ce"):
        raise ConfigError("loss.name must be 'ce' or 'dice_ce'")
    if config["optimizer"]["name"] not in ("adam", "adamw", "sgd"):
        raise ConfigError("optimizer.name must be 'adam', 'adamw' or 'sgd'")
    if config["schedule"]["name"] not in ("none", "cosine", "poly"):
        raise ConfigError("schedule.name must be 'none', 'cosine' or 'poly'")
    if config["validation"]["mode"] not in ("patches", "sliding_window"):
        raise ConfigError("validation.mode must be 'patches' or 'sliding_window'")
    if not 0.0 < float(data["validation_fraction"]) < 1.0:
        raise ConfigError("data.validation_fraction must be in (0, 1)")
    folds = data["folds"]
    if folds is not None and (int(folds) < 2 or not 0 <= int(data["fold"]) < int(folds)):
        raise ConfigError(f"--folds {folds} --fold {data['fold']}: need folds >= 2 and 0 <= fold < folds")
    if sampling["samples_per_volume"] < 1 or sampling["queue_length"] < sampling["samples_per_volume"]:
        raise ConfigError("sampling.queue_length must be at least sampling.samples_per_volume (>= 1)")


def _triple(value: Any, name: str, kind) -> None:
    try:
        items = [kind(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be three numbers, not {value!r}") from None
    if len(items) != 3 or min(items) <= 0:
        raise ConfigError(f"{name} must be three positive numbers, not {value!r}")


def dump_config(config: dict, path: Path) -> None:
    """Write the resolved recipe as YAML (the run folder's ``config.yaml``)."""
    import yaml

    from LiverTumorSegLib.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config, sort_keys=False))

"""The model card, ``model.json``: everything the engine needs to know about a model.

A model is a folder holding the weights and ``model.json``. The card names the
architecture, the labels, the grid the model works in (spacing in mm in (x, y, z)
order, and an orientation code such as ``"LPS"``: the anatomical direction in which
the i, j and k array axes increase), the intensity transform, the patch size
((z, y, x) voxels), the default overlap, provenance and the weights' SHA-256.
Nothing about a model is hard-coded elsewhere in the engine.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

CARD_NAME = "model.json"
FORMAT_VERSION = 1
ORIENTATION_LETTERS = {"L", "R", "P", "A", "S", "I"}


@dataclass
class IntensityTransform:
    """How HU become network input.

    ``mode="window"``: clip to ``window_hu`` then map linearly onto ``output_range``.
    ``mode="minmax"``: map the volume's own min..max onto ``output_range`` (the seed's
    TorchIO ``RescaleIntensity``); ``window_hu`` is then unused.
    """

    mode: str = "window"
    window_hu: tuple = (-200.0, 250.0)
    output_range: tuple = (-1.0, 1.0)


@dataclass
class ModelCard:
    """Parsed ``model.json``. See the README's "Models" section for the schema."""

    name: str
    architecture: dict
    labels: dict
    spacing_mm: tuple
    patch_size: tuple
    weights_file: str
    weights_sha256: str
    orientation: str = "LPS"
    intensity: IntensityTransform = field(default_factory=IntensityTransform)
    default_overlap: float = 0.25
    version: str = "0.0.0"
    description: str = ""
    intended_use: str = ""
    weights_format: str = "torch-state-dict"
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return int(self.architecture.get("num_classes", len(self.labels)))

    def to_dict(self) -> dict:
        """The JSON form written to ``model.json``."""
        d = asdict(self)
        weights = {"file": d.pop("weights_file"), "sha256": d.pop("weights_sha256"),
                   "format": d.pop("weights_format")}
        d["weights"] = weights
        d["spacing_mm"] = list(self.spacing_mm)
        d["patch_size"] = list(self.patch_size)
        return d

    def save(self, folder: Path) -> Path:
        """Write ``model.json`` into ``folder`` atomically; returns its path."""
        from ..atomic import atomic_write_text

        path = Path(folder) / CARD_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "model.json") -> "ModelCard":
        """Parse and validate a card; raise :class:`ModelError` naming the bad field."""
        try:
            return _parse(d)
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ModelError(f"{source}: invalid or missing field ({exc!r}); see the README's model card schema") from None

    @classmethod
    def load(cls, folder: Path) -> "ModelCard":
        """Read ``folder/model.json``."""
        path = Path(folder) / CARD_NAME
        if not path.is_file():
            raise ModelError(f"{folder} is not a model folder: it has no {CARD_NAME}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path} must hold a JSON object")
        return cls.from_dict(data, str(path))


def _parse(d: dict) -> ModelCard:
    version = int(d.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        raise ModelError(f"card format {version} is newer than this engine understands ({FORMAT_VERSION}); update LiverTumorSeg")
    weights = d["weights"]
    spacing = _numbers(d["spacing_mm"], "spacing_mm")
    patch = _numbers(d["patch_size"], "patch_size", whole=True)
    if len(spacing) != 3 or not all(SPACING_RANGE_MM[0] <= s <= SPACING_RANGE_MM[1] for s in spacing):
        raise ModelError(f"spacing_mm must be three finite numbers (x, y, z) from {SPACING_RANGE_MM[0]} to "
                         f"{SPACING_RANGE_MM[1]} mm, not {list(spacing)}: the model card is wrong")
    if len(patch) != 3 or not all(1 <= p <= MAX_PATCH for p in patch):
        raise ModelError(f"patch_size must be three whole numbers (z, y, x) from 1 to {MAX_PATCH}, not {list(patch)}: "
                         "the model card is wrong")
    orientation = str(d.get("orientation", "LPS")).upper()
    axes = {c for c in orientation}
    if len(orientation) != 3 or not axes <= ORIENTATION_LETTERS or len({_axis(c) for c in orientation}) != 3:
        raise ModelError(f"orientation {orientation!r} is not a valid code such as 'LPS' or 'RAS'")
    it = d.get("intensity", {})
    intensity = IntensityTransform(
        mode=str(it.get("mode", "window")),
        window_hu=_numbers(it.get("window_hu", (-200.0, 250.0)), "intensity.window_hu"),
        output_range=_numbers(it.get("output_range", (-1.0, 1.0)), "intensity.output_range"),
    )
    if intensity.mode not in ("window", "minmax"):
        raise ModelError(f"intensity.mode {intensity.mode!r} must be 'window' or 'minmax'")
    if len(intensity.window_hu) != 2 or len(intensity.output_range) != 2:
        raise ModelError("intensity.window_hu and intensity.output_range must hold two numbers each")
    if intensity.window_hu[0] >= intensity.window_hu[1]:
        raise ModelError("intensity.window_hu must be (low, high) with low < high")
    if intensity.output_range[0] >= intensity.output_range[1]:
        raise ModelError("intensity.output_range must be (low, high) with low < high")
    overlap = float(d.get("default_overlap", 0.25))
    if not 0.0 <= overlap < 1.0:
        raise ModelError("default_overlap must be in [0, 1)")
    if not all(math.isfinite(v) for v in (*spacing, *intensity.window_hu, *intensity.output_range)):
        raise ModelError("spacing_mm, intensity.window_hu and intensity.output_range must be finite numbers")
    labels = {str(k): str(v) for k, v in d["labels"].items()}
    _check_labels(labels)
    _check_architecture(dict(d["architecture"]), patch, len(labels))
    weights_file = Path(str(weights["file"]))
    if weights_file.is_absolute() or ".." in weights_file.parts or not weights_file.parts:
        raise ModelError(f"weights.file {str(weights['file'])!r} must be a file name inside the model folder")
    check_sha256(weights["sha256"])
    return ModelCard(
        name=str(d["name"]),
        architecture=dict(d["architecture"]),
        labels=labels,
        spacing_mm=spacing,
        patch_size=patch,
        weights_file=str(weights["file"]),
        weights_sha256=str(weights["sha256"]).lower(),
        weights_format=str(weights.get("format", "torch-state-dict")),
        orientation=orientation,
        intensity=intensity,
        default_overlap=overlap,
        version=str(d.get("version", "0.0.0")),
        description=str(d.get("description", "")),
        intended_use=str(d.get("intended_use", "")),
        provenance=dict(d.get("provenance", {})),
        metrics=dict(d.get("metrics", {})),
        format_version=version,
    )


MAX_WIDTH = 1024
MAX_PATCH = 512
SPACING_RANGE_MM = (0.1, 20.0)
SHA256_DIGITS = re.compile(r"[0-9a-f]{64}")
#: What the engine makes of each class: 0 background, 1 liver, 2 (if any) tumor; a card
#: must name its classes so (any case), or its volumes would be reported under the
#: wrong names.
LABEL_NAMES = {
    "0": {"background", "bg", "none"},
    "1": {"liver"},
    "2": {"tumor", "tumour", "cancer", "lesion", "liver tumor", "liver tumour", "liver lesion", "liver cancer",
          "neoplasm", "hcc", "metastasis", "metastases", "liver metastasis", "liver metastases"},
}


def _label_name(name: str) -> str:
    """``Liver_Tumors`` -> ``liver tumor``: case, separators and a plural s do not matter."""
    words = re.sub(r"[\s_\-]+", " ", name).strip().lower()
    return words[:-1] if words.endswith(("tumors", "tumours", "lesions", "cancers", "neoplasms")) else words


def check_sha256(value) -> str:
    """``weights.sha256`` in lower case; :class:`ModelError` unless it is 64 hex digits (an
    empty or cut checksum would leave the weights unchecked)."""
    if not isinstance(value, str) or not SHA256_DIGITS.fullmatch(value.lower()):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ModelError(f"weights.sha256 must be the weights file's SHA-256, 64 hex digits, not {shown}: the model "
                         "card is wrong (Training/export.py writes it), and the weights cannot be checked")
    return value.lower()


def _numbers(value, name: str, whole: bool = False) -> tuple:
    """A card's list of numbers; booleans, strings and (if ``whole``) fractions refused."""
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ModelError(f"{name} must be a list of numbers, not {value!r}: the model card is wrong")
    if whole:
        if not all(float(v).is_integer() for v in value):
            raise ModelError(f"{name} must hold whole numbers, not {list(value)}: the model card is wrong")
        return tuple(int(v) for v in value)
    return tuple(float(v) for v in value)


def _check_labels(labels: dict) -> None:
    """The engine reads class 1 as liver and class 2 as tumor: refuse a card that means
    something else by them."""
    if set(labels) not in ({"0", "1"}, {"0", "1", "2"}):
        raise ModelError(f"labels must be classes 0 (background), 1 (liver) and optionally 2 (tumor), not "
                         f"{sorted(labels)}: this engine reports class 1 as liver and 2 as tumor")
    wrong = {k: v for k, v in labels.items() if _label_name(v) not in LABEL_NAMES[k]}
    if wrong:
        expected = {k: sorted(LABEL_NAMES[k])[0] if k != "2" else "tumor" for k in wrong}
        raise ModelError(f"labels {wrong} do not mean what this engine reports them as ({expected}); "
                         "the model's classes would be measured under the wrong names")


def _check_architecture(arch: dict, patch: tuple, n_labels: int) -> None:
    """Refuse, before any network is built, an architecture this engine cannot run."""
    if arch.get("type", "unet3d") != "unet3d":
        return  # build_network names the unsupported type
    widths = arch.get("widths", (32, 64, 128, 256))
    if not isinstance(widths, (list, tuple)) or len(widths) < 2 or \
            not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_WIDTH for w in widths):
        raise ModelError(f"architecture.widths must be 2 or more whole numbers from 1 to {MAX_WIDTH}, not {widths!r}")
    divisor = 2 ** (len(widths) - 1)
    if any(p % divisor for p in patch):
        raise ModelError(f"patch_size {list(patch)} must be divisible by {divisor} (2 to the number of "
                         "pooling steps of architecture.widths)")
    classes = int(arch.get("num_classes", n_labels))
    if classes < 2 or classes != n_labels:
        raise ModelError(f"architecture.num_classes ({classes}) must be 2 or more and equal the number of labels "
                         f"({n_labels})")
    if int(arch.get("in_channels", 1)) != 1:
        raise ModelError("architecture.in_channels must be 1 (one CT volume)")


def _axis(letter: str) -> int:
    return {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}[letter]


def direction_from_orientation(code: str) -> Any:
    """3x3 LPS direction matrix (columns = i, j, k) for an orientation code like 'RAS'."""
    import numpy as np

    sign = {"L": 1.0, "P": 1.0, "S": 1.0, "R": -1.0, "A": -1.0, "I": -1.0}
    m = np.zeros((3, 3))
    for column, letter in enumerate(code.upper()):
        m[_axis(letter), column] = sign[letter]
    return m

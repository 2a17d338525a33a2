"""The data set on disk: MSD Task03 layout, ``dataset.json``, the case list and the split.

``dataset.json`` lists ``training`` entries ``{"image": "./imagesTr/x.nii.gz",
"label": "./labelsTr/x.nii.gz"}`` and ``test`` entries (image paths). Only entries
with both an image and a label are training subjects; files on disk that the JSON does
not list (for example macOS ``._`` resource forks) are ignored. A listed file that is
missing is an error naming the case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import DatasetError

DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class Case:
    """One subject: an id (the image file name without suffix) and its files."""

    case_id: str
    image: Path
    label: Optional[Path] = None


def case_id_of(path: Path) -> str:
    """``liver_7`` for ``.../liver_7.nii.gz`` (strips image suffixes)."""
    from LiverTumorSegLib.io import input_name

    return input_name(Path(path))


def read_dataset_json(data_dir: Path) -> dict:
    """Parse ``data_dir/dataset.json`` or raise :class:`DatasetError` saying what is wrong."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DatasetError(f"data folder {data_dir} does not exist")
    path = data_dir / DATASET_JSON
    if not path.is_file():
        raise DatasetError(
            f"{path} is missing: a Medical Segmentation Decathlon folder (e.g. Task03_Liver) holds "
            "dataset.json beside imagesTr/ and labelsTr/; point --data-dir at that folder"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must hold a JSON object")
    return data


def _resolve(data_dir: Path, entry: str) -> Path:
    return (data_dir / str(entry)).resolve() if not Path(str(entry)).is_absolute() else Path(str(entry))


def training_cases(data_dir: Path) -> List[Case]:
    """The labelled subjects of ``dataset.json``, in the file's order.

    Raises :class:`DatasetError` when ``dataset.json`` is missing or malformed, or a
    listed image or label file does not exist (the message names the case).
    """
    data_dir = Path(data_dir).expanduser()
    data = read_dataset_json(data_dir)
    entries = data.get("training")
    if not isinstance(entries, list):
        raise DatasetError(f"{data_dir / DATASET_JSON} has no 'training' list")
    cases, seen, missing = [], set(), []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("image") or not entry.get("label"):
            continue
        image, label = _resolve(data_dir, entry["image"]), _resolve(data_dir, entry["label"])
        case_id = case_id_of(image)
        absent = [f"its {kind} file {path}" for kind, path in (("image", image), ("label", label)) if not path.is_file()]
        if absent:
            missing.append(f"case {case_id} (training entry {index}): {' and '.join(absent)} "
                           f"{'is' if len(absent) == 1 else 'are'} missing")
            continue
        if case_id in seen:
            raise DatasetError(f"case {case_id} is listed twice in {DATASET_JSON}")
        seen.add(case_id)
        cases.append(Case(case_id, image, label))
    if missing:
        raise DatasetError(f"{len(missing)} case(s) of {DATASET_JSON} have missing files; restore them or remove "
                           "their entries from dataset.json:\n  " + "\n  ".join(missing))
    return cases


def test_cases(data_dir: Path) -> List[Case]:
    """The ``test`` entries of ``dataset.json`` whose image exists, each with the label
    ``labelsTs/<same name>`` when that file exists (MSD ships test images unlabelled)."""
    data_dir = Path(data_dir).expanduser()
    data = read_dataset_json(data_dir)
    cases = []
    for entry in data.get("test", []) or []:
        rel = entry.get("image") if isinstance(entry, dict) else entry
        if not rel:
            continue
        image = _resolve(data_dir, rel)
        if not image.is_file():
            raise DatasetError(f"test case {case_id_of(image)}: image {image} is listed in {DATASET_JSON} but missing")
        label = data_dir / "labelsTs" / image.name
        cases.append(Case(case_id_of(image), image, label if label.is_file() else None))
    return cases


def split_cases(cases: List[Case], validation_fraction: float = 0.1, folds: Optional[int] = None,
                fold: int = 0) -> Tuple[List[Case], List[Case]]:
    """Sequential split (no shuffling, as the seed did).

    Without ``folds``: the first ``1 - validation_fraction`` of the cases train and the
    rest validate (at least one case validates). With ``folds=k``: the cases are cut
    into k consecutive blocks and block ``fold`` validates.

    Raises :class:`DatasetError` when the training or the validation set is empty.
    """
    n = len(cases)
    if n == 0:
        raise DatasetError("the training set is empty: dataset.json lists no case with both an image and a label")
    if folds:
        bounds = [round(i * n / folds) for i in range(folds + 1)]
        val = cases[bounds[fold]:bounds[fold + 1]]
        train = cases[:bounds[fold]] + cases[bounds[fold + 1]:]
    else:
        n_val = max(1, int(round(n * validation_fraction)))
        train, val = cases[:n - n_val], cases[n - n_val:]
    if not train:
        raise DatasetError(f"the training set is empty: all {n} labelled case(s) went to validation; "
                           "add cases or lower data.validation_fraction")
    if not val:
        raise DatasetError(f"the validation set is empty with {n} case(s) and {folds} folds; use fewer folds")
    return train, val

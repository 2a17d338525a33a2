"""Does an optimisation move accuracy? Dice per engine configuration, same inputs.

Cases: held-out phantoms (seeds never used in training, on their own random grids,
i.e. resampled like real input) and the real CTs in ``../shared/data/real`` (skipped,
with a reason, when that folder is absent). Every configuration segments every case
through :meth:`Segmenter.segment` (the whole engine, postprocessing included);
Dice is against the case's reference labels (LiTS convention: liver = labels 1 and 2,
tumor = label 2) and against the reference configuration's labels.

Configurations, in the order the optimisations were added:

* ``fp32_nocrop``: full precision on the whole grid (the MONAI-equivalent reference);
* ``fp32_crop``: + crop to the body and skip air patches (kept from the seed engine), on
  the default window grid (the whole volume's);
* ``bf16_autocast``: + bf16 autocast, network in its loaded layout (the engine before
  this work's changes);
* ``default``: the engine as shipped (channels-last-3d copy with bf16 weights; the
  whole volume's window grid);
* ``cover_grid``: the default with ``window_grid="cover"`` (``--window-grid cover``):
  only as many of the whole volume's windows as cover the body's box;
* ``body_grid``: the default with ``window_grid="body"`` (``--window-grid body``): the
  grid laid on the body's box along axes where that saves windows.

One more configuration is not an optimisation but the choice item 1's Dice target
raises: ``constant_weighting``, the default with ``weighting="constant"``
(``--weighting constant``, MONAI's default mode), against the Gaussian default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import numpy as np

from .weights import HELDOUT_SEED_BASE

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repository
REAL_DIR = Path(os.environ.get("LIVERTUMORSEG_SHARED_DATA", SHARED_DATA)) / "real"
REAL_CASES = {"lits117_crop": ("lits117_crop_ct.nii.gz", "lits117_crop_label.nii.gz"),
              "abdomen_3mm": ("abdomen_3mm_ct.nii.gz", "abdomen_3mm_liver_ref.nii.gz")}


def _dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return None if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def dice_pair(pred: np.ndarray, ref: np.ndarray, has_tumor_labels: bool = True) -> dict:
    out = {"liver": _dice(pred >= 1, ref >= 1)}
    if has_tumor_labels:
        out["tumor"] = _dice(pred == 2, ref == 2)
    return out


def cases(n_phantoms: int, real: bool = True) -> List[dict]:
    """[{name, ct Volume, labels ndarray, tumor_labels}], phantoms then real cases."""
    from LiverTumorSegLib.io import read_volume
    from LiverTumorSegLib.phantom import make_phantom

    out = []
    for i in range(n_phantoms):
        c = make_phantom(HELDOUT_SEED_BASE + i, preset="coarse")
        out.append({"name": f"phantom_{HELDOUT_SEED_BASE + i}", "ct": c.image, "labels": c.labels.array,
                    "tumor_labels": True})
    if real:
        for name, (ct, lab) in REAL_CASES.items():
            if (REAL_DIR / ct).is_file():
                out.append({"name": name, "ct": read_volume(REAL_DIR / ct),
                            "labels": read_volume(REAL_DIR / lab).array, "tumor_labels": name != "abdomen_3mm"})
    return out


def segmenters(model) -> dict:
    """name -> Segmenter for each configuration (see the module docstring)."""
    import torch

    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    def make(**kw):
        return Segmenter(model, SegmentOptions(device="cpu", min_lesion_ml=0.0, **kw))

    configs = {"fp32_nocrop": make(precision="fp32", crop_to_body=False), "fp32_crop": make(precision="fp32")}
    before = make(precision="bf16")
    before._prepared = (model.network.eval(), torch.bfloat16)  # pre-optimisation path
    configs["bf16_autocast"] = before
    configs["default"] = make()
    configs["cover_grid"] = make(window_grid="cover")
    configs["body_grid"] = make(window_grid="body")
    configs["constant_weighting"] = make(weighting="constant")
    return configs


def run(model, n_phantoms: int, real: bool = True, log=print) -> dict:
    """Dice per configuration and case; the largest Dice move against the reference."""
    data = cases(n_phantoms, real)
    configs = segmenters(model)
    rows = {}
    moves = {name: 0.0 for name in configs}
    for case in data:
        labels = {}
        row = {}
        for name, seg in configs.items():
            labels[name] = seg.segment(case["ct"]).labels.array
            row[name] = {"vs_reference": dice_pair(labels[name], case["labels"], case["tumor_labels"]),
                         "vs_fp32_nocrop": dice_pair(labels[name], labels["fp32_nocrop"], case["tumor_labels"])}
        for name in configs:
            for cls, value in row[name]["vs_reference"].items():
                ref = row["fp32_nocrop"]["vs_reference"][cls]
                if value is not None and ref is not None:
                    moves[name] = max(moves[name], abs(value - ref))
        row["default_vs_bf16_autocast"] = dice_pair(labels["default"], labels["bf16_autocast"], case["tumor_labels"])
        rows[case["name"]] = row
        log(f"  accuracy {case['name']}: " + ", ".join(
            f"{n} liver {row[n]['vs_reference']['liver'] or 0:.4f}" for n in configs))
    if not any(name in rows for name in REAL_CASES):
        rows["real_cases"] = f"skipped: {REAL_DIR} not found" if real else "skipped (--quick)"
    return {"cases": rows, "max_dice_move_vs_fp32_nocrop": moves, "tolerance": 0.002,
            "configs": list(configs)}

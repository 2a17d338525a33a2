"""The benchmark model: the seed-width (32) U-Net trained briefly on phantoms.

The weights (5.8 M parameters, 23 MB) are too big to bundle, so they live outside the
repository, in ``$LIVERTUMORSEG_BENCH_WEIGHTS`` or ``~/.cache/livertumorseg/bench-weights``,
and :func:`ensure_weights` makes them when they are missing.

Why a training loop here and not ``Training/train.py``: the recipe must be affordable
on 2 CPU cores (1,854 s on the shared development machine) and reproducible without a
data set on disk, so it renders its phantoms in memory at the model spacing and runs
plain Adam steps on 64-voxel patches with bf16 autocast.

The recipe (``RECIPE``, written into the card's ``provenance``): 16 phantoms of the
"full" preset's field of view (seeds 1000-1015) on the 1.5 mm grid, 1,000 steps of
batch 2, patches centred on background inside the body (HU above -500) / liver /
tumour with probabilities 0.4 / 0.4 / 0.2, cross-entropy + soft Dice, Adam at 3e-4
with a cosine decay to 3e-5, He-normal initialisation and the gradient norm clipped at
1. The seed network has no normalisation layers; with PyTorch's default initialisation
and lr 1e-3, the same data collapsed to background everywhere after 800 steps.

What it buys on the item-1 input (256 x 256 x 200 on the 1.5 mm grid, the seed's
overlap, MONAI's constant-mode fp32 sliding window): liver Dice 0.888 and tumour Dice
0.553 against the phantom's truth, with 2.4 % of the body's voxels at a top class
probability below 0.9 (``python -m benchmarks.agreement``, first line). Snapshots of
the same run (``--snapshot-every 250``; ``python -m benchmarks.agreement DIR/step-250``)
gave liver Dice 0.540 after 250 steps and 0.731 after 500. The previous benchmark model (12
liver-height "coarse" phantoms, 48-voxel patches, 240 steps at lr 1e-3, default
initialisation) gave 0.51 on this input, most of it false liver in the soft tissue
below the liver, and no tumour at all. The outputs are organ-sized and include lesions,
so postprocessing, statistics and surfaces do realistic work. The weights are
convolutional, so they run on the card's 96-voxel patches.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

SPACING_MM = (1.5, 1.5, 1.5)
PATCH = (96, 96, 96)
SEED_OVERLAP = 8.0 / 96.0  # the seed's 8-voxel overlap
WIDTHS = (32, 64, 128, 256)
TRAIN_SEED_BASE = 1000  # training phantoms: seeds 1000, 1001, ...
HELDOUT_SEED_BASE = 2000  # held-out phantoms (never trained on)
RECIPE = {
    "cases": 16, "preset": "full", "orientation": "lps", "spacing_mm": list(SPACING_MM),
    "patch": 64, "batch": 2, "steps": 1000, "lr": 3.0e-4, "loss": "cross-entropy + soft Dice",
    "label_probabilities": {"0": 0.4, "1": 0.4, "2": 0.2}, "background": "body",
    "init": "kaiming", "clip_grad_norm": 1.0, "precision": "bf16 autocast (CPU)",
    "optimizer": "Adam", "seed": 0, "threads": 2,
}


def weights_dir() -> Path:
    """Folder of the benchmark model (``$LIVERTUMORSEG_BENCH_WEIGHTS`` overrides)."""
    env = os.environ.get("LIVERTUMORSEG_BENCH_WEIGHTS")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "livertumorseg" / "bench-weights"


def bench_card(name: str = "bench-phantom-w32", patch=PATCH, overlap: float = 0.25):
    """The benchmark model's card (weights fields are filled in by ``save_model``)."""
    from LiverTumorSegLib.model.card import IntensityTransform, ModelCard

    return ModelCard(
        name=name, version="0.1.0",
        architecture={"type": "unet3d", "in_channels": 1, "num_classes": 3, "widths": list(WIDTHS), "norm": "none"},
        labels={"0": "background", "1": "liver", "2": "tumor"}, spacing_mm=SPACING_MM, patch_size=tuple(patch),
        weights_file="weights.pt", weights_sha256="", orientation="LPS",
        intensity=IntensityTransform("window", (-200.0, 250.0), (-1.0, 1.0)), default_overlap=overlap,
        description="Benchmark model: seed-architecture U-Net, short phantom training (benchmarks/weights.py).",
        intended_use="Benchmarks only; not a medical device.",
    )


def phantom_on_model_grid(seed: int, preset: str = "coarse", **kw):
    """A phantom rendered directly on the model grid (1.5 mm, LPS): (hu float32, labels uint8), (z, y, x)."""
    from LiverTumorSegLib.phantom import make_phantom

    case = make_phantom(seed, spacing=SPACING_MM, orientation="lps", preset=preset, **kw)
    return case.image.array.astype(np.float32), case.labels.array.astype(np.uint8)


class _Case:
    """One training phantom: the scaled image, its labels and where each class lies.

    Class 0 ("background") is sampled among all background voxels, or, with
    ``background="body"``, among background voxels inside the body (HU above -500):
    the soft tissue that a liver model must learn to reject, instead of mostly air.
    """

    def __init__(self, image: np.ndarray, labels: np.ndarray, hu: np.ndarray, background: str) -> None:
        self.image, self.labels = image, labels
        self.where = {c: np.flatnonzero(labels == c).astype(np.int64) for c in (1, 2)}
        self.body = hu > -500.0 if background == "body" else None

    def centre(self, rng, cls: int) -> tuple:
        if cls:
            flat = self.where[cls][int(rng.integers(len(self.where[cls])))]
            return np.unravel_index(flat, self.labels.shape)
        while True:  # rejection sampling: background is most of the volume
            idx = tuple(int(rng.integers(n)) for n in self.labels.shape)
            if self.labels[idx] == 0 and (self.body is None or self.body[idx]):
                return idx


def _sample_patch(rng, case: _Case, patch: int, probabilities: dict):
    classes = [c for c in (0, 1, 2) if c == 0 or len(case.where[c])]
    p = np.array([probabilities[str(c)] for c in classes], dtype=float)
    cls = int(rng.choice(classes, p=p / p.sum()))
    centre = case.centre(rng, cls)
    starts = []
    for c, n in zip(centre, case.labels.shape):
        starts.append(int(np.clip(int(c) - patch // 2, 0, max(n - patch, 0))))
    sl = tuple(slice(s, s + patch) for s in starts)
    img, lab = case.image[sl], case.labels[sl]
    pad = [(0, patch - n) for n in img.shape]
    if any(a for _, a in pad):
        img = np.pad(img, pad, constant_values=-1.0)
        lab = np.pad(lab, pad, constant_values=0)
    return img, lab


def train_bench_model(out_dir: Path, recipe: Optional[dict] = None,
                      log: Callable[[str], None] = print, snapshot_every: int = 0) -> Path:
    """Train the benchmark model and save it (weights.pt + model.json) into ``out_dir``.

    ``snapshot_every`` > 0 also saves the model every that many steps into
    ``out_dir/step-N`` (to compare training lengths from one run).
    """
    import torch
    import torch.nn.functional as F

    from LiverTumorSegLib.model import UNet3D, save_model
    from LiverTumorSegLib.preprocess import scale_intensity

    r = dict(RECIPE, **(recipe or {}))
    if r["init"] not in ("default", "kaiming"):
        raise ValueError(f"recipe init must be 'default' or 'kaiming', not {r['init']!r}")
    torch.manual_seed(int(r["seed"]))
    torch.set_num_threads(int(r["threads"]))
    rng = np.random.default_rng(int(r["seed"]))
    card = bench_card()
    t0 = time.perf_counter()
    data = []
    for i in range(int(r["cases"])):
        hu, lab = phantom_on_model_grid(TRAIN_SEED_BASE + i, preset=r["preset"])
        data.append(_Case(scale_intensity(hu, card.intensity), lab, hu, r["background"]))
        del hu
    log(f"rendered {len(data)} training phantoms in {time.perf_counter() - t0:.0f} s")
    net = UNet3D(widths=WIDTHS)
    if r["init"] == "kaiming":  # He-normal convolutions keep activations' scale without norm layers
        for module in net.modules():
            if isinstance(module, torch.nn.Conv3d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                torch.nn.init.zeros_(module.bias)
    net = net.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(net.parameters(), lr=float(r["lr"]))
    steps, batch, patch = int(r["steps"]), int(r["batch"]), int(r["patch"])
    t1 = time.perf_counter()

    def save(folder: Path, recipe: dict) -> Path:  # an eval-mode, contiguous copy of the network as it is now
        card.provenance = {
            "made_by": "benchmarks/weights.py train_bench_model", "recipe": recipe,
            "training_phantom_seeds": [TRAIN_SEED_BASE + i for i in range(int(r["cases"]))],
            "train_seconds": round(time.perf_counter() - t1, 1), "torch": torch.__version__,
        }
        return save_model(folder, copy.deepcopy(net).to(memory_format=torch.contiguous_format).eval(), card)

    for step in range(steps):
        pairs = [_sample_patch(rng, data[int(rng.integers(len(data)))], patch, r["label_probabilities"])
                 for _ in range(batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None]).contiguous(
            memory_format=torch.channels_last_3d)
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        lr = float(r["lr"]) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        logits = logits.float()
        probs = torch.softmax(logits, 1)
        one_hot = F.one_hot(y, 3).movedim(-1, 1).float()
        dims = (0, 2, 3, 4)
        dice = (2 * (probs * one_hot).sum(dims) + 1e-5) / (probs.sum(dims) + one_hot.sum(dims) + 1e-5)
        loss = F.cross_entropy(logits, y) + (1 - dice[1:].mean())
        opt.zero_grad()
        loss.backward()
        if r["clip_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(net.parameters(), float(r["clip_grad_norm"]))
        opt.step()
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            save(Path(out_dir) / f"step-{step + 1}", dict(r, steps=step + 1, snapshot_of_steps=steps))
        if step % 20 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} lr {lr:.2e} "
                f"({time.perf_counter() - t1:.0f} s)")
    return save(Path(out_dir), r)


def ensure_weights(path: Optional[Path] = None, log: Callable[[str], None] = print) -> Path:
    """The benchmark model folder; trains it (about 31 minutes on 2 cores: 1,854 s measured) if missing."""
    from LiverTumorSegLib.model.card import CARD_NAME

    folder = Path(path).expanduser() if path else weights_dir()
    if usable(folder, explicit=bool(path)):
        return folder
    if path:
        raise FileNotFoundError(f"--weights {folder} holds no {CARD_NAME}")
    if (folder / CARD_NAME).is_file():
        log(f"benchmark weights in {folder} were made by another recipe: training them again")
    else:
        log(f"benchmark weights not found in {folder}: training them now (benchmarks/weights.py)")
    return train_bench_model(folder, log=log)


def usable(folder: Path, explicit: bool = False) -> bool:
    """Whether ``folder`` holds a model card to use: any card when the user named the
    folder (``--weights``), else only one whose provenance records the current RECIPE."""
    import json

    from LiverTumorSegLib.model.card import CARD_NAME

    card_path = Path(folder) / CARD_NAME
    if not card_path.is_file():
        return False
    if explicit:
        return True
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (card.get("provenance") or {}).get("recipe") == RECIPE


def random_model(patch=(48, 48, 48), seed: int = 0):
    """A seeded, untrained seed-width model (``--quick`` without trained weights)."""
    import torch

    from LiverTumorSegLib.model import LoadedModel, UNet3D

    torch.manual_seed(seed)
    net = UNet3D(widths=WIDTHS).eval()
    return LoadedModel(card=bench_card("bench-random-w32", patch=patch), network=net, folder=Path("."))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train the benchmark model (seed width, phantoms).")
    parser.add_argument("--out", type=Path, default=None, help="model folder (default: %s)" % weights_dir())
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument("--snapshot-every", type=int, default=0, help="also save the model every N steps")
    parser.add_argument("--recipe", default=None,
                        help='JSON of recipe fields to change, e.g. \'{"preset": "full", "background": "body"}\'')
    args = parser.parse_args()
    import json

    changes = dict(json.loads(args.recipe) if args.recipe else {}, steps=args.steps)
    print(train_bench_model(args.out or weights_dir(), changes, snapshot_every=args.snapshot_every))

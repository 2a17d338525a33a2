"""Figures of an evaluation: Dice distribution, detection by lesion size, loss curves
(read back from TensorBoard), and overlays (PNG and GIF) of the best and worst cases.

Overlays are drawn on the model's grid (axis-aligned in the card's orientation, LPS:
rows run anterior to posterior, columns patient right to left, i.e. the radiological
view) so that oblique or permuted inputs look like every other case.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

from .dataset import Case
from .metrics import SIZE_BINS
from .visual import enlarge, grey, most_informative_slice, side_by_side

DISPLAY_HU = (-200.0, 300.0)
MAX_GIF_FRAMES = 80


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_scalars(logs_dir: Path) -> dict:
    """``{tag: [(step, value), ...]}`` from the TensorBoard event files under ``logs_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict = {}
    for events in sorted(Path(logs_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(values) for tag, values in scalars.items()}


def plot_dice(report: dict, path: Path) -> Path:
    """Box plot with the individual cases of liver and tumor Dice."""
    plt = _pyplot()
    regions = [r for r in ("liver", "tumor") if any(r in c for c in report["cases"].values())]
    values = [[c[r]["dice"] for c in report["cases"].values() if r in c] for r in regions]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.boxplot(values, showfliers=False)
    ax.set_xticks(range(1, len(regions) + 1), regions)
    rng = np.random.default_rng(0)
    for i, vals in enumerate(values, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=14, alpha=0.7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice per case")
    ax.set_title(f"Dice distribution ({len(report['cases'])} cases)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_detection(report: dict, path: Path) -> Optional[Path]:
    """Lesion recall and precision by lesion diameter (bars), with lesion counts."""
    by_size = report["detection"].get("by_diameter") or {}
    if not by_size:
        return None
    plt = _pyplot()
    names = [name for name, _, _ in SIZE_BINS]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for offset, key in ((-0.2, "recall"), (0.2, "precision")):
        vals = [by_size[n][key] if by_size[n][key] is not None else 0.0 for n in names]
        ax.bar(x + offset, vals, width=0.4, label=key)
    ax.set_xticks(x, [f"{n}\n(n={by_size[n]['reference_lesions']} ref)" for n in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    ax.set_title(f"Lesion detection by diameter (IoU >= {report['detection']['iou_threshold']:g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_losses(logs_dir: Path, path: Path) -> Optional[Path]:
    """Training and validation loss (and validation Dice) against the step."""
    scalars = read_scalars(logs_dir)
    curves = {tag: scalars[tag] for tag in ("train/loss_step", "train/loss_epoch", "val/loss") if tag in scalars}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for tag, values in curves.items():
        steps, vals = zip(*values)
        ax.plot(steps, vals, label=tag, alpha=0.5 if tag.endswith("_step") else 1.0)
    dice = [t for t in ("val/dice_liver", "val/dice_tumor") if t in scalars]
    if dice:
        twin = ax.twinx()
        for tag in dice:
            steps, vals = zip(*scalars[tag])
            twin.plot(steps, vals, "--", label=tag)
        twin.set_ylabel("validation Dice")
        twin.set_ylim(0, 1)
        twin.legend(loc="center right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.set_title("Loss curves (TensorBoard logs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _case_score(scores: dict) -> float:
    values = [scores[r]["dice"] for r in ("liver", "tumor") if r in scores]
    return float(np.mean(values))


def _on_model_grid(case: Case, prediction_path: Path, card) -> tuple:
    """CT (HU), reference and prediction resampled to the model grid, cropped around the liver."""
    from LiverTumorSegLib.io import read_volume
    from LiverTumorSegLib.preprocess import resample_to, to_model_grid

    ct = read_volume(case.image)
    hu = to_model_grid(ct, card)
    ref = resample_to(read_volume(case.label), hu, interpolation="nearest", default_value=0, dtype=np.uint8)
    pred = resample_to(read_volume(prediction_path), hu, interpolation="nearest", default_value=0, dtype=np.uint8)
    union = (ref.array > 0) | (pred.array > 0)
    if union.any():
        idx = [np.flatnonzero(union.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
        box = tuple(slice(max(int(ix[0]) - 6, 0), int(ix[-1]) + 7) for ix in idx)
    else:
        box = tuple(slice(0, n) for n in hu.array.shape)
    return hu.array[box], ref.array[box], pred.array[box]


def write_overlays(case: Case, prediction_path: Path, card, stem: Path) -> List[Path]:
    """``stem.png`` (the slice with most tumor, else liver) and ``stem.gif`` (all axial
    slices through the liver): reference on the left, prediction on the right."""
    from PIL import Image

    hu, ref, pred = _on_model_grid(case, prediction_path, card)
    k = most_informative_slice(ref if ref.any() else pred)
    png = stem.with_suffix(".png")
    Image.fromarray(enlarge(side_by_side(grey(hu[k], *DISPLAY_HU), ref[k], pred[k]))).save(png)
    step = max(1, int(np.ceil(hu.shape[0] / MAX_GIF_FRAMES)))
    frames = [Image.fromarray(enlarge(side_by_side(grey(hu[z], *DISPLAY_HU), ref[z], pred[z])))
              for z in range(hu.shape[0] - 1, -1, -step)]
    gif = stem.with_suffix(".gif")
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=90, loop=0)
    return [png, gif]


def write_plots(report: dict, cases: List[Case], out_dir: Path, logs_dir: Optional[Path], model_card) -> dict:
    """Every figure of the report; returns ``{figure: path}`` (paths relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    figures = {"dice_distribution": plot_dice(report, out_dir / "dice_distribution.png"),
               "detection_by_size": plot_detection(report, out_dir / "detection_by_size.png")}
    logs = Path(logs_dir) if logs_dir else _logs_from_card(model_card)
    if logs is not None and logs.is_dir():
        figures["loss_curves"] = plot_losses(logs, out_dir / "loss_curves.png")
    ranked = sorted(report["cases"], key=lambda cid: _case_score(report["cases"][cid]))
    by_id = {c.case_id: c for c in cases}
    picks = {"worst": ranked[0], "best": ranked[-1]} if len(ranked) > 1 else {"best": ranked[0]}
    for kind, case_id in picks.items():
        paths = write_overlays(by_id[case_id], out_dir / "predictions" / f"{case_id}.nii.gz", model_card,
                               out_dir / f"{kind}_{case_id}")
        figures[f"{kind}_overlay"], figures[f"{kind}_gif"] = paths
    return {k: str(Path(v).relative_to(out_dir)) for k, v in figures.items() if v is not None}


def _logs_from_card(card) -> Optional[Path]:
    run_dir = (card.provenance.get("training") or {}).get("run_dir")
    return Path(run_dir) / "logs" if run_dir else None

"""Item 1: sliding-window inference, ours against MONAI and TorchIO, interleaved.

Every competitor gets the same input (a phantom CT on the model grid, scaled as the
model card says), the same network object and weights, the same patch size, overlap and
batch size, on the CPU with the suite's thread count:

* ``ours``: the engine as the CLI runs it (:meth:`Segmenter.infer_logits`: the whole
  volume's window grid, MONAI's, running only the windows that reach the body, the
  network prepared by :func:`~LiverTumorSegLib.inference.prepare_network`, precision
  ``auto``, Gaussian weighting);
* ``ours_constant``: the same with constant weighting, the weighting of the Dice
  reference (the weighting alone moves labels by more than the 0.998 Dice target
  allows: MONAI's Gaussian mode against its constant mode);
* ``ours_body_grid``: the default with ``window_grid="body"`` (``--window-grid body``):
  the grid laid on the body's box along axes where that saves windows (fewer patches,
  other context for each);
* ``monai_gaussian`` / ``monai_constant``: ``monai.inferers.sliding_window_inference``
  on the whole volume, fp32, under ``torch.inference_mode``;
* ``monai_gaussian_reused_memory`` (CPU only): ``monai_gaussian`` inside
  :func:`~LiverTumorSegLib.allocator.reuse_freed_memory`, the allocator setting our
  engine applies around its patch loop. MONAI as shipped does not, so the headline
  ratio is against the plain runs; this one shows how much of our lead that setting
  is (``ratio_vs_monai_same_allocator``), and that it leaves MONAI's output unchanged
  (``max_abs_diff``);
* ``torchio``: ``GridSampler`` + ``DataLoader`` + ``GridAggregator(overlap_mode="average")``
  (the seed's method; "average" is constant weighting), fp32.

Agreement: label Dice of ours (and TorchIO) against MONAI's constant-mode fp32 labels,
and of our Gaussian variants against MONAI's Gaussian-mode fp32 labels (same weighting);
maximum absolute logit difference under matching weighting: our engine at fp32 without
cropping against MONAI (both modes, one extra run each at the first overlap), TorchIO
against MONAI constant, and our default run against MONAI Gaussian inside the region
it computes (bf16 rounding).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np

from .measure import interleaved, summary


GAUSSIAN_VARIANTS = ("ours", "ours_body_grid")  # our runs weighted as MONAI's Gaussian mode


def label_dice(a: np.ndarray, b: np.ndarray) -> dict:
    """Dice of liver (labels 1 and 2, LiTS convention), tumor (2) and all foreground labels pooled."""
    out = {}
    num = den = 0
    for name, cls in (("liver", (1, 2)), ("tumor", (2,))):
        ma, mb = np.isin(a, cls), np.isin(b, cls)
        inter, total = int(np.count_nonzero(ma & mb)), int(np.count_nonzero(ma) + np.count_nonzero(mb))
        out[name] = 1.0 if total == 0 else 2.0 * inter / total
    for cls in (1, 2):
        ma, mb = a == cls, b == cls
        num += 2 * int(np.count_nonzero(ma & mb))
        den += int(np.count_nonzero(ma) + np.count_nonzero(mb))
    out["labels"] = 1.0 if den == 0 else num / den
    return out


def add_label_agreement(row: dict, kept: dict, names: Sequence[str]) -> None:
    """Into ``row[name]`` for each of ``names`` that ran: label Dice against MONAI's
    constant-mode fp32 labels and, for our Gaussian variants, against its Gaussian-mode
    fp32 labels (the same weighting: what the engine's own choices, bf16, skipped air and
    the window grid, move)."""
    constant = kept["monai_constant"].argmax(0).astype(np.uint8)
    gaussian = kept["monai_gaussian"].argmax(0).astype(np.uint8)
    for name in names:
        if name not in kept:
            continue
        labels = kept[name].argmax(0)
        row[name]["dice_vs_monai_constant_fp32"] = label_dice(labels, constant)
        if name in GAUSSIAN_VARIANTS:
            row[name]["dice_vs_monai_same_weighting_fp32"] = label_dice(labels, gaussian)


def _full_logits(logits: np.ndarray, box: tuple, shape: tuple) -> np.ndarray:
    from LiverTumorSegLib.inference import UNCOVERED_LOGIT

    full = np.full((logits.shape[0],) + tuple(shape), UNCOVERED_LOGIT, dtype=np.float32)
    full[0] = 0.0
    full[(slice(None),) + tuple(box)] = logits
    return full


PATCHES: Dict[str, int] = {}  # competitor -> patches its last run computed (ours only)


def competitors(model, hu: np.ndarray, x: np.ndarray, overlap: float, batch: int,
                device: str = "cpu") -> Dict[str, Callable[[], np.ndarray]]:
    """name -> callable giving (K, Z, Y, X) float32 logits on the host; ``x`` is ``hu``
    scaled by the card. On the CPU the set includes TorchIO; on CUDA it includes MONAI
    under fp16 autocast instead (the like-for-like precision of our CUDA default)."""
    import torch

    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    net, card = model.network.eval().to(device), model.card
    patch = tuple(card.patch_size)
    k = card.num_classes

    def run_ours(name, **options):
        segmenter = Segmenter(model, SegmentOptions(device=device, overlap=overlap, batch_size=batch, **options))

        def count(fraction, message):  # "inference: done/total patches"
            PATCHES[name] = int(message.split("/")[-1].split()[0])

        def run():
            logits, box = segmenter.infer_logits(hu, progress=count)
            return _full_logits(logits, box, x.shape)
        return run

    def run_monai(mode, dtype=None, reuse_memory=False):
        from monai.inferers import sliding_window_inference

        from LiverTumorSegLib.allocator import reuse_freed_memory

        def run():
            image = torch.from_numpy(x)[None, None].to(device)
            with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=dtype,
                                                        enabled=dtype is not None), \
                    reuse_freed_memory(reuse_memory):
                out = sliding_window_inference(image, patch, batch, net, overlap=overlap, mode=mode,
                                               sigma_scale=0.125)
            return out[0].float().cpu().numpy()
        return run

    def run_torchio():
        import torchio as tio
        from torch.utils.data import DataLoader

        subject = tio.Subject(ct=tio.ScalarImage(tensor=torch.from_numpy(x[None])))
        vox = 2 * int(round(overlap * patch[0] / 2))
        sampler = tio.inference.GridSampler(subject, patch, vox)
        aggregator = tio.inference.GridAggregator(sampler, overlap_mode="average")
        with torch.inference_mode():
            for b in DataLoader(sampler, batch_size=batch):
                aggregator.add_batch(net(b["ct"][tio.DATA]), b[tio.LOCATION])
        return aggregator.get_output_tensor().numpy()[:k]

    out = {"ours": run_ours("ours"), "ours_constant": run_ours("ours_constant", weighting="constant"),
           "ours_body_grid": run_ours("ours_body_grid", window_grid="body"),
           "monai_gaussian": run_monai("gaussian"), "monai_constant": run_monai("constant")}
    if torch.device(device).type == "cuda":
        out["monai_gaussian_fp16"] = run_monai("gaussian", torch.float16)
    else:
        out["monai_gaussian_reused_memory"] = run_monai("gaussian", reuse_memory=True)
        out["torchio"] = run_torchio
    return out


def exactness(model, hu: np.ndarray, overlap: float, batch: int, references: dict) -> dict:
    """Max |logit difference| of our engine at fp32, uncropped, against MONAI per weighting."""
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    out = {}
    for weighting in ("constant", "gaussian"):
        ref = references.get(f"monai_{weighting}")
        if ref is None:
            continue
        seg = Segmenter(model, SegmentOptions(device="cpu", overlap=overlap, batch_size=batch, precision="fp32",
                                              weighting=weighting, crop_to_body=False))
        logits, _ = seg.infer_logits(hu)
        out[f"ours_fp32_{weighting}_vs_monai_{weighting}"] = float(np.abs(logits - ref).max())
    return out


def run(model, hu: np.ndarray, overlaps: Sequence[float], reps: int, batch: int = 2,
        check_exactness: bool = True, log=print, partial=None) -> dict:
    """All competitors at each overlap on ``hu`` (z, y, x HU on the model grid); the JSON section.

    ``partial(section)`` is called after each overlap with the figures so far.
    """
    from LiverTumorSegLib.inference import plan_windows
    from LiverTumorSegLib.preprocess import scale_intensity

    x = scale_intensity(hu, model.card.intensity)
    by_overlap = {}
    for index, overlap in enumerate(overlaps):
        log(f"inference: overlap {overlap:.4f} on {x.shape[::-1]} (x, y, z) voxels, {reps} reps")
        kept: dict = {}

        def keep(name, rep, logits):
            if rep == 0:
                kept[name] = logits

        runs = interleaved(competitors(model, hu, x, overlap, batch), reps, keep, log)
        row = {name: summary(samples) for name, samples in runs.items()}
        add_label_agreement(row, kept, ("ours", "ours_constant", "ours_body_grid", "torchio", "monai_gaussian"))
        computed = kept["ours"][1] > -1e3  # voxels our engine computed (not skipped as air)
        row["max_abs_diff"] = {
            "torchio_average_vs_monai_constant": float(np.abs(kept["torchio"] - kept["monai_constant"]).max()),
            "ours_default_vs_monai_gaussian_in_computed_region": float(
                np.abs(kept["ours"] - kept["monai_gaussian"])[:, computed].max()) if computed.any() else None,
            "computed_fraction": float(computed.mean()),
        }
        if "monai_gaussian_reused_memory" in kept:  # the allocator setting must not change results
            row["max_abs_diff"]["monai_reused_memory_vs_monai_gaussian"] = float(
                np.abs(kept["monai_gaussian_reused_memory"] - kept["monai_gaussian"]).max())
        if check_exactness and index == 0:
            log("inference: exactness check (ours at fp32, uncropped, one run per weighting)")
            row["max_abs_diff"].update(exactness(model, hu, overlap, batch, kept))
        row["patches"] = {"total": len(plan_windows(x.shape, model.card.patch_size, overlap).corners),
                          **{name: PATCHES.get(name) for name in runs if name.startswith("ours")}}
        t = {name: row[name]["seconds_median"] for name in runs}
        monai_rss = max(min(row["monai_gaussian"]["peak_rss_added_mib"],
                            row["monai_constant"]["peak_rss_added_mib"]), 1e-9)

        def ratios(name):  # ours / theirs: time against the faster MONAI mode and TorchIO, peak RSS added
            out = {"ratio_vs_monai": t[name] / min(t["monai_gaussian"], t["monai_constant"]),
                   "ratio_vs_torchio": t[name] / t["torchio"],
                   "rss_ratio_vs_monai": row[name]["peak_rss_added_mib"] / monai_rss}
            if "monai_gaussian_reused_memory" in t:
                out["ratio_vs_monai_same_allocator"] = t[name] / t["monai_gaussian_reused_memory"]
            return out

        row["ratio_vs_monai_gaussian"] = t["ours"] / t["monai_gaussian"]
        row["ratio_vs_monai_constant"] = t["ours"] / t["monai_constant"]
        row.update(ratios("ours"))
        row["body_grid"] = ratios("ours_body_grid")
        by_overlap[f"{overlap:.4f}"] = row
        kept.clear()
        if partial is not None:
            partial(_section(model, x, batch, by_overlap))
    return _section(model, x, batch, by_overlap)


def _section(model, x: np.ndarray, batch: int, by_overlap: dict) -> dict:
    worst = max(by_overlap.values(), key=lambda r: r["ratio_vs_monai"])
    return {
        "input_shape_xyz": list(x.shape[::-1]), "patch_size": list(model.card.patch_size), "batch_size": batch,
        "by_overlap": by_overlap,
        "ratio_vs_monai": max(r["ratio_vs_monai"] for r in by_overlap.values()),
        "ratio_vs_torchio": max(r["ratio_vs_torchio"] for r in by_overlap.values()),
        "rss_ratio_vs_monai": max(r["rss_ratio_vs_monai"] for r in by_overlap.values()),
        "min_label_dice_vs_monai_constant": min(
            r["ours"]["dice_vs_monai_constant_fp32"]["labels"] for r in by_overlap.values()),
        "min_label_dice_constant_vs_monai_constant": min(
            (r["ours_constant"]["dice_vs_monai_constant_fp32"]["labels"] for r in by_overlap.values()
             if "ours_constant" in r), default=None),
        "body_grid": {
            key: max(r["body_grid"][key] for r in by_overlap.values())
            for key in ("ratio_vs_monai", "ratio_vs_torchio", "rss_ratio_vs_monai")},
        "ratio_vs_monai_same_allocator": max(
            (r["ratio_vs_monai_same_allocator"] for r in by_overlap.values() if "ratio_vs_monai_same_allocator" in r),
            default=None),
        "min_label_dice_vs_monai_same_weighting": min(
            r["ours"]["dice_vs_monai_same_weighting_fp32"]["labels"] for r in by_overlap.values()),
        "min_label_dice_body_grid_vs_monai_constant": min(
            r["ours_body_grid"]["dice_vs_monai_constant_fp32"]["labels"] for r in by_overlap.values()),
        "headline": "worst overlap; ours / the faster of MONAI's two modes",
        "worst_overlap": [k for k, v in by_overlap.items() if v is worst][0],
    }

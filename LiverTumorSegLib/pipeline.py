"""The engine: a CT volume in, labels in the CT's own grid and statistics out.

:class:`Segmenter` is the one object the command line, the Slicer bridge and the
training evaluation all call, so every front end gets the same numbers.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .boxes import WEIGHTINGS, WINDOW_GRIDS, patch_starts, window_box
from .errors import InputError
from .inference import prepare_network, sliding_window_inference
from .model import LoadedModel, load_model, resolve_model
from .model.card import direction_from_orientation
from .postprocess import argmax_labels, clean_labels, drop_small_lesions, to_input_grid
from .preprocess import (BODY_THRESHOLD_HU, air_value, as_resamplable, body_bounding_box, resolve_intensity,
                         scale_intensity, to_model_grid, validate_ct)
from .result_checks import result_warnings
from .resources import batch_activation_bytes, check_memory, model_grid_size, resolve_device, resolve_precision
from .volume import Volume

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

# Share of the whole job each stage takes on the progress bar.
STAGES = {"preprocess": 0.08, "inference": 0.80, "postprocess": 0.08, "statistics": 0.04}


@dataclass
class SegmentOptions:
    """Knobs of one segmentation run (defaults are the sane clinical ones).

    Attributes:
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda`` or ``mps``.
        overlap: patch overlap fraction in [0, 1); None takes the model card's.
        fast: one pass with no overlap (fewer patches; it can cost accuracy: README).
        batch_size: patches per forward pass.
        precision: ``auto`` (bf16 on CPUs that have it, fp16 on CUDA), ``fp32``,
            ``bf16`` or ``fp16``.
        weighting: ``gaussian`` or ``constant`` patch weighting.
        min_lesion_ml: tumor components smaller than this (mL) become liver.
        allow_non_ct: run on images whose intensities do not look like HU.
        crop_to_body: run the network only on the windows that reach the body's
            bounding box (and skip those with no body voxel).
        window_grid: with ``crop_to_body``, where those windows sit. ``volume`` (the
            default): always on the whole volume's grid (MONAI's), so the result
            inside the body is the uncropped one. ``cover``: the whole volume's
            windows, only as many as cover the body's box (the flush last window
            along an axis only where the others fall short of the box): no window
            moves, but where one is left out the body's voxels blend fewer windows.
            ``body`` (fewest windows, fastest):
            along an axis where a grid laid on the body's box needs fewer windows than
            the whole volume's grid, on that grid; the windows then see other context,
            which moved a benchmark model's liver Dice by up to 0.005 (BENCHMARKS.md).
            See :func:`~.boxes.window_box`.
        memory_budget_gb: refuse jobs estimated above this; None = 85 % of free RAM.
        threads: torch CPU threads while a segmentation runs (torch's setting is
            put back after it); None leaves torch's setting.
    """

    device: str = "auto"
    overlap: Optional[float] = None
    fast: bool = False
    batch_size: int = 2
    precision: str = "auto"
    weighting: str = WEIGHTINGS[0]
    min_lesion_ml: float = 0.01
    allow_non_ct: bool = False
    crop_to_body: bool = True
    window_grid: str = WINDOW_GRIDS[0]
    memory_budget_gb: Optional[float] = None
    threads: Optional[int] = None


@dataclass
class SegmentationResult:
    """Labels (uint8: 0 background, 1 liver parenchyma, 2 tumor; the liver is 1 and 2) in the input grid, with stats."""

    labels: Volume
    stats: dict
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


class _StageProgress:
    """Maps each stage's own 0..1 progress onto the whole job's 0..1."""

    def __init__(self, callback: Optional[ProgressFn]) -> None:
        self.callback = callback
        self.done = 0.0

    def stage(self, name: str) -> ProgressFn:
        start, share = self.done, STAGES[name]
        self.done += share

        def report(fraction: float, message: str = "") -> None:
            if self.callback is not None:
                self.callback(min(start + share * fraction, 1.0), message or name)

        report(0.0, name)
        return report


_BACKGROUND = None


def _background():
    """One worker thread for device warm-ups (created on first use)."""
    global _BACKGROUND
    if _BACKGROUND is None:
        from concurrent.futures import ThreadPoolExecutor

        _BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livertumorseg-warmup")
    return _BACKGROUND


def _prepare_and_warm(network, device: str, autocast, card, batch_size: int) -> tuple:
    """:func:`prepare_network`, then one forward pass of a zero batch of the patch shape
    (CUDA context, weights on the device, cuDNN's kernels chosen)."""
    import torch

    prepared, left = prepare_network(network, device, autocast)
    if isinstance(prepared, torch.nn.Module):
        shape = (int(batch_size), int(card.architecture.get("in_channels", 1)), *[int(p) for p in card.patch_size])
        try:
            with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=left or torch.float32,
                                                        enabled=left is not None):
                prepared(torch.zeros(shape, device=device))
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:  # only a warm-up: inference has its own out-of-memory fallback
            torch.cuda.empty_cache()
    return prepared, left


_THREADS_LOCK = threading.RLock()


@lru_cache(maxsize=1)
def _threads_are_per_thread() -> bool:
    """Whether torch's CPU thread count is a per-thread setting: so in OpenMP builds
    (``omp_set_num_threads``), process-wide with other parallel backends (TBB, native)."""
    import torch

    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def torch_threads(threads: Optional[int]):
    """torch's CPU thread count set to ``threads`` (None: left as it is) while the block
    runs, then put back; yields the count in force. In OpenMP builds the setting is per
    thread: each block puts back what it found in its own thread, and runs in other
    threads go on side by side. Where it is process-wide, blocks that set it take turns
    (a lock). Either way a Segmenter leaves its caller's setting alone."""
    import torch

    if not threads:
        yield torch.get_num_threads()
        return
    with (nullcontext() if _threads_are_per_thread() else _THREADS_LOCK):
        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            yield int(threads)
        finally:
            torch.set_num_threads(before)


def _check_numbers(options: SegmentOptions) -> None:
    """Refuse (:class:`InputError`) option values no run can use."""
    o = options
    whole = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
    rules = (("batch_size", o.batch_size, "a whole number of at least 1", lambda v: whole(v) and v >= 1),
             ("threads", o.threads, "a whole number of at least 1, or None",
              lambda v: v is None or (whole(v) and v >= 1)),
             ("overlap", o.overlap, "a number in [0, 1), or None",
              lambda v: v is None or (not isinstance(v, bool) and 0.0 <= v < 1.0)),
             ("min_lesion_ml", o.min_lesion_ml, "0 or more", lambda v: v >= 0),
             ("memory_budget_gb", o.memory_budget_gb, "above 0, or None", lambda v: v is None or v > 0))
    for name, value, wanted, ok in rules:
        try:
            good = bool(ok(value))  # NaN compares False: refused too
        except TypeError:
            good = False
        if not good:
            raise InputError(f"{name} must be {wanted}, not {value!r}")


class Segmenter:
    """Runs a model on CT volumes. Load once, segment many.

    Args:
        model: a :class:`LoadedModel`, a model folder, a model name, or None for the
            default bundled model.
        options: run options.
    """

    def __init__(self, model: Union[LoadedModel, str, Path, None] = None,
                 options: Optional[SegmentOptions] = None) -> None:
        if options is not None and not isinstance(options, SegmentOptions):
            raise InputError(f"options must be a SegmentOptions, not {type(options).__name__}")
        self.options = options or SegmentOptions()
        _check_numbers(self.options)
        for name, value, allowed in (("window grid", self.options.window_grid, WINDOW_GRIDS),
                                     ("weighting", self.options.weighting, WEIGHTINGS)):
            if value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        self.model = model if isinstance(model, LoadedModel) else load_model(resolve_model(
            None if model is None else str(model)))
        self.device = resolve_device(self.options.device)
        self.autocast = resolve_precision(self.options.precision, self.device)
        import torch

        self.threads = int(self.options.threads or torch.get_num_threads())  # as of now; see segment()
        # On the CPU: a channels-last copy, with bf16 weights when the precision is bf16.
        # On a GPU: starting CUDA, moving the weights and cuDNN's first kernels take a
        # second or more, so that runs in a background thread while the caller reads
        # and preprocesses the CT; the first use of ``network`` waits for it.
        # ``_prepared`` is (module, autocast dtype still needed), or the warm-up's future.
        if self.device == "cuda":
            self._prepared = _background().submit(_prepare_and_warm, self.model.network, self.device,
                                                  self.autocast, self.model.card, self.options.batch_size)
        else:
            self._prepared = prepare_network(self.model.network, self.device, self.autocast)

    def _network_and_autocast(self) -> tuple:
        """(module, autocast dtype), waiting for a GPU warm-up still under way (and
        re-raising what it raised)."""
        if not isinstance(self._prepared, tuple):
            self._prepared = self._prepared.result()
        return self._prepared

    @property
    def network(self):
        """The module inference runs."""
        return self._network_and_autocast()[0]

    @property
    def card(self):
        return self.model.card

    @property
    def precision_name(self) -> str:
        """The precision the forward passes run in: ``float32``, ``bfloat16`` or ``float16``."""
        return str(self.autocast).replace("torch.", "") if self.autocast else "float32"

    def check_memory(self, size_xyz, spacing, direction=None) -> int:
        """Estimate the peak memory for an input of this size (and direction, 3 x 3;
        None: the identity); refuse if over budget."""
        widths = self.card.architecture.get("widths") or (32, 64, 128, 256)  # build_network's default
        model_direction = direction_from_orientation(self.card.orientation)
        # A batch never holds more patches than the model grid has windows.
        grid_zyx = model_grid_size(size_xyz, spacing, self.card.spacing_mm, direction, model_direction)[::-1]
        windows = int(np.prod([len(patch_starts(int(n), p, self.overlap()))
                               for n, p in zip(grid_zyx, self.card.patch_size)]))
        batch = batch_activation_bytes(self.card.patch_size, widths, min(self.options.batch_size, windows),
                                       half_precision=self.autocast is not None)
        return check_memory(size_xyz, spacing, self.card.spacing_mm, self.options.memory_budget_gb,
                            self.card.num_classes, batch, direction, model_direction)

    def overlap(self) -> float:
        if self.options.fast:
            return 0.0
        overlap = self.card.default_overlap if self.options.overlap is None else self.options.overlap
        if not 0.0 <= overlap < 1.0:
            raise InputError(f"overlap {overlap} must be in [0, 1)")
        return float(overlap)

    def label_settings(self) -> dict:
        """What decides the labels besides the CT, as ``stats.json``'s ``run`` records it:
        ``engine_version``, ``model_card_sha256`` (of the card's JSON form: grid, patch,
        intensity window, architecture...), ``model_weights_sha256``, ``precision``,
        ``overlap``, ``weighting``, ``min_lesion_ml`` and ``window_grid``. (Device, threads
        and batch size do not change the result beyond rounding.)"""
        import hashlib
        import json

        from . import __version__

        card = json.dumps(self.card.to_dict(), sort_keys=True, default=str).encode("utf-8")
        return {"engine_version": __version__, "model_card_sha256": hashlib.sha256(card).hexdigest(),
                "model_weights_sha256": self.card.weights_sha256, "precision": self.precision_name,
                "overlap": self.overlap(), "weighting": self.options.weighting,
                "min_lesion_ml": self.options.min_lesion_ml,
                "window_grid": self.options.window_grid if self.options.crop_to_body else "volume, uncropped"}

    def _network_input(self, hu: np.ndarray) -> tuple:
        """(scaled input, body mask or None, box) for an HU array on the model grid."""
        box = body_bounding_box(hu) if self.options.crop_to_body else None
        if box is None:
            box = tuple(slice(0, n) for n in hu.shape)
        else:  # where the whole volume's windows sit, unless a crop saves windows
            box = window_box(box, hu.shape, self.card.patch_size, self.overlap(),
                             getattr(self.model.network, "divisor", 1), grid=self.options.window_grid)
        # min-max scaling on the whole model-grid volume, as in training, not on the crop
        net_input = scale_intensity(hu[box], resolve_intensity(hu, self.card.intensity))
        body = hu[box] > BODY_THRESHOLD_HU if self.options.crop_to_body else None
        return net_input, body, box

    def _run_network(self, net_input: np.ndarray, body: Optional[np.ndarray],
                     progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None) -> np.ndarray:
        pad_value = air_value(self.card.intensity)
        network, autocast_dtype = self._network_and_autocast()
        with torch_threads(self.options.threads) as self.threads:
            return sliding_window_inference(
                net_input, network, self.card.patch_size, num_classes=self.card.num_classes,
                overlap=self.overlap(), batch_size=self.options.batch_size, weighting=self.options.weighting,
                device=self.device, autocast_dtype=autocast_dtype, pad_value=pad_value,
                compute_mask=body, progress=progress, cancel=cancel,
            )

    def infer_logits(self, hu: np.ndarray, progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelFn] = None) -> tuple:
        """The network's logits for an HU array already on the model grid, (z, y, x).

        Exactly what :meth:`segment` computes: cropped to the body's bounding box and
        skipping patches with no body voxel when ``crop_to_body``. Returns
        ``(logits, box)``: (K, *box shape) float32 weighted-mean logits and the box's
        (z, y, x) slices in ``hu``.
        """
        net_input, body, box = self._network_input(hu)
        return self._run_network(net_input, body, progress, cancel), box

    def segment(self, ct: Volume, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelFn] = None) -> SegmentationResult:
        """Segment one CT (HU) volume; the labels come back in ``ct``'s own grid."""
        from .stats import compute_statistics

        validate_ct(ct, allow_non_ct=self.options.allow_non_ct)
        ct = as_resamplable(ct)
        self.check_memory(ct.shape_xyz, ct.spacing, ct.direction)
        steps = _StageProgress(progress)
        timings = {}

        t = time.perf_counter()
        report = steps.stage("preprocess")
        hu = to_model_grid(ct, self.card)
        net_input, body, box = self._network_input(hu.array)
        report(1.0)
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        logits = self._run_network(net_input, body, steps.stage("inference"), cancel)
        timings["inference"] = time.perf_counter() - t
        del net_input, body

        t = time.perf_counter()
        report = steps.stage("postprocess")
        model_labels = np.zeros(hu.array.shape, dtype=np.uint8)
        model_labels[box] = argmax_labels(logits)
        del logits
        model_labels, left_out = clean_labels(model_labels, hu.array > BODY_THRESHOLD_HU)
        left_out_ml = left_out * float(np.prod(self.card.spacing_mm)) / 1000.0
        if cancel is not None and cancel():
            from .errors import Cancelled

            raise Cancelled("cancelled by the user")
        labels = to_input_grid(hu.with_array(model_labels), ct)
        dropped = drop_small_lesions(labels, ct.voxel_volume_ml, self.options.min_lesion_ml)
        report(1.0)
        timings["postprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        report = steps.stage("statistics")
        label_volume = ct.with_array(labels)
        stats = compute_statistics(label_volume, ct)
        report(1.0, "segmented")
        timings["statistics"] = time.perf_counter() - t
        warnings = result_warnings(labels, ct.array, stats, left_out_ml)
        info = {
            "model": self.card.name, "model_version": self.card.version,
            "model_folder": str(Path(self.model.folder).absolute()), **self.label_settings(),
            "device": self.device, "batch_size": self.options.batch_size, "threads": self.threads,
            "model_grid_size_xyz": list(hu.shape_xyz), "small_lesions_dropped": dropped,
            "liver_left_out_ml": round(left_out_ml, 3),
            "warnings": warnings,
        }
        return SegmentationResult(labels=label_volume, stats=stats, timings=timings, info=info)

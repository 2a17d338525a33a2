"""Overlapping-patch (sliding-window) inference with bounded memory.

Patches of ``patch_size`` (z, y, x) voxels are laid on a regular grid whose step is
``int(patch * (1 - overlap))`` along each axis, the last patch flush with the far edge
(the same grid as MONAI's ``sliding_window_inference``). Each patch's logits are
multiplied by an importance map (MONAI's: a Gaussian with sigma = ``sigma_scale`` x
patch size, floored at 1e-3, or constant 1) and summed into accumulators together
with the weights; the result is the weighted mean of the logits. Only one batch of
patches is held at a time.

Patches where ``compute_mask`` is all False (outside the body) are skipped; voxels
covered by no computed patch get background (class 0).

Speed on the CPU: :func:`prepare_network` gives the sliding window a copy of the
network in the channels-last-3d memory format (oneDNN's fast path for 3D
convolutions) and, when the precision is bf16, with bf16 weights, so no autocast casts
are needed. Batches are fed in the network's own dtype and memory format. While the
patches run, freed buffers are reused rather than handed back to the kernel
(:mod:`.allocator`), which spares every forward pass its page faults. The measured
gains are in BENCHMARKS.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .allocator import reuse_freed_memory
from .boxes import patch_starts  # noqa: F401  (part of this module's API)
from .errors import Cancelled

# torch.OutOfMemoryError is torch 2.5's name; older releases raise its CUDA subclass.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]
UNCOVERED_LOGIT = -1.0e4


GAUSSIAN_FLOOR = 1e-3


def importance_map(patch_size: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Weights of one patch (float32), MONAI's ``compute_importance_map``.

    ``"gaussian"``: the product of one 1-D Gaussian per axis, centred on the patch,
    sigma = sigma_scale x size (peak 1 at odd sizes, a little under it at even ones),
    raised to at least ``GAUSSIAN_FLOOR`` (1e-3), so the patch's rim keeps a say where
    patches overlap. ``"constant"``: all ones (plain averaging).
    """
    if mode == "constant":
        return np.ones(tuple(patch_size), dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"weighting must be 'gaussian' or 'constant', not {mode!r}")
    axes = []
    for n in patch_size:
        sigma = max(sigma_scale * n, 1e-6)
        x = np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2.0)
        axes.append(np.exp(x * x / np.float32(-2.0 * sigma * sigma)).astype(np.float32))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w, max(float(w.min()), GAUSSIAN_FLOOR)).astype(np.float32)


@dataclass
class WindowPlan:
    """Where the patches go on a (possibly padded) image."""

    padded_shape: tuple
    pad: tuple  # (before, after) per axis (z, y, x)
    corners: list  # (z, y, x) patch starts in padded coordinates


def plan_windows(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> WindowPlan:
    """Lay out patches over an image of ``shape`` (z, y, x); pads axes smaller than a patch."""
    pad = []
    padded = []
    for n, p in zip(shape, patch_size):
        extra = max(p - n, 0)
        pad.append((extra // 2, extra - extra // 2))
        padded.append(n + extra)
    starts = [patch_starts(n, p, overlap) for n, p in zip(padded, patch_size)]
    corners = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    return WindowPlan(tuple(padded), tuple(pad), corners)


def prepare_network(network, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> tuple:
    """The module to run inference with, and the autocast dtype still needed.

    On the CPU: a copy of ``network`` (the original is left as it is) in eval mode, in
    the channels-last-3d memory format, with its weights in ``dtype`` when that is
    bf16 (no autocast needed then). Elsewhere: ``network`` moved to ``device``, with
    ``dtype`` as autocast. Returns ``(module, autocast_dtype)``.
    """
    if torch.device(device).type != "cpu" or not isinstance(network, torch.nn.Module):
        return network.to(device) if isinstance(network, torch.nn.Module) else network, dtype
    prepared = copy.deepcopy(network).eval()
    if dtype == torch.bfloat16:
        prepared = prepared.to(dtype=torch.bfloat16)
        dtype = None
    return prepared.to(memory_format=torch.channels_last_3d), dtype


def _input_layout(network) -> tuple:
    """(dtype, channels_last) that ``network`` wants its input in."""
    if not isinstance(network, torch.nn.Module):
        return torch.float32, False
    dtype, channels_last = None, False
    for p in network.parameters():
        if p.ndim == 5 and p.is_floating_point():
            dtype = dtype or p.dtype
            if p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous():
                channels_last = True
                break
    return dtype or torch.float32, channels_last


def sliding_window_inference(
    image: np.ndarray,
    network: Callable[[torch.Tensor], torch.Tensor],
    patch_size: Sequence[int],
    *,
    num_classes: int,
    overlap: float = 0.25,
    batch_size: int = 2,
    weighting: str = "gaussian",
    sigma_scale: float = 0.125,
    device: str = "cpu",
    autocast_dtype: Optional[torch.dtype] = None,
    pad_value: float = 0.0,
    compute_mask: Optional[np.ndarray] = None,
    accumulate_on: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    reuse_memory: bool = True,
) -> np.ndarray:
    """Weighted-mean logits of ``network`` over overlapping patches.

    Args:
        image: network input, (C, Z, Y, X) or (Z, Y, X) float32.
        network: maps (N, C, pz, py, px) tensors to (N, K, pz, py, px) logits.
        patch_size: (pz, py, px) voxels.
        num_classes: K, the number of logits per voxel.
        overlap: fraction of a patch shared with its neighbour, in [0, 1).
        batch_size: patches per forward pass.
        weighting: ``"gaussian"`` or ``"constant"``.
        device: torch device the network runs on.
        autocast_dtype: run the forward pass under autocast in this dtype (bf16 on the
            CPU, fp16 on CUDA), or None for full precision.
        pad_value: value for padding images smaller than a patch.
        compute_mask: (Z, Y, X) bool; patches with no True voxel are not computed.
        accumulate_on: device of the accumulators; default the network's device,
            falling back to the CPU if the GPU runs out of memory.
        progress: called with (fraction done, message) after every batch.
        cancel: returning True stops the run (raises :class:`Cancelled`).
        reuse_memory: on the CPU, keep the C allocator from returning each batch's
            buffers to the kernel while the patches run
            (:func:`~.allocator.reuse_freed_memory`; same results, fewer page faults).

    Returns:
        (K, Z, Y, X) float32 logits on the CPU.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError("overlap must be in [0, 1)")
    if image.ndim == 3:
        image = image[None]
    shape = image.shape[1:]
    plan = plan_windows(shape, patch_size, overlap)
    if any(b or a for b, a in plan.pad):
        image = np.pad(image, ((0, 0),) + plan.pad, mode="constant", constant_values=pad_value)
        if compute_mask is not None:
            compute_mask = np.pad(compute_mask, plan.pad, mode="constant", constant_values=False)
    corners = plan.corners
    if compute_mask is not None:
        corners = [c for c in corners if _any_in(compute_mask, c, patch_size)]

    acc_device = torch.device(accumulate_on or device)
    weights_np = importance_map(patch_size, weighting, sigma_scale)
    accumulators = _Accumulators(num_classes, plan.padded_shape, weights_np, acc_device)
    source = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    pz, py, px = patch_size
    total = max(len(corners), 1)
    input_dtype, channels_last = _input_layout(network)
    if input_dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        input_dtype = torch.float32
    on_cpu = torch.device(device).type == "cpu"  # elsewhere the activations are not the host's
    with torch.inference_mode(), reuse_freed_memory(reuse_memory and on_cpu):
        for first in range(0, len(corners), batch_size):
            if cancel is not None and cancel():
                raise Cancelled("inference cancelled by the user")
            batch_corners = corners[first:first + batch_size]
            batch = torch.stack([source[:, z:z + pz, y:y + py, x:x + px] for z, y, x in batch_corners])
            batch = batch.to(device, dtype=input_dtype, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last_3d)
            if autocast_dtype is not None and autocast_dtype != input_dtype:
                with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype):
                    logits = network(batch)
            else:
                logits = network(batch)
            accumulators.add(logits, batch_corners, patch_size)
            if progress is not None:
                done = min(first + batch_size, len(corners))
                progress(done / total, f"inference: {done}/{len(corners)} patches")
    result = accumulators.result()
    crop = tuple(slice(b, n - a) for (b, a), n in zip(plan.pad, plan.padded_shape))
    return np.ascontiguousarray(result[(slice(None),) + crop])


def _any_in(mask: np.ndarray, corner: tuple, patch_size: Sequence[int]) -> bool:
    z, y, x = corner
    pz, py, px = patch_size
    return bool(mask[z:z + pz, y:y + py, x:x + px].any())


class _Accumulators:
    """Weighted logit sums and weight sums; moves to the CPU on GPU out-of-memory."""

    def __init__(self, num_classes: int, shape: tuple, weights: np.ndarray, device: torch.device) -> None:
        self.num_classes = num_classes
        self.shape = shape
        self.weights_np = weights
        self.fell_back = False
        try:
            self._allocate(device)
        except OutOfMemoryError:
            self._fall_back()

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros((self.num_classes,) + tuple(self.shape), dtype=torch.float32, device=device)
        self.counts = torch.zeros(tuple(self.shape), dtype=torch.float32, device=device)
        self.weights = torch.from_numpy(self.weights_np).to(device)

    def _fall_back(self) -> None:
        import warnings

        old = getattr(self, "sums", None)
        old_counts = getattr(self, "counts", None)
        if old is not None:
            sums, counts = old.cpu(), old_counts.cpu()
            del self.sums, self.counts
            self.device = torch.device("cpu")
            self.sums, self.counts = sums, counts
            self.weights = torch.from_numpy(self.weights_np)
        else:
            self._allocate(torch.device("cpu"))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.fell_back = True
        warnings.warn("GPU memory ran out: accumulating the sliding-window results on the CPU instead")

    def add(self, logits: torch.Tensor, corners: list, patch_size: Sequence[int]) -> None:
        try:
            self._add(logits, corners, patch_size)
        except OutOfMemoryError:
            if self.device.type == "cpu":
                raise
            self._fall_back()
            self._add(logits, corners, patch_size)

    def _add(self, logits: torch.Tensor, corners: list, patch_size: Sequence[int]) -> None:
        pz, py, px = patch_size
        logits = logits.to(self.device, dtype=torch.float32).contiguous()
        for index, (z, y, x) in enumerate(corners):
            self.sums[:, z:z + pz, y:y + py, x:x + px].addcmul_(logits[index], self.weights)
            self.counts[z:z + pz, y:y + py, x:x + px].add_(self.weights)

    def result(self) -> np.ndarray:
        """Weighted mean logits, (K, Z, Y, X) float32 numpy; divides in place. In
        inference mode: sums moved off the GPU inside the patch loop are inference
        tensors, which only inference mode may update in place."""
        with torch.inference_mode():
            covered = self.counts > 0
            out = self.sums.div_(self.counts.clamp_(min=1e-20))
            del self.counts
            if not bool(covered.all()):
                fill = torch.full((self.num_classes,), UNCOVERED_LOGIT, device=out.device)
                fill[0] = 0.0
                out[:, ~covered] = fill[:, None]
            return out.cpu().numpy()

"""Devices, precision and the memory budget."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from .errors import InputError, ResourceError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str = "auto") -> str:
    """``auto`` means cuda, then mps, then cpu; an unavailable device is an error."""
    import torch

    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device == "cuda" and not cuda:
        raise InputError("device 'cuda' was requested but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if device == "mps" and not mps:
        raise InputError("device 'mps' was requested but it is not available; use --device cpu or auto")
    return device


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str):
    """The autocast dtype for a precision name on a device (None = fp32).

    ``auto``: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32.
    """
    import torch

    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device == "cuda":
            return torch.float16
        if device == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def available_memory_bytes() -> int:
    """Memory the process can still use (Linux MemAvailable; else physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


# Python, torch, numpy, SimpleITK and a loaded model, before any volume: 0.46-0.50 GiB
# measured (peak RSS of command-line runs on a small CT, extrapolated to no batch).
RUNTIME_BYTES = int(0.5 * (1 << 30))
# Host memory of one forward pass, per patch voxel and channel of the network's first
# level, for a batch's patches at once, for a U-Net whose widths double at each level.
# Measured on the CPU with the seed U-Net (widths 32-256, 96³ patches) and the demo
# model (8-64, 48³): 16-19 bytes in bf16, 29-43 in fp32, including the freed buffers
# kept for reuse (:mod:`.allocator`). Other widths count through :func:`effective_width`.
ACTIVATION_BYTES = {"half": 24, "full": 52}


def _level_load(widths: Sequence[int]) -> float:
    """Channels a forward pass holds at each level, weighted by the level's share of the
    patch's voxels (1/8 per pooling step). Above the bottom: 3 x the lower level's width
    (the tensor upsampled from it is held three times over: itself, in the concatenation
    with the skip connection, and as the convolution's reordered input) + this level's
    width; the bottom level: 2 x its width (its block's two convolution outputs). Set
    with the peaks measured for widths 2 then 96 (128³ patches): 3.2-4.0 GiB over runs."""
    w = [int(x) for x in widths]
    return sum((3 * w[level + 1] + w[level] if level + 1 < len(w) else 2 * w[level]) / 8 ** level
               for level in range(len(w)))


#: :func:`_level_load` of widths (1, 2, 4, 8): the seed's and the demo model's shape.
DOUBLING_LOAD = _level_load((1, 2, 4, 8))


def effective_width(widths: Union[int, Sequence[int]]) -> float:
    """The first-level width of a channel-doubling 4-level U-Net that takes as much
    activation memory as a network of these ``widths`` (an int: such a network's first
    width). The measured constants (:data:`ACTIVATION_BYTES`) are per first-level
    channel of such networks; a card whose widths grow faster (e.g. 2 then 96) holds far
    more channels at full resolution than its first width says. Never less than the
    first width, so no doubling network's estimate falls below what was measured."""
    if isinstance(widths, (int, np.integer)):
        return float(widths)
    widths = [int(w) for w in widths]
    return max(float(widths[0]), _level_load(widths) / DOUBLING_LOAD)


def batch_activation_bytes(patch_size: Sequence[int] = (96, 96, 96),
                           widths: Union[int, Sequence[int]] = (32, 64, 128, 256),
                           batch_size: int = 2, half_precision: bool = False) -> int:
    """Host memory a batch's forward pass takes (see :data:`ACTIVATION_BYTES`):
    batch x patch voxels x :func:`effective_width` of the card's ``widths`` x bytes."""
    per = ACTIVATION_BYTES["half" if half_precision else "full"]
    return int(batch_size * float(np.prod([int(p) for p in patch_size])) * effective_width(widths) * per)


def model_grid_size(input_size_xyz: Sequence[int], input_spacing: Sequence[float],
                    model_spacing: Sequence[float], input_direction=None, model_direction=None) -> np.ndarray:
    """An upper bound of the model grid's size (x, y, z) for an input of this size.

    The model grid covers the input's physical bounding box along the model's axes, so
    a rotated input needs more of it: give both directions (3 x 3, columns the axes;
    None: the identity) and each model axis gets the box's extent along it."""
    extent = np.asarray(input_size_xyz, dtype=float) * np.asarray(input_spacing, dtype=float)
    rotation = np.eye(3)
    if input_direction is not None or model_direction is not None:
        to_model = np.eye(3) if model_direction is None else np.asarray(model_direction, dtype=float).reshape(3, 3)
        direction = np.eye(3) if input_direction is None else np.asarray(input_direction, dtype=float).reshape(3, 3)
        rotation = np.abs(to_model.T @ direction)  # |cos| between each model axis and each input axis
    return np.ceil(rotation @ extent / np.asarray(model_spacing, dtype=float)) + 1


def estimate_peak_bytes(input_size_xyz: Sequence[int], input_spacing: Sequence[float],
                        model_spacing: Sequence[float], num_classes: int = 3,
                        batch_bytes: Optional[int] = None, input_direction=None, model_direction=None) -> int:
    """A conservative estimate of the engine's peak host memory for one volume.

    Input grid: the image (up to 4 bytes/voxel), its float32 copy for resampling, the
    labels, masks and statistics scratch (18 bytes/voxel; 16 measured at 512×512×1000).
    Model grid: HU, scaled input, logit sums, weights and labels (~(12 + 4K)
    bytes/voxel). Plus :data:`RUNTIME_BYTES` and ``batch_bytes``, one batch's forward
    pass (:func:`batch_activation_bytes`; default: the seed U-Net, two 96³ patches in
    fp32). The directions are :func:`model_grid_size`'s. The measured peaks are in
    BENCHMARKS.md ("Memory estimate").
    """
    if batch_bytes is None:
        batch_bytes = batch_activation_bytes()
    n_in = float(np.prod([int(s) for s in input_size_xyz]))
    n_model = float(np.prod(model_grid_size(input_size_xyz, input_spacing, model_spacing, input_direction,
                                            model_direction)))
    return int(n_in * 18 + n_model * (12 + 4 * num_classes) + RUNTIME_BYTES + batch_bytes)


def check_memory(input_size_xyz: Sequence[int], input_spacing: Sequence[float],
                 model_spacing: Sequence[float], budget_gb: Optional[float] = None,
                 num_classes: int = 3, batch_bytes: Optional[int] = None, input_direction=None,
                 model_direction=None) -> int:
    """Refuse (:class:`ResourceError`) a job whose estimate exceeds the budget.

    The default budget is 85 % of the memory available now. When the runtime and one
    batch alone exceed it, the message names the model's patches and the batch size, not
    the volume (no crop would help). Returns the estimate.
    """
    need = estimate_peak_bytes(input_size_xyz, input_spacing, model_spacing, num_classes, batch_bytes,
                               input_direction, model_direction)
    budget = budget_gb * (1 << 30) if budget_gb else 0.85 * available_memory_bytes()
    model_alone = RUNTIME_BYTES + (batch_activation_bytes() if batch_bytes is None else batch_bytes)
    if model_alone > budget:  # no crop of the volume helps: the model's patches are the cost
        raise ResourceError(
            f"the engine with this model needs about {model_alone / (1 << 30):.1f} GiB of memory before any "
            f"volume (the runtime and one batch of the model's patches), more than the budget of "
            f"{budget / (1 << 30):.2f} GiB: use "
            "--batch-size 1, a machine with more memory or a larger --memory-budget-gb, or a model whose card "
            "has a smaller patch_size or widths."
        )
    if need > budget:
        raise ResourceError(
            f"this volume ({'x'.join(str(int(s)) for s in input_size_xyz)} voxels) needs about "
            f"{need / (1 << 30):.1f} GiB of memory, more than the budget of {budget / (1 << 30):.2f} GiB. "
            "Crop the volume to the abdomen, free memory, or raise --memory-budget-gb."
        )
    return need

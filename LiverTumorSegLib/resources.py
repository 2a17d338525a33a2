"""Devices, precision and the memory budget."""

from __future__ import annotations

import os
from typing import Optional, Sequence

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


def estimate_peak_bytes(input_size_xyz: Sequence[int], input_spacing: Sequence[float],
                        model_spacing: Sequence[float], num_classes: int = 3) -> int:
    """A conservative estimate of the engine's peak host memory for one volume.

    Input grid: the image (up to 4 bytes/voxel), its float32 copy for resampling, the
    labels and statistics scratch (~14 bytes/voxel). Model grid: HU, scaled input,
    logit sums, weights and labels (~(12 + 4K) bytes/voxel). Plus 1.75 GiB for torch,
    the network and one batch of activations, with the freed buffers the allocator
    keeps for reuse during the patch loop (:mod:`.allocator`; up to 0.4 GiB measured;
    the peaks measured from 128³ to 512×512×600 stay 0.4-2.1 GiB under this estimate).
    """
    n_in = float(np.prod([int(s) for s in input_size_xyz]))
    extent = np.asarray(input_size_xyz, dtype=float) * np.asarray(input_spacing, dtype=float)
    n_model = float(np.prod(np.ceil(extent / np.asarray(model_spacing, dtype=float)) + 1))
    return int(n_in * 14 + n_model * (12 + 4 * num_classes) + 1.75 * (1 << 30))


def check_memory(input_size_xyz: Sequence[int], input_spacing: Sequence[float],
                 model_spacing: Sequence[float], budget_gb: Optional[float] = None,
                 num_classes: int = 3) -> int:
    """Refuse (:class:`ResourceError`) a job whose estimate exceeds the budget.

    The default budget is 85 % of the memory available now. Returns the estimate.
    """
    need = estimate_peak_bytes(input_size_xyz, input_spacing, model_spacing, num_classes)
    budget = budget_gb * (1 << 30) if budget_gb else 0.85 * available_memory_bytes()
    if need > budget:
        raise ResourceError(
            f"this volume ({'x'.join(str(int(s)) for s in input_size_xyz)} voxels) needs about "
            f"{need / (1 << 30):.1f} GiB of memory, more than the budget of {budget / (1 << 30):.2f} GiB. "
            "Crop the volume to the abdomen, free memory, or raise --memory-budget-gb."
        )
    return need

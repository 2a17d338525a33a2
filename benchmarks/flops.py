"""Floating-point operations of one forward pass (convolutions only, 1 MAC = 2 FLOP).

Counted from the network's own layers: a forward pass on the ``meta`` device (shapes
only, no arithmetic) with a hook on every ``Conv3d`` that adds
2 x output voxels x out channels x (in channels / groups) x kernel volume.
Pooling, upsampling, concatenation and ReLU are left out (well under 1 % of the FLOP).
"""

from __future__ import annotations

import copy
from typing import Sequence


def forward_flops(network, patch_size: Sequence[int], in_channels: int = 1) -> float:
    """FLOP of one forward pass of ``network`` on one (1, C, *patch_size) patch."""
    import torch
    from torch import nn

    meta = copy.deepcopy(network).to("meta")
    total = [0.0]

    def hook(module, inputs, output):
        k = 1
        for s in module.kernel_size:
            k *= int(s)
        total[0] += 2.0 * output.numel() * (module.in_channels // module.groups) * k

    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, nn.Conv3d)]
    try:
        with torch.no_grad():
            meta(torch.empty((1, in_channels) + tuple(int(p) for p in patch_size), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total[0]

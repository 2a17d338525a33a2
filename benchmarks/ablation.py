"""Where the speed comes from: one forward pass per variant, interleaved.

Each variant runs the same weights on the same batch of phantom patches (taken from
the item-1 input, so activations are realistic). ``fp32`` is the network as loaded
(what MONAI and TorchIO run); ``default`` is what the engine runs
(:func:`~LiverTumorSegLib.inference.prepare_network` at precision ``auto``).
Optional variants: ``torch.compile`` (inductor; its compile time is reported apart).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Dict

import numpy as np

from .measure import interleaved, summary


def variants(network, x, compile_too: bool = False, log=print) -> Dict[str, Callable]:
    import torch

    from LiverTumorSegLib.inference import prepare_network

    cl = torch.channels_last_3d
    net_cl = copy.deepcopy(network).to(memory_format=cl)
    default, _ = prepare_network(network, "cpu", torch.bfloat16)
    x_cl = x.contiguous(memory_format=cl)
    x_bf = x.to(torch.bfloat16).contiguous(memory_format=cl)

    def autocast(net, inp):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return net(inp)
        return run

    def plain(net, inp):
        def run():
            with torch.inference_mode():
                return net(inp)
        return run

    out = {
        "fp32": plain(network, x), "fp32_channels_last": plain(net_cl, x_cl),
        "bf16_autocast": autocast(network, x), "bf16_autocast_channels_last": autocast(net_cl, x_cl),
        "default (bf16 weights, channels_last)": plain(default, x_bf),
    }
    if x.shape[0] > 1:
        out["default, one patch per call"] = lambda: [plain(default, x_bf[i:i + 1])() for i in range(x.shape[0])]
    if compile_too:
        compiled = torch.compile(default)
        t = time.perf_counter()
        plain(compiled, x_bf)()
        out["torch.compile(default)"] = plain(compiled, x_bf)
        log(f"  torch.compile: first call (compile) {time.perf_counter() - t:.1f} s")
    return out


def run(model, hu: np.ndarray, reps: int, batch: int = 2, compile_too: bool = False, log=print) -> dict:
    """Forward time per patch for each variant; gains relative to ``fp32``."""
    import torch

    from LiverTumorSegLib.preprocess import scale_intensity

    from .flops import forward_flops

    patch = tuple(model.card.patch_size)
    x = scale_intensity(hu, model.card.intensity)
    centre = [max((n - p) // 2, 0) for n, p in zip(x.shape, patch)]
    tiles = []
    for i in range(batch):
        z, y, xx = centre[0], min(centre[1] + i * patch[1] // 2, max(x.shape[1] - patch[1], 0)), centre[2]
        tiles.append(x[z:z + patch[0], y:y + patch[1], xx:xx + patch[2]])
    tensor = torch.from_numpy(np.stack(tiles)[:, None].copy())
    fns = variants(model.network.eval(), tensor, compile_too, log)
    for fn in fns.values():  # warm-up: oneDNN primitive creation, weight reorders
        fn()
    runs = interleaved(fns, reps, log=log)
    flop = forward_flops(model.network, patch) * batch
    rows = {}
    base = None
    for name, samples in runs.items():
        s = summary(samples)
        s["seconds_per_patch"] = s["seconds_median"] / batch
        s["gflops"] = flop / s["seconds_median"] / 1e9
        base = base or s["seconds_median"]
        s["speedup_vs_fp32"] = base / s["seconds_median"]
        rows[name] = s
    return {"patch_size": list(patch), "batch": batch, "gflop_per_patch": flop / batch / 1e9, "rows": rows}

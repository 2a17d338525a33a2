"""Where the speed comes from: one forward pass per variant, interleaved.

Each variant runs the same weights on the same batch of phantom patches (taken from
the item-1 input, so activations are realistic). ``fp32`` is the network as loaded
(what MONAI and TorchIO run); ``default`` is what the engine runs
(:func:`~LiverTumorSegLib.inference.prepare_network` at precision ``auto``).
``default, N patches per call`` runs the default on a batch of twice the ablation's
patches (the engine's ``--batch-size``). Optional variants: ``torch.compile``
(inductor; its compile time is reported apart) and ONNX Runtime (the fp32 network
exported to ONNX, run by its CPU execution provider with every graph optimisation and
the same thread count; needs ``onnx`` and ``onnxruntime``, the ``bench`` extra). ONNX
Runtime's x86 CPU provider has no bf16 convolution, so fp32 is what it can run.
Every variant runs without the engine's allocator setting
(:mod:`LiverTumorSegLib.allocator`), so the rows compare like with like; ONNX Runtime
keeps its own memory arena between calls.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np

from .measure import interleaved, summary


def onnx_runtime_session(network, x, threads: int, log=print) -> Tuple[Callable, float]:
    """(run, export seconds): ``network`` (fp32) exported to ONNX and loaded into an
    ONNX Runtime CPU session with ``threads`` intra-op threads; ``run()`` returns the
    logits of ``x`` as a numpy array. The exported file is removed once loaded."""
    import onnxruntime as ort
    import torch

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ltsbench-onnx-") as folder:
        path = str(Path(folder) / "network.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(network.eval(), (x,), path, input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17, dynamo=False)
        export_s = time.perf_counter() - t
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"image": x.detach().cpu().numpy()}
    log(f"  ONNX Runtime {ort.__version__}: export {export_s:.1f} s")
    return (lambda: session.run(None, feed)[0]), export_s


def variants(network, x, compile_too: bool = False, onnx_too: bool = False,
             log=print) -> Dict[str, Tuple[Callable, int]]:
    """{name: (run, patches one run computes)} for the batch ``x``."""
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
    out = {name: (fn, x.shape[0]) for name, fn in out.items()}
    twice = torch.cat([x_bf, x_bf]).contiguous(memory_format=cl)
    out[f"default, {twice.shape[0]} patches per call"] = (plain(default, twice), twice.shape[0])
    if compile_too:
        compiled = torch.compile(default)
        t = time.perf_counter()
        plain(compiled, x_bf)()
        out["torch.compile(default)"] = (plain(compiled, x_bf), x.shape[0])
        log(f"  torch.compile: first call (compile) {time.perf_counter() - t:.1f} s")
    if onnx_too:
        out["onnxruntime fp32 (CPU provider)"] = (onnx_runtime_session(network, x, torch.get_num_threads(), log)[0],
                                                  x.shape[0])
    return out


def run(model, hu: np.ndarray, reps: int, batch: int = 2, compile_too: bool = False, onnx_too: bool = False,
        log=print) -> dict:
    """Forward time per patch for each variant; gains relative to ``fp32``. With
    ``onnx_too``, also ONNX Runtime's largest |logit difference| from the fp32 network."""
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
    found = variants(model.network.eval(), tensor, compile_too, onnx_too, log)
    fns = {name: fn for name, (fn, _) in found.items()}
    warm = {name: fn() for name, fn in fns.items()}  # warm-up: oneDNN primitive creation, weight reorders
    out = {}
    if onnx_too:
        with torch.inference_mode():
            reference = model.network(tensor).float().numpy()
        out["onnxruntime_max_abs_logit_diff_vs_fp32"] = float(
            np.abs(warm["onnxruntime fp32 (CPU provider)"] - reference).max())
    del warm
    runs = interleaved(fns, reps, log=log)
    flop_per_patch = forward_flops(model.network, patch)
    rows = {}
    base = None
    for name, samples in runs.items():
        s = summary(samples)
        s["patches_per_run"] = found[name][1]
        s["seconds_per_patch"] = s["seconds_median"] / s["patches_per_run"]
        s["gflops"] = flop_per_patch / s["seconds_per_patch"] / 1e9
        base = base or s["seconds_per_patch"]
        s["speedup_vs_fp32"] = base / s["seconds_per_patch"]
        rows[name] = s
    return dict(out, patch_size=list(patch), batch=batch, gflop_per_patch=flop_per_patch / 1e9, rows=rows)

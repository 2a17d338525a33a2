"""Page faults and kernel time of one forward pass, with and without reused buffers.

``python -m benchmarks.page_faults [--weights FOLDER] [--reps N] [--threads 2]``

The engine's network (:func:`~LiverTumorSegLib.inference.prepare_network` at the
CPU's default precision) runs a batch of two patches of the card's size, ``reps``
times in a row, first with glibc's defaults, then inside
:func:`~LiverTumorSegLib.allocator.reuse_freed_memory` (as the sliding window runs
it), alternating the two for ``rounds`` rounds. Outside the block glibc has the
settings a block leaves behind (:func:`~LiverTumorSegLib.allocator.outside_settings`,
applied at the start, so every round is alike). For every call it prints the wall
time, the user and kernel CPU time and the minor page faults (``getrusage``); the
first call of each block is the one that may still grow the heap.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def main(argv=None) -> int:
    import torch

    from LiverTumorSegLib.allocator import outside_settings, reuse_freed_memory
    from LiverTumorSegLib.inference import prepare_network
    from LiverTumorSegLib.model import load_model
    from LiverTumorSegLib.resources import resolve_precision

    from .weights import usable, weights_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help="model folder (default: the benchmark weights)")
    parser.add_argument("--reps", type=int, default=4, help="forward passes per block")
    parser.add_argument("--rounds", type=int, default=2, help="blocks per setting, alternating")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not outside_settings():
        print("glibc's malloc is not in use or is tuned by the environment: nothing to compare", file=sys.stderr)
        return 2
    folder = args.weights or weights_dir()
    if not usable(folder, explicit=args.weights is not None):
        print(f"no benchmark weights in {folder}: make them with `python -m benchmarks.weights`, or pass --weights",
              file=sys.stderr)
        return 2
    model = load_model(folder)
    dtype = resolve_precision("auto", "cpu")
    net, autocast = prepare_network(model.network, "cpu", dtype)
    p = tuple(model.card.patch_size)
    first = next(p_ for p_ in net.parameters() if p_.ndim == 5)
    x = torch.randn((2, first.shape[1]) + p)
    x = x.to(first.dtype).contiguous(memory_format=torch.channels_last_3d)
    print(f"{torch.__version__}, {args.threads} threads, batch of 2 patches of {p}, weights {dtype or 'fp32'}")
    steady = {False: [], True: []}
    with torch.inference_mode():
        net(x)  # oneDNN primitives and weight reorders, outside any block
        for rnd in range(args.rounds):
            for reuse in (False, True):
                block = reuse_freed_memory() if reuse else contextlib.nullcontext()
                with block:
                    for i in range(args.reps):
                        u0, s0, f0 = _usage()
                        t = time.perf_counter()
                        net(x)
                        wall = time.perf_counter() - t
                        u1, s1, f1 = _usage()
                        print(f"round {rnd + 1} {'reused' if reuse else 'outside a block'} call {i + 1}: "
                              f"wall {wall:.3f} s, user {u1 - u0:.2f} s, kernel {s1 - s0:.2f} s, "
                              f"minor faults {f1 - f0}")
                        if i > 0:
                            steady[reuse].append((wall, s1 - s0, f1 - f0))
    for reuse, rows in steady.items():
        if rows:
            print(f"{'reused' if reuse else 'outside a block'} (calls after the first of each block, median): "
                  f"wall {statistics.median(r[0] for r in rows):.3f} s, "
                  f"kernel {statistics.median(r[1] for r in rows):.2f} s, "
                  f"minor faults {statistics.median(r[2] for r in rows):.0f}")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

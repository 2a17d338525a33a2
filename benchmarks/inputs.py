"""Benchmark inputs: phantom CTs, made once and kept in a cache folder.

Files go to ``$LIVERTUMORSEG_BENCH_INPUTS`` or ``~/.cache/livertumorseg/bench-inputs``;
a file's name holds every parameter that made it, and the phantom generator is
deterministic, so a cached file is the same file a fresh run would write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

BENCH_SEED = 11  # the benchmark patient (3 tumours forced, so tumour labels exist)
N_TUMORS = 3


def inputs_dir() -> Path:
    env = os.environ.get("LIVERTUMORSEG_BENCH_INPUTS")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "livertumorseg" / "bench-inputs"


def phantom_file(shape_xyz: Sequence[int], spacing: Sequence[float], seed: int = BENCH_SEED,
                 n_tumors: int = N_TUMORS, log=print) -> Path:
    """A phantom CT (int16 HU, LPS, NIfTI) of this grid; written on first use."""
    from LiverTumorSegLib.io import write_volume
    from LiverTumorSegLib.phantom import make_phantom

    tag = "x".join(str(int(s)) for s in shape_xyz) + "_" + "x".join(f"{float(s):g}" for s in spacing)
    path = inputs_dir() / f"phantom_s{seed}_t{n_tumors}_{tag}mm.nii.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"writing benchmark input {path.name}")
        case = make_phantom(seed, spacing=tuple(spacing), shape=tuple(shape_xyz), orientation="lps",
                            n_tumors=n_tumors)
        write_volume(case.image, path)
    return path


def model_grid_phantom(shape_xyz: Sequence[int], seed: int = BENCH_SEED, n_tumors: int = N_TUMORS) -> tuple:
    """(hu float32, labels uint8), (z, y, x), rendered directly on the 1.5 mm model grid."""
    from .weights import SPACING_MM

    from LiverTumorSegLib.phantom import make_phantom

    case = make_phantom(seed, spacing=SPACING_MM, shape=tuple(shape_xyz), orientation="lps", n_tumors=n_tumors)
    return case.image.array.astype(np.float32), case.labels.array.astype(np.uint8)

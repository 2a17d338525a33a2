"""Keep the C allocator from handing large buffers back to the kernel in hot loops.

Every forward pass of the 3D U-Net allocates and frees activations of about 100 MB
(a batch of two 96-voxel patches at width 32). glibc's ``malloc`` serves blocks that
large with ``mmap`` and returns them with ``munmap`` on ``free``, so the next forward
pass touches brand-new pages and the kernel zeroes them one page fault at a time:
about 330,000 faults and a quarter of the CPU time per forward pass on the benchmark
machine (BENCHMARKS.md, "Optimisations kept"). PyTorch's CPU performance guide
suggests a caching allocator (jemalloc or TCMalloc, preloaded) for this;
:func:`reuse_freed_memory` gets the same effect from glibc itself, for the length of a
``with`` block and with no new dependency:

* ``M_MMAP_MAX = 0``: large blocks come from the heap, whose freed memory ``malloc``
  reuses;
* ``M_TRIM_THRESHOLD`` at its largest (2 GiB): freed memory at the top of the heap
  is kept.

On leaving the block the two settings go back to glibc's documented defaults and
``malloc_trim(0)`` returns the free memory to the kernel, so the process's footprint
after the loop is what it would have been. Elsewhere (macOS, Windows, musl) it does
nothing. The results are bit-for-bit the same either way: only where memory comes
from changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

# mallopt parameters and glibc's defaults for them (malloc.h, mallopt(3)).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
KEEP_ALL = 2**31 - 1  # the largest trim threshold mallopt takes (an int): 2 GiB

_lock = threading.Lock()
_depth = 0
_libc: Optional[ctypes.CDLL] = None
_looked_up = False


def glibc() -> Optional[ctypes.CDLL]:
    """The process's glibc with ``mallopt`` and ``malloc_trim`` typed, or None elsewhere."""
    global _libc, _looked_up
    if not _looked_up:
        _looked_up = True
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.mallopt.restype = ctypes.c_int
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.malloc_trim.restype = ctypes.c_int
                _libc = lib
            except (OSError, AttributeError):
                _libc = None
    return _libc


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed large buffers are reused instead of returned to the kernel.

    Yields whether the setting is in force (False off glibc, or when ``enabled`` is
    False). Nested and concurrent blocks share one setting; the last to leave restores
    glibc's defaults and trims.
    """
    global _depth
    lib = glibc() if enabled else None
    if lib is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            lib.mallopt(M_TRIM_THRESHOLD, KEEP_ALL)
            lib.mallopt(M_MMAP_MAX, 0)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                lib.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                lib.malloc_trim(0)

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

The setting is process-wide while a block is open (every thread's allocations see
it), and it helps the allocations of the main thread's arena, where the command line
and Lightning run the network. On leaving the last open block, ``malloc_trim(0)``
returns the free memory to the kernel, and glibc is left as its own dynamic rule
leaves a process that has freed a block of the rule's ceiling: mmap threshold 32 MiB,
trim threshold 64 MiB (:func:`outside_settings`). It cannot be left exactly as it
was, because any ``mallopt`` call turns that rule off for good. A child forked inside
a block starts outside it.

It does nothing off glibc (macOS, Windows, musl), when the user tunes glibc's malloc
through the environment (``MALLOC_*_`` variables or ``glibc.malloc`` tunables: their
settings are kept), or when ``LIVERTUMORSEG_REUSE_MEMORY=0``. The kept buffers cost
about 0.4 GB of peak memory on the benchmark model. The results are bit-for-bit the
same either way: only where memory comes from changes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536  # glibc's default
MMAP_THRESHOLD_CEILING = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # DEFAULT_MMAP_THRESHOLD_MAX: 32 MiB
KEEP_ALL = 2**31 - 1  # the largest trim threshold mallopt takes (an int): 2 GiB
ENV_SWITCH = "LIVERTUMORSEG_REUSE_MEMORY"  # "0" turns reuse off
USER_TUNING = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_lock = threading.Lock()
_depth = 0  # blocks open now


@functools.lru_cache(maxsize=None)
def glibc() -> Optional[ctypes.CDLL]:
    """The process's glibc with ``mallopt`` and ``malloc_trim`` typed, or None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.mallopt.restype = ctypes.c_int
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


def user_tunes_malloc() -> bool:
    """Whether the environment sets glibc's malloc parameters (then they are left alone)."""
    return any(name in os.environ for name in USER_TUNING) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def _usable(enabled: bool) -> Optional[ctypes.CDLL]:
    if not enabled or os.environ.get(ENV_SWITCH, "1").strip() == "0" or user_tunes_malloc():
        return None
    return glibc()


def _apply_outside(lib: ctypes.CDLL) -> None:
    lib.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING)
    lib.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_CEILING)


def outside_settings() -> bool:
    """Put glibc in the state a block leaves behind (see the module's text), now.

    The benchmarks call it before timing anything, so that every competitor runs
    under the same settings, before and after the engine's first block. Returns
    whether anything was set (False where :func:`reuse_freed_memory` does nothing).
    """
    lib = _usable(True)
    if lib is None:
        return False
    with _lock:
        if _depth == 0:
            _apply_outside(lib)
    return True


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed large buffers are reused instead of returned to the kernel.

    Yields whether the setting is in force: False off glibc, when ``enabled`` is
    False, when ``$LIVERTUMORSEG_REUSE_MEMORY`` is ``0`` or when the environment
    tunes glibc's malloc itself. Nested and concurrent blocks share the one
    process-wide setting; the last to leave trims and sets :func:`outside_settings`.
    """
    global _depth
    lib = _usable(enabled)
    if lib is None:
        yield False
        return
    entered = False
    try:
        with _lock:
            _depth += 1
            entered = True
            if _depth == 1:
                lib.mallopt(M_TRIM_THRESHOLD, KEEP_ALL)
                lib.mallopt(M_MMAP_MAX, 0)
        yield True
    finally:
        if entered:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    _apply_outside(lib)
                    lib.malloc_trim(0)


def _after_fork_in_child() -> None:
    """A child forked inside a block (a data-loader worker) starts outside it."""
    global _depth, _lock
    _lock = threading.Lock()  # the parent's may have been held by another thread at the fork
    if _depth:  # a block was open, so glibc() is known
        _apply_outside(glibc())
    _depth = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

"""The allocator setting around the patch loop: fewer page faults, same results, memory given back."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch

from LiverTumorSegLib import allocator
from LiverTumorSegLib.inference import sliding_window_inference
from LiverTumorSegLib.model.unet import UNet3D

try:
    import resource
except ImportError:  # Windows
    resource = None

needs_glibc = pytest.mark.skipif(allocator.glibc() is None or resource is None,
                                 reason="mallopt is glibc's; this platform has no glibc")

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)
WARM_UP = 8  # cycles for the heap to hold a free chunk that fits (aligned requests are a little larger)
MIB = 2**20


@pytest.fixture(autouse=True)
def _glibc_as_it_comes(monkeypatch):
    """The tests are about the setting itself: not turned off, not overridden by the user."""
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    for name in allocator.USER_TUNING + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(name, raising=False)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_sizes = iter(range(300, 100_000, 10))  # MiB: each request larger than the one before


def _mmapped_while_holding(nbytes: int) -> int:
    """Bytes glibc maps with mmap while a block of ``nbytes`` is held (not touched, so
    nothing is faulted in): about its size when glibc maps it, 0 when it comes from the heap."""
    lib = allocator.glibc()
    if not hasattr(lib, "mallinfo2"):
        pytest.skip("this glibc is older than 2.33 (no mallinfo2)")
    lib.mallinfo2.restype = _MallInfo2
    before = lib.mallinfo2().hblkhd
    block = torch.empty(nbytes, dtype=torch.uint8)
    mapped = lib.mallinfo2().hblkhd - before
    del block
    return mapped


def _mmapped_for_a_new_block() -> int:
    """As above for a block no free chunk of the heap can hold: larger than all the
    heap's free memory (earlier tests may have left large free chunks in it)."""
    lib = allocator.glibc()
    if not hasattr(lib, "mallinfo2"):
        pytest.skip("this glibc is older than 2.33 (no mallinfo2)")
    lib.mallinfo2.restype = _MallInfo2
    return _mmapped_while_holding(lib.mallinfo2().fordblks + next(_sizes) * MIB)


def _maps_large_blocks() -> None:
    """Precondition: outside any block glibc maps a new large block (not so when another
    allocator, jemalloc or TCMalloc, is preloaded)."""
    if _mmapped_for_a_new_block() < 300 * MIB:
        pytest.skip("malloc here does not map large blocks with mmap (another allocator preloaded?)")


def _faults_of_second_touch() -> int:
    """Minor page faults while a freshly allocated 64 MiB block is written, after an
    identical block was written and freed just before."""
    first = torch.ones(BLOCK // 4)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ones(BLOCK // 4)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del second
    return after - before


def _rss_kib() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


@needs_glibc
def test_large_blocks_come_from_the_heap_only_inside_the_outermost_block():
    _maps_large_blocks()
    with allocator.reuse_freed_memory() as on:
        assert on is True
        with allocator.reuse_freed_memory():
            assert _mmapped_for_a_new_block() == 0
        assert _mmapped_for_a_new_block() == 0  # the inner block's end restores nothing
    assert _mmapped_for_a_new_block() >= 300 * MIB  # large blocks are mapped again
    assert _mmapped_while_holding(16 * MIB) == 0  # under the 32 MiB threshold a block leaves behind



def _run_fresh(script: str, timeout: float):
    """Run ``script`` (given the repository root as its argument) in a fresh Python
    without the user's malloc tuning or our switch; the JSON of its last output line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in allocator.USER_TUNING + ("GLIBC_TUNABLES",
                                                                                  allocator.ENV_SWITCH)}
    proc = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_FAULTS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from LiverTumorSegLib import allocator
from Testing.test_allocator import WARM_UP, _faults_of_second_touch, _rss_kib
out = {"outside": _faults_of_second_touch()}
with allocator.reuse_freed_memory() as on:
    out["on"] = on
    for _ in range(WARM_UP):
        _faults_of_second_touch()
    out["inside"] = _faults_of_second_touch()
    out["rss_inside_kib"] = _rss_kib()
out["rss_after_kib"] = _rss_kib()
print(json.dumps(out))
"""


@needs_glibc
def test_freed_blocks_are_reused_inside_and_returned_after():
    """In a fresh process, so that no free chunk left by earlier tests can serve the
    block outside the block (which would hide what glibc does as it comes)."""
    r = _run_fresh(_FAULTS_SCRIPT, timeout=300)
    pages = BLOCK // resource.getpagesize()
    if r["outside"] < pages // 2:  # a fresh process maps a 64 MiB block anew, a fault per 4 KiB page
        pytest.skip(f"a freed 64 MiB block costs only {r['outside']} page faults here (huge pages, or another "
                    "allocator preloaded): nothing to save")
    assert r["on"] is True
    assert r["inside"] < pages // 20
    assert r["rss_after_kib"] < r["rss_inside_kib"] - BLOCK // 1024 // 2  # malloc_trim gave the blocks back


@needs_glibc
def test_a_child_forked_inside_a_block_starts_outside_it():
    _maps_large_blocks()
    with allocator.reuse_freed_memory():
        pid = os.fork()
        if pid == 0:  # the child: no block open, large blocks mapped again
            ok = allocator._depth == 0 and _mmapped_for_a_new_block() >= 300 * MIB
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert _mmapped_for_a_new_block() == 0  # the parent's block is still open
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@needs_glibc
@pytest.mark.parametrize("how", ["switch", "user tuning", "disabled"])
def test_the_setting_stays_off_when_asked(monkeypatch, how):
    _maps_large_blocks()
    if how == "switch":
        monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    elif how == "user tuning":
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    with allocator.reuse_freed_memory(enabled=how != "disabled") as on:
        assert on is False
        assert _mmapped_for_a_new_block() >= 300 * MIB


def test_sliding_window_runs_its_cpu_patches_inside_a_block_and_the_results_are_identical():
    torch.manual_seed(0)
    net = UNet3D(in_channels=1, num_classes=3, widths=(4, 8), norm="instance").eval()
    depths = []

    def spy(x):
        depths.append(allocator._depth)
        return net(x)

    image = np.random.default_rng(1).normal(size=(40, 36, 44)).astype(np.float32)
    kwargs = dict(num_classes=3, overlap=0.25, batch_size=2)
    a = sliding_window_inference(image, spy, (24, 24, 24), reuse_memory=True, **kwargs)
    inside, depths[:] = list(depths), []
    b = sliding_window_inference(image, spy, (24, 24, 24), reuse_memory=False, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert depths and all(d == 0 for d in depths)
    if allocator.glibc() is not None:
        assert inside and all(d == 1 for d in inside)


# -- from a mutation review: the switches and outside_settings --------------------------


@pytest.mark.parametrize("tunables, tuned", [("glibc.malloc.mmap_max=0", True),
                                             ("glibc.rtld.nns=2:glibc.malloc.trim_threshold=1", True),
                                             ("glibc.rtld.nns=2", False), ("", False)])
def test_glibc_malloc_tunables_count_as_the_user_tuning_malloc(monkeypatch, tunables, tuned):
    """GLIBC_TUNABLES naming a glibc.malloc.* setting is the user's own tuning (left
    alone, the block does nothing); other tunables are not."""
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert allocator.user_tunes_malloc() is tuned
    with allocator.reuse_freed_memory() as on:
        assert on is (allocator.glibc() is not None and not tuned)


def test_outside_settings_does_nothing_when_the_switch_is_off(monkeypatch):
    """$LIVERTUMORSEG_REUSE_MEMORY=0 leaves glibc alone: outside_settings sets nothing
    and says so (the benchmarks report it)."""
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.outside_settings() is False
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    monkeypatch.delenv(allocator.ENV_SWITCH)
    assert allocator.outside_settings() is False


@needs_glibc
def test_outside_settings_inside_an_open_block_leaves_the_block_in_force():
    """Called while a block is open (another thread's inference), outside_settings must
    not switch mmap back on under it."""
    _maps_large_blocks()
    assert allocator.outside_settings() is True
    with allocator.reuse_freed_memory():
        assert allocator.outside_settings() is True
        assert _mmapped_for_a_new_block() == 0
    assert _mmapped_for_a_new_block() >= 300 * MIB


_HEAP_SCRIPT = """
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from LiverTumorSegLib import allocator  # no torch in this process: glibc's thresholds as they come

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

lib = allocator.glibc()
if not hasattr(lib, "mallinfo2"):
    print(json.dumps(None)); sys.exit()
lib.mallinfo2.restype = MallInfo2
lib.malloc.restype, lib.malloc.argtypes, lib.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
MIB = 2**20

def mapped(nbytes):
    before = lib.mallinfo2().hblkhd
    p = lib.malloc(nbytes)
    out = lib.mallinfo2().hblkhd - before
    lib.free(p)
    return out

out = {"probe": mapped(MIB)}
with allocator.reuse_freed_memory() as on:
    out["on"] = on
    p = lib.malloc(64 * MIB)  # from the heap's top (mmap is off), untouched
    held = lib.mallinfo2().arena
    lib.free(p)
    out["trimmed"] = held - lib.mallinfo2().arena
out["mapped_16"] = mapped(16 * MIB)
out["mapped_48"] = mapped(48 * MIB)
print(json.dumps(out))
"""


@needs_glibc
def test_glibc_thresholds_inside_and_after_a_block_in_a_fresh_process():
    """In a process without torch (glibc's thresholds as they come): inside a block a
    freed block at the heap's top is kept (trim threshold at its largest), and after
    it the mmap threshold is 32 MiB, however low it was before."""
    r = _run_fresh(_HEAP_SCRIPT, timeout=120)
    if r is None:
        pytest.skip("this glibc is older than 2.33 (no mallinfo2)")
    if r["mapped_48"] < 48 * MIB:
        pytest.skip("malloc here does not map large blocks with mmap (another allocator preloaded?)")
    assert r["on"] is True
    assert r["trimmed"] < MIB  # kept for reuse, not handed back at free
    assert r["mapped_16"] == 0  # from the heap: the threshold a block leaves behind is 32 MiB

"""The allocator setting around the patch loop: fewer page faults, same results, memory given back."""

from __future__ import annotations

import ctypes
import resource

import numpy as np
import pytest
import torch

from LiverTumorSegLib import allocator
from LiverTumorSegLib.inference import sliding_window_inference
from LiverTumorSegLib.model.unet import UNet3D

needs_glibc = pytest.mark.skipif(allocator.glibc() is None, reason="mallopt is glibc's; this platform has no glibc")

BLOCK = 64 * 2**20  # well above glibc's largest mmap threshold (32 MiB)
WARM_UP = 8  # cycles for the heap to hold a free chunk that fits (aligned requests are a little larger)


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


def _faults_as_glibc_comes() -> int:
    """The second-touch faults with glibc's defaults; skips where there are few to save
    (a kernel that backs every mapping with 2 MiB pages faults 512 times less)."""
    faults = _faults_of_second_touch()
    if faults < BLOCK // resource.getpagesize() // 2:
        pytest.skip(f"a freed 64 MiB block costs only {faults} page faults here (huge pages?): nothing to save")
    return faults


def _rss_kib() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_sizes = iter(range(300, 10_000, 10))  # MiB; each larger than any block before, so no free chunk fits it


def _mmapped_for_a_new_block() -> int:
    """Bytes glibc maps with mmap while a block larger than any before is held (not
    touched, so nothing is faulted in): the block's size with glibc's defaults, 0 when
    large blocks come from the heap."""
    lib = allocator.glibc()
    if not hasattr(lib, "mallinfo2"):
        pytest.skip("this glibc is older than 2.33 (no mallinfo2)")
    lib.mallinfo2.restype = _MallInfo2
    before = lib.mallinfo2().hblkhd
    block = torch.empty(next(_sizes) * 2**20, dtype=torch.uint8)
    mapped = lib.mallinfo2().hblkhd - before
    del block
    return mapped


@needs_glibc
def test_large_blocks_come_from_the_heap_only_inside_the_outermost_block():
    assert _mmapped_for_a_new_block() >= 300 * 2**20
    with allocator.reuse_freed_memory() as on:
        assert on is True
        with allocator.reuse_freed_memory():
            assert _mmapped_for_a_new_block() == 0
        assert _mmapped_for_a_new_block() == 0  # the inner block's end restores nothing
    assert _mmapped_for_a_new_block() >= 300 * 2**20  # glibc's defaults are back


@needs_glibc
def test_freed_blocks_are_reused_inside_and_returned_after():
    pages = BLOCK // resource.getpagesize()
    _faults_as_glibc_comes()  # glibc as it comes: the block is mapped anew, a fault per page
    with allocator.reuse_freed_memory():
        for _ in range(WARM_UP):  # the first cycles may still grow the heap
            _faults_of_second_touch()
        assert _faults_of_second_touch() < pages // 20
        held = _rss_kib()
    assert _rss_kib() < held - BLOCK // 1024 // 2  # malloc_trim gave the freed blocks back


def test_disabled_block_changes_nothing():
    with allocator.reuse_freed_memory(enabled=False) as on:
        assert on is False


def test_sliding_window_results_are_identical_with_and_without_reuse():
    torch.manual_seed(0)
    net = UNet3D(in_channels=1, num_classes=3, widths=(4, 8), norm="instance").eval()
    image = np.random.default_rng(1).normal(size=(40, 36, 44)).astype(np.float32)
    kwargs = dict(num_classes=3, overlap=0.25, batch_size=2)
    a = sliding_window_inference(image, net, (24, 24, 24), reuse_memory=True, **kwargs)
    b = sliding_window_inference(image, net, (24, 24, 24), reuse_memory=False, **kwargs)
    np.testing.assert_array_equal(a, b)

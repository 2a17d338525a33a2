"""The memory estimate follows every level's width, not only the first."""

from __future__ import annotations

import pytest

from LiverTumorSegLib.errors import ResourceError
from LiverTumorSegLib.resources import ACTIVATION_BYTES, batch_activation_bytes

from .helpers import make_tiny_model

WIDTHS = [(8, 16, 32, 64), (32, 64, 128, 256), (4, 8), (2, 96), (96, 2), (2, 4, 96), (16, 16, 16, 16)]


@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("half", [False, True])
def test_a_batch_estimate_covers_the_tensors_its_top_level_must_hold_at_once(widths, half):
    """At the top level the decoder holds the tensor upsampled from the level below
    (widths[1] channels) and its concatenation with the skip connection (widths[0] +
    widths[1]) at the same time, at the patch's full size: a floor under any estimate."""
    patch, batch = (64, 64, 64), 2
    floor = batch * 64 ** 3 * (2 * widths[1] + widths[0]) * (2 if half else 4)
    assert batch_activation_bytes(patch, widths, batch, half) >= floor


@pytest.mark.parametrize("widths", [(8, 16, 32, 64), (32, 64, 128, 256), (4, 8), (8, 16, 32)])
def test_doubling_networks_keep_the_measured_estimate(widths):
    """The constants were measured per first-level channel of channel-doubling U-Nets
    (BENCHMARKS.md, "Memory estimate"): their estimates stay what was measured."""
    patch = (48, 48, 48)
    assert batch_activation_bytes(patch, widths, 2, False) == 2 * 48 ** 3 * widths[0] * ACTIVATION_BYTES["full"]
    assert batch_activation_bytes(patch, widths, 2, False) == batch_activation_bytes(patch, widths[0], 2, False)


def test_the_budget_refuses_a_card_whose_widths_grow_faster_than_doubling(tmp_path):
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    narrow = make_tiny_model(tmp_path / "narrow", widths=(2, 4), patch=(64, 64, 64))
    wide = make_tiny_model(tmp_path / "wide", widths=(2, 96), patch=(64, 64, 64))
    options = SegmentOptions(device="cpu", batch_size=1, precision="fp32")
    header = ((64, 64, 64), (3.0, 3.0, 3.0))  # one window
    need_narrow = Segmenter(narrow, options).check_memory(*header)
    need_wide = Segmenter(wide, options).check_memory(*header)
    # the wide card's top level holds about 2 x 96 + 2 channels at full size, not 2
    assert need_wide - need_narrow >= 64 ** 3 * (2 * 96 + 2 - 2 * 4 - 2) * 4
    budget = SegmentOptions(device="cpu", batch_size=1, precision="fp32",
                            memory_budget_gb=(need_narrow + need_wide) / 2 / 2**30)
    assert Segmenter(narrow, budget).check_memory(*header) == need_narrow
    with pytest.raises(ResourceError, match="memory"):
        Segmenter(wide, budget).check_memory(*header)


def test_a_model_too_large_for_the_budget_is_blamed_not_the_volume(tmp_path):
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    huge_patches = make_tiny_model(tmp_path / "huge", widths=(4, 8), patch=(256, 256, 256))
    options = SegmentOptions(device="cpu", batch_size=1, precision="fp32", memory_budget_gb=2.0)
    with pytest.raises(ResourceError, match="needs about .* before any volume .*patch_size") as info:
        Segmenter(huge_patches, options).check_memory((32, 32, 32), (3.0, 3.0, 3.0))  # a tiny volume
    assert "Crop the volume" not in str(info.value)
    small = make_tiny_model(tmp_path / "small", widths=(4, 8), patch=(32, 32, 32))
    with pytest.raises(ResourceError, match="Crop the volume"):  # a volume too large is still the volume's fault
        Segmenter(small, options).check_memory((1024, 1024, 1024), (0.5, 0.5, 0.5))

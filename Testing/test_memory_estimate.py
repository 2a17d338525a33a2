"""The memory estimate follows every level's width, not only the first."""

from __future__ import annotations

import numpy as np
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


# -- from a mutation review: resources.py and Segmenter.check_memory ---------------------


def test_the_budget_is_in_gibibytes_and_an_estimate_equal_to_it_fits():
    """--memory-budget-gb counts GiB (2**30 bytes), as the messages print it: a job
    needing exactly the budget runs, one byte more is refused."""
    from LiverTumorSegLib.resources import check_memory, estimate_peak_bytes

    header = ((200, 200, 100), (0.8, 0.8, 1.5), (1.5, 1.5, 1.5))
    need = estimate_peak_bytes(*header)
    assert check_memory(*header, budget_gb=need / 2 ** 30) == need
    with pytest.raises(ResourceError, match="Crop the volume"):
        check_memory(*header, budget_gb=(need - 1) / 2 ** 30)


def test_the_model_grid_bound_covers_a_slightly_rotated_input():
    """Scanner direction cosines are often a fraction of a degree off the axes: the
    model grid then spans one more voxel along x and y than the extent says, which the
    bound's margin of one voxel covers."""
    from LiverTumorSegLib.preprocess import model_grid_for
    from LiverTumorSegLib.resources import model_grid_size
    from LiverTumorSegLib.volume import Volume

    from .oracle import oracle_model, rotation

    card = oracle_model(spacing=(3.0, 3.0, 3.0)).card
    ct = Volume(np.zeros((30, 30, 30), np.int16), (3.0, 3.0, 3.0), direction=rotation("z", 0.5))
    bound = model_grid_size(ct.shape_xyz, ct.spacing, card.spacing_mm)
    assert np.all(bound >= np.array(model_grid_for(ct, card).shape_xyz))



def test_the_model_grid_bound_covers_any_rotated_input_given_its_direction(tmp_path):
    """The model grid covers a rotated input's whole bounding box: a CT tilted by 25 and
    12 degrees needs a 390 x 421 x 383 grid where its axes' extents give 275 x 275 x 335,
    2.5 times fewer voxels. With its direction the bound covers the grid, for the CLI's
    header check and for ``segment`` alike (it was too low by about 0.9 GB here)."""
    from LiverTumorSegLib.io import read_header, write_volume
    from LiverTumorSegLib.model.card import direction_from_orientation
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter
    from LiverTumorSegLib.preprocess import model_grid_for
    from LiverTumorSegLib.resources import estimate_peak_bytes, model_grid_size
    from LiverTumorSegLib.volume import Volume

    from .oracle import oracle_model, rotation

    card = oracle_model(spacing=(1.5, 1.5, 1.5)).card
    lps = direction_from_orientation(card.orientation)
    tilted = rotation("z", 25.0) @ rotation("x", -12.0)
    ct = Volume(np.broadcast_to(np.int16(0), (200, 512, 512)), (0.8, 0.8, 2.5), direction=tilted)
    grid = np.array(model_grid_for(ct, card).shape_xyz)
    assert np.prod(grid) > 2 * np.prod(model_grid_size(ct.shape_xyz, ct.spacing, card.spacing_mm))
    bound = model_grid_size(ct.shape_xyz, ct.spacing, card.spacing_mm, tilted, lps)
    assert np.all(bound >= grid) and np.all(bound <= grid + 2)
    rng = np.random.default_rng(3)
    for _ in range(50):
        direction = rotation("z", rng.uniform(-180, 180)) @ rotation("x", rng.uniform(-90, 90)) @ rotation(
            "y", rng.uniform(-90, 90))
        size = tuple(int(v) for v in rng.integers(5, 60, size=3))
        spacing = tuple(float(v) for v in rng.uniform(0.5, 4.0, size=3))
        v = Volume(np.broadcast_to(np.int16(0), size[::-1]), spacing, direction=direction)
        shape = np.array(model_grid_for(v, card).shape_xyz)
        b = model_grid_size(size, spacing, card.spacing_mm, direction, lps)
        assert np.all(b >= shape) and np.all(b <= shape + 2)
    assert estimate_peak_bytes(ct.shape_xyz, ct.spacing, card.spacing_mm, input_direction=tilted,
                               model_direction=lps) > estimate_peak_bytes(ct.shape_xyz, ct.spacing, card.spacing_mm)
    # the command line reads the direction from the header, without the voxels
    small = Volume(np.zeros((20, 40, 40), np.int16), (0.8, 0.8, 2.5), direction=tilted)
    write_volume(small, tmp_path / "tilted.nrrd")
    size, spacing, direction = read_header(tmp_path / "tilted.nrrd", with_direction=True)
    np.testing.assert_allclose(direction, tilted, atol=1e-6)
    seg = Segmenter(make_tiny_model(tmp_path / "m"), SegmentOptions(device="cpu", memory_budget_gb=100.0))
    assert seg.check_memory(size, spacing, direction) > seg.check_memory(size, spacing)

def test_a_batch_is_capped_by_the_windows_along_each_axis_of_a_non_cubic_patch(tmp_path):
    """The window count pairs the model grid's z, y, x with the patch's z, y, x: here
    2 x 2 x 2 = 8 windows, so any batch size from 8 up costs as much as 8."""
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    model = make_tiny_model(tmp_path / "m", widths=(4, 8), patch=(16, 32, 64))  # (z, y, x)
    header = ((64, 32, 16), (3.0, 3.0, 3.0))  # x, y, z: a 65 x 33 x 17 model grid

    def need(batch):
        return Segmenter(model, SegmentOptions(device="cpu", precision="fp32", batch_size=batch)).check_memory(*header)

    assert need(7) < need(8) == need(64)


def test_the_estimate_follows_the_precision_and_the_number_of_classes(tmp_path):
    """A bf16 run holds about half the activations of an fp32 one; each class adds a
    logit sum on the model grid (4 bytes a voxel)."""
    import dataclasses

    from LiverTumorSegLib.model import LoadedModel, load_model
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter
    from LiverTumorSegLib.resources import model_grid_size

    header = ((128, 128, 64), (3.0, 3.0, 3.0))
    model = load_model(make_tiny_model(tmp_path / "m", widths=(8, 16), patch=(32, 32, 32)))

    def need(model, precision):
        return Segmenter(model, SegmentOptions(device="cpu", precision=precision)).check_memory(*header)

    fp32, bf16 = need(model, "fp32"), need(model, "bf16")
    windows = 2  # the default batch size; the grid has more windows than that
    assert fp32 - bf16 == windows * 32 ** 3 * 8 * (ACTIVATION_BYTES["full"] - ACTIVATION_BYTES["half"])
    card = dataclasses.replace(model.card, architecture={**model.card.architecture, "num_classes": 4},
                               labels={**model.card.labels, "3": "vessel"})
    four = LoadedModel(card=card, network=model.network, folder=model.folder)
    n_model = float(np.prod(model_grid_size(*header, model.card.spacing_mm)))
    assert need(four, "fp32") - fp32 == int(4 * n_model)


def test_the_estimate_of_a_fast_growing_card_stays_above_its_measured_peaks():
    """README, "Memory and size limits": widths 2 then 96 with 128^3 patches peaked at up
    to 4,050 MiB in fp32 and 1,844 MiB in bf16 (one patch a batch). The per-level
    channel counts of :func:`_level_load` were set from those peaks; the runtime and
    one batch alone must stay above them."""
    from LiverTumorSegLib.resources import RUNTIME_BYTES

    for half, peak_mib in ((False, 4050), (True, 1844)):
        assert RUNTIME_BYTES + batch_activation_bytes((128,) * 3, (2, 96), 1, half) >= peak_mib * 2 ** 20

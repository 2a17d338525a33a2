"""Sliding-window inference: agrees with a plain reference and with MONAI; weighting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from LiverTumorSegLib.inference import (UNCOVERED_LOGIT, importance_map, patch_starts, plan_windows,
                                        sliding_window_inference)
from LiverTumorSegLib.model.unet import UNet3D


def _net(seed: int = 0) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(widths=(4, 8)).eval()


def _reference(image: np.ndarray, net, patch, overlap) -> np.ndarray:
    """Straightforward constant-weight average over the same patch grid."""
    plan = plan_windows(image.shape, patch, overlap)
    total = np.zeros((3,) + image.shape, dtype=np.float64)
    count = np.zeros(image.shape, dtype=np.float64)
    pz, py, px = patch
    with torch.no_grad():
        for z, y, x in plan.corners:
            tile = torch.from_numpy(image[z:z + pz, y:y + py, x:x + px][None, None].copy())
            total[:, z:z + pz, y:y + py, x:x + px] += net(tile)[0].numpy()
            count[z:z + pz, y:y + py, x:x + px] += 1
    return (total / count).astype(np.float32)


def test_patch_grid_covers_the_image_and_ends_flush():
    for size, patch, overlap in [(100, 32, 0.25), (32, 32, 0.5), (97, 16, 0.0), (200, 96, 8 / 96)]:
        starts = patch_starts(size, patch, overlap)
        assert starts[0] == 0 and starts[-1] == size - patch
        assert all(b - a <= int(patch * (1 - overlap)) for a, b in zip(starts, starts[1:]))


def test_constant_weighting_matches_plain_reference():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(40, 50, 37)).astype(np.float32)
    net = _net()
    ours = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, overlap=0.4,
                                    batch_size=3, weighting="constant")
    np.testing.assert_allclose(ours, _reference(image, net, (16, 16, 16), 0.4), atol=1e-5)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_weighting_matches_monai(mode):
    monai_inferers = pytest.importorskip("monai.inferers", reason="MONAI (test extra) is not installed")
    from monai.data.utils import compute_importance_map

    np.testing.assert_allclose(importance_map((16, 20, 12), mode),
                               compute_importance_map((16, 20, 12), mode, sigma_scale=0.125).numpy(), rtol=1e-6)
    rng = np.random.default_rng(2)
    image = rng.normal(size=(40, 45, 52)).astype(np.float32)
    net = _net(3)
    ours = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, overlap=0.25,
                                    batch_size=2, weighting=mode)
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(
            torch.from_numpy(image)[None, None], (16, 16, 16), 2, net, overlap=0.25, mode=mode, sigma_scale=0.125)
    np.testing.assert_allclose(ours, theirs[0].numpy(), atol=1e-5)


def test_gaussian_importance_map_is_as_documented():
    w = importance_map((16, 20, 12), "gaussian", sigma_scale=0.125)
    assert w.shape == (16, 20, 12) and w.dtype == np.float32
    # even sizes: the peak is half a voxel off every centre line
    peak = np.exp(-0.5 * ((0.5 / 2.0) ** 2 + (0.5 / 2.5) ** 2 + (0.5 / 1.5) ** 2))
    assert w.max() == pytest.approx(peak, rel=1e-6)
    assert w.min() == pytest.approx(1e-3)  # every voxel keeps some weight: MONAI's floor
    assert np.count_nonzero(w == w.min()) > 100
    odd = importance_map((9, 9, 9), "gaussian", sigma_scale=0.125)
    assert odd[4, 4, 4] == pytest.approx(1.0) and odd.min() == pytest.approx(1e-3)
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)  # symmetric
    assert np.all(importance_map((8, 8, 8), "constant") == 1)
    with pytest.raises(ValueError):
        importance_map((8, 8, 8), "triangle")


def test_gaussian_weighting_is_a_normalised_average():
    """A network that outputs a constant must give that constant back exactly."""

    class Constant(torch.nn.Module):
        def forward(self, x):
            out = torch.empty((x.shape[0], 3) + x.shape[2:])
            out[:, 0], out[:, 1], out[:, 2] = 0.5, -2.0, 3.0
            return out

    image = np.zeros((30, 41, 29), dtype=np.float32)
    out = sliding_window_inference(image, Constant(), (16, 16, 16), num_classes=3, overlap=0.5)
    np.testing.assert_allclose(out[:, 10, 20, 15], [0.5, -2.0, 3.0], rtol=1e-5)
    np.testing.assert_allclose(out[2], 3.0, rtol=1e-5)


def test_gaussian_differs_from_constant_where_patches_overlap():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(24, 24, 40)).astype(np.float32)
    net = _net(5)
    g = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, overlap=0.5, weighting="gaussian")
    c = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, overlap=0.5, weighting="constant")
    assert np.abs(g - c).max() > 1e-4


def test_small_image_is_padded_and_cropped_back():
    """Padded to a patch (x unevenly: 4 voxels before, 5 after), then cropped back where
    the image lies: the result is the explicitly padded image's, not shifted by a voxel."""
    image = np.random.default_rng(0).normal(size=(10, 20, 7)).astype(np.float32)
    net = _net()
    out = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, weighting="constant")
    assert out.shape == (3, 10, 20, 7)
    plan = plan_windows(image.shape, (16, 16, 16), 0.25)
    assert plan.pad == ((3, 3), (0, 0), (4, 5))
    padded = _reference(np.pad(image, plan.pad), net, (16, 16, 16), 0.25)
    np.testing.assert_allclose(out, padded[:, 3:13, :, 4:11], atol=1e-5)


def test_skipped_patches_become_background_and_are_not_computed():
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            out = torch.zeros((x.shape[0], 3) + x.shape[2:])
            out[:, 2] = 5.0  # everything computed would be tumor
            return out

    image = np.zeros((16, 16, 64), dtype=np.float32)
    mask = np.zeros(image.shape, dtype=bool)
    mask[:, :, :10] = True  # only the first patch along x touches the body
    out = sliding_window_inference(image, Counting(), (16, 16, 16), num_classes=3, overlap=0.0,
                                   batch_size=1, compute_mask=mask)
    assert sum(calls) == 1
    labels = out.argmax(0)
    assert (labels[:, :, :16] == 2).all() and (labels[:, :, 16:] == 0).all()
    # uncovered voxels: background 0, every other class UNCOVERED_LOGIT (not a tie at 0)
    assert (out[0, :, :, 16:] == 0.0).all() and (out[1:, :, :, 16:] == UNCOVERED_LOGIT).all()
    np.testing.assert_allclose(out[:, :, :, :16], np.array([0.0, 0.0, 5.0])[:, None, None, None]
                               * np.ones((1, 16, 16, 16)), rtol=1e-6)


def test_progress_and_cancel():
    from LiverTumorSegLib.errors import Cancelled

    image = np.zeros((32, 32, 64), dtype=np.float32)
    seen = []
    sliding_window_inference(image, _net(), (16, 16, 16), num_classes=3, overlap=0.0, batch_size=4,
                             progress=lambda f, m: seen.append(f))
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen) and len(seen) == 4
    reports = []  # 16 patches in batches of 3: the last batch is short, and progress stops at 1
    sliding_window_inference(image, _net(), (16, 16, 16), num_classes=3, overlap=0.0, batch_size=3,
                             progress=lambda f, m: reports.append((f, m)))
    fractions = [f for f, _ in reports]
    assert fractions == [3 / 16, 6 / 16, 9 / 16, 12 / 16, 15 / 16, 1.0] and max(fractions) <= 1.0
    assert fractions[-1] == 1.0 and reports[-1][1] == "inference: 16/16 patches"
    with pytest.raises(Cancelled):
        sliding_window_inference(image, _net(), (16, 16, 16), num_classes=3, cancel=lambda: True)


def test_bf16_autocast_stays_close_to_fp32():
    rng = np.random.default_rng(6)
    image = rng.normal(size=(32, 32, 32)).astype(np.float32)
    net = _net(7)
    full = sliding_window_inference(image, net, (16, 16, 16), num_classes=3)
    half = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, autocast_dtype=torch.bfloat16)
    agreement = (full.argmax(0) == half.argmax(0)).mean()
    assert agreement > 0.97


def test_gpu_out_of_memory_falls_back_to_cpu_accumulators(monkeypatch):
    """Simulated: the first accumulation on the 'GPU' raises OutOfMemoryError; the run
    moves its accumulators to the CPU, warns, and gives the same result."""
    import LiverTumorSegLib.inference as inference

    rng = np.random.default_rng(8)
    image = rng.normal(size=(20, 20, 40)).astype(np.float32)
    net = _net(9)
    expected = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, overlap=0.25)

    original_init, original_add = inference._Accumulators.__init__, inference._Accumulators._add
    state = {"raised": 0}

    def init_as_if_on_gpu(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.device = torch.device("cuda")  # tensors stay on the CPU; only the label is faked

    def add_that_runs_out_once(self, *args, **kwargs):
        if self.device.type == "cuda":
            state["raised"] += 1
            raise inference.OutOfMemoryError("CUDA out of memory (simulated)")
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(inference._Accumulators, "__init__", init_as_if_on_gpu)
    monkeypatch.setattr(inference._Accumulators, "_add", add_that_runs_out_once)
    with pytest.warns(UserWarning, match="GPU memory ran out"):
        out = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, overlap=0.25)
    assert state["raised"] == 1
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_aligned_box_contains_the_box_on_the_lattice():
    from LiverTumorSegLib.boxes import align_box

    rng = np.random.default_rng(7)
    for _ in range(500):
        n, p, d = int(rng.integers(5, 300)), int(rng.choice([16, 32, 96])), int(rng.choice([1, 2, 8]))
        start = int(rng.integers(0, n))
        stop = int(rng.integers(start + 1, n + 1))
        (out,) = align_box((slice(start, stop),), (n,), (p,), d)
        assert 0 <= out.start <= start and stop <= out.stop <= n
        assert out.stop - out.start >= min(p, n)
        if out.stop < n:  # not stopped by the far edge: on the lattice at both ends
            assert out.start % d == 0 and (out.stop - out.start) % d == 0
        else:  # flush with the far edge: on the lattice, or where the whole array's last window starts
            assert out.start % d == 0 or out.start == max(n - p, 0)
            if out.start == max(n - p, 0) and out.start % d:
                assert n - p <= start  # taken only when the box fits in that last window


def test_window_box_keeps_the_whole_grid_unless_a_crop_saves_windows():
    from LiverTumorSegLib.boxes import align_box, window_box

    rng = np.random.default_rng(11)
    kept = cropped = 0
    for _ in range(600):
        n, p, d = int(rng.integers(5, 300)), int(rng.choice([16, 32, 96])), int(rng.choice([1, 2, 8]))
        overlap = float(rng.choice([0.0, 8 / 96, 0.25, 0.5, 0.7]))
        start = int(rng.integers(0, n))
        stop = int(rng.integers(start + 1, n + 1))
        (out,) = window_box((slice(start, stop),), (n,), (p,), overlap, d, grid="body")
        (aligned,) = align_box((slice(start, stop),), (n,), (p,), d)
        assert 0 <= out.start <= start and stop <= out.stop <= n
        here = [out.start + s for s in patch_starts(out.stop - out.start, p, overlap)]
        whole = patch_starts(n, p, overlap)
        reaching = [s for s in whole if s < stop and s + p > start] if n > p else [0]
        (volume,) = window_box((slice(start, stop),), (n,), (p,), overlap, d, grid="volume")
        assert window_box((slice(start, stop),), (n,), (p,), overlap, d) == (volume,)  # the default
        assert [volume.start + s for s in patch_starts(volume.stop - volume.start, p, overlap)] == reaching
        own = patch_starts(max(aligned.stop - aligned.start, p), p, overlap)
        if out == aligned and here != reaching:  # the crop: only where it saves windows
            cropped += 1
            assert len(here) < len(reaching)
        else:  # exactly the whole array's windows that reach the box
            kept += 1
            assert here == reaching and len(here) <= len(own)
    assert kept > 100 and cropped > 100



def test_window_box_cover_takes_as_few_of_the_whole_grids_windows_as_cover_the_box():
    """``grid="cover"`` never moves a window: those the sliding window lays on its crop
    are the whole array's, every one reaches the box, together they cover it, and
    without the first or the last some voxel of the box would be left uncovered."""
    from LiverTumorSegLib.boxes import window_box

    rng = np.random.default_rng(12)
    fewer = 0
    for _ in range(600):
        n, p = int(rng.integers(5, 300)), int(rng.choice([16, 32, 96]))
        overlap = float(rng.choice([0.0, 8 / 96, 0.25, 0.5, 0.7]))
        start = int(rng.integers(0, n))
        stop = int(rng.integers(start + 1, n + 1))
        (out,) = window_box((slice(start, stop),), (n,), (p,), overlap, 8, grid="cover")
        here = [out.start + s for s in patch_starts(out.stop - out.start, p, overlap)]
        whole = patch_starts(n, p, overlap)
        reaching = [s for s in whole if s < stop and s + p > start] if n > p else [0]
        assert set(here) <= set(reaching) and len(here) >= 1
        covered = np.zeros(n, bool)
        for s in here:
            covered[s:s + p] = True
        assert covered[start:stop].all()
        assert out == slice(here[0], min(here[-1] + p, n))
        for dropped in (here[1:], here[:-1]):
            if len(here) > 1:
                rest = np.zeros(n, bool)
                for s in dropped:
                    rest[s:s + p] = True
                assert not rest[start:stop].all()
        fewer += len(here) < len(reaching)
    assert fewer > 100


def test_window_box_cover_on_the_benchmark_phantoms_body():
    """The item-2 benchmark case (a 274 x 274 x 300 model grid, 96^3 patches at 25 %%
    overlap, the body at y 58..223, x 37..256): the whole grid's windows at 178 along y
    add nothing the windows at 0, 72 and 144 do not cover."""
    from LiverTumorSegLib.boxes import window_box

    box = (slice(0, 300), slice(58, 223), slice(37, 256))
    assert window_box(box, (300, 274, 274), (96, 96, 96), 0.25, 8, grid="cover") == (
        slice(0, 300), slice(0, 240), slice(0, 274))
    assert window_box(box, (300, 274, 274), (96, 96, 96), 0.25, 8, grid="volume") == (
        slice(0, 300), slice(0, 274), slice(0, 274))

@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
def test_crop_to_body_computes_the_whole_volume_result_where_it_saves_no_windows(tiny_model, weighting, monkeypatch):
    """A context-dependent network, ``window_grid="body"``: where a grid on the body's box
    saves no windows, the result inside the run's box is the whole volume's. Laying the
    grid on the body's own box on every axis (the earlier crop) changes it."""
    from LiverTumorSegLib import boxes, pipeline
    from LiverTumorSegLib.model import load_model
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    model = load_model(tiny_model)  # 32^3 patches, divisor 2; at overlap 0.25 a stride of 24
    rng = np.random.default_rng(5)
    hu = np.full((70, 66, 75), -1000.0, dtype=np.float32)
    hu[3:62, 3:64, 36:75] = rng.uniform(-150.0, 200.0, size=(59, 61, 39))
    opts = dict(device="cpu", precision="fp32", weighting=weighting, overlap=0.25)
    whole, _ = Segmenter(model, SegmentOptions(crop_to_body=False, **opts)).infer_logits(hu)
    logits, box = Segmenter(model, SegmentOptions(crop_to_body=True, window_grid="body", **opts)).infer_logits(hu)
    # x: of the volume's windows at 0, 24 and 43, two reach the body's box (32..75 with
    # its 4-voxel margin), as many as a grid on that box needs: the run takes those two
    assert box == (slice(0, 70), slice(0, 66), slice(24, 75))
    # inside the body's box the same windows add up (between 24 and 32 the volume's window
    # at 0 adds to the whole run too, but that is air beyond the box)
    np.testing.assert_allclose(logits[:, :, :, 8:], whole[:, :, :, 32:], atol=2e-5, rtol=0)

    def grid_on_the_body(box, shape, patch_size, overlap, divisor, grid="body"):
        return boxes.align_box(box, shape, patch_size, divisor)

    monkeypatch.setattr(pipeline, "window_box", grid_on_the_body)
    moved, moved_box = Segmenter(model, SegmentOptions(crop_to_body=True, **opts)).infer_logits(hu)
    assert moved_box[2] == slice(32, 75)
    assert np.abs(moved - whole[(slice(None),) + moved_box]).max() > 1e-3


def test_window_grid_volume_reproduces_the_uncropped_run_where_the_body_grid_moves_windows(tiny_model):
    """Along x a grid on the body's box needs 2 windows, the volume's grid 3: with
    ``window_grid="body"`` the windows move (and a context-dependent network's result
    with them); with ``window_grid="volume"``, the default, they stay, and inside the
    body's box the result is the uncropped one."""
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.model import load_model
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    model = load_model(tiny_model)  # 32^3 patches, divisor 2; at overlap 0.25 windows at 0, 24, 43 of 75
    rng = np.random.default_rng(6)
    hu = np.full((40, 40, 75), -1000.0, dtype=np.float32)
    hu[4:36, 4:36, 30:60] = rng.uniform(-150.0, 200.0, size=(32, 32, 30))
    opts = dict(device="cpu", precision="fp32", weighting="constant", overlap=0.25)
    whole, _ = Segmenter(model, SegmentOptions(crop_to_body=False, **opts)).infer_logits(hu)
    body, body_box = Segmenter(model, SegmentOptions(window_grid="body", **opts)).infer_logits(hu)
    volume, volume_box = Segmenter(model, SegmentOptions(**opts)).infer_logits(hu)
    assert SegmentOptions().window_grid == "volume"
    assert body_box[2] == slice(26, 64)  # the body's box 26..64, on the lattice: 2 windows
    assert volume_box[2] == slice(0, 75)  # all 3 of the volume's windows reach it
    inside = (slice(None), slice(0, 40), slice(0, 40), slice(26, 64))
    np.testing.assert_allclose(volume[inside], whole[inside], atol=2e-5, rtol=0)
    assert np.abs(body[:, :, :, :] - whole[inside]).max() > 1e-3
    with pytest.raises(InputError, match="window grid"):
        Segmenter(model, SegmentOptions(window_grid="moving", **opts))



def test_minmax_scaling_uses_the_whole_volume_not_the_body_crop(tiny_model):
    """A card with per-volume min-max scaling (the seed recipe's) was trained on the whole
    volume's min..max. Padding outside the scanner's field of view (-3024 HU) lies
    outside the body's box: scaling the crop on its own min..max would hand the network
    other values than training did, and than the uncropped run does."""
    import dataclasses

    from LiverTumorSegLib.model import load_model
    from LiverTumorSegLib.model.card import IntensityTransform
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    model = load_model(tiny_model)
    card = dataclasses.replace(model.card, intensity=IntensityTransform("minmax", (-200.0, 250.0), (-1.0, 1.0)))
    model = dataclasses.replace(model, card=card)
    rng = np.random.default_rng(7)
    hu = np.full((40, 40, 75), -1000.0, dtype=np.float32)
    hu[4:36, 4:36, 30:60] = rng.uniform(-150.0, 200.0, size=(32, 32, 30))
    hu[:, :2, :2] = -3024.0  # the field of view's corner, far from the body
    seg = Segmenter(model, SegmentOptions(window_grid="body", device="cpu", precision="fp32", overlap=0.25))
    net_input, _, box = seg._network_input(hu)
    assert hu[box].min() == -1000.0  # the corner is outside the crop
    lo, hi = -3024.0, float(hu.max())
    np.testing.assert_allclose(net_input, (hu[box] - lo) * (2.0 / (hi - lo)) - 1.0, atol=1e-5)
    uncropped, _, _ = Segmenter(model, SegmentOptions(crop_to_body=False, device="cpu"))._network_input(hu)
    np.testing.assert_array_equal(net_input, uncropped[box])


class _PoolNet(torch.nn.Module):
    """Depends on nothing but the 4-voxel pooling lattice: no context across blocks."""

    divisor = 4

    def forward(self, x):
        u = torch.nn.functional.interpolate(torch.nn.functional.avg_pool3d(x, 4), scale_factor=4)
        return torch.cat([torch.zeros_like(u), u, -u], 1)


@pytest.mark.parametrize("align", [True, False])
def test_crop_to_body_keeps_the_pooling_lattice(tiny_model, monkeypatch, align):
    """On the body grid, cropped and uncropped runs agree exactly where both compute;
    unaligned they do not."""
    from LiverTumorSegLib import boxes
    from LiverTumorSegLib.model import LoadedModel, load_model
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    if not align:
        monkeypatch.setattr(boxes, "align_box", lambda box, *args: box)
    loaded = load_model(tiny_model)
    model = LoadedModel(card=loaded.card, network=_PoolNet(), folder=loaded.folder)
    rng = np.random.default_rng(3)
    hu = np.full((52, 60, 72), -1000.0, dtype=np.float32)
    hu[5:37, 9:50, 13:63] = rng.uniform(-150.0, 200.0, size=(32, 41, 50))  # body off the lattice
    opts = dict(device="cpu", precision="fp32", weighting="constant", overlap=0.25)
    logits, box = Segmenter(model, SegmentOptions(crop_to_body=True, window_grid="body", **opts)).infer_logits(hu)
    whole, _ = Segmenter(model, SegmentOptions(crop_to_body=False, **opts)).infer_logits(hu)
    computed = logits[1] > -1e3
    assert computed.mean() > 0.9
    same = np.allclose(logits[:, computed], whole[(slice(None),) + box][:, computed], atol=1e-6)
    assert same == align


# -- from a mutation review: boxes.py at the edges of its ranges -------------------------


def test_class_mask_at_the_ends_of_the_label_range():
    """The lookup table covers the whole label range (a 0/255 uint8 mask), and a
    negative class value selects nothing (it must not wrap to the last entry, 255)."""
    from LiverTumorSegLib.boxes import class_mask

    labels = np.array([[[0, 1, 255]]], dtype=np.uint8)
    assert class_mask(labels, (255,)).tolist() == [[[False, False, True]]]
    assert not class_mask(labels, (-1,)).any()
    wide = np.array([[[0, 65535]]], dtype=np.uint16)
    assert class_mask(wide, (65535,)).tolist() == [[[False, True]]]
    assert not class_mask(wide, (-1,)).any()


def test_align_box_starts_at_the_last_window_when_the_box_starts_there():
    """A box starting exactly where the whole array's last window starts fits
    in that window, so the aligned box starts there too (the docstring's rule)."""
    from LiverTumorSegLib.boxes import align_box

    n, p, d = 100, 32, 8          # last window at 68, not on the 8-lattice
    (out,) = align_box((slice(68, 98),), (n,), (p,), d)  # 64 + 40 > 100: flush
    assert out == slice(68, 100)


def test_patch_stride_truncates_like_monai():
    """The stride is truncated, as MONAI's _get_scan_interval takes int(patch * (1 - overlap))."""
    from LiverTumorSegLib.boxes import patch_starts

    assert patch_starts(200, 80, 0.33) == [0, 53, 106, 120]  # 80 * 0.67 = 53.6 -> 53


# -- from a mutation review: inference.py's network preparation, skipping and fallbacks --


class _Recorder(torch.nn.Module):
    """Wraps a network; records, per forward pass, the batch's size, dtype, whether it
    is channels-last-3d (and not plain contiguous), and the CPU autocast in force."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.seen = []

    def forward(self, x):
        self.seen.append(dict(n=x.shape[0], dtype=x.dtype,
                              channels_last=x.is_contiguous(memory_format=torch.channels_last_3d)
                              and not x.is_contiguous(),
                              autocast=torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return self.net(x)


def _two_channel_net(seed: int = 0) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(in_channels=2, widths=(4, 8)).eval()


def test_prepare_network_gives_an_eval_channels_last_copy_and_leaves_the_original():
    """On the CPU the original network keeps its mode, dtype and layout; the copy is in
    eval mode, channels-last-3d, and with bf16 weights (no autocast left) at bf16."""
    from LiverTumorSegLib.inference import prepare_network

    net = _net().train()
    prepared, left = prepare_network(net, "cpu", torch.bfloat16)
    assert prepared is not net and left is None and not prepared.training
    assert all(p.dtype == torch.bfloat16 for p in prepared.parameters())
    convs = [p for p in prepared.parameters() if p.ndim == 5]
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # really channels-last, not merely both
    assert net.training
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in net.parameters())
    full, left = prepare_network(net, "cpu", None)
    assert left is None and all(p.dtype == torch.float32 for p in full.parameters())
    _, left = prepare_network(net, "cpu", torch.float16)  # only bf16 becomes weights
    assert left == torch.float16


def test_a_prepared_bf16_network_gets_bf16_channels_last_batches_and_no_autocast():
    """Batches are fed in the network's own dtype and memory format (a float32 batch into
    bf16 weights fails); autocast is skipped when the input is already in its dtype."""
    from LiverTumorSegLib.inference import prepare_network

    image = np.random.default_rng(12).normal(size=(2, 16, 16, 24)).astype(np.float32)
    prepared, left = prepare_network(_two_channel_net(), "cpu", torch.bfloat16)
    spy = _Recorder(prepared)
    out = sliding_window_inference(image, spy, (16, 16, 16), num_classes=3, autocast_dtype=torch.bfloat16)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert spy.seen and all(s["dtype"] == torch.bfloat16 and s["channels_last"] and s["autocast"] is None
                            for s in spy.seen)


def test_an_unprepared_network_gets_plain_float32_batches_with_the_autocast_asked_for():
    """A contiguous float32 network is fed contiguous batches (a 1x1x1 head conv is
    contiguous both ways and must not count as channels-last), under the bf16 autocast
    asked for; without one, under none."""
    image = np.random.default_rng(13).normal(size=(2, 16, 16, 24)).astype(np.float32)
    spy = _Recorder(_two_channel_net())
    sliding_window_inference(image, spy, (16, 16, 16), num_classes=3, autocast_dtype=torch.bfloat16)
    assert spy.seen and all(s["dtype"] == torch.float32 and not s["channels_last"]
                            and s["autocast"] == torch.bfloat16 for s in spy.seen)
    spy.seen.clear()
    sliding_window_inference(image, spy, (16, 16, 16), num_classes=3)
    assert spy.seen and all(s["autocast"] is None for s in spy.seen)


def test_defaults_are_monai_like_overlap_batch_and_gaussian():
    """Documented defaults: overlap 0.25, 2 patches per batch, Gaussian weighting."""
    image = np.random.default_rng(14).normal(size=(40, 16, 16)).astype(np.float32)
    spy = _Recorder(_net(15))
    out = sliding_window_inference(image, spy, (16, 16, 16), num_classes=3)
    assert [s["n"] for s in spy.seen] == [2, 1]  # z starts 0, 12, 24 (stride 12); at 0.5: 0, 8, 16, 24
    gauss = sliding_window_inference(image, spy, (16, 16, 16), num_classes=3, overlap=0.25, weighting="gaussian")
    const = sliding_window_inference(image, spy, (16, 16, 16), num_classes=3, overlap=0.25, weighting="constant")
    np.testing.assert_array_equal(out, gauss)
    assert np.abs(out - const).max() > 1e-4


@pytest.mark.parametrize("overlap", [1.0, -0.1, 1.5])
def test_overlap_outside_zero_to_one_is_refused(overlap):
    """An overlap of 1 would give a zero stride (no grid at all); a negative one gaps."""
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(np.zeros((16, 16, 16), np.float32), _net(), (16, 16, 16), num_classes=3,
                                 overlap=overlap)


class _Tumor(torch.nn.Module):
    """Counts its patches; everything it computes is tumour (class 2)."""

    def __init__(self):
        super().__init__()
        self.patches = 0

    def forward(self, x):
        self.patches += x.shape[0]
        out = torch.zeros((x.shape[0], 3) + x.shape[2:])
        out[:, 2] = 5.0
        return out


def test_a_body_voxel_at_a_patch_s_far_corner_makes_that_patch_computed():
    """A patch is computed when any voxel of it is body, up to its last voxel on every
    axis (no off-by-one, no swapped y/x in the mask look-up)."""
    image = np.zeros((16, 32, 48), dtype=np.float32)
    mask = np.zeros(image.shape, dtype=bool)
    mask[15, 31, 47] = True  # the far corner of the last patch, (0, 16, 32)
    net = _Tumor()
    out = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, overlap=0.0, batch_size=1,
                                   compute_mask=mask)
    assert net.patches == 1
    labels = out.argmax(0)
    assert (labels[:, 16:, 32:] == 2).all()
    assert labels[:, :16, :].max() == 0 and labels[:, :, :32].max() == 0


def test_padding_of_a_small_image_never_counts_as_body():
    """The compute mask is padded with False: a patch whose real voxels are all air is
    skipped even though it covers the padding."""
    image = np.zeros((10, 16, 32), dtype=np.float32)  # z padded 3 + 3 to a patch
    mask = np.zeros(image.shape, dtype=bool)
    mask[:, :, :8] = True  # only the first patch along x touches the body
    net = _Tumor()
    out = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, overlap=0.0, batch_size=1,
                                   compute_mask=mask)
    assert net.patches == 1 and out.shape == (3, 10, 16, 32)
    labels = out.argmax(0)
    assert (labels[:, :, :16] == 2).all() and (labels[:, :, 16:] == 0).all()


def test_cancel_before_the_first_batch_computes_nothing():
    """cancel() is asked before every batch, the first included."""
    from LiverTumorSegLib.errors import Cancelled

    net = _Tumor()
    with pytest.raises(Cancelled):
        sliding_window_inference(np.zeros((16, 16, 64), np.float32), net, (16, 16, 16), num_classes=3,
                                 overlap=0.0, batch_size=1, cancel=lambda: True)
    assert net.patches == 0


def test_off_the_cpu_the_patch_loop_leaves_the_host_allocator_alone():
    """reuse_freed_memory is for the host's activations: with the network on another
    device ('meta' stands in for a GPU here) no block is opened."""
    from LiverTumorSegLib import allocator

    depths = []

    def net(x):
        depths.append(allocator._depth)
        return torch.zeros((x.shape[0], 3) + x.shape[2:])

    out = sliding_window_inference(np.zeros((16, 16, 32), np.float32), net, (16, 16, 16), num_classes=3,
                                   device="meta", accumulate_on="cpu")
    assert out.shape == (3, 16, 16, 32) and depths and all(d == 0 for d in depths)


def _fake_gpu_accumulators(monkeypatch, raise_on_call):
    """_Accumulators labelled 'cuda' (their tensors stay on the CPU) whose
    ``raise_on_call``-th accumulation on the 'GPU' runs out of memory."""
    import LiverTumorSegLib.inference as inference

    original_init, original_add = inference._Accumulators.__init__, inference._Accumulators._add
    state = {"calls": 0}

    def init_as_if_on_gpu(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.device = torch.device("cuda")

    def add_that_runs_out(self, *args, **kwargs):
        if self.device.type != "cuda":
            return original_add(self, *args, **kwargs)
        state["calls"] += 1
        if state["calls"] == raise_on_call:
            raise inference.OutOfMemoryError("CUDA out of memory (simulated)")
        self.device = torch.device("cpu")  # the real accumulation, on the tensors' own device
        try:
            return original_add(self, *args, **kwargs)
        finally:
            self.device = torch.device("cuda")

    monkeypatch.setattr(inference._Accumulators, "__init__", init_as_if_on_gpu)
    monkeypatch.setattr(inference._Accumulators, "_add", add_that_runs_out)
    return state


@pytest.mark.parametrize("copy_to_host", [False, True])
def test_gpu_out_of_memory_mid_run_keeps_what_was_accumulated(monkeypatch, copy_to_host):
    """Running out on the second of three batches: the first batch's sums move to the CPU
    with the accumulators (they must not be dropped), and the result is unchanged. On a
    real GPU ``.cpu()`` makes new tensors, inside the patch loop's inference mode
    (``copy_to_host``: a clone stands in for that copy); the mean must still be taken
    from them (an in-place update of an inference tensor outside inference mode is an
    error)."""
    rng = np.random.default_rng(8)
    image = rng.normal(size=(16, 16, 40)).astype(np.float32)  # x windows at 0, 12, 24
    net = _net(9)
    kwargs = dict(num_classes=3, overlap=0.25, batch_size=1)
    expected = sliding_window_inference(image, net, (16, 16, 16), **kwargs)
    state = _fake_gpu_accumulators(monkeypatch, raise_on_call=2)
    if copy_to_host:
        monkeypatch.setattr(torch.Tensor, "cpu", lambda self: self.clone())
    with pytest.warns(UserWarning, match="GPU memory ran out"):
        out = sliding_window_inference(image, net, (16, 16, 16), **kwargs)
    assert state["calls"] == 2
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_out_of_memory_on_the_cpu_is_raised_without_a_gpu_fallback(monkeypatch):
    """On the CPU there is nowhere to fall back to: the error propagates at once, with no
    misleading 'GPU memory ran out' warning and no retry."""
    import warnings

    import LiverTumorSegLib.inference as inference

    calls = []

    def add_that_runs_out(self, *args, **kwargs):
        calls.append(self.device.type)
        raise inference.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(inference._Accumulators, "_add", add_that_runs_out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(inference.OutOfMemoryError):
            sliding_window_inference(np.zeros((16, 16, 16), np.float32), _Tumor(), (16, 16, 16), num_classes=3)
    assert calls == ["cpu"]


def test_accumulators_that_do_not_fit_on_the_gpu_start_on_the_cpu(monkeypatch):
    """Out of GPU memory already when the accumulators are allocated: they are allocated
    on the CPU instead, with a warning, and the result is the same."""
    import LiverTumorSegLib.inference as inference

    original = inference._Accumulators._allocate

    def allocate_only_on_the_cpu(self, device):
        if device.type != "cpu":
            raise inference.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, device)

    image = np.random.default_rng(10).normal(size=(16, 20, 24)).astype(np.float32)
    net = _net(11)
    expected = sliding_window_inference(image, net, (16, 16, 16), num_classes=3)
    monkeypatch.setattr(inference._Accumulators, "_allocate", allocate_only_on_the_cpu)
    with pytest.warns(UserWarning, match="GPU memory ran out"):
        out = sliding_window_inference(image, net, (16, 16, 16), num_classes=3, accumulate_on="cuda")
    np.testing.assert_allclose(out, expected, atol=1e-6)


# -- from a mutation review: pipeline.py's crop to the body ------------------------------


def test_crop_to_body_runs_no_window_without_a_body_voxel():
    """Two small bodies at opposite corners: their box is the whole volume, so every one
    of its 27 windows reaches the box, but only the 2 holding a body voxel are run."""
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions

    from .oracle import ThresholdNet, oracle_model

    class Counting(ThresholdNet):
        patches = 0

        def forward(self, x):
            Counting.patches += x.shape[0]
            return super().forward(x)

    model = oracle_model(spacing=(3.0, 3.0, 3.0), patch=(32, 32, 32))
    model.network = Counting()
    hu = np.full((80, 80, 80), -1000.0, dtype=np.float32)  # windows at 0, 24 and 48 along each axis
    hu[2:10, 2:10, 2:10] = hu[70:78, 70:78, 70:78] = 40.0
    opts = dict(device="cpu", precision="fp32", overlap=0.25)
    for crop, expected in ((True, 2), (False, 27)):
        Counting.patches = 0
        logits, box = Segmenter(model, SegmentOptions(crop_to_body=crop, **opts)).infer_logits(hu)
        assert Counting.patches == expected and box == (slice(0, 80),) * 3
    assert (logits[1][4:8, 4:8, 4:8] > logits[0][4:8, 4:8, 4:8]).all()  # the bodies are liver to the oracle

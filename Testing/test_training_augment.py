"""Per-patch spatial augmentation: exact centre crop without a transform, the axis
conventions of a known rotation, a margin that keeps every source voxel inside the
sampled patch, and the queue and module that use it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "Training") not in sys.path:
    sys.path.insert(0, str(REPO / "Training"))

torch = pytest.importorskip("torch")
pytest.importorskip("torchio", reason="the training extras (pip install .[train]) are not installed")

from livertumorseg_training.augment import PatchAugmenter, margin_factor, sampled_patch_size  # noqa: E402
from livertumorseg_training.config import load_config  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Random test inputs are the same whatever ran before (torch's global generator)."""
    torch.manual_seed(0)


class FixedAugmenter(PatchAugmenter):
    """Applies one given voxel-space matrix (x, y, z order) to every sample."""

    def __init__(self, patch_size, matrix):
        super().__init__(patch_size, None, 1.0)
        self.matrix = torch.as_tensor(matrix, dtype=torch.float32)

    def matrices(self, n, generator=None):
        return self.matrix.expand(n, 3, 3)


def test_no_transform_is_an_exact_centre_crop():
    # grid_sample lands on the voxel centres to float rounding (a few 1e-6 of a voxel on
    # random values); a crop one voxel off would be wrong by about 1
    image = torch.randn(2, 1, 12, 14, 16)
    label = torch.randint(0, 3, (2, 12, 14, 16))
    out_image, out_label = PatchAugmenter((8, 10, 12), None, 0.0)(image, label)
    assert torch.allclose(out_image, image[:, :, 2:10, 2:12, 2:14], atol=1e-5)
    assert torch.equal(out_label, label[:, 2:10, 2:12, 2:14]) and out_label.dtype == label.dtype


def test_a_quarter_turn_about_z_rotates_the_yx_plane():
    # source offset = M @ output offset, (x, y, z): x_src = -y_out, y_src = x_out
    quarter = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    image = torch.randn(1, 1, 10, 12, 12)
    label = torch.randint(0, 3, (1, 10, 12, 12))
    out_image, out_label = FixedAugmenter((6, 8, 8), quarter)(image, label)
    crop = image[:, :, 2:8, 2:10, 2:10]
    # rot90 with k=1 over (y, x): out[y, x] = crop[x, n - 1 - y], i.e. source y = x_out, x = -y_out
    assert torch.allclose(out_image, torch.rot90(crop, k=1, dims=(3, 4)), atol=1e-5)
    assert not torch.allclose(out_image, torch.rot90(crop, k=3, dims=(3, 4)), atol=1e-5)
    assert torch.equal(out_label, torch.rot90(label[:, 2:8, 2:10, 2:10], k=1, dims=(2, 3)))


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (0.8, 0.8, 2.5)])
def test_the_margin_keeps_every_source_voxel_inside_the_sampled_patch(spacing):
    config = load_config("default", [f"data.spacing_mm=[{spacing[0]},{spacing[1]},{spacing[2]}]",
                                     "sampling.patch_size=[16,16,16]"])
    size = sampled_patch_size(config)
    assert all(s > 16 and (s - 16) % 2 == 0 for s in size)
    # a NaN shell one voxel thick: any output that reads it (with non-zero weight) is NaN
    image = torch.zeros((4, 1) + size)
    image[:, :, [0, -1]] = float("nan")
    image[:, :, :, [0, -1]] = float("nan")
    image[:, :, :, :, [0, -1]] = float("nan")
    label = torch.zeros((4,) + size, dtype=torch.long)
    augmenter = PatchAugmenter.from_config(config)
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        out, _ = augmenter(image, label, generator)
        assert not torch.isnan(out).any()
    # and the extreme corners of the angle box at the smallest scale
    deg = math.radians(float(config["augmentation"]["affine_degrees"]))
    from livertumorseg_training.augment import _rotation

    d = torch.diag(torch.tensor(config["data"]["spacing_mm"], dtype=torch.float32))
    for signs in ([1, 1, 1], [1, -1, 1], [-1, 1, 1], [1, 1, -1]):
        r = _rotation(torch.tensor([signs], dtype=torch.float32) * deg)[0]
        m = torch.linalg.inv(d) @ r @ d / min(config["augmentation"]["affine_scales"])
        out, _ = FixedAugmenter((16, 16, 16), m)(image[:1], label[:1])
        assert not torch.isnan(out).any()


def test_margin_factor_grows_with_angle_and_shrinking():
    assert margin_factor(None, 0.0) == 1.0
    assert margin_factor((1.0, 1.0), 10.0) > 1.0
    assert margin_factor((0.9, 1.1), 10.0) > margin_factor((1.0, 1.1), 10.0)
    assert margin_factor((0.9, 1.1), 20.0) > margin_factor((0.9, 1.1), 10.0)


def test_random_augmentation_keeps_labels_and_is_seeded():
    image = torch.randn(2, 1, 30, 30, 30)
    label = torch.randint(0, 3, (2, 30, 30, 30))
    augmenter = PatchAugmenter((20, 20, 20), (0.9, 1.1), 10.0, flip=True)
    a = augmenter(image, label, torch.Generator().manual_seed(3))
    b = augmenter(image, label, torch.Generator().manual_seed(3))
    c = augmenter(image, label, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert set(torch.unique(a[1]).tolist()) <= {0, 1, 2} and a[1].dtype == torch.long
    assert a[0].shape == (2, 1, 20, 20, 20) and a[1].shape == (2, 20, 20, 20)


def test_too_small_patches_are_refused():
    with pytest.raises(ValueError, match="smaller than the output patch"):
        PatchAugmenter((16, 16, 16))(torch.zeros(1, 1, 8, 16, 16), torch.zeros(1, 8, 16, 16, dtype=torch.long))


def test_training_queue_samples_with_the_margin_and_the_module_crops(tmp_path):
    from .test_training_data import make_dataset

    from livertumorseg_training.data import LiverDataModule
    from livertumorseg_training.module import LiverSegModule

    config = load_config("smoke", ["sampling.num_workers=0", "data.cache_workers=1",
                                   "sampling.patch_size=[8,8,8]", "model.widths=[4,8]"])
    data = make_dataset(tmp_path / "data", n=3)
    module = LiverDataModule(data, config, tmp_path / "cache")
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert tuple(batch["image"].shape[2:]) == sampled_patch_size(config) != (8, 8, 8)
    val = next(iter(module.val_dataloader())) if config["validation"]["mode"] == "patches" else None
    if val is not None:
        assert tuple(val["image"].shape[2:]) == (8, 8, 8)

    class Training:
        training = True

    net = LiverSegModule(config)
    net._trainer = Training()
    out = net.on_after_batch_transfer(dict(batch), 0)
    assert tuple(out["image"].shape[2:]) == (8, 8, 8) and tuple(out["label"].shape[1:]) == (8, 8, 8)
    Training.training = False
    untouched = net.on_after_batch_transfer(dict(batch), 0)
    assert untouched["image"] is batch["image"]


def test_fast_label_sampler_draws_as_torchio_label_sampler_does():
    """Class frequencies follow the probabilities renormalised over the classes present
    among valid centres; centres are voxels of the drawn class, spread over all of them."""
    import torchio as tio

    from livertumorseg_training.sampling import FastLabelSampler

    label = np.zeros((30, 30, 30), np.uint8)
    label[5:25, 5:25, 5:25] = 1
    label[10:12, 10:12, 10:12] = 2
    label[27:, 27:, 27:] = 2  # too close to the edge to centre a 10-voxel patch: never drawn
    subject = tio.Subject(label=tio.LabelMap(tensor=torch.from_numpy(label[None])))
    torch.manual_seed(0)
    sampler = FastLabelSampler((10, 10, 10), "label", {0: 0.2, 1: 0.3, 2: 0.5})
    counts, centres = np.zeros(3), set()
    for patch in sampler(subject, 3000):
        i, j, k = (int(v) for v in patch[tio.LOCATION][:3])
        centre = (i + 5, j + 5, k + 5)
        value = int(label[centre])
        counts[value] += 1
        if value == 2:
            centres.add(centre)
        assert patch["label"].shape == (1, 10, 10, 10)
    assert np.allclose(counts / counts.sum(), [0.2, 0.3, 0.5], atol=0.03)
    assert centres == {(a, b, c) for a in (10, 11) for b in (10, 11) for c in (10, 11)}
    only_liver = FastLabelSampler((10, 10, 10), "label", {1: 1.0, 3: 5.0})  # label 3 absent
    assert all(int(label[tuple(int(v) + 5 for v in p[tio.LOCATION][:3])]) == 1 for p in only_liver(subject, 20))
    with pytest.raises(RuntimeError, match="can centre a patch"):
        list(FastLabelSampler((10, 10, 10), "label", {3: 1.0})(subject, 1))


def test_intensity_scaled_on_the_patch_equals_the_engine_scaling():
    from LiverTumorSegLib.model.card import IntensityTransform
    from LiverTumorSegLib.preprocess import scale_intensity

    hu = torch.randint(-1100, 1500, (2, 1, 12, 12, 12)).to(torch.int16)
    augmenter = PatchAugmenter((12, 12, 12), None, 0.0, intensity=((-200.0, 250.0), (-1.0, 1.0)))
    out, _ = augmenter(hu, torch.zeros(2, 12, 12, 12, dtype=torch.long))
    expected = scale_intensity(hu.numpy().astype(np.float32), IntensityTransform("window", (-200.0, 250.0),
                                                                                 (-1.0, 1.0)))
    assert out.dtype == torch.float32 and np.allclose(out.numpy(), expected, atol=1e-6)
    shifted = PatchAugmenter((12, 12, 12), None, 0.0, intensity=((-200.0, 250.0), (-1.0, 1.0)),
                             hu_shift=50.0, hu_scale=(0.9, 1.1))(hu, torch.zeros(2, 12, 12, 12, dtype=torch.long))[0]
    assert not torch.allclose(shifted, out) and float(shifted.min()) >= -1.0 and float(shifted.max()) <= 1.0


def test_min_max_scaling_before_the_padding_gives_what_scaling_after_it_gave():
    import torchio as tio

    from livertumorseg_training.transforms import EngineIntensity, build_transforms

    config = load_config("seed", ["data.crop_or_pad=[20,18,16]", "sampling.patch_size=[8,8,8]",
                                  "sampling.pad_half_patch=true"])
    hu = torch.randint(-1024, 1500, (1, 22, 17, 15)).float()
    subject = tio.Subject(ct=tio.ScalarImage(tensor=hu), label=tio.LabelMap(tensor=torch.zeros_like(hu)))
    got = build_transforms(config, train=False)(subject)["ct"].data
    it = config["intensity"]
    old = tio.Compose([tio.CropOrPad((20, 18, 16), padding_mode="minimum"), tio.Pad((4, 4, 4), padding_mode="minimum"),
                       tio.Lambda(EngineIntensity(it["mode"], it["window_hu"], it["output_range"]),
                                  types_to_apply=[tio.INTENSITY])])(subject)["ct"].data
    assert got.shape == old.shape == (1, 28, 26, 24) and torch.allclose(got, old)


@pytest.mark.parametrize("source_zyx, target_xyz, pad_xyz", [
    ((9, 12, 7), (6, 15, 12), (2, 0, 3)),  # x cropped by one (odd), y and z padded
    ((10, 5, 8), (8, 8, 8), (1, 1, 1)),    # z cropped, y padded with a minimum from the cropped-away slice
    ((10, 9, 9), (8, 8, 8), (2, 2, 2)),    # only cropped: the padding takes the minimum of what is left
])
def test_reader_does_what_crop_or_pad_then_pad_do(tmp_path, source_zyx, target_xyz, pad_xyz):
    import torchio as tio

    from livertumorseg_training.transforms import (CachedArrayReader, CachedLabelMap, CachedScalarImage,
                                                   EngineIntensity, build_transforms, patch_to_zyx)

    rng = np.random.default_rng(3)
    hu = rng.integers(-900, 1500, source_zyx).astype(np.int16)
    hu[0] = -3000  # the first z slice is cropped away in the last two cases
    label = rng.integers(1, 3, source_zyx).astype(np.uint8)  # no 0: the label's own minimum pads it
    label[0] = 0
    np.save(tmp_path / "ct.npy", hu)
    np.save(tmp_path / "label.npy", label)
    affine = np.array([[-1.5, 0, 0, 10.0], [0, -1.5, 0, 20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])

    def raw(arr, dtype):
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 1, 0)[None]).astype(dtype))

    reference = tio.Compose([tio.CropOrPad(target_xyz, padding_mode="minimum"), tio.Pad(pad_xyz, padding_mode="minimum")])(
        tio.Subject(ct=tio.ScalarImage(tensor=raw(hu, np.float32), affine=affine),
                    label=tio.LabelMap(tensor=raw(label, np.uint8), affine=affine)))
    subject = tio.Subject(
        ct=CachedScalarImage(tmp_path / "ct.npy", reader=CachedArrayReader(affine, (4, 4, 4), -1024.0, "float32",
                                                                           pad_xyz, target_xyz)),
        label=CachedLabelMap(tmp_path / "label.npy", reader=CachedArrayReader(affine, (4, 4, 4), 0, "uint8",
                                                                             pad_xyz, target_xyz)))
    for name in ("ct", "label"):
        assert torch.equal(subject[name].data, reference[name].data), name
        assert np.allclose(subject[name].affine, reference[name].affine), name
        assert patch_to_zyx(subject[name].data).is_contiguous(), name  # loaded as the reader laid it out
    # the recipe's pipeline over the reader equals TorchIO's transforms over the raw volume
    config = load_config("seed", [f"data.crop_or_pad=[{','.join(map(str, target_xyz))}]",
                                  "sampling.patch_size=[8,8,8]", "sampling.pad_half_patch=true"])
    pad = (4, 4, 4)
    subject = tio.Subject(ct=tio.ScalarImage(tmp_path / "ct.npy", reader=CachedArrayReader(
        affine, (8, 8, 8), -1024.0, "float32", pad, target_xyz)))
    got = build_transforms(config, train=False, geometry_in_reader=True)(subject)["ct"].data
    it = config["intensity"]
    want = tio.Compose([tio.CropOrPad(target_xyz, padding_mode="minimum"), tio.Pad(pad, padding_mode="minimum"),
                        tio.Lambda(EngineIntensity(it["mode"], it["window_hu"], it["output_range"]))])(
        tio.Subject(ct=tio.ScalarImage(tensor=raw(hu, np.float32), affine=affine)))["ct"].data
    assert got.shape == want.shape and torch.allclose(got, want)


def test_reader_pads_to_the_patch_after_the_crop(tmp_path):
    from livertumorseg_training.transforms import CachedArrayReader

    np.save(tmp_path / "a.npy", np.arange(6 * 6 * 6, dtype=np.int16).reshape(6, 6, 6) - 100)
    tensor, _ = CachedArrayReader(np.eye(4), (8, 8, 8), -1024.0, "float32", (0, 0, 0), (4, 4, 4))(tmp_path / "a.npy")
    assert tensor.shape == (1, 8, 8, 8)  # cropped to 4, then padded to the patch with the minimum kept
    inner = tensor[0, 2:6, 2:6, 2:6]
    assert float(tensor[0, 0, 0, 0]) == float(inner.min()) and int(np.count_nonzero(tensor[0] == inner.min())) > 1


def test_with_noise_per_subject_the_padding_comes_after_the_noise():
    import torchio as tio

    from livertumorseg_training.transforms import build_transforms, reader_padding

    noisy = load_config("seed", ["augmentation.noise_std_hu=20", "sampling.pad_half_patch=true"])
    assert reader_padding(noisy, train=True) == (0, 0, 0)
    assert isinstance(build_transforms(noisy, train=True, geometry_in_reader=True).transforms[-1], tio.Pad)
    assert reader_padding(noisy, train=False) == (48, 48, 48)  # no noise outside training
    quiet = load_config("seed", ["sampling.pad_half_patch=true"])
    assert reader_padding(quiet, train=True) != (0, 0, 0)
    assert not any(isinstance(t, (tio.Pad, tio.CropOrPad))
                   for t in build_transforms(quiet, train=True, geometry_in_reader=True).transforms)

"""TorchIO pieces: reading cached arrays, the engine's intensity scaling, HU augmentation.

TorchIO images are (C, W, H, D) = (C, x, y, z) with a RAS affine; the cache and the
engine use (z, y, x) arrays in LPS. :class:`CachedArrayReader` makes the bridge and
:func:`patch_to_zyx` goes back, so the network sees patches in exactly the axis order
the engine's sliding window gives it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchio as tio

AIR_HU = -1024.0


class CachedArrayReader:
    """TorchIO ``reader``: a cached (z, y, x) ``.npy`` as a (1, x, y, z) tensor + RAS affine.

    Pads every side by ``pad_xyz`` voxels, and symmetrically any axis still smaller than
    ``min_shape_xyz`` so that a patch always fits, with ``pad_value``; the affine is
    shifted accordingly. The padded array is allocated once and the cached voxels are
    copied into it (one pass; no separate padding transform). Picklable, so TorchIO's
    loader workers can use it.
    """

    def __init__(self, ijk_to_ras: np.ndarray, min_shape_xyz: Sequence[int], pad_value: float, dtype: str,
                 pad_xyz: Sequence[int] = (0, 0, 0)) -> None:
        self.ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
        self.min_shape_xyz = tuple(int(s) for s in min_shape_xyz)
        self.pad_value = float(pad_value)
        self.dtype = dtype
        self.pad_xyz = tuple(int(p) for p in pad_xyz)

    def __call__(self, path) -> tuple:
        zyx = np.load(str(path), mmap_mode="r")
        shape = [n + 2 * p for n, p in zip(zyx.shape[::-1], self.pad_xyz)]
        before = [p + max(m - n, 0) // 2 for n, m, p in zip(shape, self.min_shape_xyz, self.pad_xyz)]
        shape = [max(n, m) for n, m in zip(shape, self.min_shape_xyz)]
        xyz = np.full(shape, self.pad_value, dtype=self.dtype)
        nx, ny, nz = zyx.shape[::-1]
        xyz[before[0]:before[0] + nx, before[1]:before[1] + ny, before[2]:before[2] + nz] = zyx.transpose(2, 1, 0)
        affine = self.ijk_to_ras.copy()
        affine[:3, 3] = affine[:3, :3] @ -np.asarray(before, dtype=np.float64) + affine[:3, 3]
        return torch.from_numpy(xyz[None]), affine


class EngineIntensity:
    """HU -> network input with the engine's :func:`~LiverTumorSegLib.preprocess.scale_intensity`.

    Used through ``tio.Lambda`` on intensity images only, so training scales exactly as
    inference does (window or per-volume min-max, from the recipe's model card values).
    """

    def __init__(self, mode: str, window_hu: Sequence[float], output_range: Sequence[float]) -> None:
        self.mode = mode
        self.window_hu = tuple(float(v) for v in window_hu)
        self.output_range = tuple(float(v) for v in output_range)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        from LiverTumorSegLib.model.card import IntensityTransform
        from LiverTumorSegLib.preprocess import scale_intensity

        transform = IntensityTransform(self.mode, self.window_hu, self.output_range)
        return torch.from_numpy(scale_intensity(tensor.numpy().astype(np.float32, copy=False), transform))


class RandomHULinear(tio.IntensityTransform):
    """Random scanner and contrast-phase variation: ``hu * a + b`` with ``a ~ U(*scale)``
    and ``b ~ U(-shift_hu, shift_hu)``, applied to intensity images before windowing.

    Scaling about 0 HU brightens soft tissue (liver, tumor) while fat stays darker than
    water, roughly as contrast enhancement does.
    """

    def __init__(self, shift_hu: float = 0.0, scale: Sequence[float] = (1.0, 1.0), **kwargs) -> None:
        super().__init__(**kwargs)
        self.shift_hu = float(shift_hu)
        self.scale = (float(scale[0]), float(scale[1]))
        self.args_names = ["shift_hu", "scale"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        a = float(torch.empty(1).uniform_(*self.scale))
        b = float(torch.empty(1).uniform_(-self.shift_hu, self.shift_hu)) if self.shift_hu else 0.0
        for image in self.get_images(subject):
            image.set_data(image.data.float() * a + b)
        return subject


def intensity_per_patch(config: dict, train: bool) -> bool:
    """Whether HU augmentation and intensity scaling act on the sampled patches (the
    training device's job, :class:`~livertumorseg_training.augment.PatchAugmenter`)
    rather than on whole volumes: for training with a fixed HU window, which needs no
    statistics of the whole volume."""
    return bool(train and config["intensity"]["mode"] == "window")


def subject_padding(config: dict, train: bool) -> tuple:
    """Voxels (x, y, z) added on every side of a subject so that the label sampler's
    centres cover what the recipe intends: half a patch with ``sampling.pad_half_patch``
    (half the sampled patch, margin included, for training); otherwise, for training
    with spatial augmentation, just the margin, so that the centres stay those the
    network's own patch allows, as with a whole-volume ``RandomAffine``."""
    from .augment import sampled_patch_size

    patch = [int(p) for p in config["sampling"]["patch_size"]]
    sampled = list(sampled_patch_size(config)) if train else patch
    if config["sampling"]["pad_half_patch"]:
        pad_zyx = [s // 2 for s in sampled]
    else:
        pad_zyx = [(s - p) // 2 for s, p in zip(sampled, patch)]
    return tuple(reversed(pad_zyx))


def reader_padding(config: dict, train: bool) -> tuple:
    """The padding the cache reader adds (:func:`subject_padding`), unless a CropOrPad
    must come first (then :func:`build_transforms` pads after it)."""
    if config["data"]["crop_or_pad"]:
        return (0, 0, 0)
    return subject_padding(config, train)


def build_transforms(config: dict, train: bool) -> tio.Transform:
    """The recipe's per-subject TorchIO pipeline: [CropOrPad], [HU augmentation],
    [engine intensity], [Pad].

    Spatial augmentation (rotation, scaling, flips) acts on the sampled training
    patches (:class:`~livertumorseg_training.augment.PatchAugmenter`, on the training
    device), which are sampled with a margin for it; with a fixed HU window, so do the
    HU augmentation and the intensity scaling (:func:`intensity_per_patch`), which leaves
    nothing to do per subject. Padding (:func:`subject_padding`: half a patch with
    ``sampling.pad_half_patch``, since TorchIO's samplers only centre patches at least
    half a patch from the edges; else the augmentation margin) is added by the cache
    reader (:func:`reader_padding`) or, after a CropOrPad, here. It fills intensity
    images with their minimum (air) and labels with 0.
    """
    steps = []
    crop = config["data"]["crop_or_pad"]
    if crop:
        steps.append(tio.CropOrPad(tuple(int(v) for v in crop), padding_mode="minimum"))
    aug = config["augmentation"]
    per_patch = intensity_per_patch(config, train)
    if train and not per_patch:
        if aug["hu_shift"] or tuple(aug["hu_scale"]) != (1.0, 1.0):
            steps.append(RandomHULinear(aug["hu_shift"], aug["hu_scale"]))
        if aug["noise_std_hu"]:
            steps.append(tio.RandomNoise(std=(0.0, float(aug["noise_std_hu"]))))
    if not per_patch:  # before the padding, which only adds the minimum: same result, fewer voxels
        it = config["intensity"]
        steps.append(tio.Lambda(EngineIntensity(it["mode"], it["window_hu"], it["output_range"]),
                                types_to_apply=[tio.INTENSITY]))
    pad_xyz = subject_padding(config, train)
    if crop and any(pad_xyz):
        steps.append(tio.Pad(pad_xyz, padding_mode="minimum"))
    return tio.Compose(steps)


def patch_to_zyx(tensor: torch.Tensor) -> torch.Tensor:
    """(..., x, y, z) TorchIO spatial axes -> (..., z, y, x), the engine's order."""
    return tensor.permute(*range(tensor.ndim - 3), tensor.ndim - 1, tensor.ndim - 2, tensor.ndim - 3)

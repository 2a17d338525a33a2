"""TorchIO pieces: reading cached arrays, the engine's intensity scaling, HU augmentation.

TorchIO images are (C, W, H, D) = (C, x, y, z) with a RAS affine; the cache and the
engine use (z, y, x) arrays in LPS. :class:`CachedArrayReader` makes the bridge and
:func:`patch_to_zyx` goes back, so the network sees patches in exactly the axis order
the engine's sliding window gives it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torchio as tio

AIR_HU = -1024.0


class CachedArrayReader:
    """TorchIO ``reader``: a cached (z, y, x) ``.npy`` as a (1, x, y, z) tensor + RAS affine.

    In one pass over the cached voxels it does what would otherwise be up to three
    whole-volume TorchIO transforms, each with its own copy:

    1. with ``crop_or_pad_xyz``: ``tio.CropOrPad(crop_or_pad_xyz, padding_mode="minimum")``
       (centred; an odd difference puts the extra voxel first; padding takes the cached
       volume's minimum);
    2. ``pad_xyz`` voxels on every side, and symmetric padding of any axis still smaller
       than ``min_shape_xyz`` so that a patch always fits. The value is ``pad_value``, or,
       after a crop-or-pad, the minimum of its result (``tio.Pad(padding_mode="minimum")``).

    The affine is shifted accordingly. The voxels are laid out (z, y, x) in memory, as the
    cache and the network have them, and returned as a transposed (x, y, z) view, so the
    copy out of the cache is contiguous and so is every patch once it is put back in the
    engine's order (:func:`patch_to_zyx`). Picklable, so TorchIO's loader workers can use it.
    """

    def __init__(self, ijk_to_ras: np.ndarray, min_shape_xyz: Sequence[int], pad_value: float, dtype: str,
                 pad_xyz: Sequence[int] = (0, 0, 0), crop_or_pad_xyz: Optional[Sequence[int]] = None) -> None:
        self.ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
        self.min_shape_xyz = tuple(int(s) for s in min_shape_xyz)
        self.pad_value = float(pad_value)
        self.dtype = dtype
        self.pad_xyz = tuple(int(p) for p in pad_xyz)
        self.crop_or_pad_xyz = tuple(int(s) for s in crop_or_pad_xyz) if crop_or_pad_xyz else None

    def __call__(self, path) -> tuple:
        zyx = np.load(str(path), mmap_mode="r")
        source = zyx.shape[::-1]
        if self.crop_or_pad_xyz:  # tio.CropOrPad's centred split: ceil(n / 2) first, floor(n / 2) last
            target = self.crop_or_pad_xyz
            src_first = [math.ceil(max(n - t, 0) / 2) for n, t in zip(source, target)]
            inner_first = [math.ceil(max(t - n, 0) / 2) for n, t in zip(source, target)]
            copied = [min(n, t) for n, t in zip(source, target)]
        else:
            target, src_first, inner_first, copied = source, [0, 0, 0], [0, 0, 0], source
        shape = [n + 2 * p for n, p in zip(target, self.pad_xyz)]
        before = [p + max(m - n, 0) // 2 for n, m, p in zip(shape, self.min_shape_xyz, self.pad_xyz)]
        shape = [max(n, m) for n, m in zip(shape, self.min_shape_xyz)]
        buffer = np.empty(shape[::-1], dtype=self.dtype)
        # boxes in the buffer's (z, y, x) order: the crop-or-pad result, and the cached voxels in it
        inner = tuple(slice(b, b + t) for b, t in zip(before[::-1], target[::-1]))
        dest = tuple(slice(b + i, b + i + c) for b, i, c in zip(before[::-1], inner_first[::-1], copied[::-1]))
        buffer[dest] = zyx[tuple(slice(s, s + c) for s, c in zip(src_first[::-1], copied[::-1]))]
        outer_value = self.pad_value
        if self.crop_or_pad_xyz:
            outer_value = buffer[dest].min()
            if list(copied) != list(target):  # CropOrPad padded some axis with the volume's minimum
                source_min = zyx.min()
                _fill_around(buffer, inner, dest, source_min)
                outer_value = min(outer_value, source_min)
        _fill_around(buffer, tuple(slice(0, n) for n in buffer.shape), inner, outer_value)
        offset = np.asarray(before, dtype=np.float64) + np.asarray(inner_first) - np.asarray(src_first)
        affine = self.ijk_to_ras.copy()
        affine[:3, 3] = affine[:3, :3] @ -offset + affine[:3, 3]
        return torch.from_numpy(buffer.transpose(2, 1, 0)[None]), affine


def _fill_around(array: np.ndarray, outer: tuple, inner: tuple, value) -> None:
    """Set the voxels of box ``outer`` that are outside box ``inner`` (slices) to ``value``."""
    box = list(outer)
    for axis, (o, i) in enumerate(zip(outer, inner)):
        for part in (slice(o.start, i.start), slice(i.stop, o.stop)):
            if part.stop > part.start:
                sl = list(box)
                sl[axis] = part
                array[tuple(sl)] = value
        box[axis] = i  # later axes only need the part not filled yet


class _OneFileLoad:
    """Loads a one-file image as the reader gives it. TorchIO's ``Image.load`` joins the
    files' tensors with ``torch.cat`` even when there is one, which copies the whole
    volume and, for the reader's transposed view, reorders it in memory."""

    def load(self) -> None:
        paths = self._as_path_list()
        if self._loaded or len(paths) != 1:
            return super().load()
        tensor, affine = self.read_and_check(paths[0])
        self.set_data(tensor)
        self.affine = affine
        self._loaded = True


class CachedScalarImage(_OneFileLoad, tio.ScalarImage):
    """``tio.ScalarImage`` for a :class:`CachedArrayReader` file (see :class:`_OneFileLoad`)."""


class CachedLabelMap(_OneFileLoad, tio.LabelMap):
    """``tio.LabelMap`` for a :class:`CachedArrayReader` file (see :class:`_OneFileLoad`)."""


def intensity_transform(config: dict):
    """The model card's intensity transform for a recipe."""
    from LiverTumorSegLib.model.card import IntensityTransform

    it = config["intensity"]
    return IntensityTransform(mode=str(it["mode"]), window_hu=tuple(float(v) for v in it["window_hu"]),
                              output_range=tuple(float(v) for v in it["output_range"]))


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


def noise_per_subject(config: dict, train: bool) -> bool:
    """Whether Gaussian noise is added to whole subjects (training without
    :func:`intensity_per_patch`)."""
    return bool(train and not intensity_per_patch(config, train) and config["augmentation"]["noise_std_hu"])


def reader_padding(config: dict, train: bool) -> tuple:
    """The padding :class:`CachedArrayReader` adds: :func:`subject_padding`, except after
    a CropOrPad in a recipe with per-subject noise, where the padding must come after the
    noise (as ``tio.Pad(padding_mode="minimum")``, one constant) and
    :func:`build_transforms` adds it."""
    if config["data"]["crop_or_pad"] and noise_per_subject(config, train):
        return (0, 0, 0)
    return subject_padding(config, train)


def build_transforms(config: dict, train: bool, geometry_in_reader: bool = False) -> tio.Transform:
    """The recipe's per-subject TorchIO pipeline: [CropOrPad], [HU augmentation],
    [engine intensity], [Pad].

    Spatial augmentation (rotation, scaling, flips) acts on the sampled training
    patches (:class:`~livertumorseg_training.augment.PatchAugmenter`, on the training
    device), which are sampled with a margin for it; with a fixed HU window, so do the
    HU augmentation and the intensity scaling (:func:`intensity_per_patch`), which leaves
    nothing to do per subject. Padding (:func:`subject_padding`: half a patch with
    ``sampling.pad_half_patch``, since TorchIO's samplers only centre patches at least
    half a patch from the edges; else the augmentation margin) fills intensity images
    with their minimum (air) and labels with 0.

    ``geometry_in_reader``: the subjects come from :class:`CachedArrayReader`, which has
    done the CropOrPad and the padding (:func:`reader_padding`) already (the training
    data module's case), so neither is repeated here. The intensity steps then run after
    the padding, which gives the same result: the padding only adds the minimum, a
    positive HU scale and a shift keep it the minimum, a min-max scaling is unchanged by
    it and a window scaling maps it to its own minimum. Noise would not keep it, so with
    per-subject noise the reader leaves the padding to the end of this pipeline.

    Every step transforms the subject in place (``copy=False``): the queue loads a fresh
    subject on every visit, so there is nothing to protect, and TorchIO's default deep
    copy would duplicate the whole volume once per step.
    """
    steps = []
    crop = config["data"]["crop_or_pad"]
    if crop and not geometry_in_reader:
        steps.append(tio.CropOrPad(tuple(int(v) for v in crop), padding_mode="minimum", copy=False))
    aug = config["augmentation"]
    per_patch = intensity_per_patch(config, train)
    if train and not per_patch and (aug["hu_shift"] or tuple(aug["hu_scale"]) != (1.0, 1.0)):
        steps.append(RandomHULinear(aug["hu_shift"], aug["hu_scale"], copy=False))
    if noise_per_subject(config, train):
        steps.append(tio.RandomNoise(std=(0.0, float(aug["noise_std_hu"])), copy=False))
    if not per_patch:  # before any padding done here: same result, fewer voxels
        it = config["intensity"]
        steps.append(tio.Lambda(EngineIntensity(it["mode"], it["window_hu"], it["output_range"]),
                                types_to_apply=[tio.INTENSITY], copy=False))
    pad_xyz = subject_padding(config, train)
    padded_by_reader = geometry_in_reader and reader_padding(config, train) == pad_xyz
    if crop and any(pad_xyz) and not padded_by_reader:
        steps.append(tio.Pad(pad_xyz, padding_mode="minimum", copy=False))
    return tio.Compose(steps, copy=False)


def patch_to_zyx(tensor: torch.Tensor) -> torch.Tensor:
    """(..., x, y, z) TorchIO spatial axes -> (..., z, y, x), the engine's order."""
    return tensor.permute(*range(tensor.ndim - 3), tensor.ndim - 1, tensor.ndim - 2, tensor.ndim - 3)

"""Spatial augmentation of patches, not of whole volumes.

TorchIO's ``RandomAffine`` in the subject pipeline resamples the whole CT (and its
label) on every visit of a subject, to cut a few patches out of it afterwards. Here the
queue instead samples each patch with a margin (:func:`sampled_patch_size`) around the
same label-drawn centre, and :class:`PatchAugmenter` resamples only the patch: random
rotation about each axis, random scale per axis and optional flips, the patch's centre
kept. It runs on batches, on the training device (a Lightning hook), so on a GPU it
costs almost nothing. The margin is large enough that no output voxel samples outside
the sampled patch, so the result equals the same transform applied to the whole volume
and cropped (up to interpolation at the volume's own edges). nnU-Net augments in the
same order (patch first, then spatial transform).

Axis conventions: batches are (N, C, Z, Y, X); angles and scales are drawn per axis, as
TorchIO's ``RandomAffine`` draws them; rotations act in millimetres, so anisotropic
voxel spacings are handled.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def _rotation(angles_rad: torch.Tensor) -> torch.Tensor:
    """(N, 3) angles about x, y, z -> (N, 3, 3) rotation matrices Rz @ Ry @ Rx (x, y, z order)."""
    a, b, c = angles_rad[:, 0], angles_rad[:, 1], angles_rad[:, 2]
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    rx = torch.stack([one, zero, zero, zero, a.cos(), -a.sin(), zero, a.sin(), a.cos()], 1).view(-1, 3, 3)
    ry = torch.stack([b.cos(), zero, b.sin(), zero, one, zero, -b.sin(), zero, b.cos()], 1).view(-1, 3, 3)
    rz = torch.stack([c.cos(), -c.sin(), zero, c.sin(), c.cos(), zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def margin_factor(scales: Optional[Sequence[float]], degrees: float, spacing_xyz: Sequence[float] = (1, 1, 1)) -> float:
    """How many times larger (per axis, in voxels) the sampled patch must be than the
    output patch so that every output voxel's source lies inside it.

    The source of output offset ``v`` (voxels from the centre) is ``M v`` with
    ``M = D^-1 R S^-1 D`` (``D`` the spacing); its largest coordinate over the patch's
    corners is at most the largest row sum of ``|M|`` times the half-width. That bound is
    taken at the extreme angles (every combination of 0 and +-degrees per axis) and the
    smallest scale.
    """
    s_min = min(scales) if scales else 1.0
    deg = float(degrees or 0.0)
    spacing = torch.tensor([float(s) for s in spacing_xyz], dtype=torch.float64)
    worst = 1.0
    for combo in itertools.product((-deg, 0.0, deg), repeat=3):
        r = _rotation(torch.tensor([combo], dtype=torch.float64) * math.pi / 180.0)[0]
        m = torch.diag(1.0 / spacing) @ r @ torch.diag(spacing) / s_min
        worst = max(worst, float(m.abs().sum(1).max()))
    return worst


def sampled_patch_size(config: dict) -> Tuple[int, int, int]:
    """(z, y, x) size of the patches the training queue samples: the network's patch,
    enlarged by :func:`margin_factor` (plus one voxel for interpolation) and kept even,
    so that the centre crop is exact. Without spatial augmentation, the patch itself."""
    patch = [int(p) for p in config["sampling"]["patch_size"]]
    aug = config["augmentation"]
    if not (aug["affine_scales"] or aug["affine_degrees"]):
        return tuple(patch)
    factor = margin_factor(aug["affine_scales"], aug["affine_degrees"], config["data"]["spacing_mm"])
    out = []
    for p in patch:
        size = math.ceil(p * factor) + 2
        out.append(size + (size - p) % 2)
    return tuple(out)


class PatchAugmenter:
    """Random affine (rotation and per-axis scale about the patch centre) and flips of a batch.

    Args:
        patch_size: (z, y, x) output size; inputs larger than it are centre-cropped by the
            same resampling.
        scales: (min, max) per-axis scale, as in ``tio.RandomAffine``; > 1 zooms in.
            None or empty: no scaling.
        degrees: rotation about each axis, uniform in +-degrees.
        spacing_xyz: voxel spacing (mm), so rotations are rigid in millimetres.
        flip: flip each axis with probability 1/2.
        intensity: ``(window_hu, output_range)`` when the patches arrive in HU and are
            to be scaled here (after the resampling, as the engine scales its input);
            None when they arrive already scaled.
        hu_shift, hu_scale, noise_std_hu: HU augmentation before the scaling (with
            ``intensity`` only): ``hu * a + b`` with ``a ~ U(hu_scale)``,
            ``b ~ U(-hu_shift, hu_shift)``, then Gaussian noise of a standard deviation
            drawn in ``[0, noise_std_hu]``, per patch.
    """

    def __init__(self, patch_size: Sequence[int], scales: Optional[Sequence[float]] = (0.9, 1.1),
                 degrees: float = 10.0, spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0), flip: bool = False,
                 intensity: Optional[tuple] = None, hu_shift: float = 0.0, hu_scale: Sequence[float] = (1.0, 1.0),
                 noise_std_hu: float = 0.0) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.scales = tuple(float(s) for s in scales) if scales else None
        self.degrees = float(degrees or 0.0)
        self.spacing = torch.tensor([float(s) for s in spacing_xyz], dtype=torch.float32)
        self.flip = bool(flip)
        self.intensity = intensity
        self.hu_shift, self.hu_scale = float(hu_shift or 0.0), tuple(float(v) for v in hu_scale)
        self.noise_std_hu = float(noise_std_hu or 0.0)

    @classmethod
    def from_config(cls, config: dict, intensity_here: Optional[bool] = None) -> "PatchAugmenter":
        """The recipe's augmenter; ``intensity_here`` defaults to what the training queue
        does (:func:`~livertumorseg_training.transforms.intensity_per_patch`)."""
        from .transforms import intensity_per_patch

        aug, it = config["augmentation"], config["intensity"]
        if intensity_here is None:
            intensity_here = intensity_per_patch(config, train=True)
        return cls(config["sampling"]["patch_size"], aug["affine_scales"], aug["affine_degrees"],
                   config["data"]["spacing_mm"], bool(aug["flip"]),
                   intensity=(tuple(it["window_hu"]), tuple(it["output_range"])) if intensity_here else None,
                   hu_shift=aug["hu_shift"], hu_scale=aug["hu_scale"], noise_std_hu=aug["noise_std_hu"])

    def _scale_intensity(self, image: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """HU augmentation, then the engine's window scaling (see ``scale_intensity``)."""
        n = image.shape[0]
        shape = (n,) + (1,) * (image.ndim - 1)
        lo_s, hi_s = self.hu_scale
        if self.hu_shift or (lo_s, hi_s) != (1.0, 1.0):
            a = lo_s + (hi_s - lo_s) * torch.rand(n, generator=generator)
            b = (torch.rand(n, generator=generator) * 2 - 1) * self.hu_shift
            image = image * a.view(shape).to(image.device) + b.view(shape).to(image.device)
        if self.noise_std_hu:
            std = torch.rand(n, generator=generator) * self.noise_std_hu
            noise = torch.randn(image.shape, generator=generator).to(image.device)
            image = image + noise * std.view(shape).to(image.device)
        (lo, hi), (out_lo, out_hi) = self.intensity
        return (image.clamp(lo, hi) - lo) * ((out_hi - out_lo) / (hi - lo)) + out_lo

    @property
    def spatial(self) -> bool:
        return bool(self.scales) or self.degrees > 0

    def matrices(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n, 3, 3) voxel-space maps from output offsets to source offsets (x, y, z order)."""
        angles = (torch.rand(n, 3, generator=generator) * 2 - 1) * self.degrees * math.pi / 180.0
        if self.scales:
            lo, hi = self.scales
            scale = lo + (hi - lo) * torch.rand(n, 3, generator=generator)
        else:
            scale = torch.ones(n, 3)
        d, d_inv = torch.diag(self.spacing), torch.diag(1.0 / self.spacing)
        return d_inv @ _rotation(angles) @ torch.diag_embed(1.0 / scale) @ d

    def __call__(self, image: torch.Tensor, label: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """image (N, C, Z, Y, X) float, label (N, Z, Y, X) integer -> the same at ``patch_size``."""
        n = image.shape[0]
        in_zyx = tuple(image.shape[2:])
        if any(i < o for i, o in zip(in_zyx, self.patch_size)):
            raise ValueError(f"patches of {in_zyx} are smaller than the output patch {self.patch_size}")
        if not self.spatial and not self.flip and in_zyx == self.patch_size:
            if self.intensity is not None:
                image = self._scale_intensity(image.float(), generator)
            return image, label
        if self.spatial:
            m = self.matrices(n, generator)
        else:
            m = torch.eye(3).expand(n, 3, 3)
        # normalised source = diag(2 / in) M diag(out / 2) normalised output (align_corners=False)
        size_in = torch.tensor(in_zyx[::-1], dtype=torch.float32)
        size_out = torch.tensor(self.patch_size[::-1], dtype=torch.float32)
        theta = torch.diag(1.0 / size_in) @ m @ torch.diag(size_out)
        theta = torch.cat([theta, torch.zeros(n, 3, 1)], 2).to(device=image.device, dtype=torch.float32)
        grid = F.affine_grid(theta, [n, 1, *self.patch_size], align_corners=False)
        out_image = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        out_label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="border",
                                  align_corners=False)[:, 0].to(label.dtype)
        if self.flip:
            flips = torch.rand(n, 3, generator=generator) < 0.5  # per sample: z, y, x
            for i in range(n):
                axes = [a for a in range(3) if flips[i, a]]
                if axes:
                    out_image[i] = out_image[i].flip([1 + a for a in axes])
                    out_label[i] = out_label[i].flip(axes)
        if self.intensity is not None:
            out_image = self._scale_intensity(out_image, generator)
        return out_image, out_label

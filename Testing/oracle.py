"""A voxel-wise 'oracle' network and analytic volumes for geometry tests.

The oracle labels a voxel liver when its (windowed, scaled) intensity lies in a liver
band and tumor when it is brighter: any misplaced, flipped or shifted mask in the
engine's resampling would then disagree with the analytic truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from LiverTumorSegLib.model import LoadedModel, ModelCard
from LiverTumorSegLib.model.card import IntensityTransform
from LiverTumorSegLib.volume import Volume

WINDOW = (-200.0, 300.0)
LIVER_HU, TUMOR_HU = 60.0, 220.0


class ThresholdNet(torch.nn.Module):
    """Logits from input intensity alone (the window maps HU onto [-1, 1])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hu = (x + 1.0) / 2.0 * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
        # Decision boundaries sit half-way between the tissues (30 HU between water and
        # liver, 140 HU between liver and tumor), so partial-volume edges split fairly.
        liver = (hu - 30.0) / 50.0
        tumor = 2.0 * (hu - 85.0) / 50.0
        background = torch.zeros_like(hu)
        return torch.cat([background, liver, tumor], dim=1)


def oracle_model(spacing=(2.0, 2.0, 2.0), patch=(32, 32, 32)) -> LoadedModel:
    card = ModelCard(
        name="oracle", architecture={"type": "threshold-oracle", "num_classes": 3},
        labels={"0": "background", "1": "liver", "2": "tumor"}, spacing_mm=tuple(spacing),
        patch_size=tuple(patch), weights_file="none", weights_sha256="",
        intensity=IntensityTransform(window_hu=WINDOW), default_overlap=0.25,
    )
    return LoadedModel(card=card, network=ThresholdNet(), folder=Path("."))


def rotation(axis: str, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def analytic_ct(spacing, direction, centre_lps=(10.0, -5.0, 20.0), extent_mm=(150.0, 130.0, 120.0)):
    """An asymmetric 'abdomen' sampled on a grid: returns (ct Volume, truth labels Volume).

    Air, a water body box, an off-centre liver ellipsoid (60 HU) with a lobe that sticks
    out towards +x (patient left) and a tumor ball (220 HU) near its -y side.
    """
    direction = np.asarray(direction, dtype=float)
    spacing = np.asarray(spacing, dtype=float)
    size = np.ceil(np.asarray(extent_mm) / spacing).astype(int)
    origin = np.asarray(centre_lps) - direction @ (spacing * (size - 1) / 2.0)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(float) * spacing
    p = ijk @ direction.T + origin  # LPS mm, (z, y, x, 3)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    body = (np.abs(x - 10) < 60) & (np.abs(y + 5) < 50) & (np.abs(z - 20) < 50)
    liver = ((x + 5) / 35) ** 2 + ((y + 5) / 28) ** 2 + ((z - 20) / 30) ** 2 < 1
    lobe = ((x - 30) / 22) ** 2 + ((y - 0) / 12) ** 2 + ((z - 28) / 12) ** 2 < 1
    tumor = (x + 10) ** 2 + (y + 18) ** 2 + (z - 15) ** 2 < 9.0 ** 2
    liver = liver | lobe
    tumor &= liver
    ct = np.full(x.shape, -1000.0, dtype=np.float32)
    ct[body] = 0.0
    ct[liver] = LIVER_HU
    ct[tumor] = TUMOR_HU
    labels = np.zeros(x.shape, dtype=np.uint8)
    labels[liver] = 1
    labels[tumor] = 2
    geometry = dict(spacing=tuple(spacing), origin=tuple(origin), direction=direction)
    return Volume(ct.astype(np.int16), **geometry), Volume(labels, **geometry)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denominator = a.sum() + b.sum()
    return 1.0 if denominator == 0 else 2.0 * np.logical_and(a, b).sum() / denominator

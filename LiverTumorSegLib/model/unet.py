"""The configurable 3D U-Net.

The default configuration is the seed architecture: 1 input channel; 32, 64, 128 and
256 channels across three 2x2x2 max-pool steps; each block is two 3x3x3 convolutions,
each followed by a ReLU; the decoder upsamples trilinearly (x2) and concatenates the
skip connection; a 1x1x1 head gives 3 logits (about 5.8 M parameters).

Widths, depth (the length of ``widths``) and normalisation are configurable.
Tensors are (N, C, Z, Y, X); spatial sizes must be divisible by ``2 ** (depth - 1)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

NORMS = ("none", "batch", "instance", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown normalisation {kind!r}; choose one of {NORMS}")


class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions, each followed by (optional normalisation and) a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "none") -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UNet3D(nn.Module):
    """3D U-Net with max-pool encoder and trilinear-upsampling decoder.

    Args:
        in_channels: input channels (1 for CT).
        num_classes: output logits per voxel.
        widths: channels per level, from the top; ``len(widths) - 1`` pooling steps.
        norm: ``"none"`` (the seed), ``"batch"``, ``"instance"`` or ``"group"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
        norm: str = "none",
    ) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError("a U-Net needs at least two levels (widths of length >= 2)")
        if norm not in NORMS:
            raise ValueError(f"unknown normalisation {norm!r}; choose one of {NORMS}")
        self.widths = tuple(int(w) for w in widths)
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in self.widths:
            self.encoders.append(ConvBlock(previous, width, norm))
            previous = width
        self.decoders = nn.ModuleList()
        for skip_width in reversed(self.widths[:-1]):
            self.decoders.append(ConvBlock(previous + skip_width, skip_width, norm))
            previous = skip_width
        self.head = nn.Conv3d(previous, num_classes, 1)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool3d(x, 2)
            x = encoder(x)
            skips.append(x)
        skips.pop()
        for decoder in self.decoders:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = decoder(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


def build_network(architecture: dict) -> UNet3D:
    """Build the network a model card's ``architecture`` section describes."""
    kind = architecture.get("type", "unet3d")
    if kind != "unet3d":
        raise ValueError(f"unsupported architecture type {kind!r} (this engine knows 'unet3d')")
    return UNet3D(
        in_channels=int(architecture.get("in_channels", 1)),
        num_classes=int(architecture.get("num_classes", 3)),
        widths=architecture.get("widths", (32, 64, 128, 256)),
        norm=architecture.get("norm", "none"),
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

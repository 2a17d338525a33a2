"""Losses and the overlap counts behind validation Dice.

Label convention: 0 background, 1 liver parenchyma, 2 tumor. Validation Dice follows
the LiTS convention: "liver" is the whole organ (labels 1 and 2), "tumor" is label 2.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, pooled over the batch.

    Args:
        logits: (N, K, Z, Y, X) raw scores.
        target: (N, Z, Y, X) integer labels in [0, K).
    """
    probs = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, probs.ndim))
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice[1:].mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, name: str = "ce",
                      dice_weight: float = 1.0, class_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``ce``: cross-entropy (the seed); ``dice_ce``: cross-entropy + ``dice_weight`` x soft Dice.

    ``class_weights`` (one per class) weight the cross-entropy term.
    """
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32,
                                                                 device=logits.device)
    ce = F.cross_entropy(logits.float(), target, weight=weight)
    if name == "ce":
        return ce
    return ce + dice_weight * soft_dice_loss(logits, target)


def overlap_counts(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[[2|A∩B|, |A|+|B|] for liver (labels >= 1), [...] for tumor (label 2)] as float64."""
    rows = []
    for pred_mask, true_mask in ((prediction >= 1, target >= 1), (prediction == 2, target == 2)):
        inter = torch.count_nonzero(pred_mask & true_mask)
        total = torch.count_nonzero(pred_mask) + torch.count_nonzero(true_mask)
        rows.append(torch.stack([2 * inter, total]))
    return torch.stack(rows).to(torch.float64)


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Dice per row of :func:`overlap_counts` (1 when both masks are empty)."""
    return torch.where(counts[:, 1] > 0, counts[:, 0] / counts[:, 1].clamp(min=1), torch.ones_like(counts[:, 0]))

"""Mask losses: binary cross-entropy and Dice, used at the coarse and the refined stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_EPS = 1.0


def bce_dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE (mean over valid pixels) and Dice (eps 1 per mask, then mean over masks).

    Args:
        logits: ``N x H x W`` mask logits.
        targets: ``N x H x W`` bool or {0, 1} float targets.
        weight: optional validity mask broadcastable to ``N x H x W`` (1 = counts, 0 = padding).

    Returns:
        ``(bce, dice)`` scalars; both are zero (and keep the graph) when ``N == 0``.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    weight = torch.ones_like(logits) if weight is None else weight.to(logits.dtype)
    weight = weight.expand_as(logits)
    if logits.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    bce = (bce * weight).sum() / weight.sum().clamp(min=1.0)
    probs = logits.sigmoid() * weight
    targets = targets * weight
    inter = (probs * targets).flatten(1).sum(-1)
    total = probs.flatten(1).sum(-1) + targets.flatten(1).sum(-1)
    dice = 1.0 - (2.0 * inter + DICE_EPS) / (total + DICE_EPS)
    return bce, dice.mean()

"""The square frame every attention map lives on, and where an image sits in it.

An ``H x W`` image is placed **centred** in an ``S x S`` square (``S = max(H, W)``), as
LLaVA-1.5's expand-to-square padding (filled with the processor's mean colour) and the reference
F-LMM do: ``(S - H) // 2`` rows above it, ``(S - W) // 2`` columns left of it. A *region* is that
placement as fractions of ``S``, ``(top, left, height, width)``; on a frame of side ``s`` it
covers the cells :func:`cells` returns. Every family's attention grid is laid on this frame: the
square-padded families' grids cover all of it, the others cover the region only (resampled).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def offsets(height: int, width: int) -> tuple[int, int]:
    """``(top, left)`` pixels of padding before an ``height x width`` image in its square."""
    side = max(height, width)
    return (side - height) // 2, (side - width) // 2


def region(height: int, width: int) -> torch.Tensor:
    """The image's ``(top, left, height, width)`` in its square, as fractions of the side."""
    top, left = offsets(height, width)
    return torch.tensor([top, left, height, width], dtype=torch.float32) / max(height, width)


def pad_to_square(image: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """``H x W x 3`` -> ``S x S x 3`` with the image centred and ``fill`` around it."""
    height, width = image.shape[:2]
    top, left = offsets(height, width)
    side = max(height, width)
    out = np.empty((side, side, *image.shape[2:]), dtype=image.dtype)
    out[...] = fill
    out[top : top + height, left : left + width] = image
    return out


def cells(region: torch.Tensor, size: int) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` cells a ``region`` covers on a ``size x size`` frame
    (at least one cell each way, always inside the frame)."""
    top, left, height, width = (float(v) for v in region)
    h = min(size, max(1, round(height * size)))
    w = min(size, max(1, round(width * size)))
    return min(round(top * size), size - h), min(round(left * size), size - w), h, w


def crop(frame: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``... x s x s`` frame values -> ``... x h x w``, the cells of ``region``."""
    top, left, h, w = cells(region, frame.shape[-1])
    return frame[..., top : top + h, left : left + w]


def place(part: torch.Tensor, region: torch.Tensor, size: int) -> torch.Tensor:
    """Resample ``N x C x h' x w'`` maps of the image onto its region of a ``size`` frame
    (bilinear), zeros elsewhere: ``N x C x size x size``."""
    top, left, h, w = cells(region, size)
    if tuple(part.shape[-2:]) != (h, w):
        part = F.interpolate(part, (h, w), mode="bilinear", align_corners=False)
    return F.pad(part, (left, size - left - w, top, size - top - h))


def targets(masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Place ``K x H x W`` masks in the image's square and resize it to ``size``.

    Returns the ``K x size x size`` float targets and a ``1 x size x size`` validity weight that is
    1 over the image and 0 over the padding.
    """
    k, height, width = masks.shape
    top, left = offsets(height, width)
    side = max(height, width)
    frame = masks.new_zeros((k, side, side), dtype=torch.float32)
    frame[:, top : top + height, left : left + width] = masks.float()
    valid = frame.new_zeros((1, 1, side, side))
    valid[..., top : top + height, left : left + width] = 1.0
    target = (F.interpolate(frame[None], size=(size, size), mode="area")[0] > 0.5).float()
    weight = (F.interpolate(valid, size=(size, size), mode="area")[0] > 0.5).float()
    return target, weight

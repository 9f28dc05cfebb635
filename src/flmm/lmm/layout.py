"""Where a prompt's image tokens are, and how their attention lands on the square frame.

:func:`image_columns` finds the image tokens' sequence positions, :func:`layouts` the token grids
of every sample (:mod:`flmm.lmm.grids`), :func:`to_grid` places captured attention on the frame
of side ``F`` (:func:`default_grid_side` when the config names none).
"""

from __future__ import annotations

import numpy as np
import torch

from flmm.lmm import grids
from flmm.lmm.processing import process


def image_columns(input_ids: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, list[int]]:
    """``B x P`` sequence positions of the image tokens in ``input_ids`` (``B x N``) and each
    sample's count ``P_b`` (``P = max P_b``; shorter rows repeat their last position)."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(1).tolist()
    if min(counts) == 0:
        raise RuntimeError(f"a sample has no image tokens (counts {counts})")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    keyed = torch.where(is_image, positions, positions + input_ids.shape[1])
    cols = keyed.sort(1).values[:, : max(counts)]
    last = cols.gather(1, torch.tensor(counts, device=cols.device)[:, None] - 1)
    return torch.where(cols < input_ids.shape[1], cols, last), counts


def layouts(lmm, enc: dict, counts: list[int]) -> list[list[tuple[grids.TokenGrid, torch.Tensor]]]:
    """Per sample of ``enc`` (a ``FrozenLMM``'s encoded batch), its image-token grids and their
    positions among its ``counts[b]`` image tokens."""
    return [grids.layout(lmm, enc, b, n) for b, n in enumerate(counts)]


def to_grid(lmm, maps: torch.Tensor, layouts: list, region: torch.Tensor) -> torch.Tensor:
    """``B x K x L x H x P`` captured attention -> ``B x K x C x F x F`` on the square frame.

    Grids of square-padded families cover the whole frame; the others cover the image and
    are resampled onto its ``region`` (``B x 4``, :mod:`flmm.frame`) of the frame.
    """
    side = lmm.grid[0]
    padded = lmm.family.pad_to_square
    return torch.stack(
        [
            grids.to_frame(maps[b], layout, side, None if padded else region[b])
            for b, layout in enumerate(layouts)
        ]
    )


def default_grid_side(lmm) -> int:
    """The family's frame side ``F``: the token grid of a probe image (``"square"``),
    ``fine_scale`` x the base tile's grid (``"anyres"``) or the family's fixed ``grid_size``."""
    family = lmm.family
    if family.grid == "anyres":
        return family.fine_scale * grids.base_side(lmm.model.config)
    if family.grid != "square":
        return family.grid_size
    probe = np.zeros((64, 64, 3), dtype=np.uint8)
    enc = process(lmm.processor, family, [probe], [lmm.prompt("a")[0]])
    count = int((enc["input_ids"][0] == lmm.image_token_id).sum())
    return grids.square(lmm, enc, 0, count)[0].height

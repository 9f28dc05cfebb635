"""How a family's image tokens lie on 2-D grids, and how those grids become one fixed frame.

A grid rule maps one processed sample to the :class:`TokenGrid` s its image tokens form, in
sequence order. :func:`to_frame` then resamples every grid onto a fixed ``F x F`` square frame
(the image centred, as :mod:`flmm.frame` defines its ``region``), so a model
configuration always yields ``parts * L * H`` channels on the same grid, whatever the image's
size or aspect ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.image_processing_utils import select_best_resolution

from flmm import frame

WHOLE_FRAME = torch.tensor([0.0, 0.0, 1.0, 1.0])


@dataclass(frozen=True)
class TokenGrid:
    """``height x width`` image tokens stored row-major, each row followed by ``skip`` tokens
    that are not on the grid (LLaVA-NeXT's newline token)."""

    height: int
    width: int
    skip: int = 0

    @property
    def num_tokens(self) -> int:
        return self.height * (self.width + self.skip)

    def index(self, offset: int) -> torch.Tensor:
        """``h*w`` positions of the grid tokens among the image tokens, starting at ``offset``."""
        rows = torch.arange(self.height)[:, None] * (self.width + self.skip)
        return (offset + rows + torch.arange(self.width)[None]).flatten()


def square(lmm, enc: dict, b: int, num_tokens: int) -> list[TokenGrid]:
    """One ``S x S`` grid: ``S^2`` is the number of image tokens the processor inserted."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise RuntimeError(f"{num_tokens} image tokens do not form a square grid")
    return [TokenGrid(side, side)]


def anyres(lmm, enc: dict, b: int, num_tokens: int) -> list[TokenGrid]:
    """LLaVA-NeXT / OneVision: the base ``S x S`` grid, then the unpadded high-res grid with one
    newline token after each row (its size from the processor's own any-res rule)."""
    side = base_side(lmm.model.config)
    height, width = (int(v) for v in enc["image_sizes"][b])
    tile = enc["pixel_values"].shape[-1]
    pinpoints = lmm.processor.image_processor.image_grid_pinpoints
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    tokens, rows = lmm.processor._get_unpadded_features(
        height, width, side, side, best_h // tile, best_w // tile
    )
    # an extreme aspect ratio can leave no high-res tokens (0 rows, or rows of width 0)
    return [TokenGrid(side, side), TokenGrid(rows, tokens // max(rows, 1), skip=1)]


def thw(lmm, enc: dict, b: int, num_tokens: int) -> list[TokenGrid]:
    """Qwen2.5-VL: the ``image_grid_thw`` patches of an image (one frame) merged ``m x m``."""
    _, height, width = (int(v) for v in enc["image_grid_thw"][b])
    merge = lmm.processor.image_processor.merge_size
    return [TokenGrid(height // merge, width // merge)]


GRIDS = {"square": square, "anyres": anyres, "thw": thw}
PARTS = {"square": 1, "anyres": 2, "thw": 1}


def base_side(config) -> int:
    """Tokens per side of one vision-tower tile."""
    return config.vision_config.image_size // config.vision_config.patch_size


def layout(lmm, enc: dict, b: int, num_tokens: int) -> list[tuple[TokenGrid, torch.Tensor]]:
    """The grids of sample ``b`` and each one's positions among its ``num_tokens`` image tokens."""
    grids = GRIDS[lmm.family.grid](lmm, enc, b, num_tokens)
    used = sum(g.num_tokens for g in grids)
    if used != num_tokens:
        raise RuntimeError(
            f"the {lmm.family.name!r} grid rule expects {used} image tokens, the processor "
            f"inserted {num_tokens}"
        )
    offsets = [0, *torch.tensor([g.num_tokens for g in grids]).cumsum(0).tolist()]
    return [(g, g.index(o)) for g, o in zip(grids, offsets)]


def to_frame(
    maps: torch.Tensor,
    grids: list[tuple[TokenGrid, torch.Tensor]],
    size: int,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Place one sample's image-token attention on the ``size x size`` frame.

    Args:
        maps: ``K x L x H x P`` attention over the sample's image tokens.
        grids: from :func:`layout`.
        size: the frame side ``F``.
        region: ``(top, left, height, width)`` fractions of the frame the grids cover (the
            image's region, :mod:`flmm.frame`; zeros elsewhere); None: the whole frame.

    Returns:
        ``K x (L * parts * H) x F x F``, channels ordered layer, grid, head.
    """
    where = WHOLE_FRAME if region is None else region
    parts = []
    for grid, index in grids:
        if grid.height * grid.width == 0:  # no tokens on this grid: nothing attended there
            parts.append(maps.new_zeros(*maps.shape[:3], size, size))
            continue
        part = maps[..., index.to(maps.device)].unflatten(-1, (grid.height, grid.width))
        placed = frame.place(part.flatten(0, 1), where, size)
        parts.append(placed.view(*part.shape[:3], size, size))
    return torch.stack(parts, 2).flatten(1, 3)

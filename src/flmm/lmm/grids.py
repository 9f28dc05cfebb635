"""How a family's image tokens lie on 2-D grids, and how those grids become one fixed frame.

A grid rule maps one processed sample to the :class:`TokenGrid` s its image tokens form, in
sequence order. :func:`to_frame` then resamples every grid onto a fixed ``F x F`` square frame
(the image centred, as :mod:`flmm.frame` defines its ``region``), so a model
configuration always yields ``parts * L * H`` channels on the same grid, whatever the image's
size or aspect ratio.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from flmm import frame

WHOLE_FRAME = torch.tensor([0.0, 0.0, 1.0, 1.0])


@dataclass(frozen=True)
class TokenGrid:
    """``height x width`` image tokens stored as a ``tiles = (rows, cols)`` mosaic of equal tiles,
    the tiles one after another in row-major order, each tile's tokens row-major, each token row
    followed by ``skip`` tokens that are not on the grid (LLaVA-NeXT's newline token). One tile
    (the default) is a plain row-major grid."""

    height: int
    width: int
    skip: int = 0
    tiles: tuple[int, int] = (1, 1)

    @property
    def num_tokens(self) -> int:
        return self.height * (self.width + self.skip)

    def index(self, offset: int) -> torch.Tensor:
        """``h*w`` positions of the grid's tokens, row-major over the whole grid, among the image
        tokens, starting at ``offset``."""
        tile_h = max(self.height // self.tiles[0], 1)
        tile_w = max(self.width // self.tiles[1], 1)
        row, col = torch.arange(self.height)[:, None], torch.arange(self.width)[None]
        tile = (row // tile_h) * self.tiles[1] + col // tile_w
        inside = (row % tile_h) * (tile_w + self.skip) + col % tile_w
        return (offset + tile * tile_h * (tile_w + self.skip) + inside).flatten()


def square(lmm, enc: dict, b: int, num_tokens: int) -> list[TokenGrid]:
    """One ``S x S`` grid: ``S^2`` is the number of image tokens the processor inserted."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise RuntimeError(f"{num_tokens} image tokens do not form a square grid")
    return [TokenGrid(side, side)]


def anyres(lmm, enc: dict, b: int, num_tokens: int) -> list[TokenGrid]:
    """LLaVA-NeXT / OneVision: the base ``S x S`` grid, then the unpadded high-res grid with one
    newline token after each row (:func:`unpadded`, then OneVision's :func:`anyres_max`)."""
    side = base_side(lmm.model.config)
    height, width = (int(v) for v in enc["image_sizes"][b])
    tile = enc["pixel_values"].shape[-1]
    pinpoints = lmm.processor.image_processor.image_grid_pinpoints
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    rows, cols = unpadded(height, width, side * (best_h // tile), side * (best_w // tile))
    rows, cols = anyres_max(rows, cols, side, lmm.model.config)
    # an extreme aspect ratio can leave no high-res tokens (0 rows, or rows of width 0)
    return [TokenGrid(side, side), TokenGrid(rows, cols, skip=1)]


def unpadded(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """The ``rows x cols`` high-res grid of an ``height x width`` image without the token rows (or
    columns) its letterbox padding filled: ``(rows - new) // 2`` off each side, ``new`` the image's
    extent rounded as transformers' LLaVA-NeXT/OneVision ``unpad_image`` does
    (``int(round(x, 7))``)."""
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        return rows - (rows - new) // 2 * 2, cols
    new = int(round(width * (rows / height), 7))
    return rows, cols - (cols - new) // 2 * 2


def anyres_max(rows: int, cols: int, side: int, config) -> tuple[int, int]:
    """OneVision's ``vision_aspect_ratio="anyres_max_N"``: an unpadded grid of more than ``N``
    base tiles' tokens shrinks by ``ratio = sqrt(rows * cols / (N * S^2))`` when ``ratio > 1.1``
    (each side floored); other configs (LLaVA-NeXT) keep ``rows x cols``."""
    aspect = getattr(config, "vision_aspect_ratio", None) or ""
    if not aspect.startswith("anyres_max_"):
        return rows, cols
    ratio = math.sqrt(rows * cols / (int(aspect.removeprefix("anyres_max_")) * side**2))
    if ratio <= 1.1:
        return rows, cols
    return int(rows // ratio), int(cols // ratio)


def tiles(lmm, enc: dict, b: int, num_tokens: int) -> list[TokenGrid]:
    """InternVL's (and Aya Vision's) dynamic tiling: the image resized to ``rows x cols`` tiles
    (:func:`tile_canvas`), each tile ``S x S`` tokens (:func:`tile_side`), in row-major tile
    order: one ``rows*S x cols*S`` mosaic over the image; then the thumbnail (the whole image in
    one tile), a second ``S x S`` grid. An image the processor keeps in one tile gets no thumbnail
    (that tile is the whole image): one grid, which :func:`layout` uses as both parts."""
    side = tile_side(lmm.processor)
    cols, rows = tile_canvas(lmm, enc["image_sizes"][b])
    if rows * cols == 1:
        return [TokenGrid(side, side)]
    return [TokenGrid(rows * side, cols * side, tiles=(rows, cols)), TokenGrid(side, side)]


def tile_side(processor) -> int:
    """Tokens per side of one tile: InternVL's processor puts ``image_seq_length`` tokens in a
    tile, Aya Vision's ``(img_size / patch_size)^2`` (its ``patch_size`` the pixels of one token
    after the pixel shuffle)."""
    count = getattr(processor, "image_seq_length", None)
    return math.isqrt(count or (processor.img_size // processor.patch_size) ** 2)


def tile_canvas(lmm, size: torch.Tensor) -> tuple[int, int]:
    """``(cols, rows)`` of the tiles InternVL's processor cuts an image of ``size = (height,
    width)`` into: GOT-OCR2's public ``get_optimal_tiled_canvas`` with the processor's tile size
    and ``min_patches`` / ``max_patches`` (the family's ``processor_kwargs`` first)."""
    processor, settings = lmm.processor.image_processor, lmm.family.processor_kwargs
    height, width = (int(v) for v in size)
    return get_optimal_tiled_canvas(
        (height, width),
        (processor.size["height"], processor.size["width"]),
        settings.get("min_patches", processor.min_patches),
        settings.get("max_patches", processor.max_patches),
    )


def thw(lmm, enc: dict, b: int, num_tokens: int) -> list[TokenGrid]:
    """Qwen2.5-VL: the ``image_grid_thw`` patches of an image (one frame) merged ``m x m``."""
    _, height, width = (int(v) for v in enc["image_grid_thw"][b])
    merge = lmm.processor.image_processor.merge_size
    return [TokenGrid(height // merge, width // merge)]


CROP_MARKER = re.compile(r"<row_(\d+)_col_(\d+)>")


def crops(lmm, enc: dict, b: int, num_tokens: int) -> list[TokenGrid]:
    """SmolVLM / Idefics3 image splitting: ``rows x cols`` crops of ``S x S`` tokens each (``S^2``
    = the processor's ``image_seq_len``), in row-major crop order: one ``rows*S x cols*S`` mosaic
    over the image; then the global image (the whole image in one crop), a second ``S x S`` grid.
    An image the processor does not split is its global image only: one grid, which
    :func:`layout` uses as both parts. ``rows x cols`` is read from the processor's own output
    (:func:`crop_canvas`)."""
    side = math.isqrt(lmm.processor.image_seq_len)
    rows, cols = crop_canvas(lmm, enc["input_ids"][b], side * side)
    if rows == 0:
        return [TokenGrid(side, side)]
    return [TokenGrid(rows * side, cols * side, tiles=(rows, cols)), TokenGrid(side, side)]


def crop_canvas(lmm, ids: torch.Tensor, per_crop: int) -> tuple[int, int]:
    """``(rows, cols)`` of the crops behind a sample's image tokens (``(0, 0)``: not split).

    The processor puts a ``<row_r_col_c>`` marker before each crop's ``per_crop`` image tokens
    (in ``ids``, the ``N`` token ids of one sample) and ``<global-img>`` before the global image's;
    the markers must name the crops of a ``rows x cols`` canvas in row-major order.
    """
    is_image = ids == lmm.image_token_id
    starts = torch.nonzero(is_image[1:] & ~is_image[:-1]).flatten().tolist()
    tokens = lmm.processor.tokenizer.convert_ids_to_tokens(ids[starts].tolist())
    markers = tokens[:-1]  # the last run of image tokens is the global image
    last = CROP_MARKER.fullmatch(markers[-1]) if markers else None
    rows, cols = (int(last[1]), int(last[2])) if last else (0, 0)
    expected = [f"<row_{r}_col_{c}>" for r in range(1, rows + 1) for c in range(1, cols + 1)]
    if markers != expected or int(is_image.sum()) != per_crop * len(tokens):
        raise RuntimeError(
            f"the image tokens are not {per_crop}-token crops framed by <row_r_col_c> markers "
            f"of a crop canvas, then the global image (tokens before them: {tokens})"
        )
    return rows, cols


def native(lmm, enc: dict, b: int, num_tokens: int) -> list[TokenGrid]:
    """Mistral 3 (Pixtral): the image at its own resolution, ``image_sizes`` (the resized, unpadded
    ``height x width`` pixels) over ``patch_size x spatial_merge_size`` pixels a token. Each token
    row is closed by an ``[IMG_BREAK]`` (the last by ``[IMG_END]``), which are not image tokens:
    the image tokens alone form a plain row-major ``h x w`` grid."""
    height, width = (int(v) for v in enc["image_sizes"][b])
    pixels = lmm.processor.patch_size * lmm.processor.spatial_merge_size
    return [TokenGrid(height // pixels, width // pixels)]


GRIDS = {
    "square": square,
    "anyres": anyres,
    "thw": thw,
    "tiles": tiles,
    "crops": crops,
    "native": native,
}
PARTS = {"square": 1, "anyres": 2, "thw": 1, "tiles": 2, "crops": 2, "native": 1}


def base_side(config) -> int:
    """Tokens per side of one vision-tower tile."""
    return config.vision_config.image_size // config.vision_config.patch_size


def layout(lmm, enc: dict, b: int, num_tokens: int) -> list[tuple[TokenGrid, torch.Tensor]]:
    """The grids of sample ``b`` and each one's positions among its ``num_tokens`` image tokens,
    always ``PARTS`` of them: a rule that yields fewer (InternVL's single tile, its own thumbnail)
    has its last grid repeated, so a model's channel count does not depend on the image."""
    grids = GRIDS[lmm.family.grid](lmm, enc, b, num_tokens)
    used = sum(g.num_tokens for g in grids)
    if used != num_tokens:
        raise RuntimeError(
            f"the {lmm.family.name!r} grid rule expects {used} image tokens, the processor "
            f"inserted {num_tokens}"
        )
    offsets = [0, *torch.tensor([g.num_tokens for g in grids]).cumsum(0).tolist()]
    placed = [(g, g.index(o)) for g, o in zip(grids, offsets)]
    return placed + placed[-1:] * (PARTS[lmm.family.grid] - len(placed))


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

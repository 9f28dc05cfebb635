"""Checks of the grids flmm derives (flmm.lmm.grids) against the model's own placement of image
features, one per grid rule; shared by the registry tests, the real-shape tests and the self-check
of a row that ``model.lmm.family=auto`` derived (:mod:`flmm.lmm.self_check`).

Each check takes ``(lmm, enc, cols, counts, layouts)``: the encoded batch (``FrozenLMM.encode``),
the image-token columns and counts (``FrozenLMM.image_columns``) and ``FrozenLMM.layouts``, and
raises :class:`GridCheckError` naming what disagrees.
"""

from __future__ import annotations

import math

import torch


class GridCheckError(AssertionError):
    """The grids disagree with the model's own placement of the image features."""


def require(what: str, holds: bool) -> None:
    """Raise :class:`GridCheckError` naming ``what`` unless it ``holds``."""
    if not holds:
        raise GridCheckError(f"grid check failed: {what}")


class _Placed(Exception):
    """Raised by the first decoder layer's pre-hook: the decoder itself need not run."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("image features placed")
        self.hidden = hidden


def decoder_input(lmm, enc: dict) -> torch.Tensor:
    """``B x N x D``: what the model hands its first decoder layer, i.e. the token embeddings with
    the image features placed by the model's own code (which checks their count), without running
    the decoder."""

    def stop(module, args, kwargs):
        raise _Placed(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    hook = lmm.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    inputs = {k: v for k, v in enc.items() if k not in ("token_phrase", "region")}
    try:
        with torch.no_grad():
            lmm.model(**inputs)
    except _Placed as placed:
        return placed.hidden
    finally:
        hook.remove()
    raise RuntimeError("the first decoder layer never ran")


def square(lmm, enc, cols, counts, layouts) -> None:
    """One ``S x S`` grid of all the image tokens, the frame's side; the model places as many
    features as there are image tokens."""
    decoder_input(lmm, enc)
    for (grid, index), count in zip([lay[0] for lay in layouts], counts):
        require(
            "square grid",
            grid.height * grid.width == count and (grid.height, grid.width) == lmm.grid,
        )


def anyres(lmm, enc, cols, counts, layouts) -> None:
    """Newline embeddings sit exactly at the image tokens that no grid covers, one per high-res
    row; the base grid is the vision tower's tile grid."""
    placed = decoder_input(lmm, enc)
    newline = lmm.model.model.image_newline
    vision = lmm.model.config.vision_config
    for b, (layout, count) in enumerate(zip(layouts, counts)):
        embeds = placed[b, cols[b, :count]]
        is_newline = torch.isclose(embeds, newline.to(embeds)).all(-1)
        off_grid = torch.ones(count, dtype=torch.bool)
        off_grid[torch.cat([index for _, index in layout])] = False
        require(
            "newline tokens off the grids",
            torch.equal(is_newline, off_grid) and int(off_grid.sum()) == layout[1][0].height,
        )
        base = layout[0][0]
        require(
            "base grid = the tower's tile grid",
            base.height == base.width == vision.image_size // vision.patch_size,
        )


def thw(lmm, enc, cols, counts, layouts) -> None:
    """The grid rows/cols equal the model's own 2-D rope positions of the image tokens; a model
    without Qwen2-VL's ``get_rope_index`` (or a processor without ``mm_token_type_ids``) gets only
    :func:`thw_counts`, as the square rule's check."""
    if not hasattr(lmm.model.model, "get_rope_index") or "mm_token_type_ids" not in enc:
        thw_counts(lmm, enc, layouts)
        return
    positions, _ = lmm.model.model.get_rope_index(
        enc["input_ids"],
        enc["mm_token_type_ids"],
        enc["image_grid_thw"],
        attention_mask=enc["attention_mask"],
    )
    merge = lmm.processor.image_processor.merge_size
    for b, (layout, count) in enumerate(zip(layouts, counts)):
        ((grid, index),) = layout
        require(
            "grid = image_grid_thw merged",
            [grid.height * merge, grid.width * merge] == enc["image_grid_thw"][b, 1:].tolist(),
        )
        rows = positions[1, b, cols[b, :count]][index]
        cols_ = positions[2, b, cols[b, :count]][index]
        require(
            "grid rows = the model's rope rows",
            torch.equal(
                (rows - rows.min()).view(grid.height, grid.width),
                torch.arange(grid.height)[:, None].expand(-1, grid.width),
            ),
        )
        require(
            "grid columns = the model's rope columns",
            torch.equal(
                (cols_ - cols_.min()).view(grid.height, grid.width),
                torch.arange(grid.width)[None].expand(grid.height, -1),
            ),
        )
    if hasattr(lmm.model.config.vision_config, "deepstack_visual_indexes"):
        deepstack(lmm, enc, cols, counts)


def deepstack(lmm, enc, cols, counts) -> None:
    """Qwen3-VL's DeepStack: between decoder layers 0 and 1 the model adds its own first
    DeepStack features at exactly the image tokens, in their order (nothing elsewhere), so the
    grids that place the image tokens place these features too. The model must have DeepStack
    active (the check would test nothing otherwise)."""
    require("DeepStack active", bool(lmm.model.config.vision_config.deepstack_visual_indexes))
    seen: dict[str, torch.Tensor] = {}

    def output(module, args, out) -> None:
        seen["out"] = out

    def next_input(module, args, kwargs) -> None:
        seen["in"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [
        lmm.layers[0].register_forward_hook(output),
        lmm.layers[1].register_forward_pre_hook(next_input, with_kwargs=True),
    ]
    inputs = {k: v for k, v in enc.items() if k not in ("token_phrase", "region")}
    try:
        with torch.no_grad():
            lmm.model(**inputs)
            own = lmm.model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    finally:
        for hook in hooks:
            hook.remove()
    added = seen["in"] - seen["out"]
    tol = 1e-5 * float(seen["out"].abs().max())
    features = torch.cat(own.deepstack_features[0]).split(counts)
    for b, count in enumerate(counts):
        at_image = torch.zeros(added.shape[1], dtype=torch.bool)
        at_image[cols[b, :count]] = True
        require("DeepStack adds nothing outside the image", added[b, ~at_image].abs().max() <= tol)
        require("DeepStack features are not zero", features[b].abs().max() > 100 * tol)
        own_order = added[b, cols[b, :count]]
        require(
            "DeepStack features at the image tokens, in order",
            (own_order - features[b].to(added)).abs().max() <= tol,
        )


def thw_counts(lmm, enc, layouts) -> None:
    """Each grid is its image's ``image_grid_thw`` merged, and the model places as many features
    as there are image tokens (its own check)."""
    decoder_input(lmm, enc)
    merge = lmm.processor.image_processor.merge_size
    for b, layout in enumerate(layouts):
        grid = layout[0][0]
        require(
            "grid = image_grid_thw merged",
            [grid.height * merge, grid.width * merge] == enc["image_grid_thw"][b, 1:].tolist(),
        )


def tile_features(lmm, enc: dict) -> torch.Tensor:
    """``T x S x S x D``: the model's own features of every tile the processor cut (all samples,
    in order), each tile's tokens as the model lays them out."""
    config = lmm.model.config
    with torch.no_grad():
        features = lmm.model.model.get_image_features(
            pixel_values=enc["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
    side = int(features.shape[1] ** 0.5)
    return features.unflatten(1, (side, side))


def tiles(lmm, enc, cols, counts, layouts) -> None:
    """The processor's tile count per sample is the grid's (tiles, plus a thumbnail when more
    than one), and the token at each mosaic cell is the model's feature of that tile's token:
    tile ``(r, c)`` of a ``rows x cols`` canvas holds mosaic rows ``r*S..`` and columns ``c*S..``;
    the thumbnail (or the single tile) is the tile after them."""
    seen, features = decoder_input(lmm, enc), tile_features(lmm, enc)
    side = features.shape[1]
    first = 0
    for b, (layout, count) in enumerate(zip(layouts, counts)):
        (mosaic, fine), (thumb, coarse) = layout
        rows, cols_ = mosaic.tiles
        tiles = rows * cols_ + (rows * cols_ > 1)
        require("tile count", count == tiles * side * side and len(layout) == 2)
        height, width = enc["image_sizes"][b].tolist()
        require("tile canvas aspect", rows == cols_ or (rows > cols_) == (height > width))
        embeds = seen[b, cols[b, :count]]
        own = features[first : first + rows * cols_].unflatten(0, (rows, cols_))
        own = own.permute(0, 2, 1, 3, 4).reshape(rows * side * cols_ * side, -1)
        require(
            "mosaic tokens = the model's tile features", torch.equal(embeds[fine], own.to(embeds))
        )
        thumbnail = features[first + tiles - 1].flatten(0, 1)
        require(
            "thumbnail tokens = the model's thumbnail features",
            torch.equal(embeds[coarse], thumbnail.to(embeds)),
        )
        require("thumbnail grid side", (thumb.height, thumb.width) == (side, side))
        first += tiles
    require("tiles = pixel_values tiles", first == enc["pixel_values"].shape[0])


def crops(lmm, enc, cols, counts, layouts) -> None:
    """The processor's crop count per sample is the grid's (crops, plus the global image when
    split), and the token at each mosaic cell is the model's own feature (after its pixel shuffle)
    of that crop's token: crop ``(r, c)`` holds mosaic rows ``r*S..`` and columns ``c*S..``; the
    global image is the crop after them."""
    seen = decoder_input(lmm, enc)
    with torch.no_grad():
        own = lmm.model.model.get_image_features(
            enc["pixel_values"], enc["pixel_attention_mask"], return_dict=True
        ).pooler_output
    side = math.isqrt(lmm.processor.image_seq_len)
    for b, (layout, count) in enumerate(zip(layouts, counts)):
        (mosaic, fine), (glob, coarse) = layout
        features = own[b].unflatten(0, (-1, side, side))
        rows, cols_ = mosaic.tiles
        split = len(features) > 1
        require(
            "crop count",
            len(features) == rows * cols_ * split + 1 and count == len(features) * side**2,
        )
        embeds = seen[b, cols[b, :count]]
        if split:
            tiles = features[:-1].unflatten(0, (rows, cols_)).permute(0, 2, 1, 3, 4)
            mosaic_features = tiles.reshape(rows * side * cols_ * side, -1)
            require(
                "mosaic tokens = the model's crop features",
                torch.equal(embeds[fine], mosaic_features),
            )
        require(
            "global tokens = the model's global-image features",
            torch.equal(embeds[coarse], features[-1].flatten(0, 1)),
        )
        require("global grid side", (glob.height, glob.width) == (side, side))


def native(lmm, enc, cols, counts, layouts) -> None:
    """Pixtral's grid: the model's own merged feature of each image sits at the grid's cells, row
    by row (the patch merger's ``image_sizes // patch_size`` patches, 2x2 merged, row-major), and
    in the sequence each grid row is followed by ``[IMG_BREAK]``, the last by ``[IMG_END]``."""
    seen = decoder_input(lmm, enc)
    with torch.no_grad():
        features = lmm.model.model.get_image_features(
            pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"], return_dict=True
        ).pooler_output
    processor = lmm.processor
    for b, (layout, count) in enumerate(zip(layouts, counts)):
        ((grid, index),) = layout
        require(
            "native grid = image tokens", grid.height * grid.width == count == features[b].shape[0]
        )
        require(
            "grid tokens = the model's merged features",
            torch.equal(seen[b, cols[b, :count][index]], features[b].to(seen)),
        )
        last = cols[b, :count][index].view(grid.height, grid.width)[:, -1]
        after = enc["input_ids"][b, last + 1]
        closing = [processor.image_break_token_id] * (grid.height - 1)
        require(
            "[IMG_BREAK] after each row", after.tolist() == [*closing, processor.image_end_token_id]
        )


GRID_CHECKS = {
    "square": square,
    "anyres": anyres,
    "thw": thw,
    "tiles": tiles,
    "crops": crops,
    "native": native,
}


def check_grids(lmm, enc: dict) -> list:
    """Run the family's grid check on an encoded batch; its layouts."""
    cols, counts = lmm.image_columns(enc["input_ids"])
    layouts = lmm.layouts(enc, counts)
    GRID_CHECKS[lmm.family.grid](lmm, enc, cols, counts, layouts)
    return layouts

"""flmm's own grid rules against the real processors' token counts, at the real checkpoints'
shapes (processors and configs only, no weights), and InternVL's tile mosaic against its pixels.

LLaVA-NeXT (``llava-v1.6-*-hf``: 336 px tiles, patch 14, five pinpoints), LLaVA-OneVision
(``llava-onevision-qwen2-*-ov-hf``: 384 px, patch 14, 1x1..6x6 pinpoints, ``anyres_max_9``),
InternVL3 (``InternVL3-*-hf``: 448 px tiles, 1-12 of them, 256 tokens each), Aya Vision
(``aya-vision-8b``: 364 px tiles, 1-12 of them, 169 tokens each) and Mistral 3
(``Mistral-Small-3.1-*``: Pixtral up to 1540 px, 28 px a token), over 40 image sizes
from 1 x 1 to 2000 x 2000 pixels and aspect ratios up to 40:1.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from flmm.foundation.real_shape import real_processor
from flmm.foundation.tiny_models import SPECIAL_TOKENS, family_tokenizer, tiny_internvl
from flmm.lmm import FrozenLMM, get_family
from flmm.lmm.grids import GRIDS, TokenGrid, layout
from flmm.lmm.processing import process

# the last rows: sizes where a rounding detail changes the grid (truncating instead of
# transformers' int(round(x, 7)): 47 x 1128, 984 x 205, 1375 x 1125; rounding to nearest: 571 x
# 1155, 573 x 389; OneVision's anyres_max_9 threshold 1.1: 1296 x 838, 992 x 1190)
SIZES = [
    (1, 1), (2, 3), (10, 10), (20, 500), (500, 20), (100, 100), (300, 2000), (2000, 300),
    (336, 336), (336, 672), (672, 336), (337, 673), (384, 384), (400, 1200), (1200, 400),
    (448, 448), (449, 897), (480, 640), (640, 480), (720, 1280), (1280, 720), (1000, 1000),
    (1080, 1920), (1920, 1080), (1500, 500), (500, 1500), (2000, 2000), (2048, 1536), (123, 457),
    (457, 123), (999, 101), (101, 999), (50, 2000),
    (47, 1128), (984, 205), (1375, 1125), (571, 1155), (573, 389), (1296, 838), (992, 1190),
]  # fmt: skip


def llava_next() -> tuple:
    """LLaVA-NeXT's processor and config as ``llava-hf/llava-v1.6-vicuna-7b-hf`` ships them."""
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=pinpoints,
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=family_tokenizer({"image_token": "<image>"}, None),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=336, patch_size=14),
        image_grid_pinpoints=pinpoints,
    )
    return processor, config


def llava_onevision() -> tuple:
    """OneVision's processor and config as ``llava-onevision-qwen2-7b-ov-hf`` ships them."""
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    image_processor = transformers.LlavaOnevisionImageProcessor(
        size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints
    )
    tokenizer = family_tokenizer({"image_token": "<image>", "video_token": "<video>"}, None)
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=transformers.LlavaOnevisionVideoProcessor(),
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(image_size=384, patch_size=14),
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )
    return processor, config


def internvl() -> tuple:
    """InternVL3's processor and config as ``OpenGVLab/InternVL3-8B-hf`` ships them."""
    names = ("start_image_token", "end_image_token", "context_image_token", "video_token")
    tokens = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": 448, "width": 448}, crop_to_patches=False, min_patches=1, max_patches=12
    )
    processor = transformers.InternVLProcessor(
        image_processor=image_processor,
        tokenizer=family_tokenizer(dict(zip(names, tokens)), None),
        video_processor=transformers.InternVLVideoProcessor(),
        image_seq_length=256,
    )
    config = transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(image_size=448, patch_size=14),
        downsample_ratio=0.5,
    )
    return processor, config


def mistral3() -> tuple:
    """Mistral 3's processor as ``Mistral-Small-3.1-24B-Instruct-2503`` publishes it (Pixtral,
    longest edge 1540 px, 14 px patches merged 2 x 2); its grid rule reads no config."""
    return real_processor("mistral3", family_tokenizer(SPECIAL_TOKENS["mistral3"], None)), None


def aya_vision() -> tuple:
    """Aya Vision's processor as ``CohereLabs/aya-vision-8b`` publishes it (364 px tiles, 1-12 of
    them, 169 tokens each); its grid rule reads no config."""
    tokenizer = family_tokenizer(SPECIAL_TOKENS["aya_vision"], None)
    return real_processor("aya_vision", tokenizer), None


REAL = {
    "aya_vision": aya_vision,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "internvl": internvl,
    "mistral3": mistral3,
}


@pytest.fixture(scope="module")
def real_shapes():
    """``family -> `` what a grid rule reads of a FrozenLMM (processor, config, family row)."""
    built = {}

    def get(family: str) -> SimpleNamespace:
        if family not in built:
            processor, config = REAL[family]()
            model = SimpleNamespace(config=config)
            built[family] = SimpleNamespace(
                processor=processor, model=model, family=get_family(family)
            )
        return built[family]

    return get


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("family", sorted(REAL))
def test_grid_rule_counts_the_processors_image_tokens(family, size, real_shapes):
    """The image tokens flmm's grid rule expects for an image equal those the processor inserts."""
    lmm = real_shapes(family)
    token = lmm.processor.image_token
    enc = process(lmm.processor, lmm.family, [np.zeros((*size, 3), np.uint8)], [f"{token} hi"])
    inserted = int((enc["input_ids"][0] == lmm.processor.image_token_id).sum())
    grids = GRIDS[lmm.family.grid](lmm, enc, 0, inserted)
    assert sum(g.num_tokens for g in grids) == inserted


def test_mosaic_index_follows_the_tile_order():
    """A 2 x 3 mosaic of 2 x 2 tiles: grid cell (y, x) is token ``x % 2 + 2 * (y % 2)`` of tile
    ``3 * (y // 2) + x // 2``, the tiles stored one after another; a plain grid skips its
    newlines."""
    grid = TokenGrid(4, 6, tiles=(2, 3))
    index = grid.index(5).view(4, 6)
    assert grid.num_tokens == 24 and sorted(index.flatten().tolist()) == list(range(5, 29))
    assert index[0].tolist() == [5, 6, 9, 10, 13, 14]
    assert index[3].tolist() == [19, 20, 23, 24, 27, 28]
    assert TokenGrid(2, 3, skip=1).index(0).tolist() == [0, 1, 2, 4, 5, 6]  # one tile, newlines


@pytest.fixture(scope="module")
def tiny_internvl_lmm() -> FrozenLMM:
    """The tiny InternVL (64 px tiles of 4 x 4 tokens, 1-6 tiles), built in memory."""
    torch.manual_seed(0)
    model, processor = tiny_internvl(None)
    return FrozenLMM(model.eval(), processor, get_family("internvl"), "tiny-internvl")


# (height, width) -> (rows, cols) of 64 px tiles: 100 x 100 is 2 x 2 (a tie with 1 x 1 that more
# tiles win for an image over half their area), 60 x 60 is one tile (no thumbnail)
CANVASES = {
    (60, 90): (2, 3),
    (90, 40): (2, 1),
    (100, 100): (2, 2),
    (60, 60): (1, 1),
    (8, 100): (1, 6),
    (130, 70): (2, 1),
}


@pytest.mark.parametrize("shape", sorted(CANVASES))
def test_tiles_mosaic_is_the_image_on_its_canvas(shape, tiny_internvl_lmm):
    """The tiles' pixels laid out as the grid rule lays their tokens are the image resized to the
    whole canvas (the processor's own resize), and the thumbnail is the image in one tile."""
    lmm = tiny_internvl_lmm
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    enc = process(lmm.processor, lmm.family, [image], [f"{lmm.processor.image_token} hi"])
    count = int((enc["input_ids"][0] == lmm.image_token_id).sum())
    (mosaic, _), (thumb, _) = layout(lmm, enc, 0, count)
    rows, cols = CANVASES[shape]
    assert mosaic.tiles == (rows, cols) and (thumb.height, thumb.width) == (4, 4)
    tile = lmm.processor.image_processor.size["height"]

    def resized(height: int, width: int) -> torch.Tensor:
        size = {"height": height, "width": width}
        out = lmm.processor.image_processor(
            images=[image], crop_to_patches=False, size=size, input_data_format="channels_last"
        )
        return torch.as_tensor(np.asarray(out["pixel_values"][0]))

    pixels = enc["pixel_values"]
    tiles = pixels[: rows * cols].unflatten(0, (rows, cols)).permute(2, 0, 3, 1, 4)
    assert torch.allclose(
        tiles.reshape(3, rows * tile, cols * tile), resized(rows * tile, cols * tile), atol=1e-5
    )
    assert torch.allclose(pixels[-1], resized(tile, tile), atol=1e-5)
    assert len(pixels) == rows * cols + (rows * cols > 1)

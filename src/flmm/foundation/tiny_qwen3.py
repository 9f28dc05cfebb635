"""Tiny models of the Qwen3-VL and GLM-4V families (dense and MoE), built offline.

The same recipe as :mod:`flmm.foundation.tiny_models` (real config and processor classes, the
synthetic world's word-level tokenizer with the family's special tokens and chat format), which
registers these builders in its ``BUILDERS``. Qwen3-VL's tiny model keeps DeepStack active: the
vision tower's ``deepstack_visual_indexes`` feed extra visual features into the first decoder
layer's output at the image tokens, so what the second layer attends to depends on them.
"""

from __future__ import annotations

import transformers

QWEN3_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
# Each family's special tokens (tokenizer attribute -> the hub tokenizer's string).
SPECIAL_TOKENS = {"qwen3_vl": QWEN3_TOKENS, "qwen3_vl_moe": QWEN3_TOKENS}
# Each family's user-turn image placeholder (the chat format is im_start's).
IMAGE_PLACEHOLDERS = {
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl_moe": "<|vision_start|><|image_pad|><|vision_end|>",
}


def _qwen3_processor(family: str, tokenizer, max_side: int, patch_size: int):
    """Qwen3-VL's processor: Qwen2-VL's image processor (2x2 merging, at most ``max_side``^2
    pixels) and Qwen3-VL's video processor."""
    from flmm.foundation.tiny_models import CHAT_TEMPLATES

    factor = 2 * patch_size
    size = {"shortest_edge": 4 * factor * factor, "longest_edge": max_side * max_side}
    return transformers.Qwen3VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(
            patch_size=patch_size, merge_size=2, temporal_patch_size=2, size=size
        ),
        tokenizer=tokenizer,
        video_processor=transformers.Qwen3VLVideoProcessor(
            patch_size=patch_size, merge_size=2, size=size
        ),
        chat_template=CHAT_TEMPLATES[family],
    )


def _qwen3_vision(max_side: int, patch_size: int) -> dict:
    """Qwen3-VL's vision tower: 2 blocks, DeepStack features taken after block 0 (the 8B takes
    them after blocks 8, 16 and 24 of 27 and adds them after decoder layers 0, 1 and 2)."""
    from flmm.foundation.tiny_models import TEXT

    return {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": TEXT["hidden_size"],
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": (max_side // patch_size) ** 2,
        "deepstack_visual_indexes": [0],
    }


# interleaved mrope over half the 16-wide head dimension, as the 8B's [24, 20, 20] of 64
QWEN3_ROPE = {
    "rope_type": "default",
    "rope_theta": 5000000.0,
    "mrope_section": [4, 2, 2],
    "mrope_interleaved": True,
}


def _qwen3_ids(tokenizer) -> dict:
    return {
        "image_token_id": tokenizer.image_token_id,
        "video_token_id": tokenizer.video_token_id,
        "vision_start_token_id": tokenizer.vision_start_token_id,
        "vision_end_token_id": tokenizer.vision_end_token_id,
    }


def tiny_qwen3_vl(words: list[str] | None, max_side: int = 96, patch_size: int = 8):
    """Qwen3-VL (native resolution, 2x2 merging, interleaved mrope, DeepStack)."""
    from flmm.foundation.tiny_models import _text, family_tokenizer

    tokenizer = family_tokenizer(SPECIAL_TOKENS["qwen3_vl"], words)
    config = transformers.Qwen3VLConfig(
        text_config=_text(tokenizer, head_dim=16, rope_parameters=QWEN3_ROPE),
        vision_config=_qwen3_vision(max_side, patch_size),
        **_qwen3_ids(tokenizer),
    )
    processor = _qwen3_processor("qwen3_vl", tokenizer, max_side, patch_size)
    return transformers.Qwen3VLForConditionalGeneration(config), processor

"""Tiny models of the Qwen3-VL and GLM-4V families (dense and MoE), built offline.

The same recipe as :mod:`flmm.foundation.tiny_models` (real config and processor classes, the
synthetic world's word-level tokenizer with the family's special tokens and chat format), which
registers these builders in its ``BUILDERS``. Qwen3-VL's tiny model keeps DeepStack active: the
vision tower's ``deepstack_visual_indexes`` feed extra visual features into the first decoder
layer's output at the image tokens, so what the second layer attends to depends on them.

``tiny_models`` imports this module to register the builders, so the builders import its shared
helpers (the tokenizer, the text widths, the chat templates) when they run, not at import.
"""

from __future__ import annotations

import transformers

QWEN3_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
GLM4V_TOKENS = {
    "image_token": "<|image|>",
    "video_token": "<|video|>",
    "image_start_token": "<|begin_of_image|>",
    "image_end_token": "<|end_of_image|>",
    "video_start_token": "<|begin_of_video|>",
    "video_end_token": "<|end_of_video|>",
    # the chat format's own tokens (added tokens of the hub tokenizer, named here so that the
    # word-level tokenizer keeps each one whole)
    "gmask_token": "[gMASK]",
    "sop_token": "<sop>",
    "user_token": "<|user|>",
    "assistant_token": "<|assistant|>",
}
# Each family's special tokens (tokenizer attribute -> the hub tokenizer's string).
SPECIAL_TOKENS = {
    "qwen3_vl": QWEN3_TOKENS,
    "qwen3_vl_moe": QWEN3_TOKENS,
    "glm4v": GLM4V_TOKENS,
    "glm4v_moe": GLM4V_TOKENS,
}
QWEN3_CHAT = (
    "<|im_start|>user\n",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|im_start|>assistant\n",
    "<|im_end|>\n",
)
GLM4V_CHAT = ("<|user|>\n", "<|begin_of_image|><|image|><|end_of_image|>", "<|assistant|>\n", "")
# Each family's chat format as ``chat_template`` arguments: user turn, image placeholder,
# assistant turn, end of turn; GLM-4V ends no turn (the next role token does) and prefixes
# every conversation with ``[gMASK]<sop>``.
CHAT_FORMATS = {
    "qwen3_vl": QWEN3_CHAT,
    "qwen3_vl_moe": QWEN3_CHAT,
    "glm4v": GLM4V_CHAT,
    "glm4v_moe": GLM4V_CHAT,
}
CHAT_PREFIXES = {"glm4v": "[gMASK]<sop>", "glm4v_moe": "[gMASK]<sop>"}


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


def _glm4v_processor(family: str, tokenizer, max_side: int, patch_size: int):
    """GLM-4V's processor: its own image processor (2x2 merging; its pixel budget counts the two
    temporal frames an image is repeated into: at most ``max_side``^2 pixels) and video
    processor."""
    from flmm.foundation.tiny_models import CHAT_TEMPLATES

    factor = 2 * patch_size
    size = {"shortest_edge": 2 * 4 * factor * factor, "longest_edge": 2 * max_side * max_side}
    settings = {"patch_size": patch_size, "merge_size": 2, "temporal_patch_size": 2, "size": size}
    return transformers.Glm4vProcessor(
        image_processor=transformers.Glm4vImageProcessor(**settings),
        tokenizer=tokenizer,
        video_processor=transformers.Glm4vVideoProcessor(**settings),
        chat_template=CHAT_TEMPLATES[family],
    )


def _glm4v_vision(max_side: int, patch_size: int) -> dict:
    """GLM-4V's vision tower: learned positions for a ``max_side`` image, resampled per image."""
    from flmm.foundation.tiny_models import TEXT

    return {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "image_size": max_side,
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": TEXT["hidden_size"],
    }


# partial rotary (half the 16-wide head dimension): mrope over its 4 frequencies, as the 9B's
# [8, 12, 12] of 32
GLM4V_ROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "mrope_section": [2, 1, 1],
}


def _glm4v_ids(tokenizer) -> dict:
    return {
        "image_token_id": tokenizer.image_token_id,
        "video_token_id": tokenizer.video_token_id,
        "image_start_token_id": tokenizer.image_start_token_id,
        "image_end_token_id": tokenizer.image_end_token_id,
        "video_start_token_id": tokenizer.video_start_token_id,
        "video_end_token_id": tokenizer.video_end_token_id,
    }


def tiny_glm4v(words: list[str] | None, max_side: int = 96, patch_size: int = 8):
    """GLM-4.1V (native resolution, 2x2 merging, partial-rotary mrope, GLM-4 decoder)."""
    from flmm.foundation.tiny_models import _text, family_tokenizer

    tokenizer = family_tokenizer(SPECIAL_TOKENS["glm4v"], words)
    config = transformers.Glm4vConfig(
        text_config=_text(tokenizer, rope_parameters=GLM4V_ROPE),
        vision_config=_glm4v_vision(max_side, patch_size),
        **_glm4v_ids(tokenizer),
    )
    processor = _glm4v_processor("glm4v", tokenizer, max_side, patch_size)
    return transformers.Glm4vForConditionalGeneration(config), processor


# the text decoder's mixture of experts: every layer sparse, 2 of 4 experts per token
TINY_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def tiny_qwen3_vl_moe(words: list[str] | None, max_side: int = 96, patch_size: int = 8):
    """Qwen3-VL-MoE (Qwen3-VL with a mixture-of-experts decoder; DeepStack active)."""
    from flmm.foundation.tiny_models import _text, family_tokenizer

    tokenizer = family_tokenizer(SPECIAL_TOKENS["qwen3_vl_moe"], words)
    text = _text(tokenizer, head_dim=16, rope_parameters=QWEN3_ROPE, **TINY_MOE)
    config = transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=_qwen3_vision(max_side, patch_size), **_qwen3_ids(tokenizer)
    )
    processor = _qwen3_processor("qwen3_vl_moe", tokenizer, max_side, patch_size)
    return transformers.Qwen3VLMoeForConditionalGeneration(config), processor


def tiny_glm4v_moe(words: list[str] | None, max_side: int = 96, patch_size: int = 8):
    """GLM-4.5V (GLM-4.1V's image side before a mixture-of-experts decoder: its first layer
    dense, then 2 of 4 routed experts plus a shared one per token)."""
    from flmm.foundation.tiny_models import _text, family_tokenizer

    tokenizer = family_tokenizer(SPECIAL_TOKENS["glm4v_moe"], words)
    moe = {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1}
    moe |= {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
    config = transformers.Glm4vMoeConfig(
        text_config=_text(tokenizer, rope_parameters=GLM4V_ROPE, **moe),
        vision_config=_glm4v_vision(max_side, patch_size),
        **_glm4v_ids(tokenizer),
    )
    processor = _glm4v_processor("glm4v_moe", tokenizer, max_side, patch_size)
    return transformers.Glm4vMoeForConditionalGeneration(config), processor

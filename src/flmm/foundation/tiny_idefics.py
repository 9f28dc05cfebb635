"""Tiny, randomly initialised SmolVLM and Idefics3 models, built entirely offline.

Same recipe as :mod:`flmm.foundation.tiny_models` (the real config, model and processor classes,
the synthetic world's word-level tokenizer with the hub tokenizer's special-token strings; the
builders are registered in its ``BUILDERS``). Both families split an image into crops with the
real image processors: the tiny ones cut up to 3 x 3 crops of 64 px (4 x 4 tokens each after the
2 x 2 pixel shuffle), plus the global image.
"""

from __future__ import annotations

import transformers
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

# the hub tokenizers' special-token strings (tokenizer attribute -> string), as
# SmolVLM2's tokenizer_config.json names them
SMOLVLM_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
# the crop markers ``<row_r_col_c>`` (r, c in 1..6): added tokens of the hub tokenizers, which
# name no attribute for them; the ``"crops"`` grid rule reads the crop canvas from them
CROP_MARKERS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
# SmolVLM2's chat format (its chat_template.json, as transformers ships it):
# "<|im_start|>User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
SMOLVLM_TEMPLATE = DEFAULT_CHAT_TEMPLATE
# Idefics3-8B-Llama3's: the same, opened by Llama 3's "<|begin_of_text|>"
IDEFICS3_TEMPLATE = DEFAULT_CHAT_TEMPLATE.replace("<|im_start|>", "<|begin_of_text|>", 1)
IDEFICS3_EXTRA = (*CROP_MARKERS, "<|begin_of_text|>")


def crop_settings(crop: int, crops: int) -> dict:
    """Image processor sizes: the longest side resized to ``crops`` crops of ``crop`` px."""
    return {"size": {"longest_edge": crops * crop}, "max_image_size": {"longest_edge": crop}}


def tiny_smolvlm(words: list[str] | None, image_size: int = 64, patch_size: int = 8):
    """SmolVLM2 (SigLIP-style tower, pixel shuffle 2, Llama decoder; 1-3 x 1-3 crops of
    ``image_size`` plus the global image, as SmolVLM2-500M's 4 per side of 512 px)."""
    from flmm.foundation.tiny_models import (
        CHAT_TEMPLATES,
        VISION,
        VISION_HEADS,
        _text,
        tokenizer_for,
    )

    tokenizer = tokenizer_for("smolvlm", words)
    processor = transformers.SmolVLMProcessor(
        image_processor=transformers.SmolVLMImageProcessor(**crop_settings(image_size, 3)),
        tokenizer=tokenizer,
        video_processor=transformers.SmolVLMVideoProcessor(),
        image_seq_len=(image_size // patch_size // 2) ** 2,
        chat_template=CHAT_TEMPLATES["smolvlm"],
    )
    config = transformers.SmolVLMConfig(
        vision_config=transformers.SmolVLMVisionConfig(
            image_size=image_size, patch_size=patch_size, **VISION, **VISION_HEADS
        ),
        text_config=transformers.LlamaConfig(**_text(tokenizer)),
        image_token_id=tokenizer.image_token_id,
        scale_factor=2,
    )
    return transformers.SmolVLMForConditionalGeneration(config), processor


def tiny_idefics3(words: list[str] | None, image_size: int = 64, patch_size: int = 8):
    """Idefics3 (SigLIP tower, pixel shuffle 2, Llama 3 decoder; SmolVLM's crops)."""
    from flmm.foundation.tiny_models import (
        CHAT_TEMPLATES,
        VISION,
        VISION_HEADS,
        _text,
        tokenizer_for,
    )

    tokenizer = tokenizer_for("idefics3", words)
    processor = transformers.Idefics3Processor(
        image_processor=transformers.Idefics3ImageProcessor(**crop_settings(image_size, 3)),
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size // 2) ** 2,
        chat_template=CHAT_TEMPLATES["idefics3"],
    )
    config = transformers.Idefics3Config(
        vision_config=transformers.Idefics3VisionConfig(
            image_size=image_size, patch_size=patch_size, **VISION, **VISION_HEADS
        ),
        text_config=transformers.LlamaConfig(**_text(tokenizer)),
        image_token_id=tokenizer.image_token_id,
        scale_factor=2,
    )
    return transformers.Idefics3ForConditionalGeneration(config), processor

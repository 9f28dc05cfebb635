"""Tiny, randomly initialised Mistral 3 and Aya Vision models, built entirely offline.

Same recipe as :mod:`flmm.foundation.tiny_models` (the real config, model and processor classes,
the synthetic world's word-level tokenizer with the family's special tokens): the builders are
registered in its ``BUILDERS``.
"""

from __future__ import annotations

import transformers
from tokenizers import AddedToken

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}

# the hub tokenizers' special-token strings (tokenizer attribute -> string)
MISTRAL3_TOKENS = {
    "image_token": "[IMG]",
    "image_break_token": "[IMG_BREAK]",
    "image_end_token": "[IMG_END]",
}
# Mistral's instruction format: ``[INST]`` user turn ``[/INST]`` answer
MISTRAL3_CHAT = ("[INST]", "[IMG]", "[/INST]", "")
# its control tokens, one token each as in the hub tokenizer (not unknown words)
MISTRAL3_CONTROL = ("[INST]", "[/INST]")


def text_ids(tokenizer) -> dict:
    """The vocabulary size and special ids a decoder config takes from ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_mistral3(tokenizer, chat_template: str, max_side: int = 96, patch_size: int = 8):
    """Mistral 3 (Pixtral tower at the image's own resolution, 2x2 patch merger, Mistral
    decoder): an image of at most ``max_side`` px a side is ``h x w`` merged tokens, ``h`` rows of
    ``w`` ``[IMG]`` tokens each closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``."""
    tokenizer.add_tokens(list(MISTRAL3_CONTROL), special_tokens=True)
    image_processor = transformers.PixtralImageProcessor(
        size={"longest_edge": max_side}, patch_size=patch_size
    )
    processor = transformers.PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        spatial_merge_size=2,
        chat_template=chat_template,
    )
    config = transformers.Mistral3Config(
        vision_config=transformers.PixtralVisionConfig(
            image_size=max_side, patch_size=patch_size, num_attention_heads=2, head_dim=16, **VISION
        ),
        text_config=transformers.MistralConfig(
            **TEXT,
            **HEADS,
            head_dim=16,
            max_position_embeddings=2048,
            **text_ids(tokenizer),
            sliding_window=None,  # as Mistral Small 3.1's text_config
        ),
        image_token_index=tokenizer.image_token_id,
        spatial_merge_size=2,
        vision_feature_layer=-1,
        # a tied random head repeats the prompt's last token, here the special [/INST], which
        # decodes to nothing
        tie_word_embeddings=False,
    )
    return transformers.Mistral3ForConditionalGeneration(config), processor


# Aya Vision's image tokens (tokenizer attribute -> string): the processor expands ``<image>``
# into ``<|START_OF_IMG|>``, per tile ``TILE_i`` (plain text) and its ``<|IMG_PATCH|>`` tokens,
# ``TILE_GLOBAL`` and the thumbnail's, then ``<|END_OF_IMG|>``
AYA_VISION_TOKENS = {
    "start_of_img_token": "<|START_OF_IMG|>",
    "end_of_img_token": "<|END_OF_IMG|>",
    "img_patch_token": "<|IMG_PATCH|>",
    "img_line_break_token": "<|IMG_LINE_BREAK|>",
}
# Cohere's turns: ``<|START_OF_TURN_TOKEN|><|USER_TOKEN|>`` ... ``<|END_OF_TURN_TOKEN|>``
AYA_VISION_CHAT = (
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>",
    "<image>",
    "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
)
# its turn tokens (added, not special, tokens of the hub tokenizer) and the tile labels (words
# of its vocabulary), one token each
AYA_VISION_CONTROL = (
    "<|START_OF_TURN_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "TILE",
    "TILE_GLOBAL",
)


def tiny_aya_vision(tokenizer, chat_template: str, image_size: int = 64, patch_size: int = 8):
    """Aya Vision 8B (SigLIP tower, pixel shuffle 2, Cohere2 decoder with sliding-window and
    full-attention layers): GOT-OCR2's dynamic tiling into 1-6 tiles of ``image_size`` plus a
    thumbnail, ``(image_size / 2 patch_size)^2`` tokens a tile. The sliding window (32 tokens) is
    shorter than a prompt, so the capture must follow the sliding layers' own mask."""
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in AYA_VISION_CONTROL])
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, max_patches=6
    )
    processor = transformers.AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=2 * patch_size,
        img_size=image_size,
        chat_template=chat_template,
    )
    text = transformers.Cohere2Config(
        **TEXT,
        **HEADS,
        max_position_embeddings=2048,
        **text_ids(tokenizer),
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
    )
    config = transformers.AyaVisionConfig(
        vision_config=transformers.SiglipVisionConfig(
            image_size=image_size, patch_size=patch_size, num_attention_heads=2, **VISION
        ),
        text_config=text,
        image_token_index=tokenizer.img_patch_token_id,
        downsample_factor=2,
        alignment_intermediate_size=2 * TEXT["hidden_size"],
    )
    return transformers.AyaVisionForConditionalGeneration(config), processor

"""Tiny, randomly initialised Gemma-family VLMs (Gemma 3, PaliGemma 2), built entirely offline.

Like :mod:`flmm.foundation.tiny_models`: the real HF config, model and processor classes, the
synthetic world's word-level tokenizer with the hub tokenizer's special-token strings, saved with
``save_pretrained``. The attention rules of the real decoders stay active at tiny sizes: Gemma 3
alternates sliding-window and global layers, with a window shorter than a tiny prompt, and its
image tokens attend to each other bidirectionally (``token_type_ids``).
"""

from __future__ import annotations

import transformers

# Gemma 3's chat format (google/gemma-3-4b-it's chat_template, without the system-prompt branch):
# <bos>, then per turn "<start_of_turn>{user|model}\n" + images + trimmed text + "<end_of_turn>\n"
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA3_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")

# a tiny prompt is about 45 tokens: a window of 20 lets a phrase see only the last image tokens
# in the sliding layer (or none), all of them in the global one
TINY_SLIDING_WINDOW = 20
# Gemma 2's tanh logit soft-capping (50 in PaliGemma 2) below a tiny model's attention logits, so
# that it changes the attention as it does where a real model's logits reach the cap
TINY_SOFTCAP = 0.02


def tiny_gemma3(words: list[str] | None, image_size: int = 32, patch_size: int = 4):
    """Gemma 3 (SigLIP tower, ``image_size / patch_size`` patches a side average-pooled to 4 x 4
    soft tokens; a sliding-window layer then a global layer; bidirectional image tokens)."""
    from flmm.foundation.tiny_models import _text, tokenizer_for

    tokenizer = tokenizer_for("gemma3", words)
    tokens = 16
    image_processor = transformers.Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = transformers.Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=tokens,
    )
    text = _text(
        tokenizer,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=TINY_SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )
    config = transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**text),
        vision_config=transformers.SiglipVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vision_use_head=False,
        ),
        mm_tokens_per_image=tokens,
        image_token_id=tokenizer.image_token_id,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id,
    )
    return transformers.Gemma3ForConditionalGeneration(config), processor


def tiny_paligemma(words: list[str] | None, image_size: int = 32, patch_size: int = 8):
    """PaliGemma 2 (SigLIP tower, a linear projector, a Gemma 2 decoder with tanh logit
    soft-capping and a sliding-window layer; prefix-LM: the image and the prefix attend to each
    other bidirectionally, the suffix causally). No chat template, as the hub checkpoints."""
    from flmm.foundation.tiny_models import SPECIAL_TOKENS, _text, family_tokenizer

    tokenizer = family_tokenizer(SPECIAL_TOKENS["paligemma"], words)
    tokens = (image_size // patch_size) ** 2
    image_processor = transformers.SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        image_seq_length=tokens,
    )
    # adds PaliGemma's <loc####> / <seg###> tokens and turns the tokenizer's own BOS off
    processor = transformers.PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer
    )
    text = _text(
        tokenizer,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=TINY_SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=TINY_SOFTCAP,
        final_logit_softcapping=30.0,
    )
    config = transformers.PaliGemmaConfig(
        text_config=transformers.Gemma2Config(**text),
        vision_config=transformers.SiglipVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vision_use_head=False,
        ),
        image_token_id=tokenizer.image_token_id,
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        vocab_size=text["vocab_size"],
    )
    return transformers.PaliGemmaForConditionalGeneration(config), processor

"""A tiny, randomly initialised LLaVA-1.5 built entirely offline.

The result is a real ``LlavaForConditionalGeneration`` plus a real ``LlavaProcessor`` saved with
``save_pretrained``, so it loads through ``from_pretrained(out_dir)`` exactly like
``llava-hf/llava-1.5-7b-hf`` does. Tests, CPU recipes and the synthetic world use it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
TEMPLATE_WORDS = (
    "user",
    "assistant",
    "please",
    "give",
    "me",
    "a",
    "description",
    "of",
    "the",
    "image",
)
PUNCTUATION = tuple(".,:;!?'\"-()")
DEFAULT_WORDS = (
    *("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white"),
    *("gray", "grey", "cyan", "circle", "square", "triangle", "star", "ring", "cross", "disk"),
    *("box", "ball", "shape", "object", "thing", "left", "right", "top", "bottom", "middle"),
    *("center", "centre", "upper", "lower", "near", "far", "next", "to", "on", "in", "at"),
    *("and", "with", "is", "are", "there", "two", "three", "one", "big", "small", "large"),
    *("tiny", "dark", "light", "this", "that", "background", "foreground", "picture", "scene"),
    *("photo", "an", "its", "it"),
)

# LLaVA-1.5 conversation format: images first in the user turn, then its text; answer after ASSISTANT.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def default_words() -> list[str]:
    """A small English vocabulary (colours, shapes, positions, counting) for tiny models."""
    return [*DEFAULT_WORDS, *(str(i) for i in range(10))]


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lowercased words and single punctuation marks, with char offsets.

    Ids: ``<unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4``, then the template words, the punctuation
    and ``words`` (deduplicated, in order). A ``<s>`` is prepended to every sequence.
    """
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *TEMPLATE_WORDS, *PUNCTUATION, *(w.lower() for w in words)):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="right",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int
) -> LlavaProcessor:
    """CLIP-style resize + centre crop to ``image_size``; ``<image>`` expands to ``(image_size/patch_size)^2``."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None,
    vision_hidden: int,
    vision_layers: int,
    vision_feature_layer: int = -2,
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32),
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llava(
    out_dir: str | Path,
    words: list[str] | None = None,
    *,
    image_size: int = 96,
    patch_size: int = 8,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_feature_layer: int = -2,
    seed: int = 0,
) -> Path:
    """Build and save a random tiny LLaVA-1.5 (model + processor) to ``out_dir``; return the path.

    ``words`` is the vocabulary (``default_words()`` when None). The image grid is
    ``image_size // patch_size`` squared (12 x 12 = 144 image tokens by default). The projector
    reads the vision tower's layer ``vision_feature_layer`` (LLaVA-1.5's penultimate by default;
    the synthetic world's recipe reads the last of 3, see :mod:`flmm.foundation.cache`).
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer(words if words is not None else default_words())
    processor = build_processor(tokenizer, image_size, patch_size)
    config = build_config(
        tokenizer,
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_feature_layer=vision_feature_layer,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out

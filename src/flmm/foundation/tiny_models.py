"""Tiny, randomly initialised models of every registered LMM family, built entirely offline.

Each builder makes the family's real ``*ForConditionalGeneration`` from its real config classes,
a word-level tokenizer built offline (with the family's special tokens and chat format) and the
family's real HF processor, and saves both with ``save_pretrained``: the folder loads through
``FrozenLMM.from_pretrained(out_dir, family=...)`` exactly as the hub checkpoint would. LLaVA-1.5
keeps its own builder (:func:`flmm.foundation.tiny_llava.build_tiny_llava`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast

from flmm.data.synthetic.corpus import vocabulary
from flmm.foundation import tiny_idefics, tiny_mistral, tiny_qwen3
from flmm.foundation.cache import TINY_VERSION, _build_once
from flmm.foundation.tiny_gemma import (
    GEMMA3_TEMPLATE,
    GEMMA3_TURN_TOKENS,
    tiny_gemma3,
    tiny_paligemma,
)
from flmm.foundation.tiny_llava import (
    CHAT_TEMPLATE as LLAVA_TEMPLATE,
)
from flmm.foundation.tiny_llava import (
    build_tiny_llava,
    build_tokenizer,
    default_words,
)

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
VISION_HEADS = {"num_attention_heads": 2}


def chat_template(user: str, image: str, assistant: str, end: str) -> str:
    """A one-image chat template: ``user + image + text + end``, ``assistant + answer + end``."""
    return (
        "{% for message in messages %}"
        f"{{% if message['role'] == 'user' %}}{{{{ {user!r} }}}}"
        "{% for c in message['content'] if c['type'] == 'image' %}"
        f"{{{{ {image!r} }}}}{{% endfor %}}"
        "{% else %}" + f"{{{{ {assistant!r} }}}}" + "{% endif %}"
        "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
        f"{{{{ {end!r} }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {assistant!r} }}}}{{% endif %}}"
    )


IM_TEMPLATE = ("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n")
DEEPSEEK = ("User: ", "<image_placeholder>", "Assistant: ", "\n\n")

# Each family's special tokens (tokenizer attribute -> the hub tokenizer's string) and chat format.
SPECIAL_TOKENS = {
    "llava": {"image_token": "<image>"},
    "llava_next": {"image_token": "<image>"},
    "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
    "qwen2_5_vl": {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
    "internvl": {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
    "deepseek_vl": {"image_token": "<image_placeholder>"},
    "deepseek_vl_hybrid": {"image_token": "<image_placeholder>"},
    "smolvlm": tiny_idefics.SMOLVLM_TOKENS,
    "idefics3": tiny_idefics.SMOLVLM_TOKENS,
    "gemma3": {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    },
    "paligemma": {"image_token": "<image>"},
    "mistral3": tiny_mistral.MISTRAL3_TOKENS,
    "aya_vision": tiny_mistral.AYA_VISION_TOKENS,
    **tiny_qwen3.SPECIAL_TOKENS,
}
# a family's further special tokens that name no attribute (crop markers, chat-turn tokens), and
# plain words its chat format needs (Gemma 3's role ``model``)
EXTRA_TOKENS = {
    "smolvlm": tiny_idefics.CROP_MARKERS,
    "idefics3": tiny_idefics.IDEFICS3_EXTRA,
    "gemma3": GEMMA3_TURN_TOKENS,
}
EXTRA_WORDS = {"gemma3": ("model",)}
CHAT_TEMPLATES = {
    "llava": LLAVA_TEMPLATE,
    "llava_next": LLAVA_TEMPLATE,
    "llava_onevision": chat_template(IM_TEMPLATE[0], "<image>\n", IM_TEMPLATE[2], IM_TEMPLATE[1]),
    "qwen2_5_vl": chat_template(
        IM_TEMPLATE[0],
        "<|vision_start|><|image_pad|><|vision_end|>",
        IM_TEMPLATE[2],
        IM_TEMPLATE[1],
    ),
    "internvl": chat_template(IM_TEMPLATE[0], "<IMG_CONTEXT>\n", IM_TEMPLATE[2], IM_TEMPLATE[1]),
    "deepseek_vl": chat_template(*DEEPSEEK),
    "deepseek_vl_hybrid": chat_template(*DEEPSEEK),
    "smolvlm": tiny_idefics.SMOLVLM_TEMPLATE,
    "idefics3": tiny_idefics.IDEFICS3_TEMPLATE,
    "gemma3": GEMMA3_TEMPLATE,
    "paligemma": None,  # as its checkpoints: flmm renders its prefix-LM prompt
    "mistral3": chat_template(*tiny_mistral.MISTRAL3_CHAT),
    "aya_vision": chat_template(*tiny_mistral.AYA_VISION_CHAT),
    **{
        family: tiny_qwen3.CHAT_PREFIXES.get(family, "") + chat_template(*chat)
        for family, chat in tiny_qwen3.CHAT_FORMATS.items()
    },
}


def family_tokenizer(
    special: dict[str, str],
    words: list[str] | None,
    extra_tokens: tuple[str, ...] = (),
    extra_words: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer plus the family's special tokens as named attributes.

    ``special`` maps attribute names (``image_token``, ``start_image_token``, ...) to token
    strings; each becomes ``tokenizer.<name>`` / ``tokenizer.<name>_id``, as on the hub.
    ``extra_tokens``: further special tokens, without attributes (:data:`EXTRA_TOKENS`);
    ``extra_words``: plain words the chat format needs (:data:`EXTRA_WORDS`).
    """
    base = build_tokenizer(words if words is not None else default_words())
    known = {"<|im_start|>", "<|im_end|>", *special.values(), *extra_tokens}
    extra = sorted(known - set(base.get_vocab()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="right",
        extra_special_tokens=special,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *extra]})
    tokenizer.add_tokens([w for w in extra_words if w not in tokenizer.get_vocab()])
    return tokenizer


def _text(tokenizer: PreTrainedTokenizerFast, **extra) -> dict:
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {**TEXT, **HEADS, "max_position_embeddings": 2048, **ids, **extra}


def _pinpoints(image_size: int) -> list[list[int]]:
    """Any-res candidate resolutions: 1x2, 2x1 and 2x2 tiles of ``image_size``."""
    return [[image_size * h, image_size * w] for h, w in ((1, 2), (2, 1), (2, 2))]


def tiny_llava_next(words: list[str] | None, image_size: int = 32, patch_size: int = 8):
    """LLaVA-NeXT (any-res, CLIP tower, Llama decoder, LLaVA-1.5 chat format)."""
    tokenizer = family_tokenizer(SPECIAL_TOKENS["llava_next"], words)
    size = {"shortest_edge": image_size}
    image_processor = transformers.LlavaNextImageProcessor(
        size=size,
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=_pinpoints(image_size),
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATES["llava_next"],
    )
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(
            image_size=image_size, patch_size=patch_size, **VISION, **VISION_HEADS
        ),
        text_config=transformers.LlamaConfig(**_text(tokenizer)),
        image_grid_pinpoints=_pinpoints(image_size),
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return transformers.LlavaNextForConditionalGeneration(config), processor


def tiny_llava_onevision(words: list[str] | None, image_size: int = 32, patch_size: int = 8):
    """LLaVA-OneVision (any-res with anyres_max_9, SigLIP tower, Qwen2 decoder, im_start format)."""
    tokenizer = family_tokenizer(SPECIAL_TOKENS["llava_onevision"], words)
    image_processor = transformers.LlavaOnevisionImageProcessor(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=_pinpoints(image_size),
    )
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=transformers.LlavaOnevisionVideoProcessor(),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=CHAT_TEMPLATES["llava_onevision"],
    )
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(
            image_size=image_size, patch_size=patch_size, **VISION, **VISION_HEADS
        ),
        text_config=transformers.Qwen2Config(**_text(tokenizer)),
        image_grid_pinpoints=_pinpoints(image_size),
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return transformers.LlavaOnevisionForConditionalGeneration(config), processor


def tiny_qwen2_5_vl(words: list[str] | None, max_side: int = 96, patch_size: int = 8):
    """Qwen2.5-VL (native resolution, 2x2 token merging; ``max_side``^2 pixels at most)."""
    tokenizer = family_tokenizer(SPECIAL_TOKENS["qwen2_5_vl"], words)
    factor = 2 * patch_size
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 4 * factor * factor, "longest_edge": max_side * max_side},
    )
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=2),
        chat_template=CHAT_TEMPLATES["qwen2_5_vl"],
    )
    # mrope: temporal, height and width sections of half the 16-wide head dimension
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = transformers.Qwen2_5_VLConfig(
        text_config=_text(tokenizer, rope_parameters=rope),
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT["hidden_size"],
            "patch_size": patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 4 * factor,
            "fullatt_block_indexes": [0],
        },
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_start_token_id,
        vision_end_token_id=tokenizer.vision_end_token_id,
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config), processor


def tiny_internvl(words: list[str] | None, image_size: int = 64, patch_size: int = 8):
    """InternVL3 (InternViT tower, pixel-shuffle 0.5, Qwen2 decoder; dynamic tiling into 1-6
    tiles of ``image_size`` plus a thumbnail, as InternVL3's 1-12 tiles)."""
    tokenizer = family_tokenizer(SPECIAL_TOKENS["internvl"], words)
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, max_patches=6
    )
    processor = transformers.InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=transformers.InternVLVideoProcessor(),
        image_seq_length=(image_size // patch_size // 2) ** 2,
        chat_template=CHAT_TEMPLATES["internvl"],
    )
    config = transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(
            image_size=image_size, patch_size=patch_size, **VISION, **VISION_HEADS
        ),
        text_config=transformers.Qwen2Config(**_text(tokenizer)),
        image_token_id=tokenizer.context_image_token_id,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
    )
    return transformers.InternVLForConditionalGeneration(config), processor


def tiny_deepseek_vl(words: list[str] | None, image_size: int = 32, patch_size: int = 8):
    """DeepSeek-VL (SigLIP tower, two-layer aligner, Llama decoder, ``User:``/``Assistant:``)."""
    tokenizer = family_tokenizer(SPECIAL_TOKENS["deepseek_vl"], words)
    image_processor = transformers.DeepseekVLImageProcessor(
        size={"height": image_size, "width": image_size}, min_size=patch_size
    )
    processor = transformers.DeepseekVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        chat_template=CHAT_TEMPLATES["deepseek_vl"],
    )
    config = transformers.DeepseekVLConfig(
        vision_config=transformers.SiglipVisionConfig(
            image_size=image_size, patch_size=patch_size, **VISION, **VISION_HEADS
        ),
        text_config=transformers.LlamaConfig(**_text(tokenizer)),
        image_token_id=tokenizer.image_token_id,
    )
    return transformers.DeepseekVLForConditionalGeneration(config), processor


def tiny_deepseek_vl_hybrid(words: list[str] | None, image_size: int = 32, patch_size: int = 8):
    """DeepSeek-VL 7B's hybrid tower: SigLIP (low res) + SAM ViT (high res) fused per token."""
    tokenizer = family_tokenizer(SPECIAL_TOKENS["deepseek_vl_hybrid"], words)
    high_res = 2 * image_size
    image_processor = transformers.DeepseekVLHybridImageProcessor(
        size={"height": image_size, "width": image_size},
        high_res_size={"height": high_res, "width": high_res},
        min_size=patch_size,
    )
    processor = transformers.DeepseekVLHybridProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        chat_template=CHAT_TEMPLATES["deepseek_vl_hybrid"],
    )
    config = transformers.DeepseekVLHybridConfig(
        vision_config=transformers.SiglipVisionConfig(
            image_size=image_size, patch_size=patch_size, **VISION, **VISION_HEADS
        ),
        high_res_vision_config=transformers.SamVisionConfig(
            image_size=high_res,
            patch_size=patch_size,
            hidden_size=32,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=16,
        ),
        text_config=transformers.LlamaConfig(**_text(tokenizer)),
        image_token_id=tokenizer.image_token_id,
    )
    return transformers.DeepseekVLHybridForConditionalGeneration(config), processor


def tokenizer_for(family: str, words: list[str] | None) -> PreTrainedTokenizerFast:
    """:func:`family_tokenizer` with ``family``'s special tokens, extra tokens and extra words."""
    extra = EXTRA_TOKENS.get(family, ()), EXTRA_WORDS.get(family, ())
    return family_tokenizer(SPECIAL_TOKENS[family], words, *extra)


def with_tokenizer(family: str, builder):
    """A ``words -> (model, processor)`` builder from one that takes the family's tokenizer and
    chat template (the builders of :mod:`flmm.foundation.tiny_mistral`)."""
    return lambda words: builder(tokenizer_for(family, words), CHAT_TEMPLATES[family])


BUILDERS = {
    "llava_next": tiny_llava_next,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "internvl": tiny_internvl,
    "deepseek_vl": tiny_deepseek_vl,
    "deepseek_vl_hybrid": tiny_deepseek_vl_hybrid,
    "smolvlm": tiny_idefics.tiny_smolvlm,
    "idefics3": tiny_idefics.tiny_idefics3,
    "gemma3": tiny_gemma3,
    "paligemma": tiny_paligemma,
    "mistral3": with_tokenizer("mistral3", tiny_mistral.tiny_mistral3),
    "aya_vision": with_tokenizer("aya_vision", tiny_mistral.tiny_aya_vision),
    "qwen3_vl": tiny_qwen3.tiny_qwen3_vl,
    "glm4v": tiny_qwen3.tiny_glm4v,
    "qwen3_vl_moe": tiny_qwen3.tiny_qwen3_vl_moe,
    "glm4v_moe": tiny_qwen3.tiny_glm4v_moe,
}


def build_tiny_lmm(
    out_dir: str | Path, family: str, words: list[str] | None = None, seed: int = 0
) -> Path:
    """Build a random tiny model of ``family`` (model + processor) and save it to ``out_dir``."""
    out = Path(out_dir)
    if family == "llava":
        return build_tiny_llava(out, words, seed=seed)
    if family not in BUILDERS:
        known = ", ".join(["llava", *sorted(BUILDERS)])
        raise ValueError(f"no tiny builder for LMM family {family!r}; known: {known}")
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](words)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def ensure_tiny_lmm(cache_dir: str, family: str, seed: int = 0) -> str:
    """Path of a random tiny ``family`` model under ``cache_dir`` (on the synthetic world's
    vocabulary), built on first use."""
    out = Path(cache_dir) / f"tiny_{family}_seed{seed}_random_v{TINY_VERSION}"
    return _build_once(out, lambda tmp: build_tiny_lmm(tmp, family, vocabulary(), seed))

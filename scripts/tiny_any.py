"""A tiny random model of any image-text-to-text model type, built generically from the type's own
config, image processor and processor classes (for scripts/family_reach.py).

The type's default config is shrunk (:func:`shrink`: every text and vision sub-config gets small
widths, few layers and heads; image and patch sizes are kept, so the image processor's default
size is set to the vision tower's); the tokenizer is flmm's word-level one with common image
special tokens as named attributes, plus every token string the processor names; the config's
special token ids are pointed at the tokenizer's; the processor gets the settings its config
implies (patch size, feature strategy, merge size, tokens per image) where its ``__init__`` takes
them, and a one-image chat template whose image placeholder is the first one the processor
expands. Nothing is downloaded.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

from flmm.foundation.tiny_models import IM_TEMPLATE, chat_template, family_tokenizer

# heads of 128 dimensions: the multimodal rope sections of Qwen2-VL and its kin default to 64
WIDTH, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 2, 2, 1, 128
# config attribute -> tiny value, wherever a (sub-)config has it
SMALL = {
    "hidden_size": WIDTH,
    "intermediate_size": 2 * WIDTH,
    "num_hidden_layers": LAYERS,
    "num_layers": LAYERS,
    "depth": LAYERS,
    "num_attention_heads": HEADS,
    "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "embed_dim": WIDTH,
    "out_hidden_size": WIDTH,
    "projector_hidden_size": WIDTH,
    "projection_dim": WIDTH,
    "text_hidden_size": WIDTH,
    "mm_hidden_size": WIDTH,
    "moe_intermediate_size": WIDTH,
    "shared_expert_intermediate_size": WIDTH,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 16384,
}
# tokenizer attribute -> token string: what processors commonly read from their tokenizer
SPECIAL = {
    "image_token": "<image>",
    "video_token": "<video>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "image_break_token": "<image_break>",
    "image_end_token": "<image_end>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
}
NOT_IMAGE_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def build_tiny_any(model_type: str, out: Path) -> Path:
    """Build and save a tiny random ``model_type`` model and its processor into ``out``."""
    config = CONFIG_MAPPING[model_type]()
    shrink(config)
    processor = build_processor(model_type, config)
    point_token_ids(config, processor)
    model_class = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
    torch.manual_seed(0)
    model = model_class(config)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    model_class.from_pretrained(out)  # a tiny config or weights that do not load back: its fault
    return out


def sub_configs(config: PretrainedConfig) -> list[PretrainedConfig]:
    """``config`` and every nested sub-config."""
    found = [config]
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if isinstance(sub, PretrainedConfig):
            found += sub_configs(sub)
    return found


def shrink(config: PretrainedConfig) -> None:
    """Small widths, layers and heads on ``config`` and its sub-configs, in place; per-layer lists
    cut to the new depth; vision feature layers pointed at the last layer."""
    for sub in sub_configs(config):
        for key, value in SMALL.items():
            if isinstance(getattr(sub, key, None), int):
                setattr(sub, key, value)
        for key in ("layer_types", "mlp_layer_types"):
            if isinstance(getattr(sub, key, None), list):
                setattr(sub, key, getattr(sub, key)[:LAYERS])
        for key in ("vision_feature_layer", "vision_feature_layers"):
            value = getattr(sub, key, None)
            if isinstance(value, int):
                setattr(sub, key, -1)
            elif isinstance(value, list):
                setattr(sub, key, [-1] * len(value))
        if isinstance(getattr(sub, "fullatt_block_indexes", None), list):
            sub.fullatt_block_indexes = [LAYERS - 1]
        rescale_mrope(sub)


def rescale_mrope(config: PretrainedConfig) -> None:
    """Multimodal rope sections (temporal, height, width) rescaled to sum to half the new head
    dimension, in place."""
    rope = getattr(config, "rope_parameters", None)
    sections = rope.get("mrope_section") if isinstance(rope, dict) else None
    if not sections:
        return
    heads = getattr(config, "num_attention_heads", HEADS)
    half = (getattr(config, "head_dim", None) or config.hidden_size // heads) // 2
    scaled = [max(1, x * half // sum(sections)) for x in sections]
    scaled[0] += half - sum(scaled)
    rope["mrope_section"] = scaled


def vision_size(config: PretrainedConfig) -> tuple[int | None, int | None]:
    """``(image_size, patch_size)`` of the vision sub-config (None where absent)."""
    vision = getattr(config, "vision_config", None) or config
    return getattr(vision, "image_size", None), getattr(vision, "patch_size", None)


def image_processor_of(model_type: str, config: PretrainedConfig):
    """The type's image processor with default settings, its size set to the vision tower's
    image size (a square) where it has one."""
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    name = names.get("torchvision") or names.get("pil") if isinstance(names, dict) else names
    processor = getattr(transformers, name)()
    side, _ = vision_size(config)
    if isinstance(side, int):
        for key in ("size", "crop_size"):
            resize(getattr(processor, key, None), side)
    vision = getattr(config, "vision_config", None)
    for key, own in (
        ("patch_size", "patch_size"),
        ("temporal_patch_size", "temporal_patch_size"),
        ("merge_size", "spatial_merge_size"),
    ):
        if isinstance(getattr(processor, key, None), int) and isinstance(
            getattr(vision, own, None), int
        ):
            setattr(processor, key, getattr(vision, own))
    if hasattr(processor, "image_seq_length") and processor.image_seq_length is None:
        processor.image_seq_length = tokens_per_image(config)
    return processor


def tokens_per_image(config: PretrainedConfig) -> int | None:
    """Image tokens per image the config implies: ``mm_tokens_per_image``, else one per patch."""
    tokens = getattr(config, "mm_tokens_per_image", None)
    side, patch = vision_size(config)
    if tokens is None and side and patch:
        tokens = (side // patch) ** 2
    return tokens


def resize(size, side: int) -> None:
    """A processor's ``size`` / ``crop_size`` (a ``SizeDict``) set to ``side`` in place: height
    and width where it has them, else its shortest edge."""
    if getattr(size, "height", None) is not None and getattr(size, "width", None) is not None:
        size.height = size.width = side
    elif getattr(size, "shortest_edge", None) is not None and size.longest_edge is None:
        size.shortest_edge = side


def processor_settings(config: PretrainedConfig, parameters) -> dict:
    """The processor ``__init__`` arguments the config implies, among ``parameters``."""
    _, patch = vision_size(config)
    strategy = getattr(config, "vision_feature_select_strategy", None)
    tokens = tokens_per_image(config)
    implied = {
        "patch_size": patch,
        "vision_feature_select_strategy": strategy,
        "num_additional_image_tokens": 1 if strategy == "default" else None,
        "spatial_merge_size": getattr(config, "spatial_merge_size", None),
        "image_seq_length": tokens,
        "num_image_tokens": tokens,
    }
    return {k: v for k, v in implied.items() if k in parameters and v is not None}


def build_processor(model_type: str, config: PretrainedConfig):
    """The type's processor on a tiny tokenizer that holds every token string it names, with a
    one-image chat template."""
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    parameters = inspect.signature(processor_class.__init__).parameters
    kwargs = {"image_processor": image_processor_of(model_type, config)}
    kwargs.update(processor_settings(config, parameters))
    video = VIDEO_PROCESSOR_MAPPING_NAMES.get(model_type)
    if "video_processor" in parameters and video:
        name = video.get("torchvision") if isinstance(video, dict) else video
        kwargs["video_processor"] = getattr(transformers, name)()
    special, extra = dict(SPECIAL), []
    for _ in range(12):  # until the tokenizer has every token the processor reads or names
        tokenizer = family_tokenizer(special, None)
        tokenizer.add_special_tokens(
            {"additional_special_tokens": extra}, replace_extra_special_tokens=False
        )
        try:
            processor = processor_class(tokenizer=tokenizer, **kwargs)
        except (AttributeError, ValueError) as err:
            missing = re.search(r"attribute '?(\w+_token)'?", str(err))
            if missing is None or missing.group(1) in special:
                raise
            special[missing.group(1)] = f"<{missing.group(1)}>"
            continue
        named = sorted(set(token_strings(processor)) - set(tokenizer.get_vocab()))
        if not named:
            break
        extra += named
    processor.chat_template = chat_template(
        IM_TEMPLATE[0], placeholder(processor), IM_TEMPLATE[2], IM_TEMPLATE[1]
    )
    return processor


def token_strings(processor) -> list[str]:
    """The special token strings a processor names (``*_token`` string attributes)."""
    found = []
    for name in dir(processor):
        if name.endswith("_token") and not name.startswith("_") and name not in NOT_IMAGE_TOKENS:
            value = getattr(processor, name, None)
            if isinstance(value, str) and value:
                found.append(value)
    return found


def placeholder(processor) -> str:
    """The first token string that, written in a prompt, the processor expands into image tokens
    for one image."""
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    candidates = [getattr(processor, n, None) for n in ("image_token", "boi_token")]
    tried = {}
    for text in [c for c in candidates if isinstance(c, str)] + token_strings(processor):
        try:
            enc = processor(images=[image], text=[f"a {text} b"], return_tensors="pt")
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as err:
            tried[text] = f"{type(err).__name__}: {err}"[:80]
            continue
        if int((enc["input_ids"] == getattr(processor, "image_token_id", -1)).sum()) > 1:
            return text
        tried[text] = "no image tokens"
    raise ValueError(f"no token string the processor expands into image tokens ({tried})")


def point_token_ids(config: PretrainedConfig, processor) -> None:
    """The config's special token ids (image, video, begin/end of image..., bos/eos/pad) set to
    the tokenizer's ids of the same names, a fresh token where it has none; vocabularies sized
    to the tokenizer."""
    tokenizer = processor.tokenizer
    for sub in sub_configs(config):
        for key in [k for k in sub.to_dict() if k.endswith(("_token_id", "_token_index"))]:
            if not isinstance(getattr(sub, key), int):
                continue
            base = key.rsplit("_", 1)[0]
            setattr(sub, key, token_id(processor, tokenizer, base, key))
    for sub in sub_configs(config):
        if isinstance(getattr(sub, "vocab_size", None), int):
            sub.vocab_size = len(tokenizer)


def token_id(processor, tokenizer, base: str, key: str) -> int:
    """The tokenizer's id of the token the processor (or tokenizer) names ``base`` (such as
    ``image_token``); a new special token ``<key>`` when neither names one."""
    own = getattr(processor, f"{base}_id", None)
    if isinstance(own, int):
        return own
    for holder in (processor, tokenizer):
        text = getattr(holder, base, None)
        if isinstance(text, str) and text in tokenizer.get_vocab():
            return tokenizer.convert_tokens_to_ids(text)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [f"<{key}>"]}, replace_extra_special_tokens=False
    )
    return tokenizer.convert_tokens_to_ids(f"<{key}>")

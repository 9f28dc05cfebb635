"""Random models of every registered LMM family at the published shapes of its headline checkpoint.

``published/<family>.json`` records the headline checkpoint's ``config.json``, its processor
settings and special tokens (facts, no weights; each file says where its values come from and
which could not be confirmed). :func:`build_real_shape` builds the family's real
``*ForConditionalGeneration`` from that config and its real processor with the published settings,
and saves both with ``save_pretrained``: the folder loads through
``FrozenLMM.from_pretrained(out_dir, family=...)``, the path a user's 7B model takes.

What stays real: every width, head and kv-head count, MLP size, rope setting and position limit,
the vision geometry (image, patch and tile sizes, merge and window sizes, feature layers) and every
processor setting. What is cut:

- the depth (``text_layers`` / ``vision_layers``; None keeps the published depth). A vision tower
  keeps the layer pattern of its last layers (Qwen2.5-VL's full-attention blocks, SAM's global
  attention blocks); Qwen3-VL's DeepStack stays active: its taps before the kept layers move to
  the first kept one.
- with the depth, the experts of a mixture-of-experts decoder: the first
  ``2 x num_experts_per_tok`` are kept (:func:`cut_experts`), so routing still chooses among them
  and every expert keeps its shape.
- the vocabulary: no tokenizer can be downloaded here, so the word-level tokenizer of the tiny
  models (:func:`flmm.foundation.tiny_models.family_tokenizer`, with the family's real
  special-token strings and chat format) stands in, the embedding and LM head have its size and the
  image token ids are its ids. The vocabulary changes no attention shape.
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from pathlib import Path

import torch
import transformers

from flmm.errors import ConfigError
from flmm.foundation.tiny_models import (
    CHAT_TEMPLATES,
    SPECIAL_TOKENS,
    tokenizer_for,
)
from flmm.lmm.families import get_family

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUB_CONFIGS = ("text_config", "vision_config", "high_res_vision_config")
LAYER_INDEX_KEYS = ("fullatt_block_indexes", "global_attn_indexes")
DEEPSTACK_KEY = "deepstack_visual_indexes"
EXPERT_KEYS = ("num_local_experts", "n_routed_experts")
# config fields holding a special token's id, where the name is not "<tokenizer attribute>_id"
CONFIG_ID_FIELD = {"context_image_token": "image_token_id", "img_patch_token": "image_token_id"}


def published(family: str) -> dict:
    """The published facts of ``family``'s headline checkpoint (``published/<family>.json``)."""
    get_family(family)  # a ConfigError naming the known families
    text = resources.files("flmm.foundation").joinpath("published", f"{family}.json").read_text()
    return json.loads(text)


def cut_depth(sub: dict, layers: int | None, name: str = "layers") -> None:
    """Keep the last ``layers`` layers of a sub-config dict (in place; None: all of them).

    The depth is ``depth`` (Qwen2.5-VL's vision tower) or ``num_hidden_layers``; per-layer lists
    (``layer_types``) and layer-index lists (full / global attention blocks) follow the cut;
    DeepStack taps (``deepstack_visual_indexes``) before the kept layers move to the first kept
    one (merged), so a cut tower still feeds DeepStack features to the decoder. ``name`` names
    the setting in the error when ``layers`` is out of range.
    """
    key = "depth" if "depth" in sub else "num_hidden_layers"
    total = sub[key]
    keep = total if layers is None else layers
    if not 1 <= keep <= total:
        raise ConfigError(
            f"{name} must be None or in [1, {total}] (the published depth), got {layers}"
        )
    first = total - keep
    for index_key in LAYER_INDEX_KEYS:
        if sub.get(index_key) is not None:
            sub[index_key] = [i - first for i in sub[index_key] if i >= first]
    if sub.get(DEEPSTACK_KEY):
        sub[DEEPSTACK_KEY] = sorted({max(i - first, 0) for i in sub[DEEPSTACK_KEY]})
    if sub.get("layer_types") is not None:
        sub["layer_types"] = sub["layer_types"][first:]
    sub[key] = keep


def cut_experts(sub: dict) -> None:
    """Keep ``2 x num_experts_per_tok`` routed experts of a text sub-config dict (in place).

    The count is ``num_local_experts`` (Qwen3-VL-MoE's ``num_experts``) or GLM-4.5V's
    ``n_routed_experts``; a dense config is untouched.
    """
    for key in EXPERT_KEYS:
        if sub.get(key) and sub.get("num_experts_per_tok"):
            sub[key] = min(sub[key], 2 * sub["num_experts_per_tok"])


def real_shape_config(
    family: str,
    tokenizer: transformers.PreTrainedTokenizerBase,
    text_layers: int | None = 2,
    vision_layers: int | None = 2,
):
    """The family's HF config from its published ``config.json``, depth, experts and vocabulary
    cut.

    The published dict goes through the config class first, so omitted fields get the class
    defaults and legacy keys are read exactly as when the hub checkpoint loads.
    """
    fam = get_family(family)
    config_class = getattr(transformers, fam.model_class).config_class
    raw = config_class.from_dict(published(family)["config"]).to_dict()
    for name in SUB_CONFIGS:
        if name in raw:
            text = name == fam.text_config
            layers, arg = (text_layers, "text_layers") if text else (vision_layers, "vision_layers")
            cut_depth(raw[name], layers, f"{family} {arg} ({name})")
    if text_layers is not None:  # a full-depth build keeps every expert too
        cut_experts(raw[fam.text_config])
    raw[fam.text_config].update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = config_class.from_dict(raw)
    for name in SPECIAL_TOKENS[family]:
        field = CONFIG_ID_FIELD.get(name, f"{name}_id")
        if hasattr(config, field):
            setattr(config, field, getattr(tokenizer, f"{name}_id"))
    return config


def _from_settings(settings: dict, type_key: str):
    """An image or video processor of the published class with the published settings."""
    # transformers 5 dropped the ``Fast`` suffix that older checkpoints' files name
    name = settings[type_key].removesuffix("Fast")
    return getattr(transformers, name)(**{k: v for k, v in settings.items() if k != type_key})


def real_processor(family: str, tokenizer: transformers.PreTrainedTokenizerBase):
    """The family's real HF processor with the published image / video processor settings and
    processor arguments, around ``tokenizer`` and the family's chat format."""
    settings = published(family)["processor"]
    extra = {}
    if "video_processor" in settings:
        extra["video_processor"] = _from_settings(
            settings["video_processor"], "video_processor_type"
        )
    return getattr(transformers, get_family(family).processor_class)(
        image_processor=_from_settings(settings["image_processor"], "image_processor_type"),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATES[family],
        **extra,
        **settings["processor"],
    )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in ``dtype`` (a 7B model never exists in float32)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_real_shape(
    family: str,
    out_dir: str | Path,
    text_layers: int | None = 2,
    vision_layers: int | None = 2,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> str:
    """Build a random ``family`` model at its published shapes and save it with its processor.

    Args:
        text_layers, vision_layers: decoder / vision-tower layers kept (None: the published depth).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; parameters are created in it.
        device: where the parameters are created (``"cuda"`` builds a full-depth 7B on the GPU).

    Returns:
        ``out_dir``, loadable with ``FrozenLMM.from_pretrained(out_dir, family=family)``.
    """
    model_class = getattr(transformers, get_family(family).model_class)  # a ConfigError if unknown
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tokenizer = tokenizer_for(family, None)
    config = real_shape_config(family, tokenizer, text_layers, vision_layers)
    processor = real_processor(family, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(DTYPES[dtype]):
        model = model_class(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)

"""``model.lmm.family=auto``: a :class:`Family` row derived from a model's config, modules and
processor, for a model type the registry has no row for.

The rule (:func:`row_for`): a model type with a row in :data:`FAMILIES` uses its row; a type in
:data:`UNSERVABLE` is refused with the reason; any other image-text-to-text type of transformers
gets a provisional row from its config (:func:`provisional`), which :func:`complete` fills in from
the loaded model and processor:

- ``model_class`` / ``processor_class``: transformers' ``AutoModelForImageTextToText`` and
  ``AutoProcessor`` classes of the config's ``model_type``;
- ``decoder_layers``: the longest ``nn.ModuleList`` of causal self-attention layers (their
  ``self_attn`` has a ``layer_idx``), ``text_config`` the sub-config of the module holding it,
  ``final_norm`` that module's one norm;
- ``grid``: ``"thw"`` when the processor returns ``image_grid_thw``, ``"anyres"`` when it returns
  ``image_sizes`` and has ``image_grid_pinpoints``, ``"tiles"`` when it crops to patches, else
  ``"square"`` when a wide and a tall image get the same square number of image tokens;
  ``pad_to_square`` for the square rule only.

A derived row must then pass :func:`flmm.lmm.self_check.self_check` before anything trains.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import fields, replace

import numpy as np
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from flmm.errors import ModelLoadError
from flmm.lmm.families import FAMILIES, Family, family_of_model_type
from flmm.lmm.processing import process
from flmm.lmm.self_check import self_check

log = logging.getLogger(__name__)

AUTO = "auto"
# model types that no row can serve: model_type -> why (the image is not a grid of tokens in the
# decoder's sequence, so there is no phrase-to-image attention to capture)
CROSS = "its decoder reads the image through cross-attention, not image tokens in its sequence"
ENCODER_DECODER = "an encoder-decoder: the image is in the encoder, the text in the decoder"
QUERIES = "its image tokens are learned queries of a resampler, not positions on the image"
UNSERVABLE = {
    "mllama": CROSS,
    "idefics": CROSS,
    "blip": CROSS,
    "florence2": ENCODER_DECODER,
    "pix2struct": ENCODER_DECODER,
    "udop": ENCODER_DECODER,
    "t5gemma2": ENCODER_DECODER,
    "vision-encoder-decoder": ENCODER_DECODER,
    "blip-2": QUERIES,
    "instructblip": QUERIES,
    "instructblipvideo": QUERIES,
    "kosmos-2": QUERIES,
}
# the frame side of native-resolution and tiled rows (the shipped rows' choice)
GRID_SIZE = 32
FINE_SCALE = 2
PROBES = ((60, 90), (90, 40))
ROW_FIELDS = ("grid", "grid_size", "pad_to_square", "processor_kwargs", "fine_scale")


class DeriveError(ValueError):
    """Derivation failed; ``fields`` names the row fields to set by hand."""

    def __init__(self, fields: tuple[str, ...], reason: str) -> None:
        super().__init__(reason)
        self.fields = fields


def refusal(name_or_path: str, model_type: str, fields: tuple[str, ...], reason: str):
    """The one-line :class:`ModelLoadError` of a model ``auto`` cannot serve."""
    return ModelLoadError(
        f"model.lmm.family=auto cannot serve {name_or_path!r} (model_type {model_type!r}): "
        f"{reason}; to use it, add a Family row for {model_type!r} to flmm/lmm/families.py "
        f"setting {', '.join(fields)} (docs/families.md, 'family=auto')"
    )


def row_for(name_or_path: str, model_type: str) -> Family:
    """The registry's row of ``model_type``, else a provisional derived row; a
    :class:`ModelLoadError` for an unservable or unknown type."""
    known = family_of_model_type(model_type)
    if known is not None:
        return FAMILIES[known]
    if model_type in UNSERVABLE:
        raise ModelLoadError(
            f"flmm cannot ground with {name_or_path!r} (model_type {model_type!r}): "
            f"{UNSERVABLE[model_type]}"
        )
    try:
        return provisional(model_type)
    except DeriveError as err:
        raise refusal(name_or_path, model_type, err.fields, str(err)) from None


def provisional(model_type: str) -> Family:
    """A row of ``model_type`` with its model and processor classes (from transformers' auto
    mappings), the layout fields still the defaults (:func:`complete` derives them)."""
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if not model_class or not hasattr(transformers, model_class):
        raise DeriveError(
            ("model_class",), "not an image-text-to-text model type of this transformers"
        )
    processor_class = PROCESSOR_MAPPING_NAMES.get(model_type)
    if not processor_class or not hasattr(transformers, processor_class):
        raise DeriveError(("processor_class",), "transformers has no processor class for it")
    return Family(model_type, model_class, processor_class, ())


def is_derived(family: Family) -> bool:
    """Whether ``family`` is not a registry row (auto derived it)."""
    return FAMILIES.get(family.name) is not family


def complete(family: Family, model: nn.Module, processor) -> Family:
    """``family`` with its decoder, text config, final norm and grid fields derived from the
    loaded ``model`` and ``processor``; a :class:`DeriveError` names the fields it could not."""
    layers_path, holder = decoder_layers(model)
    text_config = sub_config_of(model.config, holder)
    prefix = layers_path.rpartition(".")[0]
    norm = f"{prefix}.{final_norm(holder)}" if prefix else final_norm(holder)
    check_image_token(model.config, processor)
    family = replace(family, text_config=text_config, decoder_layers=layers_path, final_norm=norm)
    return replace(family, **grid_fields(family, processor))


def serve(name_or_path: str, family: Family, model: nn.Module, processor, build: Callable):
    """``build(family)`` (a :class:`flmm.lmm.FrozenLMM` of ``model``); for a row auto derived,
    the completed row, self-checked, its source logged; a one-line :class:`ModelLoadError` when
    derivation or the self-check fails."""
    if not is_derived(family):
        return build(family)
    try:
        family = complete(family, model, processor)
    except DeriveError as err:
        raise refusal(name_or_path, family.name, err.fields, str(err)) from None
    try:
        lmm = build(family)
        self_check(lmm)
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        fields_ = ("text_config", "decoder_layers", "final_norm", *ROW_FIELDS)
        raise refusal(
            name_or_path,
            family.name,
            fields_,
            f"the derived row {family_source(family)} failed its self-check ({reason})",
        ) from err
    log.info("model.lmm.family=auto derived and self-checked this row: %s", family_source(family))
    return lmm


def decoder_layers(model: nn.Module) -> tuple[str, nn.Module]:
    """The attribute path of the decoder layer list (the causal one, then the longest, of the
    lists of numbered self-attention layers), and the module holding it."""
    found = [
        (is_causal(module), len(module), name)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and has_attention(module[0])
    ]
    if not found:
        mixed = any(
            isinstance(m, nn.ModuleList) and any(map(has_attention, m)) for m in model.modules()
        )
        reason = "its decoder mixes attention with other layers (linear attention, convolutions)"
        raise DeriveError(
            ("decoder_layers", "final_norm", "text_config"),
            reason if mixed else "no list of decoder layers with self-attention found",
        )
    path = max(found)[2]
    return path, model.get_submodule(path.rpartition(".")[0])


def has_attention(layer: nn.Module) -> bool:
    """A layer whose ``self_attn`` is numbered (``layer_idx``), which is what the capture reads."""
    return hasattr(getattr(layer, "self_attn", None), "layer_idx")


def is_causal(layers: nn.ModuleList) -> bool:
    """Whether every layer's attention is causal (a decoder's; a vision tower's is not)."""
    return all(getattr(layer.self_attn, "is_causal", False) for layer in layers)


def sub_config_of(config, holder: nn.Module) -> str:
    """The name of the sub-config of ``config`` that configures ``holder``."""
    for name in config.sub_configs:
        if getattr(config, name, None) is getattr(holder, "config", ()):
            return name
    raise DeriveError(("text_config",), "the decoder's config is not a sub-config of the model's")


def final_norm(holder: nn.Module) -> str:
    """The name of the one norm module among ``holder``'s children (``norm`` if several)."""
    norms = [n for n, m in holder.named_children() if "norm" in type(m).__name__.lower()]
    if "norm" in norms:
        return "norm"
    if len(norms) != 1:
        raise DeriveError(("final_norm",), f"no single final norm beside the layers ({norms})")
    return norms[0]


def check_image_token(config, processor) -> None:
    """The processor names an image token id, and it is the config's."""
    token = getattr(processor, "image_token_id", None)
    if not isinstance(token, int):
        raise DeriveError(("processor_class",), "the processor has no image_token_id")
    for key in ("image_token_id", "image_token_index"):
        own = getattr(config, key, None)
        if isinstance(own, int) and own != token:
            raise DeriveError(
                ("processor_class",),
                f"the processor's image token {token} is not the config's {key}={own}",
            )


def grid_fields(family: Family, processor) -> dict:
    """``grid`` (and ``grid_size``, ``fine_scale``, ``pad_to_square``, ``processor_kwargs``) from
    what the processor returns for a wide and a tall probe image."""
    image = processor.image_processor
    if getattr(image, "crop_to_patches", None) is not None:
        kwargs = {"crop_to_patches": True}
        return {
            "grid": "tiles",
            "grid_size": GRID_SIZE,
            "pad_to_square": False,
            "processor_kwargs": kwargs,
        }
    encs = [probe(processor, family, shape) for shape in PROBES]
    if "image_grid_thw" in encs[0]:
        return {"grid": "thw", "grid_size": GRID_SIZE, "pad_to_square": False}
    if "image_sizes" in encs[0] and getattr(image, "image_grid_pinpoints", None):
        return {"grid": "anyres", "fine_scale": FINE_SCALE, "pad_to_square": False}
    counts = [int((enc["input_ids"] == processor.image_token_id).sum()) for enc in encs]
    if counts[0] != counts[1] or math.isqrt(counts[0]) ** 2 != counts[0] or not counts[0]:
        raise DeriveError(
            ROW_FIELDS,
            f"{counts} image tokens for {PROBES} images fit no grid rule of flmm.lmm.grids",
        )
    return {"grid": "square", "pad_to_square": True}


def probe(processor, family: Family, shape: tuple[int, int]) -> dict:
    """The processor's output for one black image of ``shape`` in a one-turn chat prompt."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}
    try:
        text = processor.apply_chat_template([user], add_generation_prompt=True)
        return process(processor, family, [np.zeros((*shape, 3), dtype=np.uint8)], [text])
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise DeriveError(ROW_FIELDS, f"the processor failed on a probe image: {err}") from err


def family_source(family: Family) -> str:
    """``Family(...)`` Python source of ``family`` (fields that differ from the defaults), to
    paste into :data:`FAMILIES`."""
    defaults = Family("x", "x", "x", ())
    args = [repr(family.name), repr(family.model_class), repr(family.processor_class), "()"]
    for f in fields(Family)[4:]:
        value = getattr(family, f.name)
        if value != getattr(defaults, f.name):
            args.append(f"{f.name}={value!r}")
    return "Family(" + ", ".join(args) + ")"

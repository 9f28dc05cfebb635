"""What differs between HF vision-language model families, kept as data (one row per family).

A new family is a new :class:`Family` row in :data:`FAMILIES`; the generic adapter
(:class:`flmm.lmm.adapter.FrozenLMM`) reads only these fields.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INSTRUCTION = "Please give me a description of the image."


@dataclass(frozen=True)
class Family:
    """One HF VLM family.

    Attributes:
        name: registry key (``model.lmm.family=...``).
        model_class: ``transformers`` class name of the full model.
        processor_class: ``transformers`` class name of the processor.
        text_config: name of the text sub-config (the decoder that gets ``"flmm_capture"``).
        decoder_layers: attribute path from the full model to its decoder layer list.
        image_token_attr: config attribute holding the image token id.
        grid: how image tokens map to a 2-D grid; ``"square"`` = ``(S, S)`` with
            ``S = vision_config.image_size // vision_config.patch_size``, row-major.
        pad_to_square: pad images to a square (top-left) before the processor, so that its
            resize/crop keeps the whole image.
        instruction: default user-turn instruction.
    """

    name: str
    model_class: str
    processor_class: str
    text_config: str
    decoder_layers: str
    image_token_attr: str
    grid: str
    pad_to_square: bool
    instruction: str = DEFAULT_INSTRUCTION


FAMILIES: dict[str, Family] = {
    "llava": Family(
        name="llava",
        model_class="LlavaForConditionalGeneration",
        processor_class="LlavaProcessor",
        text_config="text_config",
        decoder_layers="model.language_model.layers",
        image_token_attr="image_token_id",
        grid="square",
        pad_to_square=True,
    ),
}


def list_lmms() -> list[str]:
    """Names of the registered LMM families."""
    return sorted(FAMILIES)


def get_family(name: str) -> Family:
    """The :class:`Family` registered under ``name``; a clear ``KeyError`` listing known names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(
            f"unknown LMM family {name!r}; known families: {', '.join(list_lmms())}"
        ) from None


def grid_shape(family: Family, config) -> tuple[int, int]:
    """``(h, w)`` of the image-token grid of a model with this family and HF ``config``."""
    if family.grid == "square":
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side, side
    raise ValueError(f"family {family.name!r} has an unknown grid rule {family.grid!r}")

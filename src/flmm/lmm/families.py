"""What differs between HF vision-language model families, kept as data (one row per family).

A new family is a new :class:`Family` row in :data:`FAMILIES` (plus a ``conf/model/lmm/*.yaml``);
the generic adapter (:class:`flmm.lmm.adapter.FrozenLMM`) reads only these fields, and the grid
rules it names live in :mod:`flmm.lmm.grids`. For a model type without a row,
``model.lmm.family=auto`` derives one from the model and self-checks it (:mod:`flmm.lmm.derive`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers

from flmm.errors import ConfigError
from flmm.lmm.grids import GRIDS

DEFAULT_INSTRUCTION = "Please give me a description of the image."


@dataclass(frozen=True)
class Family:
    """One HF VLM family.

    Attributes:
        name: registry key (``model.lmm.family=...``).
        model_class: ``transformers`` class name of the full model.
        processor_class: ``transformers`` class name of the processor.
        checkpoints: real hub checkpoints of the family (documentation and configs).
        grid: the rule laying image tokens out on 2-D grids (a key of
            :data:`flmm.lmm.grids.GRIDS`): ``"square"`` one ``S x S`` grid, ``S^2`` = the image
            tokens the processor inserts; ``"anyres"`` the base ``S x S`` grid plus the unpadded
            high-res grid without its newline tokens; ``"thw"`` the merged ``image_grid_thw`` grid;
            ``"tiles"`` InternVL's mosaic of tiles plus its thumbnail; ``"crops"`` SmolVLM's and
            Idefics3's mosaic of crops (read from the processor's row/column markers) plus the
            global image; ``"native"`` Pixtral's ``image_sizes`` grid, its row-break tokens left
            out.
        pad_to_square: pad images to a centred square before the processor, so that its
            resize/crop keeps the whole image and the grid covers the square frame; otherwise the
            grids cover the image itself and are resampled onto its region of the frame.
        fine_scale: any-res: the output grid side is ``fine_scale`` x the base grid side.
        grid_size: the output grid side when the token grid has no fixed size (``"thw"``,
            ``"tiles"``, ``"crops"``, ``"native"``).
        processor_kwargs: keyword arguments for every processor call.
        text_config: name of the text sub-config (the decoder that gets ``"flmm_capture"``).
        decoder_layers: attribute path from the full model to its decoder layer list.
        final_norm: attribute path to the norm after the last decoder layer (HF's last hidden
            state, which the text prompts read, is its output).
        images_per_prompt: the processor takes a list of images per prompt, not a flat list.
        prefix_lm: PaliGemma's prefix-LM prompt (its checkpoints ship no chat template): the user
            turn is the processor's text (the prefix, attended bidirectionally with the image),
            the answer its suffix (causal); :mod:`flmm.lmm.processing`.
        instruction: default user-turn instruction.
        tiny_grid_size: ``grid_size`` of ``model=<family>_tiny`` where the family rule does not
            fit the tiny model (None: the family rule).
    """

    name: str
    model_class: str
    processor_class: str
    checkpoints: tuple[str, ...]
    grid: str = "square"
    pad_to_square: bool = True
    fine_scale: int = 1
    grid_size: int | None = None
    processor_kwargs: dict = field(default_factory=dict)
    images_per_prompt: bool = False
    prefix_lm: bool = False
    text_config: str = "text_config"
    decoder_layers: str = "model.language_model.layers"
    final_norm: str = "model.language_model.norm"
    instruction: str = DEFAULT_INSTRUCTION
    tiny_grid_size: int | None = None

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"family {self.name!r}: grid must be one of {sorted(GRIDS)}")
        if self.grid in ("thw", "tiles", "crops", "native") and not self.grid_size:
            raise ValueError(f"family {self.name!r}: the {self.grid!r} grid rule needs a grid_size")


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llava",
            "LlavaForConditionalGeneration",
            "LlavaProcessor",
            ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"),
        ),
        Family(
            "llava_next",
            "LlavaNextForConditionalGeneration",
            "LlavaNextProcessor",
            ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-mistral-7b-hf"),
            grid="anyres",
            pad_to_square=False,
            fine_scale=2,
        ),
        Family(
            "llava_onevision",
            "LlavaOnevisionForConditionalGeneration",
            "LlavaOnevisionProcessor",
            (
                "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
                "llava-hf/llava-onevision-qwen2-7b-ov-hf",
            ),
            grid="anyres",
            pad_to_square=False,
            fine_scale=2,
        ),
        Family(
            "qwen2_5_vl",
            "Qwen2_5_VLForConditionalGeneration",
            "Qwen2_5_VLProcessor",
            ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
            grid="thw",
            pad_to_square=False,
            grid_size=32,
            # its tiny model: a 96 px image is 6 x 6 merged tokens, resampled onto 12 x 12
            tiny_grid_size=12,
        ),
        Family(
            "qwen3_vl",
            "Qwen3VLForConditionalGeneration",
            "Qwen3VLProcessor",
            ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-2B-Instruct"),
            # 16 px patches merged 2x2: one token per 32 px; DeepStack adds visual features
            # into the first decoder layers at the image tokens (their positions stay the grid's)
            grid="thw",
            pad_to_square=False,
            grid_size=32,
            tiny_grid_size=12,
        ),
        Family(
            "qwen3_vl_moe",
            "Qwen3VLMoeForConditionalGeneration",
            "Qwen3VLProcessor",
            ("Qwen/Qwen3-VL-30B-A3B-Instruct",),
            # Qwen3-VL's image side (DeepStack included) before a mixture-of-experts decoder
            grid="thw",
            pad_to_square=False,
            grid_size=32,
            tiny_grid_size=12,
        ),
        Family(
            "glm4v",
            "Glm4vForConditionalGeneration",
            "Glm4vProcessor",
            ("zai-org/GLM-4.1V-9B-Thinking",),
            # 14 px patches merged 2x2; the image tokens sit between <|begin_of_image|> and
            # <|end_of_image|>, one per merged token
            grid="thw",
            pad_to_square=False,
            grid_size=32,
            tiny_grid_size=12,
        ),
        Family(
            "glm4v_moe",
            "Glm4vMoeForConditionalGeneration",
            "Glm4vProcessor",
            ("zai-org/GLM-4.5V",),
            # GLM-4.1V's image side before a mixture-of-experts decoder
            grid="thw",
            pad_to_square=False,
            grid_size=32,
            tiny_grid_size=12,
        ),
        Family(
            "internvl",
            "InternVLForConditionalGeneration",
            "InternVLProcessor",
            ("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-8B-hf"),
            # dynamic tiling, as the model is used: 1-12 tiles of 448 px (16 x 16 tokens) by
            # aspect ratio, plus a thumbnail; the tiles are resized, never padded
            grid="tiles",
            pad_to_square=False,
            grid_size=32,
            processor_kwargs={"crop_to_patches": True},
            # its tiny model: 64 px tiles of 4 x 4 tokens
            tiny_grid_size=8,
        ),
        Family(
            "deepseek_vl",
            "DeepseekVLForConditionalGeneration",
            "DeepseekVLProcessor",
            ("deepseek-community/deepseek-vl-1.3b-chat",),
        ),
        Family(
            "deepseek_vl_hybrid",
            "DeepseekVLHybridForConditionalGeneration",
            "DeepseekVLHybridProcessor",
            ("deepseek-community/deepseek-vl-7b-chat",),
        ),
        Family(
            "smolvlm",
            "SmolVLMForConditionalGeneration",
            "SmolVLMProcessor",
            (
                "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
                "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
                "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
            ),
            # image splitting, as the model is used: the image resized (longest side 2048 px at
            # 500M) into crops of 512 px (8 x 8 tokens after pixel shuffle), plus the global image;
            # the crops are resized, never padded
            grid="crops",
            pad_to_square=False,
            grid_size=32,
            decoder_layers="model.text_model.layers",
            final_norm="model.text_model.norm",
            images_per_prompt=True,
            # its tiny model: 64 px crops of 4 x 4 tokens
            tiny_grid_size=8,
        ),
        Family(
            "idefics3",
            "Idefics3ForConditionalGeneration",
            "Idefics3Processor",
            (
                "HuggingFaceM4/Idefics3-8B-Llama3",
                "HuggingFaceTB/SmolVLM-256M-Instruct",
                "HuggingFaceTB/SmolVLM-500M-Instruct",
                "HuggingFaceTB/SmolVLM-Instruct",
            ),
            # SmolVLM's image splitting (SmolVLM v1 checkpoints are Idefics3 models): crops of
            # 364 px (13 x 13 tokens) at 8B, of 512 px (8 x 8) at 256M, up to 4 x 4 of them
            grid="crops",
            pad_to_square=False,
            grid_size=32,
            decoder_layers="model.text_model.layers",
            final_norm="model.text_model.norm",
            images_per_prompt=True,
            tiny_grid_size=8,
        ),
        Family(
            "gemma3",
            "Gemma3ForConditionalGeneration",
            "Gemma3Processor",
            ("google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it"),
            # 896 px squashed (no crop, no padding), 64 x 64 SigLIP patches pooled to 16 x 16
            pad_to_square=False,
            images_per_prompt=True,
        ),
        Family(
            "paligemma",
            "PaliGemmaForConditionalGeneration",
            "PaliGemmaProcessor",
            ("google/paligemma2-3b-mix-448", "google/paligemma2-3b-pt-224"),
            # 448 px squashed (no crop, no padding), 32 x 32 SigLIP tokens (224 px: 16 x 16)
            pad_to_square=False,
            prefix_lm=True,
            instruction="caption en",
        ),
        Family(
            "mistral3",
            "Mistral3ForConditionalGeneration",
            "PixtralProcessor",
            (
                "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
                "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
            ),
            # Pixtral at the image's own resolution (longest edge <= 1540 px), 28 px a token:
            # up to 55 x 55 tokens
            grid="native",
            pad_to_square=False,
            grid_size=32,
            # its tiny model: a 96 px image is 6 x 6 merged tokens, resampled onto 12 x 12
            tiny_grid_size=12,
        ),
        Family(
            "aya_vision",
            "AyaVisionForConditionalGeneration",
            "AyaVisionProcessor",
            ("CohereLabs/aya-vision-8b", "CohereLabs/aya-vision-32b"),
            # InternVL's layout: 1-12 tiles of 364 px (13 x 13 tokens after the pixel shuffle)
            # by aspect ratio, plus a thumbnail
            grid="tiles",
            pad_to_square=False,
            grid_size=26,
            processor_kwargs={"crop_to_patches": True},
            # its tiny model: 64 px tiles of 4 x 4 tokens
            tiny_grid_size=8,
        ),
    )
}


def family_of_model_type(model_type: str) -> str | None:
    """The registered family whose model class has HF config ``model_type`` (None if none)."""
    for family in FAMILIES.values():
        config_class = getattr(transformers, family.model_class).config_class
        if config_class.model_type == model_type:
            return family.name
    return None


def list_lmms() -> list[str]:
    """Names of the registered LMM families."""
    return sorted(FAMILIES)


def get_family(name: str) -> Family:
    """The :class:`Family` registered under ``name``; a :class:`ConfigError` lists known names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown LMM family {name!r}; known families: {', '.join(list_lmms())} "
            "(set model.lmm.family=...)"
        ) from None

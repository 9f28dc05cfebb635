"""One generic adapter turning a frozen HF vision-language model into a grounding feature extractor.

``FrozenLMM(batch) -> CaptureOutput``: the image and an instruction go in the user turn, the text to
ground in the assistant turn (teacher forcing); one frozen forward over the whole batch captures the
phrase-to-image attention of every layer and the phrase tokens' hidden states of the last layers.

The adapter holds the model and runs the forward; its parts live beside it: the prompts and the
phrases' tokens in :mod:`flmm.lmm.prompts`, the image tokens' grids on the frame in
:mod:`flmm.lmm.layout`, the hidden-state hooks in :mod:`flmm.lmm.hidden_states`, chat answers in
:mod:`flmm.lmm.generation`, loading in :mod:`flmm.lmm.loading`.
"""

from __future__ import annotations

import functools
import operator

import numpy as np
import torch
from torch import nn

from flmm.attention.capture import MERGES, capture, phrase_rows, use_capture
from flmm.errors import ConfigError
from flmm.lmm import derive, generation, grids, hidden_states, layout, loading, processing, prompts
from flmm.lmm.families import Family
from flmm.types import CaptureOutput, GroundingBatch


class FrozenLMM(nn.Module):
    """A frozen HF VLM + processor; ``forward(batch) -> CaptureOutput``.

    Args:
        model: the HF model (its text decoder is switched to ``"flmm_capture"`` here).
        processor: its HF processor.
        family: the :class:`Family` row describing ``model``.
        model_id: the name or path it was loaded from.
        text_layers: keep hidden states of the last ``text_layers`` decoder layers (None = all).
        merge: ``"mean"`` or ``"max"`` over the tokens of a phrase.
        instruction: user-turn instruction (the family's default when None).
        grid_size: side ``F`` of the output attention grid (the family's rule when None).
        trust_remote_code, revision, quantization, placed: how :meth:`from_pretrained` loaded it
            (head folders and checkpoints record them): whether it could run the checkpoint's
            code, the hub commit, the quantization, whether a ``device_map`` placed it.
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        family: Family,
        model_id: str,
        text_layers: int | None = None,
        merge: str = "mean",
        instruction: str | None = None,
        grid_size: int | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        quantization: str | None = None,
        placed: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.processor, self.family, self._model_id = model, processor, family, model_id
        self.merge = merge
        self.instruction = instruction or family.instruction
        self.trust_remote_code, self.revision = trust_remote_code, revision
        self.quantization, self.placed = quantization, placed
        self.layers = operator.attrgetter(family.decoder_layers)(model)
        self.final_norm = operator.attrgetter(family.final_norm)(model)
        self.text_config = getattr(model.config, family.text_config)
        total = len(self.layers)
        self._text_layers = total if text_layers is None else text_layers
        if not 1 <= self._text_layers <= total:
            raise ConfigError(f"model.lmm.text_layers must be in [1, {total}], got {text_layers}")
        if merge not in MERGES:
            raise ConfigError(f"model.lmm.merge must be one of {MERGES}, got {merge!r}")
        # the id the model reads image features into (Gemma 3's <image_soft_token>)
        self.image_token_id = model.config.image_token_id
        # the image's token in a prompt before the processor expands it: the same token, except
        # Gemma 3's <start_of_image> and Aya Vision's "<image>" (expanded into <|IMG_PATCH|>)
        self.placeholder_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        processor.tokenizer.padding_side = "right"
        side = layout.default_grid_side(self) if grid_size is None else grid_size
        if side < 1:
            raise ConfigError(f"model.lmm.grid_size must be a positive integer, got {grid_size}")
        self._grid = (side, side)
        use_capture(model, family.text_config)
        self.model.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        family: str = "auto",
        *,
        dtype: str | torch.dtype = "auto",
        device_map=None,
        attn_implementation: str | dict | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        quantization: str | None = None,
        trust_remote_code: bool = False,
        text_layers: int | None = None,
        merge: str = "mean",
        instruction: str | None = None,
        grid_size: int | None = None,
    ) -> FrozenLMM:
        """Load model and processor with transformers' ``from_pretrained`` (a local dir or hub id).

        Args:
            family: a registered family, or ``"auto"``: the row of the checkpoint's model type,
                else one derived from its config, modules and processor and self-checked
                (:mod:`flmm.lmm.derive`).
            dtype: ``"auto"`` (bfloat16 where ``device_map`` or a bitsandbytes quantization puts
                the model on CUDA, float32 elsewhere), ``"float32"``, ``"bfloat16"``, ``"float16"``
                (or the torch dtype).
            device_map: transformers' placement (``"auto"``, ``"cuda:0"``, a dict...); None loads
                on the CPU. A placed LMM stays where it was put when the module holding it moves.
            attn_implementation: for the vision tower (``"sdpa"``, ``"eager"``,
                ``"flash_attention_2"``, or a per-sub-config dict); the text decoder always runs
                ``"flmm_capture"`` (sdpa plus the capture), whatever is asked for it.
            revision, cache_dir, local_files_only, token: hub options of the model, the
                processor and the config check alike.
            quantization: None, ``"int8"`` (torchao weight-only, CPU or CUDA), ``"8bit"`` or
                ``"4bit"`` (bitsandbytes, CUDA only): :mod:`flmm.lmm.loading`.
            trust_remote_code: run code shipped with the checkpoint (only the caller decides).
            text_layers, merge, instruction, grid_size: see :class:`FrozenLMM`.
        """
        name_or_path = str(name_or_path)
        hub = {
            "revision": revision,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "token": token,
            "trust_remote_code": trust_remote_code,
        }
        fam = loading.family_for(name_or_path, family, hub)
        how = {"dtype": dtype, "device_map": device_map, "quantization": quantization}
        model, processor = loading.load(
            name_or_path, fam, attn_implementation=attn_implementation, hub=hub, **how
        )
        build = functools.partial(
            cls,
            model,
            processor,
            model_id=name_or_path,
            text_layers=text_layers,
            merge=merge,
            instruction=instruction,
            grid_size=grid_size,
            trust_remote_code=trust_remote_code,
            revision=loading.hub_commit(name_or_path, revision, cache_dir),
            quantization=quantization,
            placed=device_map is not None,
        )
        return derive.serve(name_or_path, fam, model, processor, build)

    def train(self, mode: bool = True) -> FrozenLMM:
        """Always stays in eval mode: the LMM is frozen."""
        return super().train(False)

    def _apply(self, fn, recurse: bool = True) -> FrozenLMM:
        """Device moves and casts of the module holding the LMM (``FLMM.to(device)``, Lightning)
        reach the LMM unless ``device_map`` placed it: then it stays where transformers put it."""
        return self if self.placed else super()._apply(fn, recurse)

    @property
    def num_layers(self) -> int:
        """``L``: decoder layers of the text model."""
        return len(self.layers)

    @property
    def channels(self) -> int:
        """``L * H`` attention channels per phrase (all decoder layers x heads); ``2 * L * H`` for
        any-res families (base and high-res grids)."""
        parts = grids.PARTS[self.family.grid]
        return parts * len(self.layers) * self.text_config.num_attention_heads

    @property
    def grid(self) -> tuple[int, int]:
        """``(F, F)``: the square frame every attention map is placed on."""
        return self._grid

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_text_layers(self) -> int:
        """``S``: decoder layers whose phrase hidden states are returned."""
        return self._text_layers

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------- grounding: the capture forward
    def prompt(self, text: str, question: str | None = None) -> tuple[str, int]:
        """The chat prompt with ``text`` as the assistant turn, and where ``text`` starts in it.

        The user turn holds the image and ``question`` (None: the grounding instruction)."""
        user_text = self.instruction if question is None else question
        return prompts.grounding_prompt(self.processor, self.family, user_text, text)

    def encode(self, batch: GroundingBatch, question: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs (right-padded ``input_ids``, ``attention_mask``, ``pixel_values`` and the
        family's extras) on the model's device, plus ``token_phrase`` (``B x N``, -1 outside
        phrases) and ``region`` (``B x 4``); ``question`` as in :meth:`prompt`."""
        texts = [self.prompt(text, question) for text in batch.texts]
        images, region = processing.processor_images(self.processor, self.family, batch.images)
        enc = processing.process(self.processor, self.family, images, [p for p, _ in texts])
        prompts.check_length(self, enc, batch.texts)
        tokenizer = self.processor.tokenizer
        token_phrase = prompts.token_phrase(tokenizer, self.placeholder_id, texts, batch, enc)
        enc = self.to_model(enc)
        enc["token_phrase"], enc["region"] = token_phrase.to(self.device), region.to(self.device)
        return enc

    def to_model(self, inputs) -> dict:
        """Processor outputs on the model's device, every float tensor in the model's dtype (the
        ``pixel_values``, and DeepSeek-VL 7B's ``high_res_pixel_values`` beside them)."""
        return {
            k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }

    @torch.no_grad()
    def forward(self, batch: GroundingBatch, question: str | None = None) -> CaptureOutput:
        """One frozen forward over the batch; see :class:`flmm.types.CaptureOutput` for shapes.

        ``question``: the user turn the texts answer (None: the grounding instruction), so the
        attention of an actual conversation is captured; an argument of the call, never state
        shared between threads."""
        inputs = self.encode(batch, question)
        token_phrase, region = inputs.pop("token_phrase"), inputs.pop("region")
        rows, row_phrase = phrase_rows(token_phrase)
        num_phrases = max(batch.num_phrases)
        image_cols, counts = self.image_columns(inputs["input_ids"])
        layouts = self.layouts(inputs, counts)
        sources = hidden_states.sources(self.layers, self.final_norm, self._text_layers)
        with (
            hidden_states.collect(sources, rows) as hidden,
            capture(rows, row_phrase, image_cols, num_phrases, self.merge) as state,
        ):
            self.model(**inputs, logits_to_keep=1)
        maps = state.stacked()  # B x K x L x H x P
        keep = (row_phrase >= 0)[:, None, :, None]
        return CaptureOutput(
            maps=self.to_grid(maps.float(), layouts, region),
            phrase_mask=torch.arange(num_phrases, device=self.device)[None]
            < torch.tensor(batch.num_phrases, device=self.device)[:, None],
            hidden=(torch.stack(hidden, 1) * keep).float(),
            token_phrase=row_phrase,
            region=region,
        )

    # ------------------------------------------------ image tokens on the frame (flmm.lmm.layout)
    def image_columns(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``B x P`` positions of the image tokens in ``input_ids`` (``B x N``) and each sample's
        count ``P_b``: :func:`flmm.lmm.layout.image_columns`."""
        return layout.image_columns(input_ids, self.image_token_id)

    def layouts(self, enc: dict, counts: list[int]) -> list:
        """Per sample, its image-token grids and their positions among its image tokens."""
        return layout.layouts(self, enc, counts)

    def to_grid(self, maps: torch.Tensor, layouts: list, region: torch.Tensor) -> torch.Tensor:
        """``B x K x L x H x P`` captured attention -> ``B x K x C x F x F`` on the square frame
        (``region``: ``B x 4``): :func:`flmm.lmm.layout.to_grid`."""
        return layout.to_grid(self, maps, layouts, region)

    # ---------------------------------- conversation: chat, visual chain of thought (generation)
    def chat_inputs(
        self, images: list[np.ndarray], question: str, answer_prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        """Model inputs of one user turn (``H x W x 3`` uint8 ``images``, then ``question``),
        ready to generate the assistant turn: :func:`flmm.lmm.generation.chat_inputs`."""
        return generation.chat_inputs(self, images, question, answer_prefix)

    def generate(
        self, images: list[np.ndarray], question: str, answer_prefix: str = "", **gen
    ) -> str:
        """The LMM's answer to ``question`` about ``images`` via HF ``generate`` (``gen``:
        ``max_new_tokens``, ``do_sample``, ``streamer``...): :func:`flmm.lmm.generation.generate`."""
        return generation.generate(self, images, question, answer_prefix, **gen)

    def answer(self, image: torch.Tensor, question: str, max_new_tokens: int = 24) -> str:
        """The frozen LMM's greedy answer to ``question`` about an ``H x W x 3`` uint8 image."""
        return generation.answer(self, image, question, max_new_tokens)

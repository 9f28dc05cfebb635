"""One generic adapter turning a frozen HF vision-language model into a grounding feature extractor.

``FrozenLMM(batch) -> CaptureOutput``: the image and an instruction go in the user turn, the text to
ground in the assistant turn (teacher forcing); one frozen forward over the whole batch captures the
phrase-to-image attention of every layer and the phrase tokens' hidden states of the last layers.
"""

from __future__ import annotations

import operator
import threading

import numpy as np
import torch
from torch import nn

from flmm import frame
from flmm.attention.capture import MERGES, capture, phrase_rows, use_capture
from flmm.errors import ConfigError, DataError
from flmm.lmm import derive, grids, loading
from flmm.lmm.families import Family
from flmm.lmm.processing import process, render
from flmm.types import CaptureOutput, GroundingBatch

_SENTINEL = "\x00"


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
        side = self._default_grid_side() if grid_size is None else grid_size
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
        model, processor = loading.load(
            name_or_path,
            fam,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=attn_implementation,
            quantization=quantization,
            hub=hub,
        )

        def build(row: Family) -> FrozenLMM:
            return cls(
                model,
                processor,
                row,
                name_or_path,
                text_layers,
                merge,
                instruction,
                grid_size,
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

    def _default_grid_side(self) -> int:
        """The family's frame side: the token grid of a probe image (``"square"``), ``fine_scale``
        x the base tile's grid (``"anyres"``) or the family's fixed ``grid_size``."""
        if self.family.grid == "anyres":
            return self.family.fine_scale * grids.base_side(self.model.config)
        if self.family.grid != "square":
            return self.family.grid_size
        probe = np.zeros((64, 64, 3), dtype=np.uint8)
        enc = self._process([probe], [self.prompt("a")[0]])
        count = int((enc["input_ids"][0] == self.image_token_id).sum())
        return grids.square(self, enc, 0, count)[0].height

    def _process(self, images: list[np.ndarray], texts: list[str]):
        """The processor on images and prompts (:func:`flmm.lmm.processing.process`): every
        processor call of grounding and chat goes through here."""
        return process(self.processor, self.family, images, texts)

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

    @torch.no_grad()
    def answer(self, image: torch.Tensor, question: str, max_new_tokens: int = 24) -> str:
        """The frozen LMM's greedy answer to ``question`` about an ``H x W x 3`` uint8 image."""
        arrays, _ = self._images([torch.as_tensor(image)])
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        text = render(self.processor, self.family, [user], add_generation_prompt=True)
        inputs = self.to_model(self._process(arrays, [text]))
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )

    def prompt(self, text: str, question: str | None = None) -> tuple[str, int]:
        """The chat prompt with ``text`` as the assistant turn, and where ``text`` starts in it.

        The user turn holds the image and ``question`` (None: the grounding instruction)."""
        user_text = self.instruction if question is None else question

        def rendered(answer: str) -> str:
            conversation = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": user_text}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
            return render(self.processor, self.family, conversation)

        start = len(rendered(_SENTINEL).split(_SENTINEL)[0])
        full = rendered(text)
        if full[start : start + len(text)] != text:
            raise RuntimeError(f"the chat template altered the assistant text {text!r}")
        return full, start

    def _images(self, images: list[torch.Tensor]) -> tuple[list[np.ndarray], torch.Tensor]:
        """Processor-ready images (padded to a centred square, with the processor's mean
        colour, if the family needs it) and their ``B x 4`` regions (:func:`flmm.frame.region`)."""
        arrays = [img.cpu().numpy() for img in images]
        region = torch.stack([frame.region(*a.shape[:2]) for a in arrays])
        if not self.family.pad_to_square:
            return arrays, region
        return [frame.pad_to_square(a, self._pad_colour()) for a in arrays], region

    def _pad_colour(self) -> np.ndarray:
        """The processor's own padding colour (``background_color``), else its mean colour."""
        processor = self.processor.image_processor
        colour = getattr(processor, "background_color", None)
        if colour is None:
            colour = np.asarray(getattr(processor, "image_mean", None) or [0.0] * 3) * 255
        return np.round(np.asarray(colour)).astype(np.uint8)

    def _token_phrase(
        self, prompts: list[tuple[str, int]], batch: GroundingBatch, enc
    ) -> torch.Tensor:
        """``B x N`` phrase index of every processor token (-1 outside phrases).

        Offsets come from tokenising the unexpanded prompt; its tokens after the last image
        placeholder are the tail of the processor's (image-expanded) sequence.
        """
        tok = self.processor.tokenizer(
            [p for p, _ in prompts], return_offsets_mapping=True, add_special_tokens=False
        )
        token_phrase = torch.full(enc["input_ids"].shape, -1, dtype=torch.long)
        lengths = enc["attention_mask"].sum(1).tolist()
        for b, ((_, start), spans) in enumerate(zip(prompts, batch.spans)):
            ids, offsets = tok["input_ids"][b], tok["offset_mapping"][b]
            first = max(i for i, t in enumerate(ids) if t == self.placeholder_id) + 1
            tail, n = ids[first:], lengths[b]
            if enc["input_ids"][b, n - len(tail) : n].tolist() != tail:
                raise RuntimeError("processor and tokenizer disagree on the text after the image")
            for k, (s, e) in enumerate(spans):
                hits = [
                    i
                    for i, (a, z) in enumerate(offsets[first:])
                    if z > a and a < start + e and z > start + s
                ]
                if not hits:
                    phrase = batch.texts[b][s:e]
                    raise ValueError(
                        f"phrase {phrase!r} of text {batch.texts[b]!r} yields no tokens"
                    )
                token_phrase[b, torch.tensor(hits) + n - len(tail)] = k
        return token_phrase

    def image_columns(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``B x P`` sequence positions of the image tokens and each sample's count ``P_b``
        (``P = max P_b``; shorter rows repeat their last position)."""
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(1).tolist()
        if min(counts) == 0:
            raise RuntimeError(f"a sample has no image tokens (counts {counts})")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        keyed = torch.where(is_image, positions, positions + input_ids.shape[1])
        cols = keyed.sort(1).values[:, : max(counts)]
        last = cols.gather(1, torch.tensor(counts, device=cols.device)[:, None] - 1)
        return torch.where(cols < input_ids.shape[1], cols, last), counts

    def layouts(
        self, enc: dict, counts: list[int]
    ) -> list[list[tuple[grids.TokenGrid, torch.Tensor]]]:
        """Per sample, its image-token grids and their positions among its image tokens."""
        return [grids.layout(self, enc, b, n) for b, n in enumerate(counts)]

    def to_grid(self, maps: torch.Tensor, layouts: list, region: torch.Tensor) -> torch.Tensor:
        """``B x K x L x H x P`` captured attention -> ``B x K x C x F x F`` on the square frame.

        Grids of square-padded families cover the whole frame; the others cover the image and
        are resampled onto its ``region`` (``B x 4``, :mod:`flmm.frame`) of the frame.
        """
        side = self._grid[0]
        return torch.stack(
            [
                grids.to_frame(
                    maps[b], layout, side, None if self.family.pad_to_square else region[b]
                )
                for b, layout in enumerate(layouts)
            ]
        )

    def encode(self, batch: GroundingBatch, question: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs (right-padded ``input_ids``, ``attention_mask``, ``pixel_values`` and the
        family's extras) on the model's device, plus ``token_phrase`` (``B x N``, -1 outside
        phrases) and ``region`` (``B x 4``); ``question`` as in :meth:`prompt`."""
        prompts = [self.prompt(text, question) for text in batch.texts]
        images, region = self._images(batch.images)
        enc = self._process(images, [p for p, _ in prompts])
        self.check_length(enc, batch.texts)
        token_phrase = self._token_phrase(prompts, batch, enc)
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
        hidden: list[torch.Tensor] = []
        hooks = [
            module.register_forward_hook(self._hidden_hook(rows, hidden))
            for module in self._hidden_sources()
        ]
        try:
            with capture(rows, row_phrase, image_cols, num_phrases, self.merge) as state:
                self.model(**inputs, logits_to_keep=1)
        finally:
            for hook in hooks:
                hook.remove()
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

    def _hidden_sources(self) -> list[nn.Module]:
        """The modules whose outputs are HF's ``hidden_states[-S:]``: the last ``S - 1`` decoder
        layers, then the final norm (HF's last hidden state is the normed last layer output)."""
        first = len(self.layers) - self._text_layers
        return [*self.layers[first : len(self.layers) - 1], self.final_norm]

    @staticmethod
    def _hidden_hook(rows: torch.Tensor, store: list[torch.Tensor]):
        """Forward hook keeping only the phrase rows (``B x R x D``) of a decoder layer's output,
        in the calling thread's forward alone (hooks are shared by every thread using the LMM)."""
        owner = threading.get_ident()

        def hook(module, args, output):
            if threading.get_ident() != owner:
                return
            states = output[0] if isinstance(output, tuple) else output
            index = rows.to(states.device)[..., None].expand(-1, -1, states.shape[-1])
            store.append(states.gather(1, index).to(rows.device))

        return hook

    # -------------------------------------------- conversation: chat, visual chain of thought
    def chat_inputs(
        self, images: list[np.ndarray], question: str, answer_prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        """Model inputs of one user turn (``images`` in order, then ``question``), ready to generate
        the assistant turn, which starts with ``answer_prefix``.

        Each image is ``H x W x 3`` uint8; several images need a processor that takes several
        image entries in one turn (LLaVA's does). The processor runs with the family's
        ``processor_kwargs``, as for grounding: an answer is grounded on the image tokens it was
        generated from.
        """
        arrays, _ = self._images([torch.as_tensor(np.ascontiguousarray(i)) for i in images])
        content = [{"type": "image"} for _ in arrays] + [{"type": "text", "text": question}]
        user = {"role": "user", "content": content}
        text = render(self.processor, self.family, [user], add_generation_prompt=True)
        text = text + answer_prefix
        inputs = self._process(arrays, [text])
        self.check_length(inputs, [question])
        return self.to_model(inputs)

    def check_length(self, enc, texts: list[str]) -> None:
        """A :class:`DataError` when a prompt (``enc``: the processor's output for ``texts``) holds
        more tokens than the LMM has positions, instead of running past its context silently."""
        limit = getattr(self.text_config, "max_position_embeddings", None)
        lengths = enc["attention_mask"].sum(1).tolist()
        for b, n in enumerate(lengths):
            if limit is not None and n > limit:
                images = int((enc["input_ids"][b] == self.image_token_id).sum())
                raise DataError(
                    f"text {texts[b][:40]!r}... ({len(texts[b].split())} words) makes a prompt of "
                    f"{n} tokens ({images} of them image tokens), more than the {limit} positions "
                    f"of {self.model_id}: shorten it by at least {n - limit} tokens"
                )

    @torch.no_grad()
    def generate(
        self, images: list[np.ndarray], question: str, answer_prefix: str = "", **gen
    ) -> str:
        """The LMM's answer to ``question`` about ``images`` via HF ``generate`` (the new text
        after ``answer_prefix``).

        ``gen`` goes to ``generate`` unchanged (``max_new_tokens``, ``do_sample``, ``top_p``,
        ``streamer``...).
        """
        inputs = self.chat_inputs(images, question, answer_prefix)
        out = self.model.generate(**inputs, **gen)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.decode(new, skip_special_tokens=True)

"""One generic adapter that turns a frozen HF vision-language model into a grounding feature extractor.

``FrozenLMM(batch) -> CaptureOutput``: the image and an instruction go in the user turn, the text to
ground in the assistant turn (teacher forcing); one frozen forward over the whole batch captures the
phrase-to-image attention of every layer and the phrase tokens' hidden states of the last layers.
"""

from __future__ import annotations

import operator
import re
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from flmm.attention.capture import capture, phrase_rows, use_capture
from flmm.errors import ModelLoadError
from flmm.lmm.families import Family, get_family, grid_shape
from flmm.types import CaptureOutput, GroundingBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_SENTINEL = "\x00"


def _check_source(name_or_path: str) -> None:
    """Raise a ``FileNotFoundError`` for a local path that does not exist (hub ids pass)."""
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith(("/", ".", "~")) or not HUB_ID.match(name_or_path)
    if looks_local and not path.exists():
        raise FileNotFoundError(
            f"LMM path {str(path)!r} does not exist. Point model.lmm.name_or_path=... at a directory saved with "
            "save_pretrained (or a HF hub id such as 'llava-hf/llava-1.5-7b-hf'); a tiny local one "
            "can be built with flmm.foundation.tiny_llava.build_tiny_llava(out_dir)."
        )


def pad_to_square(image: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """``H x W x 3`` -> ``S x S x 3`` with ``S = max(H, W)``; the image sits at the top-left."""
    height, width = image.shape[:2]
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=image.dtype)
    out[...] = fill
    out[:height, :width] = image
    return out


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
    ) -> None:
        super().__init__()
        self.model, self.processor, self.family, self._model_id = model, processor, family, model_id
        self.merge = merge
        self.instruction = instruction or family.instruction
        self.layers = operator.attrgetter(family.decoder_layers)(model)
        self.text_config = getattr(model.config, family.text_config)
        total = len(self.layers)
        self._text_layers = total if text_layers is None else text_layers
        if not 1 <= self._text_layers <= total:
            raise ValueError(f"text_layers must be in [1, {total}], got {text_layers}")
        self.image_token_id = getattr(model.config, family.image_token_attr)
        self._grid = grid_shape(family, model.config)
        processor.tokenizer.padding_side = "right"
        use_capture(model, family.text_config)
        self.model.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        family: str = "llava",
        dtype: str = "float32",
        text_layers: int | None = None,
        merge: str = "mean",
        instruction: str | None = None,
        trust_remote_code: bool = False,
    ) -> FrozenLMM:
        """Load model and processor with ``from_pretrained`` (a local dir or a hub id)."""
        name_or_path = str(name_or_path)
        fam = get_family(family)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        _check_source(name_or_path)
        model_cls = getattr(transformers, fam.model_class)
        processor_cls = getattr(transformers, fam.processor_class)
        try:
            model = model_cls.from_pretrained(
                name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
            )
            processor = processor_cls.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as err:
            where = (
                "local directory" if Path(name_or_path).exists() else "hub id (no such local path)"
            )
            raise ModelLoadError(
                f"could not load a {fam.model_class} / {fam.processor_class} ({family!r} family) from "
                f"{where} {name_or_path!r}: {err}\nCheck model.lmm.name_or_path=... and model.lmm.family=..."
            ) from err
        return cls(model, processor, fam, name_or_path, text_layers, merge, instruction)

    def train(self, mode: bool = True) -> FrozenLMM:
        """Always stays in eval mode: the LMM is frozen."""
        return super().train(False)

    @property
    def num_layers(self) -> int:
        """``L``: decoder layers of the text model."""
        return len(self.layers)

    @property
    def channels(self) -> int:
        """``L * H``: attention channels per phrase (all decoder layers x heads)."""
        return len(self.layers) * self.text_config.num_attention_heads

    @property
    def grid(self) -> tuple[int, int]:
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

    @torch.no_grad()
    def answer(self, image: torch.Tensor, question: str, max_new_tokens: int = 24) -> str:
        """The frozen LMM's greedy answer to ``question`` about an ``H x W x 3`` uint8 image."""
        arrays, _ = self._images([torch.as_tensor(image)])
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        text = self.processor.apply_chat_template([user], add_generation_prompt=True)
        inputs = self.processor(images=arrays, text=[text], return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )

    def prompt(self, text: str) -> tuple[str, int]:
        """The chat prompt with ``text`` as the assistant turn, and where ``text`` starts in it."""

        def render(answer: str) -> str:
            conversation = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": self.instruction}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
            return self.processor.apply_chat_template(conversation, tokenize=False)

        start = len(render(_SENTINEL).split(_SENTINEL)[0])
        full = render(text)
        if full[start : start + len(text)] != text:
            raise RuntimeError(f"the chat template altered the assistant text {text!r}")
        return full, start

    def _images(self, images: list[torch.Tensor]) -> tuple[list[np.ndarray], torch.Tensor]:
        """Processor-ready images (padded to a square if the family needs it) and ``B x 2`` region."""
        arrays = [img.cpu().numpy() for img in images]
        region = torch.ones(len(arrays), 2)
        if not self.family.pad_to_square:
            return arrays, region
        mean = getattr(self.processor.image_processor, "image_mean", None) or [0.0, 0.0, 0.0]
        fill = np.round(np.asarray(mean) * 255).astype(np.uint8)
        for b, arr in enumerate(arrays):
            side = max(arr.shape[:2])
            region[b] = torch.tensor([arr.shape[0] / side, arr.shape[1] / side])
        return [pad_to_square(a, fill) for a in arrays], region

    def _token_phrase(
        self, prompts: list[tuple[str, int]], batch: GroundingBatch, enc
    ) -> torch.Tensor:
        """``B x N`` phrase index of every processor token (-1 outside phrases).

        Offsets come from tokenising the unexpanded prompt; its tokens after the last image token
        are the tail of the processor's (image-expanded) sequence.
        """
        tok = self.processor.tokenizer(
            [p for p, _ in prompts], return_offsets_mapping=True, add_special_tokens=False
        )
        token_phrase = torch.full(enc["input_ids"].shape, -1, dtype=torch.long)
        lengths = enc["attention_mask"].sum(1).tolist()
        for b, ((_, start), spans) in enumerate(zip(prompts, batch.spans)):
            ids, offsets = tok["input_ids"][b], tok["offset_mapping"][b]
            first = max(i for i, t in enumerate(ids) if t == self.image_token_id) + 1
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

    def _image_cols(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``B x P`` positions of the image tokens (``P = h * w``)."""
        is_image = input_ids == self.image_token_id
        expected = self._grid[0] * self._grid[1]
        counts = is_image.sum(1)
        if not bool((counts == expected).all()):
            raise RuntimeError(
                f"expected {expected} image tokens per sample, got {counts.tolist()}"
            )
        return is_image.nonzero()[:, 1].view(len(input_ids), expected)

    def encode(self, batch: GroundingBatch) -> dict[str, torch.Tensor]:
        """Model inputs (right-padded ``input_ids``, ``attention_mask``, ``pixel_values``) on the
        model's device, plus ``token_phrase`` (``B x N``, -1 outside phrases) and ``region`` (``B x 2``).
        """
        prompts = [self.prompt(text) for text in batch.texts]
        images, region = self._images(batch.images)
        enc = self.processor(
            images=images, text=[p for p, _ in prompts], return_tensors="pt", padding=True
        )
        enc["token_phrase"] = self._token_phrase(prompts, batch, enc)
        enc["region"] = region
        enc = {k: v.to(self.device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        return enc

    @torch.no_grad()
    def forward(self, batch: GroundingBatch) -> CaptureOutput:
        """One frozen forward over the batch; see :class:`flmm.types.CaptureOutput` for shapes."""
        inputs = self.encode(batch)
        token_phrase, region = inputs.pop("token_phrase"), inputs.pop("region")
        rows, row_phrase = phrase_rows(token_phrase)
        num_phrases = max(batch.num_phrases)
        image_cols = self._image_cols(inputs["input_ids"])
        hidden: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_hook(self._hidden_hook(rows, hidden))
            for layer in self.layers[len(self.layers) - self._text_layers :]
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
            maps=maps.flatten(2, 3).unflatten(-1, self._grid).float(),
            phrase_mask=torch.arange(num_phrases, device=self.device)[None]
            < torch.tensor(batch.num_phrases, device=self.device)[:, None],
            hidden=(torch.stack(hidden, 1) * keep).float(),
            token_phrase=row_phrase,
            region=region,
        )

    @staticmethod
    def _hidden_hook(rows: torch.Tensor, store: list[torch.Tensor]):
        """Forward hook keeping only the phrase rows (``B x R x D``) of a decoder layer's output."""

        def hook(module, args, output):
            states = output[0] if isinstance(output, tuple) else output
            store.append(states.gather(1, rows[..., None].expand(-1, -1, states.shape[-1])))

        return hook

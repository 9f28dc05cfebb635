"""The prompts a frozen LMM reads, and where each phrase's tokens sit in its sequence.

Grounding teacher-forces the text to ground as the assistant turn after a user turn of the image
and an instruction (:func:`grounding_prompt`); chat renders one user turn ready for generation
(:func:`generation_prompt`). :func:`token_phrase` maps the phrases' character spans onto the
processor's image-expanded token sequence.
"""

from __future__ import annotations

import torch

from flmm.errors import DataError
from flmm.lmm.families import Family
from flmm.lmm.processing import render
from flmm.types import GroundingBatch

SENTINEL = "\x00"


def user_turn(num_images: int, text: str) -> dict:
    """A user message of ``num_images`` images, then ``text``."""
    content = [{"type": "image"} for _ in range(num_images)]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def generation_prompt(processor, family: Family, num_images: int, question: str) -> str:
    """One user turn (``num_images`` images, then ``question``), ready for the assistant's turn."""
    turn = user_turn(num_images, question)
    return render(processor, family, [turn], add_generation_prompt=True)


def grounding_prompt(processor, family: Family, user_text: str, text: str) -> tuple[str, int]:
    """The chat prompt with ``text`` as the assistant turn after a user turn of one image and
    ``user_text``, and where ``text`` starts in it."""

    def rendered(answer: str) -> str:
        assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        return render(processor, family, [user_turn(1, user_text), assistant])

    start = len(rendered(SENTINEL).split(SENTINEL)[0])
    full = rendered(text)
    if full[start : start + len(text)] != text:
        raise RuntimeError(f"the chat template altered the assistant text {text!r}")
    return full, start


def token_phrase(
    tokenizer, placeholder_id: int, prompts: list[tuple[str, int]], batch: GroundingBatch, enc
) -> torch.Tensor:
    """``B x N`` phrase index of every processor token (-1 outside phrases).

    ``prompts``: each sample's ``(prompt, start of its text)``; ``enc``: the processor's output on
    them (``input_ids`` and ``attention_mask``, ``B x N``, right-padded). Offsets come from
    tokenising the unexpanded prompt; its tokens after the last image placeholder
    (``placeholder_id``) are the tail of the processor's (image-expanded) sequence.
    """
    tok = tokenizer([p for p, _ in prompts], return_offsets_mapping=True, add_special_tokens=False)
    out = torch.full(enc["input_ids"].shape, -1, dtype=torch.long)
    lengths = enc["attention_mask"].sum(1).tolist()
    for b, ((_, start), spans) in enumerate(zip(prompts, batch.spans)):
        ids, offsets = tok["input_ids"][b], tok["offset_mapping"][b]
        offsets, shift = text_tail(ids, offsets, placeholder_id, enc["input_ids"][b], lengths[b])
        for k, (s, e) in enumerate(spans):
            hits = span_tokens(offsets, start + s, start + e)
            if not hits:
                phrase = batch.texts[b][s:e]
                raise ValueError(f"phrase {phrase!r} of text {batch.texts[b]!r} yields no tokens")
            out[b, torch.tensor(hits) + shift] = k
    return out


def text_tail(
    ids: list[int], offsets: list, placeholder_id: int, row: torch.Tensor, length: int
) -> tuple[list, int]:
    """The offsets of the tokenised prompt (``ids``) after its last image placeholder, and where
    those tokens start in the processor's ``row`` (``N`` ids, the first ``length`` real)."""
    first = max(i for i, t in enumerate(ids) if t == placeholder_id) + 1
    tail = ids[first:]
    if row[length - len(tail) : length].tolist() != tail:
        raise RuntimeError("processor and tokenizer disagree on the text after the image")
    return offsets[first:], length - len(tail)


def span_tokens(offsets: list, begin: int, end: int) -> list[int]:
    """Indices of the tokens (character ``offsets``) overlapping characters ``[begin, end)``;
    tokens without characters never."""
    return [i for i, (a, z) in enumerate(offsets) if z > a and a < end and z > begin]


def check_length(lmm, enc, texts: list[str]) -> None:
    """A :class:`DataError` when a prompt (``enc``: the processor's output for ``texts``, ``B x N``
    tensors) holds more tokens than the LMM (a ``FrozenLMM``) has positions, instead of running
    past its context silently."""
    limit = getattr(lmm.text_config, "max_position_embeddings", None)
    lengths = enc["attention_mask"].sum(1).tolist()
    for b, n in enumerate(lengths):
        if limit is not None and n > limit:
            images = int((enc["input_ids"][b] == lmm.image_token_id).sum())
            raise DataError(
                f"text {texts[b][:40]!r}... ({len(texts[b].split())} words) makes a prompt of "
                f"{n} tokens ({images} of them image tokens), more than the {limit} positions "
                f"of {lmm.model_id}: shorten it by at least {n - limit} tokens"
            )

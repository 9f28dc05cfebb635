"""Capture of word-to-image attention inside transformers' attention interface.

``"flmm_capture"`` is a transformers attention implementation: it returns sdpa's output unchanged
and, while a :func:`capture` context is active, also computes the softmax weights of the phrase
token rows only (``R`` rows instead of ``N``), keeps the image-token columns and merges the rows
of each phrase. Each layer stores ``B x K x H x P`` (``P`` image tokens); no ``N x N`` attention
is ever materialised. Set it on the text decoder only with :func:`use_capture`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "flmm_capture"
MERGES = ("mean", "max")


@dataclass
class Capture:
    """What to capture during one forward pass, and what was captured.

    Attributes:
        rows: ``B x R`` long, sequence positions of the phrase tokens (padding rows: any position).
        row_phrase: ``B x R`` long, phrase index of each row, -1 for padding rows.
        image_cols: ``B x P`` long, sequence positions of the image tokens.
        num_phrases: ``K``, phrases per sample after padding.
        merge: ``"mean"`` or ``"max"`` over the rows of a phrase.
        maps: layer index -> ``B x K x H x P`` float32 merged attention, filled by the forward.
    """

    rows: torch.Tensor
    row_phrase: torch.Tensor
    image_cols: torch.Tensor
    num_phrases: int
    merge: str = "mean"
    maps: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        phrases = torch.arange(self.num_phrases, device=self.row_phrase.device)
        self.member = self.row_phrase[:, None, :] == phrases[None, :, None]  # B x K x R
        self.counts = self.member.sum(-1)  # B x K

    def on(self, device: torch.device) -> Capture:
        """This capture's index tensors on ``device`` (a layer that ``device_map`` put on another
        device than the inputs); it shares ``maps``."""
        if self.rows.device == device:
            return self
        moved = {k: getattr(self, k).to(device) for k in ("rows", "row_phrase", "image_cols")}
        return replace(self, **moved, maps=self.maps)

    def stacked(self) -> torch.Tensor:
        """``B x K x L x H x P``, the captured layers in layer order."""
        if not self.maps:
            raise RuntimeError("nothing was captured: is the text decoder set to 'flmm_capture'?")
        return torch.stack([self.maps[i] for i in sorted(self.maps)], dim=2)


_ACTIVE: ContextVar[Capture | None] = ContextVar("flmm_capture", default=None)


@contextmanager
def capture(
    rows: torch.Tensor,
    row_phrase: torch.Tensor,
    image_cols: torch.Tensor,
    num_phrases: int,
    merge: str = "mean",
) -> Iterator[Capture]:
    """Activate capture for the forward passes inside the ``with`` block (see :class:`Capture`)."""
    state = Capture(rows, row_phrase, image_cols, num_phrases, merge)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def phrase_rows(token_phrase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact the phrase tokens of each sample.

    Args:
        token_phrase: ``B x N`` long, phrase index of every sequence token, -1 elsewhere.

    Returns:
        rows ``B x R`` (positions, 0 for padding) and row_phrase ``B x R`` (-1 for padding),
        ``R`` = the largest number of phrase tokens in a sample.
    """
    is_phrase = token_phrase >= 0
    num_rows = int(is_phrase.sum(1).max()) if token_phrase.numel() else 0
    # A stable sort brings phrase tokens first, in sequence order.
    order = torch.sort((~is_phrase).to(torch.int8), dim=1, stable=True).indices[:, :num_rows]
    row_phrase = token_phrase.gather(1, order)
    rows = torch.where(row_phrase >= 0, order, torch.zeros_like(order))
    return rows, row_phrase


def _row_mask(
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    q_len: int,
    kv_len: int,
    is_causal: bool,
) -> torch.Tensor | None:
    """The mask restricted to the phrase rows: ``B x (1|H) x R x N``, bool or additive float."""
    batch, num_rows = rows.shape
    if attention_mask is None:
        if not is_causal:
            return None
        positions = rows + (kv_len - q_len)
        keys = torch.arange(kv_len, device=rows.device)
        return (keys[None, None, :] <= positions[:, :, None])[:, None]
    mask = attention_mask.expand(batch, -1, -1, -1)
    index = rows[:, None, :, None].expand(batch, mask.shape[1], num_rows, mask.shape[-1])
    return mask.gather(2, index)


def phrase_image_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool,
    state: Capture,
    softcap: float | None = None,
) -> torch.Tensor:
    """Merged phrase-row attention over the image columns.

    Args:
        query: ``B x H x N x d``; key: ``B x H_kv x N x d`` (grouped-query when ``H_kv < H``).
        attention_mask: None (causal or full), or ``B x (1|H) x N x N`` bool / additive float.
        softcap: tanh logit soft-capping (Gemma 2), None for none.

    Returns:
        ``B x K x H x P`` float32.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    num_rows = state.rows.shape[1]
    q_rows = query.gather(2, state.rows[:, None, :, None].expand(batch, heads, num_rows, dim))
    q_rows = q_rows.float().view(batch, kv_heads, heads // kv_heads, num_rows, dim)
    scores = (q_rows @ key.float()[:, :, None].transpose(-1, -2)).flatten(1, 2) * scaling
    mask = _row_mask(attention_mask, state.rows, q_len, kv_len, is_causal)
    probs = masked(capped(scores, softcap), mask).softmax(-1)
    cols = state.image_cols[:, None, None, :].expand(batch, heads, num_rows, -1)
    return merge_rows(probs.gather(3, cols), state)


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` (Gemma 2's logit soft-capping); ``scores`` if None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``scores`` (``... x Q x N``) with a broadcastable bool mask (False: the dtype's minimum) or
    additive float mask applied; unchanged for None."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask.to(scores.dtype)


def softcapped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float,
    is_causal: bool,
) -> torch.Tensor:
    """Attention with logit soft-capping, which sdpa lacks (Gemma 2's and PaliGemma 2's decoders):
    their eager attention, on sdpa's bool mask (frozen: no dropout).

    Args:
        query: ``B x H x N x d``; key, value: ``B x H_kv x N x d``.
        attention_mask: as :func:`phrase_image_attention`'s (None: causal or full).

    Returns:
        ``B x N x H x d``, laid out as sdpa's output.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if attention_mask is None and is_causal:
        attention_mask = (
            torch.ones(query.shape[2], key.shape[2], dtype=torch.bool)
            .tril(key.shape[2] - query.shape[2])
            .to(query.device)
        )
    scores = masked(capped(query @ key.transpose(-1, -2) * scaling, softcap), attention_mask)
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous()


def merge_rows(probs: torch.Tensor, state: Capture) -> torch.Tensor:
    """``B x H x R x P`` row attention -> ``B x K x H x P`` per phrase (zeros for empty phrases)."""
    member = state.member.to(probs.dtype)
    if state.merge == "mean":
        weights = member / state.counts.clamp(min=1)[..., None].to(probs.dtype)
        return torch.einsum("bkr,bhrp->bkhp", weights, probs)
    rows = probs[:, None].masked_fill(~state.member[:, :, None, :, None], float("-inf"))
    merged = rows.amax(dim=3)
    return merged.masked_fill((state.counts == 0)[:, :, None, None], 0.0)


def capture_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa's attention (eager's where the decoder soft-caps its logits); records the merged
    phrase-to-image attention while capture is active."""
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("flmm_capture does not support position_bias")
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    softcap = kwargs.get("softcap")
    if softcap is None:
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    else:
        output = softcapped_attention(
            query, key, value, attention_mask, scaling, softcap, is_causal and query.shape[2] > 1
        )
    state = _ACTIVE.get()
    if state is not None:
        here = state.on(query.device)
        merged = phrase_image_attention(
            query, key, attention_mask, scaling, is_causal, here, softcap
        )
        state.maps[module.layer_idx] = merged.to(state.rows.device)
    return output, None


def register() -> None:
    """Register ``"flmm_capture"`` (attention + sdpa's mask) with transformers; idempotent."""
    AttentionInterface.register(IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def use_capture(model: PreTrainedModel, text_config: str = "text_config") -> None:
    """Switch the text decoder of ``model`` (its ``text_config`` sub-model) to flmm_capture.

    transformers ignores a dict key that names no sub-config, so that is refused here; a decoder
    that still does not capture makes :meth:`Capture.stacked` raise at the first forward.
    """
    if text_config not in model.config.sub_configs:
        known = ", ".join(model.config.sub_configs)
        raise RuntimeError(
            f"could not set {IMPLEMENTATION!r} on {text_config!r}: {type(model.config).__name__} "
            f"has no such sub-config (it has: {known}); fix the family's text_config"
        )
    register()
    model.set_attn_implementation({text_config: IMPLEMENTATION})


register()

"""Numerical equivalence of the "flmm_capture" attention with eager ``output_attentions=True``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from flmm.attention.capture import capture, phrase_rows, use_capture
from flmm.foundation.tiny_llava import build_tiny_llava
from flmm.lmm import FrozenLMM
from flmm.types import GroundingBatch


@pytest.fixture(scope="module")
def gqa_llava_dir(tmp_path_factory: pytest.TempPathFactory):
    """Tiny LLaVA with grouped-query attention: 4 query heads share 2 key/value heads."""
    return build_tiny_llava(tmp_path_factory.mktemp("gqa_llava"), num_kv_heads=2, seed=1)


def eager_maps(path, inputs: dict, token_phrase: torch.Tensor, num_phrases: int, merge: str):
    """Reference: full eager attentions, phrase rows x image columns, merged per phrase in Python."""
    eager = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    weights = torch.stack(attentions, 1)  # B x L x H x N x N
    cols = inputs["input_ids"] == eager.config.image_token_id
    batch, layers, heads = weights.shape[:3]
    out = torch.zeros(batch, num_phrases, layers * heads, int(cols[0].sum()))
    for b in range(batch):
        for k in range(num_phrases):
            rows = (token_phrase[b] == k).nonzero()[:, 0]
            if len(rows):
                picked = weights[b][:, :, rows][..., cols[b]]
                merged = picked.mean(2) if merge == "mean" else picked.amax(2)
                out[b, k] = merged.flatten(0, 1)
    return out


def check_against_eager(path, batch: GroundingBatch, merge: str = "mean") -> None:
    lmm = FrozenLMM.from_pretrained(path, merge=merge)
    inputs = lmm.encode(batch)
    token_phrase = inputs.pop("token_phrase")
    inputs.pop("region")
    expected = eager_maps(path, inputs, token_phrase, max(batch.num_phrases), merge)
    maps = lmm(batch).maps
    assert maps.shape == (len(batch), max(batch.num_phrases), lmm.channels, *lmm.grid)
    assert (maps.flatten(3) - expected).abs().max() <= 1e-5


def test_capture_matches_eager_on_right_padded_batch(tiny_llava_dir, ragged_batch):
    check_against_eager(tiny_llava_dir, ragged_batch)


def test_capture_matches_eager_with_grouped_query_attention(gqa_llava_dir, ragged_batch):
    check_against_eager(gqa_llava_dir, ragged_batch)


def test_capture_max_merge_matches_eager(tiny_llava_dir, ragged_batch):
    check_against_eager(tiny_llava_dir, ragged_batch, merge="max")


def test_capture_matches_eager_without_padding_mask(tiny_llava_dir, sample_factory):
    """A single sample: transformers passes no mask (pure causal), the capture builds its own."""
    batch = GroundingBatch.collate(
        [sample_factory("a green star and a red ring", ["green star", "red ring"], 70, 70)]
    )
    check_against_eager(tiny_llava_dir, batch)


def test_logits_identical_with_and_without_capture(tiny_llava_dir, ragged_batch):
    lmm = FrozenLMM.from_pretrained(tiny_llava_dir)
    inputs = lmm.encode(ragged_batch)
    token_phrase = inputs.pop("token_phrase")
    inputs.pop("region")
    sdpa = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_dir, attn_implementation="sdpa"
    ).eval()
    rows, row_phrase = phrase_rows(token_phrase)
    cols = (inputs["input_ids"] == lmm.image_token_id).nonzero()[:, 1].view(len(ragged_batch), -1)
    with torch.no_grad():
        plain = lmm.model(**inputs).logits
        with capture(rows, row_phrase, cols, 3) as state:
            captured = lmm.model(**inputs).logits
        reference = sdpa(**inputs).logits
    assert len(state.maps) == lmm.num_text_layers
    assert torch.equal(plain, captured)
    assert torch.equal(plain, reference)


def test_phrase_rows_compacts_phrase_tokens():
    token_phrase = torch.tensor([[-1, 0, 0, -1, 1], [-1, -1, 0, -1, -1]])
    rows, row_phrase = phrase_rows(token_phrase)
    assert rows.tolist() == [[1, 2, 4], [2, 0, 0]]
    assert row_phrase.tolist() == [[0, 0, 1], [0, -1, -1]]


def test_capture_refuses_a_text_config_that_names_no_sub_config(tiny_llava_dir):
    """transformers would ignore the unknown key silently and leave the decoder uncaptured."""
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    with pytest.raises(RuntimeError, match="no such sub-config .*text_config"):
        use_capture(model, "language_config")

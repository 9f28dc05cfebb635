"""The attention rules of the Gemma families are active in their tiny models and matter: Gemma 3's
sliding-window layers and its bidirectional image tokens. (Capture equal to eager with these rules
active is the registry's ``test_registry_capture_matches_eager``.)"""

from __future__ import annotations

import pytest
import torch

from flmm.attention.capture import capture, phrase_rows, use_capture
from flmm.foundation.tiny_gemma import TINY_SLIDING_WINDOW
from flmm.foundation.tiny_models import build_tiny_lmm
from flmm.lmm import FrozenLMM


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> FrozenLMM:
    folder = build_tiny_lmm(tmp_path_factory.mktemp("tiny_gemma3"), "gemma3")
    return FrozenLMM.from_pretrained(folder, family="gemma3")


def captured(lmm: FrozenLMM, batch, drop: tuple[str, ...] = ()):
    """``B x K x L x H x P`` raw captured maps, the model inputs, ``B x N`` token_phrase and
    ``B x P`` image columns; ``drop`` names model inputs left out."""
    inputs = lmm.encode(batch)
    token_phrase = inputs.pop("token_phrase")
    inputs.pop("region")
    rows, row_phrase = phrase_rows(token_phrase)
    cols, _ = lmm.image_columns(inputs["input_ids"])
    kept = {k: v for k, v in inputs.items() if k not in drop}
    with torch.no_grad(), capture(rows, row_phrase, cols, max(batch.num_phrases)) as state:
        lmm.model(**kept, logits_to_keep=1)
    return state.stacked(), inputs, token_phrase, cols


def test_gemma3_tiny_layers_are_sliding_then_global(gemma3):
    text = gemma3.text_config
    assert text.layer_types == ["sliding_attention", "full_attention"]
    assert text.sliding_window == TINY_SLIDING_WINDOW


def test_gemma3_sliding_layer_sees_only_the_image_tokens_inside_its_window(gemma3, ragged_batch):
    """A phrase's sliding-window attention reaches exactly the image tokens less than the window
    before one of its tokens; its global attention reaches every image token."""
    maps, inputs, token_phrase, cols = captured(gemma3, ragged_batch)
    assert inputs["attention_mask"].sum(1).min() > TINY_SLIDING_WINDOW
    cut = 0
    for b in range(len(ragged_batch)):
        for k in range(ragged_batch.num_phrases[b]):
            rows = (token_phrase[b] == k).nonzero()[:, 0]
            inside = ((rows[:, None] - cols[b][None, :]) < TINY_SLIDING_WINDOW).any(0)
            assert torch.equal(maps[b, k, 0] > 0, inside.expand_as(maps[b, k, 0]))
            assert (maps[b, k, 1] > 0).all()
            cut += int((~inside).sum())
    assert cut > 0


def test_gemma3_image_tokens_attend_to_each_other_bidirectionally(gemma3, ragged_batch):
    """The processor marks the image tokens (``token_type_ids``), the adapter hands them to the
    model, and an image token then attends to later image tokens, text only to earlier tokens;
    without them the captured maps change."""
    maps, inputs, _, cols = captured(gemma3, ragged_batch)
    is_image = inputs["input_ids"] == gemma3.image_token_id
    assert torch.equal(inputs["token_type_ids"].bool(), is_image)
    gemma3.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            weights = gemma3.model(**inputs, output_attentions=True).attentions[1]
    finally:
        use_capture(gemma3.model)
    first, last = int(cols[0, 0]), int(cols[0, -1])
    assert (weights[0, :, first, last] > 0).all()
    assert (weights[0, :, last + 1, last + 2] == 0).all()
    causal, _, _, _ = captured(gemma3, ragged_batch, drop=("token_type_ids",))
    assert not torch.allclose(maps, causal, atol=1e-4)


def test_gemma3_prompts_start_with_one_bos(gemma3, ragged_batch):
    """Gemma 3's chat template writes ``<bos>``: the processor adds no second one (as
    transformers' own ``apply_chat_template(tokenize=True)``), in grounding and in chat."""
    bos = gemma3.processor.tokenizer.bos_token_id
    ids = gemma3.encode(ragged_batch)["input_ids"]
    chat = gemma3.chat_inputs([ragged_batch.images[0].numpy()], "what is in the image?")
    for row in (*ids, chat["input_ids"][0]):
        assert row[0] == bos and row[1] != bos

"""The attention rules of the Gemma families are active in their tiny models and matter: Gemma 3's
sliding-window layers and bidirectional image tokens, PaliGemma 2's prefix-LM mask (image and user
turn bidirectional, the answer causal) and logit soft-capping. (Capture equal to eager with these
rules active is the registry's ``test_registry_capture_matches_eager``.)"""

from __future__ import annotations

import pytest
import torch

from flmm.attention.capture import capture, phrase_rows, use_capture
from flmm.foundation.tiny_gemma import TINY_SLIDING_WINDOW, TINY_SOFTCAP
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


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory) -> FrozenLMM:
    folder = build_tiny_lmm(tmp_path_factory.mktemp("tiny_paligemma"), "paligemma")
    return FrozenLMM.from_pretrained(folder, family="paligemma")


def test_paligemma_prompt_is_prefix_then_answer(paligemma, ragged_batch):
    """User turn -> the processor's prefix (type 0), the grounded text -> its suffix (type 1,
    ended by ``<eos>``); a chat prompt is the prefix alone, an answer being continued a suffix
    without ``<eos>``."""
    assert paligemma.prompt("red circle") == ("<image>caption en\nred circle</s>", 18)
    inputs = paligemma.encode(ragged_batch)
    types, phrases = inputs["token_type_ids"], inputs["token_phrase"]
    eos = paligemma.processor.tokenizer.eos_token_id
    for b, n in enumerate(inputs["attention_mask"].sum(1).tolist()):
        answer = types[b, :n].nonzero()[:, 0]
        assert (types[b, phrases[b] >= 0] == 1).all() and inputs["input_ids"][b, n - 1] == eos
        assert torch.equal(answer, torch.arange(int(answer[0]), n))
    image = [ragged_batch.images[0].numpy()]
    assert not paligemma.chat_inputs(image, "answer en what is it?")["token_type_ids"].any()
    going = paligemma.chat_inputs(image, "answer en what is it?", answer_prefix="a red")
    assert going["token_type_ids"][0, -2:].tolist() == [1, 1]
    assert going["input_ids"][0, -1] != eos


def test_paligemma_prefix_attends_bidirectionally_the_answer_causally(paligemma, ragged_batch):
    """An image token attends to the prefix text after it; an answer token to no later token;
    without ``token_type_ids`` the captured maps change."""
    maps, inputs, _, cols = captured(paligemma, ragged_batch)
    paligemma.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            weights = paligemma.model(**inputs, output_attentions=True).attentions[1]
    finally:
        use_capture(paligemma.model)
    answer = int(inputs["token_type_ids"][0].nonzero()[0, 0])
    assert (weights[0, :, int(cols[0, 0]), answer - 1] > 0).all()
    assert (weights[0, :, answer, answer + 1] == 0).all()
    causal, _, _, _ = captured(paligemma, ragged_batch, drop=("token_type_ids",))
    assert not torch.allclose(maps, causal, atol=1e-4)


def test_paligemma_logit_softcapping_is_active_in_capture(paligemma, ragged_batch):
    """The tiny decoder soft-caps its attention logits (sdpa cannot: capture runs eager's
    attention there) and the cap changes the captured maps."""
    assert paligemma.text_config.attn_logit_softcapping == TINY_SOFTCAP
    maps, _, _, _ = captured(paligemma, ragged_batch)
    for layer in paligemma.layers:
        layer.self_attn.attn_logit_softcapping = None
    try:
        uncapped, _, _, _ = captured(paligemma, ragged_batch)
    finally:
        for layer in paligemma.layers:
            layer.self_attn.attn_logit_softcapping = TINY_SOFTCAP
    assert not torch.allclose(maps, uncapped, atol=1e-4)

"""GroundedChat: text identical to plain HF generate, streaming, grounding from attention."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from test_hostile_inputs import one_line_error
from transformers import LlavaForConditionalGeneration

from flmm.chat.conversation import (
    COT_PREFIX,
    COT_QUESTION,
    NOUN_RULE,
    ChatResult,
    GroundedChat,
    expand_box,
    mask_box,
)
from flmm.chat.fallback import noun_phrases
from flmm.chat.selector import KeywordSelector, word_spans
from flmm.data.masks import largest_region
from flmm.errors import FlmmUserError
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.model.loader import sam_variant_of
from flmm.model.network import FLMMModel
from flmm.types import GroundingBatch, GroundingSample

QUESTION = "what colour is the circle?"


@pytest.fixture(scope="module")
def chat(tiny_llava_dir) -> GroundedChat:
    torch.manual_seed(0)
    lmm = FrozenLMM.from_pretrained(tiny_llava_dir)
    return GroundedChat(FLMMModel.build(lmm, build_sam("tiny"), base_channels=8))


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)


def plain_generate(lmm: FrozenLMM, image: np.ndarray, seed: int | None = None, **gen) -> str:
    """The answer of the processor + HF ``generate`` alone (a square image needs no padding)."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    prompt = lmm.processor.apply_chat_template([user], add_generation_prompt=True)
    inputs = lmm.processor(images=[image], text=[prompt], return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    out = lmm.model.generate(**inputs, **gen)
    return lmm.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_greedy_answer_is_plain_generate(chat, image):
    expected = plain_generate(chat.lmm, image, max_new_tokens=12, do_sample=False)
    assert expected.strip()
    assert chat.answer(image, QUESTION, max_new_tokens=12) == expected
    assert chat.chat(image, QUESTION, phrases=[], max_new_tokens=12).answer == expected


def test_sampled_answer_is_plain_generate_with_the_same_seed(chat, image):
    gen = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "top_k": 0}
    expected = plain_generate(chat.lmm, image, seed=7, **gen)
    assert chat.answer(image, QUESTION, seed=7, **gen) == expected
    other = [chat.answer(image, QUESTION, seed=s, **gen) for s in (1, 2, 3)]
    assert any(o != expected for o in other), "sampling ignores the seed"


def test_decoding_settings_reach_answers_not_the_chain_of_thought(chat, image, monkeypatch):
    """``decoding`` (``--repetition-penalty``) is plain generate's setting for answers, streamed
    or not; the chain of thought's steps keep the model's own decoding."""
    expected = plain_generate(
        chat.lmm, image, max_new_tokens=12, do_sample=False, repetition_penalty=1.5
    )
    monkeypatch.setattr(chat, "decoding", {"repetition_penalty": 1.5})
    assert chat.answer(image, QUESTION, max_new_tokens=12) == expected
    assert "".join(chat.stream(image, QUESTION, max_new_tokens=12)).strip() == expected.strip()
    assert chat.answer(image, QUESTION, max_new_tokens=12, repetition_penalty=1.0) == (
        plain_generate(chat.lmm, image, max_new_tokens=12, do_sample=False)
    )
    seen, generate = [], chat.lmm.generate
    monkeypatch.setattr(chat.lmm, "generate", lambda *a, **k: seen.append(k) or generate(*a, **k))
    chat.visual_cot(image, QUESTION, max_new_tokens=4)
    assert len(seen) == 2 and not any("repetition_penalty" in k for k in seen)


def test_streaming_gives_the_same_text(chat, image):
    expected = chat.answer(image, QUESTION, max_new_tokens=12)
    pieces = list(chat.stream(image, QUESTION, max_new_tokens=12))
    assert len(pieces) > 1 and "".join(pieces).strip() == expected.strip()
    received: list[str] = []
    result = chat.chat(image, QUESTION, phrases=[], max_new_tokens=12, on_text=received.append)
    assert "".join(received).strip() == result.answer.strip()


def test_streaming_errors_reach_the_caller(chat, image):
    with pytest.raises(FlmmUserError, match="H x W x 3"):
        next(chat.stream(image[..., 0], QUESTION))
    with pytest.raises(ValueError, match="max_new_tokens"):  # raised inside the worker thread
        list(chat.stream(image, QUESTION, max_new_tokens=-1))


def test_teacher_forced_capture_equals_attention_at_generation(chat, image, tiny_llava_dir):
    """The answer tokens' rows in the conversation forward are their rows while generating."""
    eager = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_dir, attn_implementation="eager"
    )
    inputs = chat.lmm.chat_inputs([image], QUESTION)
    out = eager.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    answer = chat.lmm.processor.decode(new, skip_special_tokens=True)
    spans = word_spans(answer)
    assert len(spans) == len(new)  # the tiny tokenizer is word-level
    cols = (inputs["input_ids"][0] == chat.lmm.image_token_id).nonzero()[:, 0]
    sample = GroundingSample(image, answer, spans, np.zeros((len(spans), 1, 1), dtype=bool))
    maps = chat.lmm(GroundingBatch.collate([sample]), QUESTION).maps[0].flatten(2)  # K x L*H x P
    # step t of generate feeds token t-1 of the answer: its row is the last query of step t
    for k in range(len(spans) - 1):
        rows = torch.cat([layer[0, :, -1, cols] for layer in out.attentions[k + 1]])
        torch.testing.assert_close(maps[k], rows, atol=1e-5, rtol=1e-4)


def test_threads_grounding_answers_to_different_questions_keep_their_own_turn(
    chat, image, monkeypatch
):
    """Two threads ground at once (the web page serves each request on its own thread): each
    prompt holds its own question, however the threads interleave. A barrier holds both threads
    inside the LMM's prompt building, so a question kept as shared state would be seen by both."""
    barrier, seen, failed = threading.Barrier(2, timeout=60), {}, []
    prompt = chat.lmm.prompt

    def ground(question: str) -> None:
        try:
            chat.ground(image, "red", ["red"], question)
        except Exception as err:  # noqa: BLE001 (reported by the assertion below)
            failed.append(err)

    def meeting(*args):
        barrier.wait()
        seen[threading.current_thread().name] = prompt(*args)[0]
        return prompt(*args)

    monkeypatch.setattr(chat.lmm, "prompt", meeting)
    questions = {"a": "what colour is the circle?", "b": "where is the square?"}
    threads = [
        threading.Thread(target=ground, args=(q,), name=name) for name, q in questions.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed, failed
    for name, question in questions.items():
        other = questions["b" if name == "a" else "a"]
        assert question in seen[name] and other not in seen[name], (name, seen[name])


def test_chat_grounds_given_phrases_in_the_answer(chat, image):
    answer = chat.answer(image, QUESTION, max_new_tokens=12)
    words = answer.split()
    result = chat.chat(image, QUESTION, phrases=[words[-1], "not said"], max_new_tokens=12)
    assert isinstance(result, ChatResult)
    assert result.phrases == [words[-1]] and result.missing == ["not said"]
    start, end = result.spans[0]
    assert result.answer[start:end] == words[-1]
    assert result.masks.shape == (1, *image.shape[:2]) and result.masks.dtype == bool


def test_chat_uses_the_keyword_selector_else_the_noun_phrase_rule(chat, image):
    answer = chat.answer(image, QUESTION, max_new_tokens=12)
    alone = chat.chat(image, QUESTION, max_new_tokens=12)  # no selector: the answer's noun phrases
    assert (alone.phrases, alone.phrases_from) == (noun_phrases(answer), NOUN_RULE)
    assert alone.masks.shape == (len(alone.phrases), *image.shape[:2])
    selector = KeywordSelector(chat.lmm.hidden_size)
    torch.nn.init.zeros_(selector.linear.weight)
    torch.nn.init.constant_(selector.linear.bias, 5.0)  # every word is a key word
    chat.selector = selector
    try:
        result = chat.chat(image, QUESTION, max_new_tokens=12)
    finally:
        chat.selector = None
    words = [answer[s:e] for s, e in word_spans(answer) if answer[s].isalnum()]
    assert " ".join(result.phrases).split() == words  # every word, punctuation never
    assert result.phrases_from == "keyword selector"
    assert result.masks.shape == (1, *image.shape[:2])


def test_visual_cot_asks_with_the_crop(chat, image):
    cot = chat.visual_cot(image, QUESTION, max_new_tokens=8)
    assert cot.object_text.startswith("The object most relevant to the question is")
    assert cot.answer.strip()
    if cot.mask is not None:
        x0, y0, x1, y1 = cot.box
        assert cot.mask.shape == image.shape[:2]
        assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
    # two images in one user turn: twice the image tokens of one
    inputs = chat.lmm.chat_inputs([image, image[:20, :30]], QUESTION)
    grid = chat.lmm.grid[0] * chat.lmm.grid[1]
    assert int((inputs["input_ids"] == chat.lmm.image_token_id).sum()) == 2 * grid


def test_the_named_object_is_grounded_as_a_referring_expression(chat, image, monkeypatch):
    """By default the object the chain of thought names is grounded as F-LMM grounds a
    referring expression (the phrase alone as the answer); ``cot_in_turn``: inside its turn."""
    monkeypatch.setattr(chat.lmm, "generate", lambda *a, **k: " the red circle. more")
    calls, ground = [], chat.ground
    monkeypatch.setattr(chat, "ground", lambda *a: calls.append(a[1:]) or ground(*a))
    step = chat.relevant_object(image, QUESTION)
    assert step.answer == f"{COT_PREFIX} the red circle. more" and step.phrases == [
        "the red circle"
    ]
    start, end = step.spans[0]
    assert step.answer[start:end] == "the red circle"
    assert step.masks.shape == (1, *image.shape[:2])
    monkeypatch.setattr(chat, "cot_in_turn", True)
    turn = chat.relevant_object(image, QUESTION)
    assert turn.spans == step.spans and turn.masks.shape == step.masks.shape
    ask = COT_QUESTION.format(question=QUESTION)
    assert calls == [
        ("the red circle", ["the red circle"]),
        (step.answer, ["the red circle"], ask),
    ]


def test_the_crop_box_holds_the_masks_largest_region():
    mask = np.zeros((50, 60), dtype=bool)
    mask[10:20, 30:41] = True  # the object
    mask[45:47, 2:4] = True  # a speck far away would stretch the box over half the image
    mask[20, 41] = True  # touching by a corner: the same region (8-connected)
    main = largest_region(mask)
    assert mask_box(main) == (30, 10, 42, 21) and not main[45:47, 2:4].any()
    assert not largest_region(np.zeros((4, 4), dtype=bool)).any()
    one = np.eye(5, dtype=bool)  # a diagonal line is one 8-connected region
    assert (largest_region(one) == one).all()


def test_boxes_and_bad_inputs():
    mask = np.zeros((50, 60), dtype=bool)
    mask[10:20, 30:41] = True
    assert mask_box(mask) == (30, 10, 41, 20)
    assert expand_box((30, 10, 41, 20), (50, 60)) == (26, 6, 45, 24)
    assert expand_box((0, 0, 60, 50), (50, 60)) == (0, 0, 60, 50)
    assert sam_variant_of("/x/sam_vit_l_0b3195.pth") == "vit_l"
    with pytest.raises(FlmmUserError, match="sam_variant"):
        sam_variant_of("weights.pth")


def test_bad_image_is_a_clear_error(chat):
    with pytest.raises(FlmmUserError, match="H x W x 3"):
        chat.answer(np.zeros((8, 8), dtype=np.uint8), QUESTION)
    with pytest.raises(FlmmUserError, match="uint8"):
        chat.answer(np.zeros((8, 8, 3), dtype=np.float32), QUESTION)


def test_images_may_be_arrays_pil_images_or_paths(chat, image, tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    expected = chat.answer(image, QUESTION, max_new_tokens=6)
    for same in (Image.fromarray(image).convert("RGBA"), str(path), path):
        assert chat.answer(same, QUESTION, max_new_tokens=6) == expected
    assert "".join(chat.stream(path, QUESTION, max_new_tokens=6)).strip() == expected.strip()
    masks = chat.ground(image, "red circle", ["red circle"]).refined
    assert torch.equal(chat.ground(str(path), "red circle", ["red circle"]).refined, masks)
    result = chat.chat(Image.fromarray(image), QUESTION, phrases=[], max_new_tokens=6)
    assert result.answer == expected and result.masks.shape == (0, 48, 48)
    assert chat.relevant_object(path, QUESTION, max_new_tokens=6).answer
    assert chat.visual_cot(path, QUESTION, max_new_tokens=6).question == QUESTION


def test_a_missing_or_unreadable_image_path_is_one_line(chat, tmp_path, capsys):
    missing = tmp_path / "nowhere.png"
    assert f"image not found: {missing}" in one_line_error(capsys, chat.answer, missing, QUESTION)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    line = one_line_error(capsys, chat.chat, str(corrupt), QUESTION)
    assert f"cannot read {corrupt} as an image" in line

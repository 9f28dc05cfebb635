"""scripts/yes_no_controls.py: the toy yes / no rules and the two-rule curriculum."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script
from transformers import AutoProcessor

from flmm.foundation.cache import SHIPPED
from flmm.foundation.pretrain_lmm import make_batch


@pytest.fixture(scope="module")
def controls():
    return load_script("scripts/yes_no_controls.py")


def asked(question: str) -> str:
    return question.split()[3]


def test_colour_rule_answers_are_true_of_the_scene_and_balanced(controls):
    pairs = controls.rule_pairs("colour", np.random.default_rng(0))
    answers = []
    for _ in range(60):
        conv = next(pairs)
        (question, answer), image = conv.turns[0], conv.images[0]
        # the scene's colours, read back from its pixels' colour labels (0: background)
        present = {list(controls.COLOURS)[i - 1] for i in np.unique(conv.labels[0]) if i}
        assert (asked(question) in present) == (answer == "yes"), question
        assert image.shape == (96, 96, 3)
        answers.append(answer == "yes")
    assert 0.3 < np.mean(answers) < 0.7


def test_match_rule_shows_the_asked_colour_iff_yes(controls):
    pairs = controls.rule_pairs("match", np.random.default_rng(1))
    for _ in range(30):
        conv = next(pairs)
        (question, answer), image = conv.turns[0], conv.images[0]
        shown = tuple(int(v) for v in image[0, 0])
        assert (controls.COLOURS[asked(question)] == shown) == (answer == "yes")


def test_curriculum_trains_on_both_rules(controls, capsys):
    losses = controls.main(
        ["match", "--steps", "1", "--then", "colour", "--then-steps", "1", "--batch-size", "2"]
        + ["--every", "1"]
    )
    out = capsys.readouterr().out
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert "match: step 1," in out and "colour: step 2," in out


def test_described_rule_gives_the_scene_as_text_and_no_image(controls):
    pairs = controls.rule_pairs("described", np.random.default_rng(2))
    samples = [next(pairs) for _ in range(40)]
    checked = 0
    for conv in samples:
        assert conv.images == []
        ((text, answer),) = conv.turns
        caption, question = text.rsplit(". ", 1)
        words = question.split()
        if (
            len(words) == 8 and words[3] in controls.COLOURS and words[4] != "object"
        ):  # "Is there a red circle in the image?"
            assert (f"{words[3]} {words[4]}" in caption) == (answer == "yes"), text
            checked += 1
    assert checked >= 10
    processor = AutoProcessor.from_pretrained(SHIPPED["tiny_llava"])
    batch = make_batch(processor, samples[:4])
    assert "pixel_values" not in batch
    for ids, labels, conv in zip(batch["input_ids"], batch["labels"], samples):
        kept = processor.tokenizer.decode(ids[labels != -100])
        assert kept == f"{conv.turns[0][1]} </s>"

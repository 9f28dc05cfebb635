"""scripts/yes_no_controls.py: the toy yes / no rules and the two-rule curriculum."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script


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

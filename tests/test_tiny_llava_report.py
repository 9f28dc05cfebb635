"""scripts/tiny_llava_report.py: the LMM-only figures (POPE plain, CoT naming, caption CHAIR)."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from flmm.data.synthetic import write_world
from flmm.data.synthetic.corpus import vocabulary
from flmm.foundation.tiny_llava import build_tiny_llava


@pytest.fixture(scope="module")
def report():
    return load_script("scripts/tiny_llava_report.py")


def test_asked_object_and_naming(report):
    assert report.asked_object("Is there an orange cross in the image?") == "orange cross"
    assert report.names_asked("the orange cross", "orange cross")
    assert report.names_asked("the large orange cross", "orange cross")
    assert not report.names_asked("the orange crosses", "orange cross")
    with pytest.raises(ValueError, match="not a POPE question"):
        report.asked_object("where is the red circle?")


def test_report_runs_end_to_end(report, tmp_path):
    world = write_world(tmp_path / "world", 2, 2, 3, seed=1)
    lmm = build_tiny_llava(tmp_path / "lmm", vocabulary(), num_layers=1, vision_layers=1)
    argv = ["--lmm", str(lmm), "--world", str(world), "--limit", "4", "--cot-limit", "3"]
    out = report.main(
        [*argv, "--captions", "2", "--questions", "2", "--max-new-tokens", "6"]
        + ["--repetition-penalty", "1.2"]
        + ["--output-dir", str(tmp_path / "out")]
    )
    assert json.loads((tmp_path / "out/report.json").read_text()) == json.loads(json.dumps(out))
    assert set(out["pope_plain"]) == {"pope_random", "pope_popular", "pope_adversarial"}
    assert all(m["n"] == 4 for m in out["pope_plain"].values())
    for name, kinds in out["pope_false_yes"].items():  # 4 questions: 2 "no" ones, each of a kind
        assert sum(k["n"] for k in kinds.values()) == 2, name
    assert all(c["n"] == 3 and 0 <= c["share"] <= 1 for c in out["cot_names_asked"].values())
    assert out["captions"]["captions"] == 2 and 0 <= out["captions"]["chair_i"] <= 1
    assert out["captions"]["repetition_penalty"] == 1.2
    short = out["short_answers"]
    assert {"where is", "what size", "how many"} <= set(short)
    assert all(0 <= k["accuracy"] <= 1 and 0 < k["majority"] <= 1 for k in short.values())


def test_short_answers_are_scored_by_kind(report):
    assert report.question_kind("what colour is the circle on the left?") == "what colour"
    assert report.question_kind("is the red circle left of the blue square?") == "relation"
    assert report.question_kind("how many circles are there?") == "how many"
    pairs = [("Red.", "red"), (" blue", "red"), ("red", "red"), ("green", "green")]
    assert report.score_short(pairs) == {"accuracy": 0.75, "majority": 0.75, "n": 4}

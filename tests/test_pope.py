"""POPE evaluation: the layout, yes/no parsing, metrics, resume, the synthetic sets, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, TINY, paths_at
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

from flmm.chat.evaluate_pope import TINY_LLAVA, evaluate_pope, same_model
from flmm.chat.pope import (
    PopeFormatError,
    check_settings,
    evaluate,
    format_table,
    parse_yes_no,
    pope_metrics,
    read_answers,
    read_pope,
    read_sets,
    score_answers,
)
from flmm.data.synthetic.pope import (
    CATEGORIES,
    ensure_pope,
    false_yes_by_kind,
    negative_kind,
    pope_sets,
    split_objects,
)
from flmm.data.synthetic.write import write_world
from flmm.errors import FlmmUserError

FIXTURES = Path(__file__).parent / "fixtures" / "pope"
GOOD = {"question_id": 1, "image": "a.png", "text": "Is there a cat in the image?", "label": "yes"}


# ------------------------------------------------------------------------------ the layout
def test_reads_the_pope_layout():
    questions = read_pope(FIXTURES / "coco_pope_random.json")
    assert [q.question_id for q in questions] == [1, 2, 3, 4]  # the blank line is skipped
    assert [q.label for q in questions] == ["yes", "no", "yes", "no"]  # "No" normalised
    assert questions[0].image == "COCO_val2014_000000310196.jpg"
    assert questions[0].text == "Is there a snowboard in the image?"


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"question_id": 2, "image": "a.png"', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "label"}), "missing field(s) label"),
        (json.dumps(dict(GOOD, label="maybe")), "label must be 'yes' or 'no', got 'maybe'"),
        (json.dumps(dict(GOOD, image="")), "image must be a non-empty string"),
        (json.dumps(dict(GOOD, question_id=[3])), "question_id must be an integer or a string"),
        (json.dumps(GOOD), "question_id 1 repeats line 1"),
    ],
)
def test_malformed_line_is_named(tmp_path, bad, message):
    path = tmp_path / "pope_random.json"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, question_id=5)) + "\n" + bad)
    with pytest.raises(PopeFormatError) as err:
        read_pope(path)
    assert f"{path}:3: " in str(err.value) and message in str(err.value)


def test_missing_or_empty_pope_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pope_dir"):
        read_pope(tmp_path / "nope.json")
    (tmp_path / "empty.json").write_text("\n")
    with pytest.raises(PopeFormatError, match="holds no questions"):
        read_pope(tmp_path / "empty.json")


def test_read_sets_limits_and_checks_its_options():
    sets = read_sets(FIXTURES, ["coco_pope_random.json"], limit=3)
    assert list(sets) == ["coco_pope_random"] and len(sets["coco_pope_random"]) == 3
    for limit in (0, -2, 1.5, True):
        with pytest.raises(FlmmUserError, match="limit must be a positive integer"):
            read_sets(FIXTURES, ["coco_pope_random.json"], limit=limit)


# --------------------------------------------------------------------------- yes/no parsing
@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("  YES, there is a red circle in the image.", "yes"),
        ("No", "no"),
        ("no!", "no"),
        ("There is no snowboard in the image.", "no"),
        ("The image does not contain a snowboard.", "no"),
        ("There isn't a snowboard.", "no"),
        ("There isn\u2019t a snowboard.", "no"),
        ("I think so, yes.", "yes"),
        ("Yes. No, wait.", "yes"),  # only the first sentence counts
        ("There is a snowboard. No doubt.", None),
        ("yes triangle at the top right . yes triangle", "yes"),
        ("a red circle at the top left.", None),
        ("Nothing of the kind.", "no"),
        ("Noted.", None),  # "no" must be a whole word
        ("", None),
    ],
)
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) == expected


# --------------------------------------------------------------------------------- metrics
def test_metrics_against_a_hand_computed_case():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    preds = ["yes", "no", None, "yes", "no", "no", None, "yes"]
    m = pope_metrics(labels, preds)
    # tp = 2 (0, 7), fp = 1 (3), tn = 2 (4, 5), fn = 1 (1), unparseable = 2 (2 on yes, 6 on no)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(3 / 8)
    assert (m["n"], m["unparseable"]) == (8, 2)


def test_metrics_are_popes_without_unparseable_answers():
    m = pope_metrics(["yes", "no", "no", "yes"], ["yes", "yes", "no", "yes"])
    assert (m["accuracy"], m["precision"], m["recall"]) == (0.75, pytest.approx(2 / 3), 1.0)
    assert (m["f1"], m["yes_ratio"]) == (pytest.approx(0.8), 0.75)
    always_no = pope_metrics(["yes", "no"], ["no", "no"])
    assert (always_no["precision"], always_no["f1"], always_no["yes_ratio"]) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------- answering, resume, scoring
@dataclass
class FakeCoT:
    object_text: str
    box: tuple[int, int, int, int] | None
    answer: str


class FakeAnswerer:
    """Says yes iff the question's object is in the image's name; crashes after ``crash_after``."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.calls, self.crash_after = 0, crash_after

    def answer(self, image, question, max_new_tokens=32):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
        return "Yes, there is." if "cat" in question else "No."

    def visual_cot(self, image, question, max_new_tokens=32):
        return FakeCoT(
            "The object most relevant is the cat", (1, 2, 5, 6), self.answer(image, question)
        )


@pytest.fixture
def pope_files(tmp_path):
    """A POPE file of 6 questions on two 8 x 8 images."""
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / name)
    rows = [
        {"question_id": i, "image": img, "text": f"Is there a {obj} in the image?", "label": label}
        for i, (img, obj, label) in enumerate(
            [
                ("a.png", "cat", "yes"),
                ("a.png", "dog", "no"),
                ("a.png", "bird", "yes"),
                ("b.png", "cat", "no"),
                ("b.png", "car", "no"),
                ("b.png", "tree", "yes"),
            ],
            start=1,
        )
    ]
    (tmp_path / "pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_evaluate_answers_every_mode_and_scores(pope_files):
    sets = read_sets(pope_files, ["pope_random.json"])
    results = evaluate(FakeAnswerer(), sets, pope_files, pope_files / "out")
    # predictions yes, no, no, yes, no, no against labels yes, no, yes, no, no, yes
    for mode in ("plain", "vcot"):
        m = results["pope_random"][mode]
        assert (m["accuracy"], m["precision"], m["recall"]) == (0.5, 0.5, pytest.approx(1 / 3))
    assert results["pope_random"]["vcot"]["grounded"] == 6
    records = read_answers(pope_files / "out" / "answers" / "pope_random.vcot.jsonl")
    assert records[0]["box"] == [1, 2, 5, 6] and records[0]["object_text"]
    table = format_table(results)
    assert "| pope_random | plain | 50.0 | 50.0 | 33.3 | 40.0 | 33.3 | 6 | 0 |" in table


def test_interrupted_run_resumes_where_it_stopped(pope_files):
    sets = read_sets(pope_files, ["pope_random.json"])
    out = pope_files / "out"
    with pytest.raises(KeyboardInterrupt):
        evaluate(FakeAnswerer(crash_after=4), sets, pope_files, out, modes=["plain"])
    answers = out / "answers" / "pope_random.plain.jsonl"
    assert [r["question_id"] for r in read_answers(answers)] == [1, 2, 3, 4]
    with open(answers, "a") as f:  # killed in the middle of writing the fifth record
        f.write('{"question_id": 5, "ima')
    again = FakeAnswerer()
    resumed = evaluate(again, sets, pope_files, out, modes=["plain"])
    assert again.calls == 2  # questions 5 and 6 only
    assert [r["question_id"] for r in read_answers(answers)] == [1, 2, 3, 4, 5, 6]
    fresh = evaluate(FakeAnswerer(), sets, pope_files, pope_files / "fresh", modes=["plain"])
    assert resumed == fresh


def test_a_whole_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "answers.jsonl"
    record = {"question_id": 1, "image": "a.png", "label": "no", "answer": "No."}
    path.write_text(json.dumps(record))
    assert read_answers(path) == [record]
    assert path.read_text().endswith("\n")


def test_corrupt_answers_and_answers_to_other_questions_are_refused(pope_files):
    sets = read_sets(pope_files, ["pope_random.json"])
    evaluate(FakeAnswerer(), sets, pope_files, pope_files / "out", modes=["plain"])
    answers = pope_files / "out" / "answers" / "pope_random.plain.jsonl"
    records = read_answers(answers)
    other = [dict(q.__dict__, label="yes") for q in sets["pope_random"]]
    (pope_files / "pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in other))
    with pytest.raises(PopeFormatError, match="answers come from other questions"):
        score_answers(read_pope(pope_files / "pope_random.json"), records)
    for bad in ("garbage", '{"question_id": 9}'):
        answers.write_text(bad + "\n" + answers.read_text().split("\n", 1)[1])
        with pytest.raises(PopeFormatError, match=r"pope_random.plain.jsonl:1: not an answer"):
            read_answers(answers)


def test_missing_image_is_named(pope_files):
    (pope_files / "b.png").unlink()
    sets = read_sets(pope_files, ["pope_random.json"])
    with pytest.raises(FileNotFoundError, match="image 'b.png'.*image_dir"):
        evaluate(FakeAnswerer(), sets, pope_files, pope_files / "out", modes=["plain"])


def test_resume_with_other_settings_is_refused(tmp_path):
    check_settings(tmp_path, {"checkpoint": "typo.ckpt", "max_new_tokens": 16})
    check_settings(tmp_path, {"checkpoint": "a.ckpt", "max_new_tokens": 16})  # nothing answered
    (tmp_path / "answers").mkdir()
    (tmp_path / "answers" / "pope_random.plain.jsonl").write_text("{}\n")
    check_settings(tmp_path, {"checkpoint": "a.ckpt", "max_new_tokens": 16})
    with pytest.raises(FlmmUserError, match="other settings \\(checkpoint"):
        check_settings(tmp_path, {"checkpoint": "b.ckpt", "max_new_tokens": 16})


def test_resume_compares_the_tiny_llava_recipe_not_its_config_spelling(tmp_path):
    """A run recorded before ``steps_scale`` existed, with another cache folder, resumes; another
    recipe is refused."""
    node = {"_target_": TINY_LLAVA, "cache_dir": "/old", "pretrain_steps": 40, "seed": 0}
    (tmp_path / "answers").mkdir()
    (tmp_path / "answers" / "pope_random.plain.jsonl").write_text("{}\n")
    check_settings(tmp_path, {"lmm": {"name_or_path": node}}, same_model)
    now = node | {"cache_dir": "/new", "steps_scale": 1.0}
    check_settings(tmp_path, {"lmm": {"name_or_path": now}}, same_model)
    with pytest.raises(FlmmUserError, match="other settings \\(lmm"):
        check_settings(tmp_path, {"lmm": {"name_or_path": now | {"seed": 1}}}, same_model)
    assert same_model({"lmm": {"name_or_path": "llava-hf/llava-1.5-7b-hf"}}) == {
        "lmm": {"name_or_path": "llava-hf/llava-1.5-7b-hf"}
    }


# ------------------------------------------------------------------------ synthetic POPE
@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("pope_world") / "world", 4, 2, 12, seed=3)


def test_world_writes_balanced_pope_sets_of_its_test_split(small_world):
    objects = split_objects(small_world)
    assert len(objects) == 12
    for strategy in ("random", "popular", "adversarial"):
        rows = read_pope(small_world / "pope" / f"pope_{strategy}.json")
        assert Counter(q.label for q in rows) == {"yes": len(rows) // 2, "no": len(rows) // 2}
        assert {q.image for q in rows} == set(objects)
        for q in rows:
            obj = _object_of(q.text)
            assert obj in CATEGORIES and (obj in objects[q.image]) == (q.label == "yes"), q
        per_image = Counter(q.image for q in rows)
        assert all(per_image[i] == 2 * min(3, len(objects[i])) for i in objects)


def _object_of(question: str) -> str:
    """ "Is there an orange square in the image?" -> "orange square"."""
    return question.removesuffix(" in the image?").split(" ", 3)[-1]


def _negatives(rows: list[dict]) -> dict[str, list[str]]:
    """``image -> objects of its "no" questions``."""
    out: dict[str, list[str]] = {}
    for r in rows:
        if r["label"] == "no":
            out.setdefault(r["image"], []).append(_object_of(r["text"]))
    return out


def _chosen_rank_first(objects, negatives, score) -> None:
    """Every chosen absent object scores at least as high as every absent object not chosen."""
    for image, chosen in negatives.items():
        rest = [c for c in CATEGORIES if c not in objects[image] and c not in chosen]
        assert min(score(image, c) for c in chosen) >= max(score(image, c) for c in rest)


def test_popular_and_adversarial_follow_pope_definitions(small_world):
    objects = split_objects(small_world)
    sets = pope_sets(objects)
    images_with = Counter(o for p in objects.values() for o in p)
    _chosen_rank_first(objects, _negatives(sets["popular"]), lambda _, c: images_with[c])

    def together(image: str, c: str) -> int:  # images holding c and a present object, summed
        return sum(c in p and q in p for q in objects[image] for p in objects.values())

    _chosen_rank_first(objects, _negatives(sets["adversarial"]), together)
    assert _negatives(sets["random"]) != _negatives(sets["popular"])


def test_pope_sets_are_deterministic_and_lazy_writing_matches(small_world, tmp_path):
    assert pope_sets(split_objects(small_world), seed=3) == pope_sets(
        split_objects(small_world), seed=3
    )
    lazy = tmp_path / "world"
    lazy.mkdir()
    for part in ("synthetic", "images"):
        os.symlink(small_world / part, lazy / part)
    ensure_pope(lazy)
    for name in ("pope_random.json", "pope_popular.json", "pope_adversarial.json"):
        assert (lazy / "pope" / name).read_bytes() == (small_world / "pope" / name).read_bytes()
    with pytest.raises(FileNotFoundError, match="no synthetic world"):
        ensure_pope(tmp_path / "nowhere")


def test_negatives_are_split_by_what_they_share_with_the_scene():
    present = ["purple cross", "red circle"]
    kinds = {
        o: negative_kind(o, present) for o in ("purple circle", "purple square", "blue circle")
    }
    assert kinds == {"purple circle": "binding", "purple square": "colour", "blue circle": "shape"}
    assert negative_kind("blue square", present) == "neither"
    questions = [("a.png", "purple circle", "no"), ("a.png", "purple square", "no")]
    questions += [("a.png", "purple square", "no"), ("a.png", "red circle", "yes")]
    shares = false_yes_by_kind(questions, ["yes", "no", "yes", "yes"], {"a.png": present})
    assert shares["binding"] == {"n": 1, "false_yes": 1.0}
    assert shares["colour"] == {"n": 2, "false_yes": 0.5}
    assert shares["neither"] == {"n": 0, "false_yes": None}  # the "yes" question is not counted


# ------------------------------------------------------------------------------ entry point
def test_cli_names_a_malformed_line_without_traceback(tmp_path):
    (tmp_path / "pope_random.json").write_text(json.dumps(GOOD) + "\n" + '{"question_id": 2}\n')
    cmd = [
        sys.executable,
        "-m",
        "flmm.chat.evaluate_pope",
        *paths_at(tmp_path),
        "synthetic_world=null",
        f"pope_dir={tmp_path}",
        "files=[pope_random.json]",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "pope_random.json:2: missing field(s) image, text, label" in result.stderr
    assert "Traceback" not in result.stderr


def compose_pope_cfg(root: Path, overrides: list[str]) -> DictConfig:
    """The real conf/evaluate_pope.yaml with ``overrides``, its run folder under ``root``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "evaluate_pope",
            overrides=[*paths_at(root), *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(root / "pope_run")
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_entry_point_on_the_trained_tiny_model_resumes(tiny_run):
    root, _, _ = tiny_run
    tiny_models = [o for o in TINY if o.startswith(("model.lmm.", "model.sam."))]
    cfg = compose_pope_cfg(
        root,
        [
            f"checkpoint={root / 'run' / 'checkpoints' / 'last.ckpt'}",
            "files=[pope_random.json,pope_adversarial.json]",
            "limit=2",
            "max_new_tokens=4",
            *tiny_models,
        ],
    )
    results = evaluate_pope(cfg)
    out = root / "pope_run"
    assert json.loads((out / "pope_metrics.json").read_text()) == results
    for name in ("pope_random", "pope_adversarial"):
        for mode in ("plain", "vcot"):
            assert results[name][mode]["n"] == 2
            assert len(read_answers(out / "answers" / f"{name}.{mode}.jsonl")) == 2
    assert "| pope_adversarial | vcot |" in (out / "pope_table.md").read_text()
    assert evaluate_pope(cfg) == results  # everything answered: resumes without new answers
    with open_dict(cfg):
        cfg.max_new_tokens = 5
    with pytest.raises(FlmmUserError, match="max_new_tokens"):
        evaluate_pope(cfg)

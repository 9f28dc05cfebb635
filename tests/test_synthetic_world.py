"""The synthetic world: determinism, exact masks, unique expressions, corpus, refer round trip."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoProcessor

from flmm import chat
from flmm.data import ReferDataset
from flmm.data.synthetic import (
    SyntheticDataModule,
    attribute_oracle_masks,
    captions,
    corpus,
    pretraining_pairs,
    qa,
    referring_expressions,
    sample_expressions,
    sample_scene,
    vocabulary,
    words,
    write_world,
)
from flmm.data.synthetic import write as write_module
from flmm.data.synthetic.corpus import region
from flmm.data.synthetic.world import COLOURS, PLURALS, SHAPES, shape_mask
from flmm.foundation.pretrain_lmm import make_batch

SINGULAR = {p: s for s, p in PLURALS.items()}


def scenes(n: int, seed: int = 0, image_size: int = 96):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, image_size) for _ in range(n)]


def resolve(objects, text: str) -> list[int]:
    """An independent reading of an expression: the indices of the objects it describes."""

    def noun(phrase: str) -> list[int]:
        *mods, head = phrase.split()
        out = [i for i, o in enumerate(objects) if head in ("object", o.shape)]
        for m in mods:
            out = [i for i in out if m in (objects[i].colour, objects[i].size)]
        return out

    def coord(i: int, axis: str) -> float:
        return objects[i].x if axis == "x" else objects[i].y

    body = text.removeprefix("the ")
    if m := re.fullmatch(r"(larger|smaller) of the two (\w+)", body):
        group = noun(SINGULAR[m[2]])
        want = "large" if m[1] == "larger" else "small"
        return [i for i in group if objects[i].size == want] if len(group) == 2 else []
    extremes = {
        "leftmost": ("x", min),
        "rightmost": ("x", max),
        "topmost": ("y", min),
        "bottommost": ("y", max),
        "on the left": ("x", min),
        "on the right": ("x", max),
        "at the top": ("y", min),
        "at the bottom": ("y", max),
    }
    if m := re.fullmatch(r"(leftmost|rightmost|topmost|bottommost) (.+)", body):
        axis, pick = extremes[m[1]]
        group = noun(m[2])
        return [pick(group, key=lambda i: coord(i, axis))] if len(group) > 1 else []
    if m := re.fullmatch(r"(.+) (left of|right of|above|below) the (.+)", body):
        landmark = noun(m[3])
        if len(landmark) != 1:
            return []
        axis, sign = {
            "left of": ("x", -1),
            "right of": ("x", 1),
            "above": ("y", -1),
            "below": ("y", 1),
        }[m[2]]
        ref = coord(landmark[0], axis)
        return [i for i in noun(m[1]) if sign * (coord(i, axis) - ref) > 0]
    if m := re.fullmatch(r"(.+) (on the left|on the right|at the top|at the bottom)", body):
        axis, pick = extremes[m[2]]
        group = noun(m[1])
        return [pick(group, key=lambda i: coord(i, axis))] if len(group) > 1 else []
    return noun(body)


def test_scenes_are_deterministic_and_masks_exact():
    a, b = scenes(20, seed=3), scenes(20, seed=3)
    assert all((x.image == y.image).all() for x, y in zip(a, b))
    assert any((x.image != y.image).any() for x, y in zip(a, scenes(20, seed=4)))
    for scene in a:
        assert 3 <= len(scene.objects) <= 5 and scene.image.dtype == np.uint8
        total = np.zeros(scene.image.shape[:2], dtype=int)
        for o in scene.objects:
            np.testing.assert_array_equal(o.mask, shape_mask(o.shape, o.center, o.radius, 96))
            assert o.mask.sum() > 20
            colour = np.array(COLOURS[o.colour])
            assert np.abs(scene.image[o.mask].astype(int) - colour).max() <= 8
            total += o.mask
        assert total.max() == 1  # no overlaps


def test_distractors_share_attributes():
    objs = [s.objects for s in scenes(300)]
    share_colour = np.mean([len({o.colour for o in os}) < len(os) for os in objs])
    share_shape = np.mean([len({o.shape for o in os}) < len(os) for os in objs])
    assert share_colour > 0.5 and share_shape > 0.5


def test_every_expression_resolves_to_exactly_its_target():
    kinds = Counter()
    for scene in scenes(150, seed=1):
        for t in range(len(scene.objects)):
            for e in referring_expressions(scene, t):
                assert resolve(scene.objects, e.text) == [t], e.text
                colours = [o.colour for o in scene.objects]
                assert e.colour_resolvable == (colours.count(scene.objects[t].colour) == 1)
                kinds[e.kind] += 1
    assert set(kinds) == {
        "colour_shape",
        "shape_only",
        "colour_only",
        "size",
        "position",
        "relational",
    }
    assert kinds["relational"] > 50 and kinds["size"] > 50


def test_sampled_expressions_mostly_need_more_than_colour():
    rng = np.random.default_rng(0)
    sampled = [
        e
        for s in scenes(200)
        for t in range(len(s.objects))
        for e in sample_expressions(s, t, rng, 3)
    ]
    assert np.mean([not e.colour_resolvable for e in sampled]) >= 0.4
    assert len({e.text for e in sampled}) > 300


def test_vocabulary_covers_all_text():
    vocab = set(vocabulary())
    rng = np.random.default_rng(0)
    seen = set()
    for scene in scenes(150, seed=2):
        seen |= set(words(captions(scene, rng)))
        for q, a in qa(scene, rng):
            seen |= set(words(q)) | set(words(a))
        for t in range(len(scene.objects)):
            for e in referring_expressions(scene, t):
                seen |= set(words(e.text))
    assert seen <= vocab, seen - vocab
    assert set(SHAPES) <= seen and set(COLOURS) <= seen


def test_captions_and_qa_are_true():
    rng = np.random.default_rng(5)
    scene = scenes(1, seed=5)[0]
    text = captions(scene, rng)
    assert text.count(".") == len(scene.objects)
    for o in scene.objects:
        assert f"{o.colour} {o.shape}" in text
    answers = dict(qa(scene, rng))
    for q, a in answers.items():
        if q.startswith("what colour is"):
            assert a == scene.objects[resolve(scene.objects, q[15:-1])[0]].colour
        if q.startswith("is there"):
            *_, colour, shape = q[:-1].split()
            present = {(o.colour, o.shape) for o in scene.objects}
            assert (a == "yes") == ((colour, shape) in present)
    image, prompt, answer = next(pretraining_pairs(np.random.default_rng(0), image_size=64))
    assert image.shape == (64, 64, 3) and prompt and answer


TERSE_PLACES = sorted(
    {f"{r} {c}".strip() or "center" for r in ("top", "", "bottom") for c in ("left", "", "right")},
    key=len,
    reverse=True,
)


def _parses(scene, sentence: str) -> list[tuple[str, int | None]]:
    """Readings ``(name, target)`` of a terse caption sentence "<name> <place>" that are true."""
    out = []
    for place in TERSE_PLACES:
        name = sentence.removesuffix(" " + place)
        if name == sentence or name.endswith((" at the", " on the", " in the")):
            continue
        if name.startswith(("a ", "an ")):
            out.append((name, None))
            continue
        found = resolve(scene.objects, name)
        if len(found) == 1 and region(scene.objects[found[0]], 96).endswith("the " + place):
            out.append((name, found[0]))
    return out


def test_refer_captions_name_each_object_then_say_where_it_is():
    rng = np.random.default_rng(3)
    named = 0
    for scene in scenes(30, seed=3):
        text = captions(scene, rng, refer_prob=1.0, terse=True)
        sentences = text.removesuffix(".").split(". ")
        assert len(sentences) == len(scene.objects)
        for sentence in sentences:
            readings = _parses(scene, sentence)
            assert readings, sentence
            named += any(target is not None for _, target in readings)
    assert named > 60


def test_chain_of_thought_text_matches_what_chat_asks():
    # the tiny LLaVA learns the wording flmm.chat's visual chain of thought uses; keep them equal
    assert corpus.COT_QUESTION == chat.COT_QUESTION.format(question="").strip().lower()
    assert corpus.COT_ANSWER == chat.COT_PREFIX.lower()


def test_is_there_questions_are_balanced():
    rng = np.random.default_rng(4)
    answers = [dict(qa(scene, rng)) for scene in scenes(300, seed=4)]
    yes = [a for qas in answers for q, a in qas.items() if q.startswith("is there")]
    assert abs(yes.count("yes") / len(yes) - 0.5) < 0.08


def test_pretraining_labels_are_the_answer_and_the_end_token(tiny_llava_dir):
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    batch = make_batch(processor, [(image, "where is the red circle?", "at the top left.")])
    labels = batch["labels"][0]
    answer = processor.tokenizer.convert_ids_to_tokens(labels[labels >= 0])
    assert answer == ["at", "the", "top", "left", ".", processor.tokenizer.eos_token]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("w") / "world", 30, 8, 8, seed=7)


def test_write_world_is_byte_deterministic(world, tmp_path):
    again = write_world(tmp_path / "again", 30, 8, 8, seed=7)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((world / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = write_world(tmp_path / "other", 30, 8, 8, seed=8)
    instances = "synthetic/instances.json"
    assert (other / instances).read_bytes() != (world / instances).read_bytes()


def test_world_round_trips_through_the_refer_reader(world):
    """Replays the generator and compares images, masks and sentences with what the reader gives."""
    rng = np.random.default_rng([7, 0])
    expected = []
    for _ in range(30):
        scene = sample_scene(rng, 96)
        sentences = [
            sample_expressions(scene, t, rng, int(rng.integers(1, 4)))
            for t in range(len(scene.objects))
        ]
        expected.append((scene, sentences))
    data = ReferDataset(world, world / "images", "synthetic", "unc", "train", "per_sentence")
    assert dict(data.skipped) == {}
    assert len(data) == sum(len(s) for _, ss in expected for s in ss)
    rows = iter(data)
    for scene, sentences in expected:
        for t, exprs in enumerate(sentences):
            for e in exprs:
                sample = next(rows)
                np.testing.assert_array_equal(sample.image, scene.image)
                np.testing.assert_array_equal(sample.masks[0], scene.objects[t].mask)
                assert sample.phrases == [e.text]
                tags = {"kind": e.kind, "colour_resolvable": e.colour_resolvable}
                assert sample.meta["tags"] == [tags]
    for split, n in (("train", 30), ("val", 8), ("test", 8)):
        data = ReferDataset(world, world / "images", "synthetic", "unc", split, "reference")
        assert len(data) == n


def test_attribute_oracle(world):
    data = ReferDataset(world, world / "images", "synthetic", "unc", "val", "reference")
    for sample in data:
        oracle = attribute_oracle_masks(data, sample, "colour")
        for mask, target, tag in zip(oracle, sample.masks, sample.meta["tags"]):
            assert (mask >= target).all()
            assert (mask == target).all() == tag["colour_resolvable"]
        assert attribute_oracle_masks(data, sample, "shape").shape == sample.masks.shape


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(write_module._Writer, "finish", boom)
    with pytest.raises(KeyboardInterrupt):
        write_world(tmp_path / "w", 3, 1, 1)
    assert list(tmp_path.iterdir()) == []


def test_synthetic_datamodule_writes_once(tmp_path):
    dm = SyntheticDataModule(tmp_path / "w", n_train=6, n_val=2, n_test=2, batch_size=3)
    dm.prepare_data()
    stamp = (tmp_path / "w/synthetic/instances.json").stat().st_mtime_ns
    dm.prepare_data()
    assert (tmp_path / "w/synthetic/instances.json").stat().st_mtime_ns == stamp
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 3 and batch.images[0].shape == (96, 96, 3)
    with pytest.raises(FileExistsError, match="different synthetic world"):
        SyntheticDataModule(tmp_path / "w", n_train=7).prepare_data()

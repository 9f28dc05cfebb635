"""ReasonSeg layout, gIoU / cIoU, and the answer-then-ground flow on synthetic-world fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_ground_cli import save_flmm

from flmm.chat.conversation import COT_PREFIX, GroundedChat
from flmm.chat.reasonseg import (
    IGNORE,
    evaluate,
    main,
    outline,
    polygon_mask,
    query_counts,
    read_split,
    scores,
    write_synthetic_split,
)
from flmm.data.synthetic import sample_scene
from flmm.errors import FlmmUserError
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.model.network import FLMMModel

BOX = [[2, 2], [11, 2], [11, 7], [2, 7]]  # x 2..11, y 2..7: 10 x 6 pixels, outline included


def write_item(root: Path, name: str, shapes: list[dict], size=(12, 16)) -> None:
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(root / f"{name}.jpg")
    anno = {"text": ["what is it?", "the thing"], "is_sentence": False, "shapes": shapes}
    (root / f"{name}.json").write_text(json.dumps(anno))


def test_polygons_target_ignore_and_flag():
    shapes = [
        {"label": "ignore", "points": [[4, 3], [5, 3], [5, 4], [4, 4]]},
        {"label": "target", "points": BOX},
        {"label": "flag", "points": [[0, 0], [15, 0], [15, 11], [0, 11]]},
    ]
    mask = polygon_mask(shapes, 12, 16)
    assert mask.shape == (12, 16)
    assert int((mask == 1).sum()) == 60 - 4 and int((mask == IGNORE).sum()) == 4
    assert mask[3, 4] == IGNORE and mask[0, 0] == 0  # the smaller ignore polygon wins


def test_read_split(tmp_path):
    write_item(tmp_path, "a", [{"label": "target", "points": BOX}])
    write_item(tmp_path, "b", [])
    items = read_split(tmp_path)
    assert [i.image_path.name for i in items] == ["a.jpg", "b.jpg"]
    assert items[0].queries == ["what is it?", "the thing"] and not items[0].is_sentence
    assert int(items[0].mask.sum()) == 60 and not items[1].mask.any()
    (tmp_path / "c.json").write_text(json.dumps({"text": ["x"]}))
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(FlmmUserError, match="'shapes'"):
        read_split(tmp_path)
    with pytest.raises(FileNotFoundError, match="split folder not found"):
        read_split(tmp_path / "a.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ReasonSeg .json"):
        read_split(tmp_path / "empty")
    (tmp_path / "c.png").unlink()
    with pytest.raises(FileNotFoundError, match="no image beside"):
        read_split(tmp_path)


def test_scores_ignore_pixels_and_empty_queries():
    target = np.zeros((4, 4), dtype=np.uint8)
    target[0, :2] = 1
    target[1, :2] = IGNORE
    pred = np.zeros((4, 4), dtype=bool)
    pred[:2, 1:3] = True  # row 0: 1 hit, 1 miss, 1 false positive; row 1: only (1, 2) counts
    assert query_counts(pred, target) == (1, 4)
    assert query_counts(np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8)) == (0, 0)
    out = scores([(1, 3), (0, 0), (2, 4)])
    assert out["giou"] == pytest.approx((1 / 3 + 1 + 0.5) / 3)
    assert out["ciou"] == pytest.approx(3 / 7) and out["queries"] == 3


def test_outline_recovers_a_synthetic_object():
    scene = sample_scene(np.random.default_rng(4), 96)
    for obj in scene.objects:
        drawn = polygon_mask([{"label": "target", "points": outline(obj.mask)}], 96, 96) == 1
        iou = (drawn & obj.mask).sum() / (drawn | obj.mask).sum()
        assert iou > 0.9, obj.shape


def test_answer_then_ground_on_the_synthetic_world(tiny_llava_dir, tmp_path, capsys, monkeypatch):
    split = write_synthetic_split(tmp_path / "val", 2, seed=3)
    items = read_split(split)
    assert len(items) == 2 and all(i.is_sentence and i.mask.any() for i in items)
    assert items[0].queries[0].startswith("what ")
    ckpt, sam = save_flmm(tmp_path / "ckpt", tiny_llava_dir)
    monkeypatch.chdir(tmp_path)  # the records go under logs/ of the current folder by default
    main(
        [
            str(split),
            "--checkpoint",
            str(ckpt),
            "--lmm",
            str(tiny_llava_dir),
            "--sam",
            str(sam),
            "--max-new-tokens",
            "3",
        ]
    )
    out = tmp_path / "logs" / "reasonseg" / "val.json"
    saved = json.loads(out.read_text())
    assert len(saved["queries"]) == 2 and saved["metrics"]["queries"] == 2
    ious = [q["iou"] for q in saved["queries"]]
    assert saved["metrics"]["giou"] == pytest.approx(np.mean(ious))
    assert f"gIoU {saved['metrics']['giou']:.4f}" in capsys.readouterr().out


def test_evaluate_scores_every_query(tiny_llava_dir, tmp_path):
    lmm = FrozenLMM.from_pretrained(tiny_llava_dir)
    chat = GroundedChat(FLMMModel.build(lmm, build_sam("tiny"), base_channels=8))
    write_item(tmp_path, "a", [{"label": "target", "points": BOX}], size=(24, 24))
    metrics, records = evaluate(chat, read_split(tmp_path), max_new_tokens=3)
    assert metrics["queries"] == 2 and len(records) == 2
    assert [r["query"] for r in records] == ["what is it?", "the thing"]
    assert all(0.0 <= r["iou"] <= 1.0 for r in records)


def test_relevant_object_mode_segments_the_object_the_cot_step_names(
    tiny_llava_dir, tmp_path, monkeypatch
):
    """The chain of thought's first step names "red circle" (given here: the random tiny LMM
    completes the prefix with nothing, which grounds nothing); that phrase alone is grounded and
    its mask is what each query scores (the target is the whole image: IoU = the mask's area)."""
    torch.manual_seed(0)
    lmm = FrozenLMM.from_pretrained(tiny_llava_dir)
    chat = GroundedChat(FLMMModel.build(lmm, build_sam("tiny"), base_channels=8))
    whole = [[0, 0], [23, 0], [23, 23], [0, 23]]
    write_item(tmp_path, "a", [{"label": "target", "points": whole}], size=(24, 24))
    asked = []

    def generate(images, question, answer_prefix="", **gen):
        asked.append((question, answer_prefix))
        return " red circle. It is on the left"

    monkeypatch.setattr(chat.lmm, "generate", generate)
    (item,) = read_split(tmp_path)
    metrics, records = evaluate(chat, [item], 3, relevant_object=True)
    image = np.array(Image.open(item.image_path).convert("RGB"))
    mask = chat.ground(image, "red circle", ["red circle"]).masks[0].numpy()
    assert mask.any() and item.mask.all()
    assert metrics["queries"] == 2 and len(records) == 2
    for record, (question, prefix), query in zip(records, asked, item.queries):
        assert query in question and prefix == COT_PREFIX
        assert record["answer"] == f"{COT_PREFIX} red circle. It is on the left"
        assert record["phrases"] == ["red circle"]
        assert record["iou"] == pytest.approx(mask.mean())

"""The F-LMM module's own arithmetic: which inputs each phrase's masks read, the four losses by
hand, and evaluation's thresholds and per-phrase records against IoUs computed here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.model.module import FLMM
from flmm.model.network import FLMMModel, Predictions
from flmm.types import GroundingBatch, GroundingSample


@pytest.fixture(scope="module")
def model(tiny_llava_dir) -> FLMMModel:
    torch.manual_seed(0)
    lmm = FrozenLMM.from_pretrained(tiny_llava_dir)
    return FLMMModel.build(lmm, build_sam("tiny"), base_channels=8).eval()


def test_each_phrase_prompts_sam_with_its_own_tokens(model, ragged_batch):
    """Changing the hidden states of one phrase (the second of sample 1) changes its refined mask
    and no other phrase's."""
    with torch.no_grad():
        capture = model.lmm(ragged_batch)
        embedded = model.refiner.embed_images(ragged_batch.images)
        before = model.decode(ragged_batch, capture, embedded)
        rows = capture.token_phrase[1] == 1
        capture.hidden[1, :, rows] += 3 * torch.randn_like(capture.hidden[1, :, rows])
        after = model.decode(ragged_batch, capture, embedded)
    assert torch.equal(after.coarse, before.coarse)
    for b, (new, old) in enumerate(zip(after.refined, before.refined)):
        for k in range(len(old)):
            if (b, k) == (1, 1):
                assert (new[k] - old[k]).abs().max() > 1e-3
            else:
                assert torch.equal(new[k], old[k]), (b, k)


# ------------------------------------------------------------------------------- losses by hand
def sample(masks: np.ndarray, image_id: str = "") -> GroundingSample:
    """A sample of ``K x H x W`` masks, with one-letter phrases ``"a b c"[:2K-1]``."""
    k, h, w = masks.shape
    text = " ".join("abc"[:k])
    spans = [(2 * i, 2 * i + 1) for i in range(k)]
    image = np.zeros((h, w, 3), dtype=np.uint8)
    return GroundingSample(image, text, spans, masks, {"image_id": image_id})


def phrase_terms(logits: np.ndarray, target: np.ndarray, valid: np.ndarray) -> tuple[list, float]:
    """One phrase's per-pixel BCEs over its ``valid`` pixels and its Dice (eps 1) there; all
    three ``H x W``."""
    p = 1 / (1 + np.exp(-logits[valid].astype(np.float64)))
    t = target[valid].astype(np.float64)
    bces = [-(ti * math.log(pi) + (1 - ti) * math.log(1 - pi)) for pi, ti in zip(p, t)]
    return bces, 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def test_losses_by_hand_exclude_padding(model):
    """Image 0 (4 x 2, two phrases) sits centred in its 4 x 4 square: columns 0 and 3 are padding,
    where the coarse logits are +8 on empty targets (a loss that counted them would be far off).
    Image 1 (2 x 2, one phrase) fills its square, each pixel a 2 x 2 block at the coarse size."""
    rng = np.random.default_rng(0)
    masks0 = np.array([[[1, 0], [1, 1], [0, 0], [0, 1]], [[0, 0], [0, 1], [1, 1], [1, 0]]], bool)
    masks1 = np.array([[[1, 0], [0, 0]]], bool)
    batch = GroundingBatch.collate([sample(masks0), sample(masks1)])
    coarse = rng.normal(size=(3, 4, 4)).astype(np.float32)
    coarse[:2, :, [0, 3]] = 8.0
    refined = [rng.normal(size=m.shape).astype(np.float32) for m in (masks0, masks1)]
    pred = Predictions(torch.from_numpy(coarse), [], [torch.from_numpy(r) for r in refined])
    frames = np.zeros((3, 4, 4), bool)
    frames[:2, :, 1:3] = masks0
    frames[2] = masks1[0].repeat(2, 0).repeat(2, 1)
    valid = np.ones((3, 4, 4), bool)
    valid[:2, :, [0, 3]] = False
    coarse_terms = [phrase_terms(*args) for args in zip(coarse, frames, valid)]
    refined_terms = [
        phrase_terms(r, m, np.ones(m.shape, bool))
        for rs, ms in zip(refined, (masks0, masks1))
        for r, m in zip(rs, ms)
    ]
    expected = {
        # coarse BCE: the mean over every valid pixel of the three phrases (8 + 8 + 16)
        "coarse_bce": float(np.mean([b for bces, _ in coarse_terms for b in bces])),
        "coarse_dice": float(np.mean([d for _, d in coarse_terms])),
        # refined: each phrase's pixel mean at its image's resolution, averaged over phrases
        "refined_bce": float(np.mean([np.mean(bces) for bces, _ in refined_terms])),
        "refined_dice": float(np.mean([d for _, d in refined_terms])),
    }
    expected["loss"] = sum(expected.values())
    got = model.losses(batch, pred)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-5), key


# ------------------------------------------------------------------ evaluation thresholds, records
def iou(pred: np.ndarray, target: np.ndarray) -> float:
    union = (pred | target).sum()
    return float((pred & target).sum() / union) if union else 1.0


def test_evaluation_thresholds_logits_at_zero_and_records_each_stages_iou(model, monkeypatch):
    """Refined logits in (0, 0.5) are probabilities above 0.5: inside the mask. Each record's
    ``iou_coarse`` / ``iou_refined`` is the IoU of that stage's mask, and the metrics average
    them."""
    target = np.zeros((2, 4, 4), bool)
    target[0, :2, :2] = True
    target[1, 2:, :] = True
    batch = GroundingBatch.collate([sample(target, "img")])
    coarse = np.full((2, 4, 4), -3.0, np.float32)
    coarse[0, :3, :3] = 2.0  # a 3 x 3 square over the 2 x 2 target: IoU 4/9
    coarse[1, 3, :] = 2.0  # half the target: IoU 1/2
    refined = np.full((2, 4, 4), -0.3, np.float32)
    refined[0, :2, :2] = 0.3  # the target exactly (sigmoid 0.57), IoU 1
    refined[1, 2:, :2] = 0.4  # the target's left half (sigmoid 0.60) ...
    refined[1, 2:, 2:] = 0.7  # ... and its right half: IoU 1
    coarse_t = torch.from_numpy(coarse)
    pred = Predictions(coarse_t, [coarse_t], [torch.from_numpy(refined)])
    module = FLMM(model)
    monkeypatch.setattr(module, "forward", lambda batch: pred)
    for metric in module.metrics.values():
        metric.reset()
    module.on_test_epoch_start()
    module.test_step(batch, 0)
    expected = {
        "iou_coarse": [iou(c > 0, t) for c, t in zip(coarse, target)],
        "iou_refined": [iou(r > 0, t) for r, t in zip(refined, target)],
    }
    assert expected == {"iou_coarse": [4 / 9, 0.5], "iou_refined": [1.0, 1.0]}
    records = module.test_records
    assert [r["phrase"] for r in records] == ["a", "b"]
    for key, values in expected.items():
        assert [r[key] for r in records] == pytest.approx(values), key
        stage = key.removeprefix("iou_")
        giou = module.metrics[f"test_{stage}"].compute()["gIoU"]
        assert float(giou) == pytest.approx(100 * np.mean(values)), stage
    (predicted,) = module.predict_step(batch, 0)
    assert np.array_equal(predicted["refined"].numpy(), refined > 0)
    assert np.array_equal(predicted["coarse"].numpy(), coarse > 0)


# ----------------------------------------------------------------- checkpoints written before
def test_checkpoints_keep_the_layout_written_before_the_split(tiny_llava_dir):
    """The state keys and shapes, the metadata fields and the hyperparameters a training checkpoint
    holds are those flmm wrote before FLMM was split into FLMMModel and the LightningModule
    (fixtures/pre_split_checkpoint.json, read from a .ckpt that code wrote): loading is strict,
    so old checkpoints load exactly when these agree."""
    old = json.loads((Path(__file__).parent / "fixtures/pre_split_checkpoint.json").read_text())
    lmm = FrozenLMM.from_pretrained(tiny_llava_dir)
    module = FLMM.build(lmm, build_sam("tiny"), base_channels=8, target_size=8)
    ckpt: dict = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    shapes = {k: "x".join(map(str, v.shape)) for k, v in ckpt["state_dict"].items()}
    assert shapes == old["state_dict"]
    assert sorted(ckpt["flmm"]) == old["flmm"] and sorted(ckpt["flmm"]["sam"]) == old["sam"]
    assert ckpt["flmm"]["mask_head"] == old["mask_head"]
    assert ckpt["hyper_parameters"] == old["hyper_parameters"]

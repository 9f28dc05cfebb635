"""Losses against hand computation; metrics against an independent numpy computation."""

import math

import numpy as np
import pytest
import torch

from flmm.heads.losses import bce_dice_loss
from flmm.model.metrics import PNGRecallMetric, ReferSegMetric, png_average_recall


def test_bce_dice_by_hand():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    targets = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-3))]
    t = [0, 1, 1, 0]
    bce = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p, t)) / 4
    dice = 1 - (2 * (p[1] + p[2]) + 1) / (sum(p) + 2 + 1)
    got_bce, got_dice = bce_dice_loss(logits, targets.bool())
    assert got_bce.item() == pytest.approx(bce, rel=1e-5)
    assert got_dice.item() == pytest.approx(dice, rel=1e-5)


def test_dice_is_mean_over_masks_and_weight_ignores_padding():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, 6), torch.rand(3, 5, 6) > 0.5
    dices = [bce_dice_loss(logits[i : i + 1], targets[i : i + 1])[1] for i in range(3)]
    expected = torch.stack(dices).mean().item()
    assert bce_dice_loss(logits, targets)[1].item() == pytest.approx(expected)
    weight = torch.zeros(1, 5, 6)
    weight[..., :4] = 1
    noisy = logits.clone()
    noisy[..., 4:] = 100.0
    weighted = bce_dice_loss(noisy, targets, weight)
    cropped = bce_dice_loss(logits[..., :4], targets[..., :4])
    torch.testing.assert_close(torch.stack(weighted), torch.stack(cropped))


def test_empty_loss_keeps_graph():
    logits = torch.zeros(0, 4, 4, requires_grad=True)
    bce, dice = bce_dice_loss(logits, torch.zeros(0, 4, 4))
    (bce + dice).backward()
    assert bce.item() == 0 and dice.item() == 0


def numpy_refer_scores(preds, targets):
    inter = np.array([np.logical_and(p, t).sum() for p, t in zip(preds, targets)], float)
    union = np.array([np.logical_or(p, t).sum() for p, t in zip(preds, targets)], float)
    ious = np.array([i / u if u else 1.0 for i, u in zip(inter, union)])
    scores = {"cIoU": 100 * inter.sum() / union.sum(), "gIoU": 100 * ious.mean()}
    scores.update({f"P@{t:g}": 100 * np.mean(ious >= t) for t in (0.5, 0.6, 0.7, 0.8, 0.9)})
    return scores, ious


def random_masks(rng, n, size, p):
    return [rng.random(size) < p for _ in range(n)]


def test_refer_metric_matches_numpy():
    rng = np.random.default_rng(0)
    targets = random_masks(rng, 7, (9, 11), 0.3) + [np.zeros((5, 5), bool), np.zeros((4, 6), bool)]
    preds = [np.logical_xor(t, rng.random(t.shape) < 0.15) for t in targets[:7]]
    preds += [np.zeros((5, 5), bool), np.ones((4, 6), bool)]
    metric = ReferSegMetric()
    metric.update(torch.from_numpy(np.stack(preds[:4])), torch.from_numpy(np.stack(targets[:4])))
    metric.update([torch.from_numpy(p) for p in preds[4:]], targets[4:])
    expected, ious = numpy_refer_scores(preds, targets)
    got = metric.compute()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value), key
    np.testing.assert_allclose(metric.per_object_ious().numpy(), ious)
    assert ious[7] == 1.0 and ious[8] == 0.0


def test_png_average_recall_by_hand():
    # recall is 1 at t = 0, 2/3 on (0, 0.5], 1/3 on (0.5, 1]: area 2/3 * 0.5 + 1/3 * 0.5
    assert png_average_recall(np.array([0.0, 0.5, 1.0])) == pytest.approx(50.0)
    assert png_average_recall(np.ones(4)) == pytest.approx(100.0)
    assert math.isnan(png_average_recall(np.zeros(0)))


def test_png_metric_groups():
    rng = np.random.default_rng(1)
    targets = random_masks(rng, 6, (8, 8), 0.4)
    preds = [np.logical_xor(t, rng.random(t.shape) < 0.2) for t in targets]
    tags = [{"things", "singular"}, {"stuff", "singular"}, {"things", "plural"}] * 2
    metric = PNGRecallMetric()
    metric.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(targets)), tags)
    _, ious = numpy_refer_scores(preds, targets)
    got = metric.compute()
    assert got["AR/all"].item() == pytest.approx(png_average_recall(ious))
    things = [i for i, t in enumerate(tags) if "things" in t]
    assert got["AR/things"].item() == pytest.approx(png_average_recall(ious[things]))
    assert got["AR/plural"].item() == pytest.approx(png_average_recall(ious[[2, 5]]))

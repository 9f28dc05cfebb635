"""Metrics against independent numpy computations, alone and synced over 2 gloo processes."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flmm.data import distributed
from flmm.model.metrics import PNGRecallMetric, ReferSegMetric

GROUPS = ("all", "things", "stuff", "singular", "plural")


def random_case(seed: int, n: int = 12):
    """Random masks of varying sizes (two empty targets), noisy predictions, random group tags."""
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(4, 12, 2)) for _ in range(n)]
    targets = [rng.random(s) < rng.uniform(0.1, 0.6) for s in shapes]
    targets[3][:] = False
    targets[7][:] = False
    preds = [np.logical_xor(t, rng.random(t.shape) < rng.uniform(0, 0.5)) for t in targets]
    preds[3][:] = False  # empty on empty: IoU 1
    tags = [[rng.choice(["things", "stuff"]), rng.choice(["singular", "plural"])] for _ in range(n)]
    return preds, targets, tags


def numpy_figures(preds, targets, tags) -> dict[str, float]:
    """cIoU, gIoU, P@t and PNG average recall written from scratch (numeric integration)."""
    inter = np.array([(p & t).sum() for p, t in zip(preds, targets)], dtype=float)
    union = np.array([(p | t).sum() for p, t in zip(preds, targets)], dtype=float)
    ious = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    out = {"cIoU": 100 * inter.sum() / union.sum(), "gIoU": 100 * ious.mean()}
    out.update({f"P@{t:g}": 100 * float(np.mean(ious >= t)) for t in (0.5, 0.6, 0.7, 0.8, 0.9)})
    grid = np.linspace(0.0, 1.0, 200_001)
    for group in GROUPS:
        chosen = ious[[group == "all" or group in t for t in tags]]
        recall = (chosen[None, :] >= grid[:, None]).mean(axis=1)
        out[f"AR/{group}"] = 100 * float(np.sum((recall[1:] + recall[:-1]) / 2 * np.diff(grid)))
    return out


def scores(preds, targets, tags) -> dict[str, float]:
    refer, png = ReferSegMetric(), PNGRecallMetric()
    half = len(preds) // 2
    for part in (slice(0, half), slice(half, None)):  # several updates, lists of ragged masks
        refer.update([torch.from_numpy(p) for p in preds[part]], targets[part])
        png.update(preds[part], [torch.from_numpy(t) for t in targets[part]], tags[part])
    return {k: float(v) for k, v in {**refer.compute(), **png.compute()}.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_numpy(seed):
    case = random_case(seed)
    expected, got = numpy_figures(*case), scores(*case)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-3), key


def eval_shards(n: int, world: int, monkeypatch) -> list[list[int]]:
    """The indices of ``n`` samples each of ``world`` ranks evaluates: the project's evaluation
    loader, with the process group's ``(world size, rank)`` simulated."""
    shards = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (world, rank))
        loader = distributed.build_loader(list(range(n)), batch_size=2, shuffle=False, seed=0)
        shards.append([i for batch in loader for i in batch.tolist()])
    return shards


def sent(metric) -> list[torch.Tensor]:
    """The tensors ``metric`` hands to the all-gather of a DDP sync, in order."""
    tensors: list[torch.Tensor] = []
    metric.sync(
        dist_sync_fn=lambda t, group=None: tensors.append(t) or [t],
        distributed_available=lambda: True,
    )
    metric.unsync()
    return tensors


def synced(metrics: list):
    """``metrics[0]``, whose ``compute`` syncs as rank 0 of ``len(metrics)`` ranks: torchmetrics'
    own sync and reductions, with an all-gather that hands back every rank's copy of a state."""
    calls = iter(list(zip(*[sent(m) for m in metrics])))
    metrics[0].dist_sync_fn = lambda tensor, group=None: list(next(calls))
    metrics[0].distributed_available_fn = lambda: True
    return metrics[0]


def test_metrics_over_uneven_eval_shards_equal_the_whole_set(monkeypatch):
    """11 samples on 3 ranks (4, 4, 3, none twice), each rank's metric states reduced as DDP
    reduces them: the figures of one process over the whole set."""
    preds, targets, tags = random_case(6, n=11)
    shards = eval_shards(11, 3, monkeypatch)
    assert [len(s) for s in shards] == [4, 4, 3]
    assert sorted(i for s in shards for i in s) == list(range(11))
    refers, pngs = [], []
    for shard in shards:
        refer, png = ReferSegMetric(), PNGRecallMetric()
        for i in shard:  # one update per sample, as evaluation steps do
            refer.update([torch.from_numpy(preds[i])], [targets[i]])
            png.update([preds[i]], [torch.from_numpy(targets[i])], [tags[i]])
        refers.append(refer)
        pngs.append(png)
    got = {**synced(refers).compute(), **synced(pngs).compute()}
    expected = numpy_figures(preds, targets, tags)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, abs=1e-3), key


def _rank(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    preds, targets, tags = random_case(5)
    mine = slice(rank, None, 2)  # each process sees every other object
    queue.put((rank, scores(preds[mine], targets[mine], tags[mine])))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_sync_across_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = numpy_figures(*random_case(5))
    for rank in (0, 1):
        for key, value in expected.items():
            assert results[rank][key] == pytest.approx(value, abs=1e-3), (rank, key)

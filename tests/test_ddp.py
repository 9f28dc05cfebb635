"""Lightning DDP with 2 CPU processes (gloo) through the real entry point matches 1 process.

Both runs see the same global batch each step (1 x 4 vs 2 x 2, see flmm.data.distributed) with one
phrase per sample, so the DDP-averaged gradient equals the single-process one up to the order of
float additions: trained weights and every metric must agree to float tolerance. Evaluation
shards are unpadded, so every val/test phrase is scored exactly once (Lightning's own sampler
would score some twice).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_flmm
from omegaconf import OmegaConf

from flmm.data.distributed import ShardSampler, build_loader

RUN = [
    *[o for o in TINY if not o.startswith(("trainer.limit_", "data.n_val", "data.n_test"))],
    "+data.max_phrases=1",  # equal phrase counts: per-rank mean losses average to the global mean
    "data.n_val=3",  # 3 images' phrases: an odd count, which Lightning's sampler would pad
    "data.n_test=3",
    "trainer.limit_train_batches=3",
    "callbacks.progress_bar=null",
]
# 2 gloo processes of 2 samples: the global batch of a 1-process run with data.batch_size=4
TWO_RANKS = ["trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2"]


def run_train(root: Path, name: str, *overrides: str) -> Path:
    run_dir = root / name
    result = run_flmm("train", root, f"hydra.run.dir={run_dir}", *RUN, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    run_train(tmp_path, "warm", "train=false", "test=false")  # builds the foundation models
    single = run_train(tmp_path, "single", "data.batch_size=4")
    ddp = run_train(tmp_path, "ddp", "trainer=ddp", *TWO_RANKS)
    expected = json.loads((single / "metrics.json").read_text())
    got = json.loads((ddp / "metrics.json").read_text())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key

    one, two = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (single, ddp)
    )
    assert one["global_step"] == two["global_step"] == 3
    assert one["state_dict"].keys() == two["state_dict"].keys()
    diff = torch.cat(
        [(v - two["state_dict"][k]).abs().flatten() for k, v in one["state_dict"].items()]
    )
    # AdamW moves every weight by about lr (1e-3) per step whatever the gradient's size, so other
    # batches would move most weights by ~1e-3; the same global batch leaves float noise, which
    # Adam enlarges only where a gradient is itself at noise level (a few weights in a thousand)
    assert float(diff.mean()) < 1e-5 and float((diff > 1e-4).float().mean()) < 0.01

    # every test phrase scored exactly once, in both runs
    name = "test_phrases.jsonl"
    records = [
        sorted(
            (r["image_id"], r["phrase"])
            for r in map(json.loads, d.joinpath(name).read_text().splitlines())
        )
        for d in (single, ddp)
    ]
    assert records[0] == records[1] and len(set(records[0])) == len(records[0]) > 2
    # rank 0 alone wrote the run folder: one CSV log, the checkpoints of one process
    assert len(list((ddp / "csv").glob("version_*"))) == 1
    assert OmegaConf.load(ddp / ".hydra" / "config.yaml").trainer.devices == 2


@pytest.mark.slow
def test_sharded_lmm_trains_like_ddp(tmp_path):
    """trainer=fsdp: the frozen LMM's weights sharded over 2 ranks, the heads under DDP."""
    run_train(tmp_path, "warm", "train=false", "test=false")  # builds the foundation models
    ddp = run_train(tmp_path, "ddp", "trainer=ddp", *TWO_RANKS)
    sharded = run_train(tmp_path, "sharded", "trainer=fsdp", *TWO_RANKS)
    expected = json.loads((ddp / "metrics.json").read_text())
    got = json.loads((sharded / "metrics.json").read_text())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    one, two = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for d in (ddp, sharded)
    )
    assert one.keys() == two.keys()  # only the trainable state, no LMM shards
    assert max(float((v - two[k]).abs().max()) for k, v in one.items()) < 1e-4
    assert json.loads((sharded / "chat_check.json").read_text())["unchanged"]
    assert "4 decoder layers sharded over 2 ranks" in (sharded / "train.log").read_text()


def test_eval_shards_are_unpadded_and_train_shards_follow_the_global_order():
    data = list(range(7))
    single = list(ShardSampler(data, shuffle=True, seed=3))
    shards = [list(ShardSampler(data, True, 3, num_replicas=2, rank=r)) for r in range(2)]
    assert [len(s) for s in shards] == [4, 4]  # padded: both ranks take 4 steps
    # step i of 2 ranks x batch 1 sees what step i of 1 process x batch 2 sees
    assert [sorted([shards[0][i], shards[1][i]]) for i in range(3)] == [
        sorted(single[2 * i : 2 * i + 2]) for i in range(3)
    ]
    evals = [list(ShardSampler(data, False, pad=False, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(evals[0] + evals[1]) == data  # each index once, no padding
    assert [len(ShardSampler(data, False, pad=False, num_replicas=2, rank=r)) for r in (0, 1)] == [
        4,
        3,
    ]
    sampler = ShardSampler(data, shuffle=True, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != single and sorted(sampler) == data  # a new order each epoch


def test_loader_state_skips_the_batches_already_trained_on():
    data = list(range(10))
    loader = build_loader(data, batch_size=2, shuffle=True, seed=0)
    loader.sampler.set_epoch(2)
    full = [b.tolist() for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    resumed = build_loader(data, batch_size=2, shuffle=True, seed=0)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert [b.tolist() for b in resumed] == full[2:]
    assert resumed.state_dict() == {"epoch": 2, "batches": 5}
    assert [b.tolist() for b in resumed] == full  # the skip applies once
    other = build_loader(data, batch_size=2, shuffle=True, seed=0)
    other.load_state_dict(state)
    other.sampler.set_epoch(3)  # the saved epoch had ended: nothing to skip in the next one
    assert len([b for b in other]) == 5


@pytest.mark.slow
def test_wandb_test_table_holds_every_ranks_phrases(tmp_path):
    ddp = run_train(tmp_path, "ddp", "trainer=ddp", *TWO_RANKS, "logger=wandb")
    scored = [json.loads(line)["phrase"] for line in (ddp / "test_phrases.jsonl").open()]
    media = ddp / "wandb" / "latest-run" / "files" / "media" / "table" / "test"
    (table,) = media.glob("phrases_*.table.json")
    rows = json.loads(table.read_text())
    logged = [row[rows["columns"].index("phrase")] for row in rows["data"]]
    assert sorted(logged) == sorted(scored) and len(scored) > 2  # each rank scored its shard

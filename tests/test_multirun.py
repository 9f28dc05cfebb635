"""Sweeps: Hydra multirun with the Optuna sweeper, W&B groups and tags, launcher configs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import yaml
from conftest import TINY, compose_cfg, paths_at
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

from flmm.training.trainer import group_sweep_runs

LRS = ("0.001", "0.003")
BLOCK, HEADER = 32768, 7
FULL, FIRST, LAST = 1, 2, 4


def wandb_records(path):
    """The protobuf records of a W&B ``.wandb`` file (a LevelDB-style log: a 7-byte file header,
    then 32 KiB blocks of chunks, each with a 7-byte header: checksum, length, type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, record = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        record = chunk if kind in (FULL, FIRST) else record + chunk
        if kind in (FULL, LAST):
            yield record


def wandb_run_record(job_dir):
    """The run record (group, tags, name) an offline W&B run wrote in its .wandb file."""
    from wandb.proto import wandb_internal_pb2

    (path,) = job_dir.glob("wandb/offline-run-*/run-*.wandb")
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {path}")


@pytest.mark.slow
def test_two_point_optuna_multirun_with_wandb_groups_and_tags(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "flmm.train",
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "hydra.sweeper.params=null",  # search only the learning rate, given here:
        f"model.lr=choice({','.join(LRS)})",
        "logger=wandb",
        "test=false",
        "callbacks.progress_bar=null",
        *paths_at(tmp_path),
        f"hydra.sweep.dir={sweep}",
        *TINY,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_SILENT="true")
    result = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [j.name for j in jobs] == ["0", "1"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads((j / "metrics.json").read_text())["val/ciou"] for j in jobs]
    assert best["best_value"] == pytest.approx(max(values))
    runs = [wandb_run_record(j) for j in jobs]
    assert runs[0].run_group == runs[1].run_group == "train-sweep"
    assert [r.display_name for r in runs] == ["train-0", "train-1"]
    for run in runs:
        assert "logger=wandb" in run.tags and "data.n_train=24" in run.tags
        assert len([t for t in run.tags if t.startswith("model.lr=")]) == 1


def test_sweep_configs_compose(tmp_path):
    cfg = compose_cfg(tmp_path, ["hparams_search=optuna", "hydra/launcher=slurm"])
    assert cfg.optimized_metric == "val/ciou" and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize" and "model.lr" in cfg.hydra.sweeper.params
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 8
    assert launcher.tasks_per_node == 8 and launcher.max_num_timeout > 0
    local = compose_cfg(tmp_path, ["hydra/launcher=local"]).hydra.launcher
    assert local._target_.endswith("LocalLauncher")


def test_wandb_runs_of_a_sweep_share_a_group_and_carry_overrides(tmp_path):
    cfg = compose_cfg(tmp_path, ["logger=wandb", "model.lr=0.003"])
    group_sweep_runs(cfg)  # a single run: left as configured
    assert cfg.logger.wandb.group == "" and list(cfg.logger.wandb.tags) == []
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = str(tmp_path / "multiruns" / "lr_sweep")
        cfg.hydra.job.num = 3
        cfg.hydra.overrides.task = ["logger=wandb", "model.lr=0.003", "x" * 80]
    HydraConfig.instance().set_config(cfg)
    group_sweep_runs(cfg)
    wandb = cfg.logger.wandb
    assert wandb.group == "train-lr_sweep" and wandb.name == "train-3"
    assert list(wandb.tags) == ["logger=wandb", "model.lr=0.003", "x" * 64]


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_point_as_its_own_job(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # the jobs run at once: write the world and build the tiny models before they start
    warm = [sys.executable, "-m", "flmm.train", "train=false", "test=false"]
    warm += [*paths_at(tmp_path), f"hydra.run.dir={tmp_path / 'warm'}", *TINY]
    subprocess.run(warm, check=True, cwd=tmp_path, env=env, capture_output=True, timeout=900)
    cmd = [
        sys.executable,
        "-m",
        "flmm.train",
        "-m",
        "hydra/launcher=local",
        f"model.lr={','.join(LRS)}",
        "test=false",
        "callbacks.progress_bar=null",
        *paths_at(tmp_path),
        f"hydra.sweep.dir={sweep}",
        *TINY,
    ]
    result = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for num, lr in enumerate(LRS):
        assert json.loads((sweep / str(num) / "metrics.json").read_text())["train/loss"] > 0
        job_cfg = yaml.safe_load((sweep / str(num) / ".hydra" / "overrides.yaml").read_text())
        assert f"model.lr={lr}" in job_cfg
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2

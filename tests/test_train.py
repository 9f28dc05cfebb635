"""The real configs, composed and instantiated; the train entry point run end to end on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from flmm.errors import CheckpointMismatchError
from flmm.runtime import CONFIG_PATH
from flmm.train import train

CONF = Path(CONFIG_PATH)
# Small enough for the fast suite, through every real code path: world generation, tiny LLaVA
# build + pretraining, tiny SAM build + pretraining, F-LMM fit, checkpoint, test.
TINY = [
    "data.n_train=24",
    "data.n_val=8",
    "data.n_test=8",
    "data.batch_size=4",
    "model.lmm.name_or_path.pretrain_steps=2",
    "model.lmm.name_or_path.batch_size=4",
    "model.sam.checkpoint.pretrain_steps=2",
    "model.base_channels=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
]


def compose_cfg(root: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={root}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
        cfg.hydra.runtime.output_dir = str(root / "run")
    HydraConfig.instance().set_config(cfg)
    return cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(tmp_path, experiment):
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}"])
    assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_


@pytest.mark.parametrize("group", ["model", "data", "trainer", "logger", "callbacks", "debug"])
def test_every_group_option_composes(tmp_path, group):
    for option in options(group):
        compose_cfg(tmp_path, [f"{group}={option}"])


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_trainer_callbacks_and_loggers_instantiate(tmp_path, logger):
    from flmm.runtime import build_trainer

    cfg = compose_cfg(tmp_path, [f"logger={logger}", "trainer.accelerator=cpu"])
    trainer = build_trainer(cfg)
    assert trainer.checkpoint_callback is not None and trainer.loggers


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flmm")
    cfg = compose_cfg(root, TINY)
    metrics = train(cfg)
    return root, cfg, metrics


def test_default_run_end_to_end(tiny_run):
    root, cfg, metrics = tiny_run
    for key in ("val/ciou", "val/giou", "val/coarse_giou", "test/ciou", "test/giou", "test/coarse_ciou"):
        assert key in metrics and 0.0 <= metrics[key] <= 100.0
    assert json.loads((root / "run" / "metrics.json").read_text()) == metrics
    assert (root / "data" / "synthetic_world" / "synthetic" / "instances.json").exists()


def test_checkpoint_holds_only_trainable_state(tiny_run):
    root, cfg, _ = tiny_run
    ckpt = torch.load(root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    prefixes = {k.split(".", 1)[0] for k in ckpt["state_dict"]}
    assert prefixes == {"mask_head", "text_prompt", "prompt_encoder", "mask_decoder"}
    meta = ckpt["flmm"]
    assert meta["family"] == "llava" and meta["channels"] > 0 and len(meta["grid"]) == 2
    assert "tiny_llava" in meta["lmm_id"] and meta["flmm_version"]


def test_checkpoint_for_another_lmm_is_refused(tiny_run):
    from flmm.checkpoint import check_metadata

    root, _, _ = tiny_run
    saved = torch.load(root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["flmm"]
    other = dict(saved, lmm_id="llava-hf/llava-1.5-7b-hf", channels=1024, grid=[24, 24])
    with pytest.raises(CheckpointMismatchError, match="llava-1.5-7b-hf.*channels: checkpoint"):
        check_metadata(saved, other)


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "flmm.train", f"paths.root_dir={cwd}", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_real_run_without_data_stops_with_one_clear_message(tmp_path):
    start = time.time()
    result = run_cli("model=llava", "data=refcoco", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert time.time() - start < 60
    assert "paths.refer_root" in result.stderr and "instances.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_real_run_without_sam_weights_names_the_checkpoint(tmp_path):
    from refer_fixtures import write_refer_fixture

    images = write_refer_fixture(tmp_path / "data" / "refer")["image_dir"]
    result = run_cli("model=llava", "data=refcoco", f"paths.coco_train2014={images}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "sam_vit_l_0b3195.pth" in result.stderr and "model.sam.checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_trained_checkpoint_reloads_strictly_through_the_public_api(tiny_run):
    import hydra

    from flmm.lit_module import FLMM

    root, cfg, _ = tiny_run
    lmm, sam = hydra.utils.instantiate(cfg.model.lmm), hydra.utils.instantiate(cfg.model.sam)
    model = FLMM.from_checkpoint(str(root / "run" / "checkpoints" / "last.ckpt"), lmm, sam)
    saved = torch.load(root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key, value in model.trainable_state_dict().items():
        assert torch.equal(value, saved["state_dict"][key]), key
    with pytest.raises(CheckpointMismatchError, match="mask_head"):
        model.load_state_dict({**saved["state_dict"], "mask_head.extra": torch.zeros(1)})


def test_frozen_lmm_untouched_by_training(tiny_run):
    root, _, metrics = tiny_run
    report = json.loads((root / "run" / "chat_check.json").read_text())
    assert report["unchanged"] and report["before"]["answers"] == report["after"]["answers"]
    assert len(report["before"]["answers"]) == 4 and all(len(a) == 2 for a in report["before"]["answers"])

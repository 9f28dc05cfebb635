"""The real configs, composed and instantiated; the train entry point run end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from conftest import CONF, compose_cfg, run_flmm
from omegaconf import OmegaConf

from flmm.config_checks import check_numbers
from flmm.errors import CheckpointMismatchError
from flmm.training.trainer import instantiate_group

# the default run measured test gIoU 74.4 refined / 42.3 coarse (make evidence); the tiny LLaVA
# with a vision tower half as wide 63.8 / 35.4, without its VQA stage 58.9 / 32.6, random LMM
# weights 22.8 / 5.2, a whole-image mask 3.4 (README)
DEFAULT_RUN_FLOOR = 66.0
COARSE_FLOOR = 37.0


def options(group: str) -> list[str]:
    """A group's options: its files, less the shared parts they include (``_frozen_lmm.yaml``...)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(tmp_path, experiment):
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}"])
    assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_
    check_numbers(cfg)


def leaves(node, path: tuple = ()) -> list[tuple[tuple, object]]:
    """``(path, value)`` of every leaf of nested dicts and lists."""
    if isinstance(node, dict | list):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        return [leaf for key, value in items for leaf in leaves(value, (*path, key))]
    return [(path, node)]


def at(node, path: tuple):
    for key in path:
        node = node[key]
    return node


def own_settings(group: str, option: str) -> tuple[dict, bool]:
    """The settings an option file writes itself (its defaults list left out), and whether it
    writes them at the top of the config (``# @package _global_``)."""
    path = CONF / group / f"{option}.yaml"
    own = OmegaConf.to_container(OmegaConf.load(path))
    own.pop("defaults", None)
    return own, path.read_text().startswith("# @package _global_")


# groups whose objects build on a CPU in no time (a model loads LMM weights, trainer=gpu a GPU)
BUILT = {"data", "logger", "callbacks"}


@pytest.mark.parametrize("group", ["model", "data", "trainer", "logger", "callbacks", "debug"])
def test_every_group_option_composes(tmp_path, group):
    """Every option composes with each of its own settings in place, every ``_target_`` in it
    names an importable callable, and the groups cheap to build build into those classes."""
    for option in options(group):
        cfg = compose_cfg(tmp_path, [f"{group}={option}"])
        check_numbers(cfg)
        own, is_global = own_settings(group, option)
        node = cfg if is_global else cfg[group]
        composed = OmegaConf.to_container(node, resolve=False)
        for path, value in leaves(own):
            assert at(composed, path) == value, (option, path)
        targets = [v for path, v in leaves(composed) if path[-1] == "_target_"]
        assert all(callable(hydra.utils.get_object(t)) for t in targets), option
        if group == "data":
            assert isinstance(hydra.utils.instantiate(node), hydra.utils.get_object(node._target_))
        elif group in BUILT:
            classes = [hydra.utils.get_object(entry._target_) for entry in node.values()]
            built = instantiate_group(node)
            assert len(built) == len(classes) and all(map(isinstance, built, classes)), option


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_trainer_callbacks_and_loggers_instantiate(tmp_path, logger):
    from flmm.model.checkpoint import AtomicCheckpointIO
    from flmm.training.trainer import build_trainer, finish_loggers

    cfg = compose_cfg(tmp_path, [f"logger={logger}", "trainer.accelerator=cpu"])
    trainer = build_trainer(cfg)
    assert trainer.checkpoint_callback is not None and trainer.loggers
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    finish_loggers(trainer)  # build_trainer logged the config: the W&B run is open


def test_logger_none_drops_the_learning_rate_monitor(tmp_path):
    """``logger=none``: Lightning refuses a LearningRateMonitor without a logger when fit starts."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from flmm.training.trainer import build_trainer

    trainer = build_trainer(compose_cfg(tmp_path, ["logger=none", "trainer.accelerator=cpu"]))
    assert not trainer.loggers and trainer.checkpoint_callback is not None
    assert not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)


def test_default_run_end_to_end(tiny_run):
    root, _, metrics = tiny_run
    for key in (
        "val/ciou",
        "val/giou",
        "val/coarse_giou",
        "test/ciou",
        "test/giou",
        "test/coarse_ciou",
    ):
        assert key in metrics and 0.0 <= metrics[key] <= 100.0
    assert json.loads((root / "run" / "metrics.json").read_text()) == metrics
    assert (root / "synthetic_world" / "synthetic" / "instances.json").exists()


@pytest.mark.slow
def test_the_embedded_default_run(tmp_path):
    """`python -m flmm.train` with no overrides, in the project folder: it writes the world if
    missing, loads the foundation models shipped with flmm (no pretraining: nothing is built),
    trains F-LMM (about 5 min on 2 cores) and reports test gIoU well above random LMM weights."""
    root = Path(__file__).resolve().parents[1]
    result = run_flmm(
        "train", root, f"hydra.run.dir={tmp_path}", timeout=3600, home=False, OMP_NUM_THREADS="2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(cached for later runs)" not in result.stdout + result.stderr  # no foundation build
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test/giou"] > DEFAULT_RUN_FLOOR
    assert metrics["test/coarse_giou"] > COARSE_FLOOR  # the mask head's own masks cross 0.5
    assert 0.5 * metrics["test/giou"] <= metrics["test/coarse_giou"] <= metrics["test/giou"]
    # what a user takes away: pictures of every epoch, the curves, a head folder whose card
    # carries the run's own scores
    assert len(list((tmp_path / "overlays").glob("epoch_*.png"))) == 8
    assert (tmp_path / "metrics.png").is_file()
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"{metrics['test/giou']:.2f}" in card and f"{metrics['test/coarse_giou']:.2f}" in card


def test_checkpoint_holds_only_trainable_state(tiny_run):
    root, _, _ = tiny_run
    ckpt = torch.load(
        root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    prefixes = {k.split(".", 1)[0] for k in ckpt["state_dict"]}
    assert prefixes == {"mask_head", "text_prompt", "prompt_encoder", "mask_decoder"}
    meta = ckpt["flmm"]
    assert meta["family"] == "llava" and meta["channels"] > 0 and len(meta["grid"]) == 2
    assert "tiny_llava" in meta["lmm_id"] and meta["flmm_version"]


def test_checkpoint_for_another_lmm_is_refused(tiny_run):
    from flmm.model.checkpoint import check_metadata

    root, _, _ = tiny_run
    saved = torch.load(
        root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )["flmm"]
    other = dict(saved, lmm_id="llava-hf/llava-1.5-7b-hf", channels=1024, grid=[24, 24])
    with pytest.raises(CheckpointMismatchError, match="llava-1.5-7b-hf.*channels: checkpoint"):
        check_metadata(saved, other)


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_flmm("train", cwd, *overrides, timeout=120)


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

    from flmm.model import load

    root, cfg, _ = tiny_run
    lmm, sam = hydra.utils.instantiate(cfg.model.lmm), hydra.utils.instantiate(cfg.model.sam)
    model = load(root / "run" / "checkpoints" / "last.ckpt", lmm=lmm, sam=sam)
    saved = torch.load(
        root / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    for key, value in model.trainable_state_dict().items():
        assert torch.equal(value, saved["state_dict"][key]), key
    with pytest.raises(CheckpointMismatchError, match="mask_head"):
        model.load_state_dict({**saved["state_dict"], "mask_head.extra": torch.zeros(1)})


def test_frozen_lmm_untouched_by_training(tiny_run):
    root, _, _ = tiny_run
    report = json.loads((root / "run" / "chat_check.json").read_text())
    assert report["unchanged"] and report["before"]["answers"] == report["after"]["answers"]
    assert len(report["before"]["answers"]) == 4 and all(
        len(a) == 2 for a in report["before"]["answers"]
    )


def test_ground_returns_masks_per_phrase_and_rejects_absent_phrases(tiny_run):
    import hydra

    from flmm.model import FLMMPredictor, load

    root, cfg, _ = tiny_run
    lmm, sam = hydra.utils.instantiate(cfg.model.lmm), hydra.utils.instantiate(cfg.model.sam)
    model = FLMMPredictor(load(root / "run" / "checkpoints" / "last.ckpt", lmm=lmm, sam=sam))
    image = np.zeros((80, 96, 3), dtype=np.uint8)
    out = model.ground(
        image, "the red circle. the blue square.", ["the red circle", "the blue square"]
    )
    assert out.spans == [(0, 14), (16, 31)]
    assert out.masks.shape == out.coarse.shape == (2, 80, 96)
    assert out.attention.shape == (2, lmm.num_layers, lmm.channels // lmm.num_layers, *lmm.grid)
    with pytest.raises(ValueError, match="'the green star' is not in the text"):
        model.ground(image, "the red circle.", ["the green star"])


# ------------------------------------ the two promises: checkpoint refusal, frozen LMM unchanged
def forged_checkpoint(tiny_run, tmp_path: Path, **meta) -> Path:
    """The tiny run's ``last.ckpt`` with its ``flmm`` metadata changed by ``meta``."""
    root, _, _ = tiny_run
    ckpt = torch.load(root / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["flmm"].update(meta)
    path = tmp_path / "other_lmm.ckpt"
    torch.save(ckpt, path)
    return path


def tiny_trainer(tmp_path: Path, callbacks=()) -> L.Trainer:
    """Two training steps on the CPU, no validation, logging or checkpoints."""
    return L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )


MISMATCHES = {  # a family-only mismatch, and a shape mismatch whose weights would still load
    "family": ({"family": "qwen2_5_vl"}, "family: checkpoint 'qwen2_5_vl' vs configured 'llava'"),
    "grid": ({"grid": [7, 7]}, r"grid: checkpoint \[7, 7\] vs configured \[12, 12\]"),
}


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
def test_checkpoint_for_another_lmm_is_refused_by_every_load_path(tiny_run, tmp_path, mismatch):
    import hydra

    from flmm.model import load

    _, cfg, _ = tiny_run
    change, message = MISMATCHES[mismatch]
    path = forged_checkpoint(tiny_run, tmp_path, **change)
    lmm, sam = hydra.utils.instantiate(cfg.model.lmm), hydra.utils.instantiate(cfg.model.sam)
    with pytest.raises(CheckpointMismatchError, match=message):
        load(path, lmm=lmm, sam=sam)
    model = hydra.utils.instantiate(cfg.model)
    with pytest.raises(CheckpointMismatchError, match=message):
        tiny_trainer(tmp_path).fit(
            model, datamodule=hydra.utils.instantiate(cfg.data), ckpt_path=path
        )


class ChangeOneLMMWeight(L.Callback):
    """Adds 1 to one weight of the frozen LMM after the first training step."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == 1:
            with torch.no_grad():
                next(pl_module.model.lmm.parameters()).view(-1)[0] += 1.0


@pytest.mark.parametrize("change", [False, True], ids=["untouched", "one_weight_changed"])
def test_frozen_lmm_check_compares_before_with_after(tiny_run, tmp_path, change):
    import hydra

    from flmm.training.callbacks import FrozenLMMCheck, fingerprint

    _, cfg, _ = tiny_run
    model = hydra.utils.instantiate(cfg.model)
    before = fingerprint(model.model.lmm)
    check = FrozenLMMCheck(["what is in the image?"], num_images=1, max_new_tokens=2)
    callbacks = [check, ChangeOneLMMWeight()] if change else [check]
    trainer = tiny_trainer(tmp_path, callbacks)
    datamodule = hydra.utils.instantiate(cfg.data)
    if change:
        with pytest.raises(RuntimeError, match="the frozen LMM changed during training"):
            trainer.fit(model, datamodule=datamodule)
        assert not json.loads((tmp_path / "chat_check.json").read_text())["unchanged"]
        return
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2 and fingerprint(model.model.lmm) == before
    assert check.before["fingerprint"] == before
    assert json.loads((tmp_path / "chat_check.json").read_text())["unchanged"]

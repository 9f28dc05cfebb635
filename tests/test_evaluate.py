"""`python -m flmm.evaluate` end to end on the refer and PNG fixtures and the synthetic world."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_cfg, paths_at, run_flmm
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image
from png_fixtures import write_png_fixture
from refer_fixtures import write_refer_fixture

from flmm.errors import exit_on_user_error
from flmm.evaluate import evaluate
from flmm.train import train

# the tiny random LLaVA and tiny SAM, one training batch, no test
MODEL = [
    "model/lmm=tiny_random_weights",
    "model.sam.checkpoint.pretrain_steps=2",
    "model.base_channels=8",
]
WORLD = ["data.n_train=8", "data.n_val=4", "data.n_test=4", "data.batch_size=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint from a 1-batch training run, and refer / PNG fixtures beside it."""
    root = tmp_path_factory.mktemp("evaluate")
    steps = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
    cfg = compose_cfg(root, [*MODEL, *WORLD, *steps, "trainer.accelerator=cpu", "test=false"])
    train(cfg)
    refer_images = write_refer_fixture(root / "data" / "refer")["image_dir"]
    write_png_fixture(root / "data" / "panoptic_narrative_grounding")
    return root, root / "run" / "checkpoints" / "last.ckpt", refer_images


def eval_cfg(root: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[*paths_at(root), *MODEL, *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(root / "eval")
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_cli(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_flmm("evaluate", root, *MODEL, *overrides, timeout=300)


def test_cli_on_the_refer_fixture_prints_both_protocols(trained):
    root, ckpt, images = trained
    result = run_cli(
        root,
        "data=refcoco",
        f"paths.coco_train2014={images}",
        "data.eval_splits=[val,train]",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        f"checkpoint={ckpt}",
        f"hydra.run.dir={root / 'cli'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "RefCOCO val" in out and "RefCOCO train" in out
    for row in ("reference / refined", "reference / coarse", "per_sentence / refined"):
        assert row in out
    assert (
        "skipped in refcoco/train/reference: empty_sentence 3, empty_sentences 1, empty_mask 1"
        in out
    )
    doc = json.loads((root / "cli" / "evaluation.json").read_text())
    val = doc["results"]["refcoco"]["val"]
    assert val["reference"]["phrases"] == 2 and val["per_sentence"]["phrases"] == 5
    assert val["reference"]["samples"] == 1 and val["per_sentence"]["samples"] == 5
    for protocol in ("reference", "per_sentence"):
        for stage in ("refined", "coarse"):
            scores = val[protocol][stage]
            assert set(scores) >= {"ciou", "giou", "p@0.5", "p@0.9"}
            assert all(0.0 <= v <= 100.0 for v in scores.values())
    metrics = json.loads((root / "cli" / "metrics.json").read_text())
    assert metrics["refcoco/val/per_sentence/coarse/giou"] == val["per_sentence"]["coarse"]["giou"]


def test_png_fixture_average_recall_per_group(trained):
    root, ckpt, _ = trained
    cfg = eval_cfg(
        root,
        [
            "data=png",
            "data.num_workers=0",
            "+data.max_eval_samples=3",
            "trainer.accelerator=cpu",
            f"checkpoint={ckpt}",
        ],
    )
    figures = evaluate(cfg)
    doc = json.loads((root / "eval" / "evaluation.json").read_text())
    scores = doc["results"]["png"]["val2017"]
    assert list(scores) == ["reference"] and scores["reference"]["phrases"] == 4
    for stage in ("refined", "coarse"):
        for group in ("all", "things", "stuff", "singular", "plural"):
            value = figures[f"png/val2017/reference/{stage}/ar/{group}"]
            assert 0.0 <= value <= 100.0
    assert doc["skipped"]["png/val2017/reference"]["unknown_segment_id"] == 1


def test_synthetic_world_both_protocols(trained):
    root, ckpt, _ = trained
    cfg = eval_cfg(root, [*WORLD, "trainer.accelerator=cpu", f"checkpoint={ckpt}"])
    figures = evaluate(cfg)
    for split in ("val", "test"):
        for protocol in ("reference", "per_sentence"):
            assert 0.0 <= figures[f"synthetic/{split}/{protocol}/refined/ciou"] <= 100.0
            # the picture a training run leaves each epoch, per set, with any logger
            picture = Image.open(
                root / "eval" / "overlays" / "synthetic" / split / f"{protocol}.png"
            )
            assert picture.height > cfg.overlays * 96 and picture.width >= 4 * 96


def test_bad_inputs_stop_with_one_line(trained, capsys):
    root, ckpt, images = trained
    common = [
        "data=refcoco",
        f"paths.coco_train2014={images}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
    ]
    for overrides, expected in [
        (
            ["data.eval_splits=[testA]", f"checkpoint={ckpt}"],
            r"corrupt or unreadable image .*_000000000005\.jpg \(image_id 5, refs \[10\]\)",
        ),
        (
            ["data.eval_splits=[testB]", f"checkpoint={ckpt}"],
            r"missing image .*COCO_train2014_000000000006\.jpg \(image_id 6, refs \[11\]\)",
        ),
        ([f"checkpoint={root / 'nope.ckpt'}"], r"checkpoint not found: .*nope\.ckpt"),
        (["data=png", "paths.png_root=/nowhere", f"checkpoint={ckpt}"], "paths.png_root"),
        (["protocols=[reference,lisa]", f"checkpoint={ckpt}"], r"unknown protocols \['lisa'\]"),
        (
            ["data=png", "protocols=[per_sentence]", f"checkpoint={ckpt}"],
            r"no evaluation set: .*defines \['reference'\]",
        ),
    ]:
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(evaluate, eval_cfg(root, [*common, *overrides]))
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("flmm: error: ")]
        assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err
        assert re.search(expected, lines[0]), lines[0]


def test_every_evaluate_data_option_composes(tmp_path):
    for option in sorted(p.stem for p in (CONF / "data").glob("*.yaml")):
        cfg = eval_cfg(tmp_path, [f"data={option}"])
        assert cfg.data._target_ and list(cfg.protocols) == ["reference", "per_sentence"]


def test_overlay_rows_are_distinct_images_with_their_masks(trained):
    import hydra

    from flmm.data.datamodule import EvalSet
    from flmm.evaluate import load_model, overlay_rows

    root, ckpt, _ = trained
    cfg = eval_cfg(root, [*WORLD, f"checkpoint={ckpt}"])
    model = load_model(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    data = datamodule.make_dataset("val", "per_sentence")
    rows = overlay_rows(model, EvalSet("synthetic", "val", "per_sentence", data), 2)
    assert len(rows) == 2
    image, phrases, (target, coarse, refined) = rows[0]
    assert torch.equal(image, torch.as_tensor(data[0].image))
    assert phrases == data[0].phrases and torch.equal(target, torch.as_tensor(data[0].masks))
    assert coarse.shape == refined.shape == target.shape and coarse.dtype == torch.bool
    second = next(s for s in data if s.meta["image_id"] != data[0].meta["image_id"])
    assert rows[1][1] == second.phrases  # an image once, though it has several sentences


@pytest.mark.slow
def test_wandb_logs_the_table_and_overlays(trained, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root, ckpt, _ = trained
    # a rerun in a folder skips the sets scored there (test_synthetic_world_both_protocols's)
    shutil.rmtree(root / "eval" / "splits", ignore_errors=True)
    cfg = eval_cfg(root, [*WORLD, "logger=wandb", "overlays=2", f"checkpoint={ckpt}"])
    evaluate(cfg)
    media = root / "eval" / "wandb" / "latest-run" / "files" / "media"
    for split in ("val", "test"):
        for protocol in ("reference", "per_sentence"):
            found = list(
                (media / "images" / "overlays" / "synthetic" / split).glob(f"{protocol}_*")
            )
            assert len(found) == 2, (split, protocol)
            # with target / coarse / refined masks the UI toggles (W&B stores each once)
            masks = media / "images" / "mask" / "overlays" / "synthetic" / split
            assert list(masks.glob(f"{protocol}_*.mask.png")), (split, protocol)
    (table,) = (media / "table").glob("evaluation_*.table.json")
    rows = json.loads(table.read_text())["data"]
    assert ["synthetic", "val", "reference", "refined", "giou"] in [r[:5] for r in rows]


@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_figures(trained):
    root, ckpt, _ = trained
    overrides = [*WORLD, "data.batch_size=2", "trainer.accelerator=cpu", f"checkpoint={ckpt}"]
    single = evaluate(eval_cfg(root, overrides))
    ddp = run_cli(
        root, *overrides, "trainer=ddp", "trainer.devices=2", f"hydra.run.dir={root / 'ddp'}"
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads((root / "ddp" / "metrics.json").read_text()) == pytest.approx(single)
    both = [json.loads((d / "evaluation.json").read_text()) for d in (root / "eval", root / "ddp")]
    for split in ("val", "test"):
        for protocol in ("reference", "per_sentence"):
            counts = [d["results"]["synthetic"][split][protocol]["phrases"] for d in both]
            assert counts[0] == counts[1] > 0  # each process scored its own shard, once


def test_mix_prints_refer_and_png_tables(trained, capsys):
    root, ckpt, images = trained
    overrides = [
        "data=mix",
        "~data.components.refcoco_plus",
        "~data.components.refcocog",
        "~data.weights.refcoco_plus",
        "~data.weights.refcocog",
        f"paths.coco_train2014={images}",
        "data.components.refcoco.eval_splits=[val]",
        "data.num_workers=0",
        "+data.max_eval_samples=3",
        "trainer.accelerator=cpu",
        f"checkpoint={ckpt}",
    ]
    figures = evaluate(eval_cfg(root, overrides))
    out = capsys.readouterr().out
    assert "RefCOCO val" in out and "PNG average recall" in out and "val2017 / refined" in out
    assert "png/val2017/reference/refined/ar/stuff" in figures
    assert "refcoco/val/per_sentence/coarse/ciou" in figures
    assert not any(k.startswith("png/val2017/per_sentence") for k in figures)

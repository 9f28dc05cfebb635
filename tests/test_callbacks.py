"""Overlay rendering, the pictures a run leaves (overlays, metrics.png) and what it logs to W&B
(offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from PIL import Image

from flmm.lmm import FrozenLMM
from flmm.lmm.fingerprint import fingerprint
from flmm.overlay import LEGEND_ROW, PALETTE, overlay, overlay_row
from flmm.training.callbacks import MaskOverlays, MetricCurves, label_map
from flmm.training.plots import line_charts
from flmm.training.trainer import build_trainer, finish_loggers


def test_overlay_tints_only_masked_pixels():
    image = torch.zeros(4, 5, 3, dtype=torch.uint8)
    masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 3, 4] = True
    out = overlay(image, masks, alpha=1.0)
    assert (out[0, 0] == PALETTE[0]).all() and (out[3, 4] == PALETTE[1]).all()
    assert out.sum() == PALETTE[0].sum() + PALETTE[1].sum()
    assert overlay_row(image, [masks, masks]).shape == (4, 15, 3)


def test_overlapping_masks_stay_apart_not_a_mix():
    """The smaller mask is drawn on top, the larger one keeps its outline; no muddy tint."""
    image = torch.full((9, 9, 3), 200, dtype=torch.uint8)
    masks = torch.zeros(2, 9, 9, dtype=torch.bool)
    masks[0] = True  # whole image
    masks[1, 3:6, 3:6] = True  # a small square inside it
    out = overlay(image, masks, alpha=1.0)
    assert (out[4, 4] == PALETTE[1]).all() and (out[3, 3] == PALETTE[1]).all()
    assert (out[1, 1] == PALETTE[0]).all() and (out[0, 4] == PALETTE[0]).all()
    half = overlay(image, masks, alpha=0.5)
    assert np.abs(half[4, 4].astype(int) - (200 + PALETTE[1].astype(int)) / 2).max() <= 1
    assert (overlay(image.numpy(), masks[:0].numpy()) == 200).all()  # no masks: the image


def test_fingerprint_sees_any_weight_change():
    layer = torch.nn.Linear(3, 2)
    before = fingerprint(layer)
    with torch.no_grad():
        layer.weight[0, 0] += 1e-6
    assert fingerprint(layer) != before
    layer.register_buffer("scale", torch.tensor(0.5))  # 0-d, as quantized layers keep scales
    before = fingerprint(layer)
    layer.scale.fill_(0.25)
    assert fingerprint(layer) != before


@pytest.fixture(scope="module")
def tiny_lmm(tiny_llava_dir) -> FrozenLMM:
    return FrozenLMM.from_pretrained(str(tiny_llava_dir))


def changes_fingerprint(module: torch.nn.Module, tensor: torch.Tensor) -> bool:
    """Whether adding 1e-3 (1 to an integer) to the last element of ``tensor`` (a parameter or
    buffer of ``module``) changes ``fingerprint(module)``; the value is put back afterwards."""
    before = fingerprint(module)
    flat = tensor.detach().view(-1)
    kept = flat[-1].clone()
    flat[-1] += 1e-3 if flat.is_floating_point() else 1
    changed = fingerprint(module) != before
    flat[-1] = kept
    assert fingerprint(module) == before
    return changed


@pytest.mark.parametrize("which", ["first", "middle", "last", "vision tower", "projector"])
def test_fingerprint_sees_a_change_in_any_frozen_tensor(tiny_lmm, which):
    names = list(tiny_lmm.state_dict())
    name = {
        "first": names[0],
        "middle": names[len(names) // 2],
        "last": names[-1],
        "vision tower": next(n for n in names if "vision_tower" in n and n != names[0]),
        "projector": next(n for n in names if "multi_modal_projector" in n),
    }[which]
    assert changes_fingerprint(tiny_lmm, tiny_lmm.state_dict()[name]), name


def test_fingerprint_sees_a_buffer_change():
    """Buffers count, 0-d ones too (BatchNorm's ``num_batches_tracked``: this crashed once)."""
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    for buffer in module[1].buffers():
        assert changes_fingerprint(module, buffer)


def test_label_map_gives_each_pixel_its_smallest_mask():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0] = True
    masks[1, 1:3, 1:3] = True
    labels = label_map(masks)
    assert labels.dtype == np.uint8 and labels[0, 0] == 1 and labels[1, 1] == 2
    assert (labels > 0).all() and (label_map(masks[:1] & False) == 0).all()


def test_line_charts_draw_each_series_in_its_colour():
    chart = line_charts({"loss": ("step", {"a": [[0, 1.0], [10, 0.5]], "b": [[5, 0.7]]})})
    colours = {tuple(c) for c in chart.reshape(-1, 3)}
    assert tuple(PALETTE[0]) in colours and tuple(PALETTE[1]) in colours
    empty = line_charts({"one": ("x", {"a": []}), "two": ("x", {})})
    assert empty.shape[1] == 2 * chart.shape[1]


def test_run_folder_holds_overlay_panels_and_metrics_png(tiny_run):
    """The default callbacks, any logger (the tiny run logs to CSV): overlays of the first val
    samples each epoch, image | target | coarse | refined, and the curves at the end of fit."""
    import hydra

    root, cfg, _ = tiny_run
    run = root / "run"
    assert sorted(p.name for p in (run / "overlays").iterdir()) == ["epoch_000.png"]
    panel = np.asarray(Image.open(run / "overlays" / "epoch_000.png").convert("RGB"))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("validate")
    # the tiny run validates one batch: its samples, at most num_samples of them
    rows = min(cfg.data.batch_size, cfg.callbacks.mask_overlays.num_samples)
    height = cfg.callbacks.mask_overlays.row_height
    assert panel.shape == (LEGEND_ROW + rows * (LEGEND_ROW + height), 4 * height, 3)
    for r in range(rows):
        sample = datamodule.val_sets[0][r]
        scale = height // sample.image.shape[0]
        target = overlay(sample.image, sample.masks).repeat(scale, 0).repeat(scale, 1)
        top = LEGEND_ROW + r * (LEGEND_ROW + height) + LEGEND_ROW
        assert (panel[top : top + height, height : 2 * height] == target).all()
        assert not (panel[top : top + height, :height] == target).all()  # the image column
    metrics = Image.open(run / "metrics.png")
    assert metrics.size[0] > metrics.size[1] > 100
    colours = {tuple(c) for c in np.asarray(metrics.convert("RGB")).reshape(-1, 3)}
    assert tuple(PALETTE[0]) in colours  # a curve was drawn


def test_checkpoints_keep_the_curves_so_a_resumed_run_draws_its_whole_history(tiny_run):
    from flmm.model.checkpoint import read_checkpoint

    root, _, metrics = tiny_run
    state = read_checkpoint(root / "run" / "checkpoints" / "last.ckpt")["callbacks"]["MetricCurves"]
    history = state["history"]
    assert [x for x, _ in history["train/loss"]] == [1, 2]  # the tiny run's two optimizer steps
    assert history["val/giou"] == [[0, pytest.approx(metrics["val/giou"])]]
    resumed = MetricCurves()
    resumed.load_state_dict(state)
    assert resumed.history == history


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_images_have_mask_toggles_and_test_table_one_row_per_phrase(
    tiny_run, tmp_path, monkeypatch, offline_wandb
):
    import hydra
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from flmm.model import FLMM, load

    root, cfg, _ = tiny_run
    model = FLMM(
        load(
            root / "run" / "checkpoints" / "last.ckpt",
            lmm=hydra.utils.instantiate(cfg.model.lmm),
            sam=hydra.utils.instantiate(cfg.model.sam),
        )
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    logged = {}
    for method in ("log_image", "log_table"):
        real = getattr(WandbLogger, method)

        def spy(self, *args, _real=real, _method=method, **kw):
            logged[_method] = kw
            return _real(self, *args, **kw)  # the real wandb.Image / wandb.Table

        monkeypatch.setattr(WandbLogger, method, spy)
    logger = WandbLogger(save_dir=str(tmp_path), project="flmm-test")
    trainer = L.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=[MaskOverlays(num_samples=2, row_height=96)],
        limit_val_batches=1,
        limit_test_batches=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
    )
    trainer.validate(model, datamodule=datamodule)
    images = logged["log_image"]
    assert images["key"] == "val/overlays" and len(images["images"]) == 2
    masks = images["masks"][0]
    assert set(masks) == {"target", "coarse", "refined"}
    phrases = images["caption"][0].split(" | ")
    assert masks["target"]["class_labels"] == {k + 1: p for k, p in enumerate(phrases)}
    assert masks["target"]["mask_data"].shape == images["images"][0].shape[:2]
    assert (tmp_path / "overlays" / "epoch_000.png").is_file()

    # under DDP every rank's phrases reach the table: a second rank's, as gathered
    from flmm.training import callbacks

    def two_ranks(rows):
        return rows + [
            (record | {"phrase": f"rank 1: {record['phrase']}"}, *r) for record, *r in rows
        ]

    monkeypatch.setattr(callbacks, "gather_records", two_ranks)
    trainer.test(model, datamodule=datamodule)
    table = logged["log_table"]
    batch = next(iter(datamodule.test_dataloader()))
    assert table["key"] == "test/phrases" and len(table["data"]) == 2 * sum(batch.num_phrases)
    phrases = [row[0] for row in table["data"]]
    assert phrases[len(phrases) // 2 :] == [f"rank 1: {p}" for p in phrases[: len(phrases) // 2]]
    columns = table["columns"]
    assert columns[0] == "phrase" and "kind" in columns and columns[-1] == "overlay"
    first = dict(zip(columns, table["data"][0]))
    assert first["phrase"] == batch.phrases(0)[0] and first["kind"]
    assert 0 <= first["iou_refined"] <= 1 and 0 <= first["iou_coarse"] <= 1
    assert set(first["overlay"]._masks) == {"target", "coarse", "refined"}
    # the masks survive the trip between ranks (one PNG of bits per phrase)
    _, _, masks = callbacks.sample_masks(batch, model(batch), 0)  # target, coarse, refined
    for name, mask in zip(("target", "coarse", "refined"), masks):
        sent = first["overlay"]._masks[name]._val["mask_data"]
        assert np.array_equal(sent, mask[0].numpy().astype(np.uint8)), name
    logger.experiment.finish()


def test_wandb_follows_a_users_wandb_mode_else_stays_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert compose_cfg(tmp_path, ["logger=wandb"]).logger.wandb.offline is True
    monkeypatch.setenv("WANDB_MODE", "online")  # W&B itself reads it when offline is false
    assert compose_cfg(tmp_path, ["logger=wandb"]).logger.wandb.offline is False


def test_wandb_table_images_are_written_inside_the_run_folder(tmp_path, monkeypatch, offline_wandb):
    """W&B stages a logged table's images in its data folder (~/.local/share/wandb by default);
    a run's are under <run>/wandb/."""
    import wandb

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.setenv(name, "unset by the test")  # restored afterwards
        monkeypatch.delenv(name)
    trainer = build_trainer(compose_cfg(tmp_path, ["logger=wandb"]))
    image = wandb.Image(np.full((8, 8, 3), 200, dtype=np.uint8))
    trainer.logger.log_table(key="evaluation", columns=["overlay"], data=[[image]])
    finish_loggers(trainer)
    staged = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.read_bytes().startswith(b"\x89PNG") for p in staged if "staging" in p.parts)
    assert not list((tmp_path / "home").rglob("*.png")) and not list(
        (tmp_path / "home").rglob("staging/*")
    )


def test_wandb_run_is_named_by_its_overrides_and_logs_the_config(tmp_path, offline_wandb):
    cfg = compose_cfg(tmp_path, ["logger=wandb", "model.lr=0.003", "seed=3"])
    trainer = build_trainer(cfg)
    run = trainer.logger.experiment
    assert run.name == "train:model.lr=0.003,seed=3"
    assert run.config["model"]["lr"] == 0.003 and run.config["seed"] == 3
    assert run.config["paths"]["output_dir"] == str(tmp_path / "run")  # resolved
    finish_loggers(trainer)

"""Overlay rendering and the W&B overlay callback (with W&B offline)."""

from __future__ import annotations

import numpy as np
import torch

from flmm.overlay import PALETTE, overlay, overlay_row
from flmm.training.callbacks import MaskOverlays, fingerprint


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


def test_overlays_are_logged_only_to_wandb(tiny_run, tmp_path, monkeypatch):
    import hydra
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from flmm.model.module import FLMM

    root, cfg, _ = tiny_run
    model = FLMM.from_checkpoint(
        str(root / "run" / "checkpoints" / "last.ckpt"),
        hydra.utils.instantiate(cfg.model.lmm),
        hydra.utils.instantiate(cfg.model.sam),
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        pred = model(batch)
    logged = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, **kw: logged.append(kw))

    class Trainer:
        is_global_zero, global_step = True, 0
        loggers = (CSVLogger(tmp_path),)

    MaskOverlays(max_images=2).on_validation_batch_end(Trainer, model, pred, batch, 0)
    assert not logged
    Trainer.loggers = [WandbLogger(save_dir=str(tmp_path), offline=True, project="flmm-test")]
    MaskOverlays(max_images=2).on_validation_batch_end(Trainer, model, pred, batch, 0)
    (call,) = logged
    assert call["key"] == "val/overlays" and len(call["images"]) == 2
    h, w = batch.images[0].shape[:2]
    assert call["images"][0].shape == (h, 4 * w, 3) and call["images"][0].dtype == np.uint8

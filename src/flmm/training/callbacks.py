"""Training callbacks: the frozen-LMM check (F-LMM's central promise: training never changes the
LMM) and the pictures a run leaves (mask overlays each epoch, curves of its metrics)."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from flmm.data.distributed import gather_records
from flmm.lmm.fingerprint import fingerprint
from flmm.model.module import phrase_records
from flmm.model.network import Predictions, upsample_logits
from flmm.overlay import PANEL_COLUMNS, as_array, disjoint, overlay_panel
from flmm.training.plots import line_charts
from flmm.types import GroundingBatch

log = logging.getLogger(__name__)


class FrozenLMMCheck(L.Callback):
    """Fingerprint the frozen LMM and record its greedy answers before and after fitting.

    Both must be identical; the comparison is written to ``chat_check.json`` in the run folder and
    logged as ``lmm_unchanged`` (1 or 0). A difference fails the run.

    Args:
        questions: asked about each of the first ``num_images`` validation images.
        max_new_tokens: length limit of each greedy answer.
    """

    def __init__(self, questions: list[str], num_images: int = 4, max_new_tokens: int = 24) -> None:
        self.questions = list(questions)
        self.num_images = num_images
        self.max_new_tokens = max_new_tokens
        self.before: dict | None = None

    def snapshot(self, trainer: L.Trainer, lmm) -> dict:
        val = trainer.datamodule.val_sets[0]
        if len(val) < self.num_images:
            log.warning(
                "frozen-LMM check: the val split has %d samples, asking about those", len(val)
            )
        images = [val[i].image for i in range(min(self.num_images, len(val)))]
        answers = [
            [lmm.answer(torch.from_numpy(img), q, self.max_new_tokens) for q in self.questions]
            for img in images
        ]
        return {"fingerprint": fingerprint(lmm), "answers": answers}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every rank takes part: with trainer=fsdp the LMM's layers are gathered collectively
        self.before = self.snapshot(trainer, pl_module.model.lmm)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None:
            return
        after = self.snapshot(trainer, pl_module.model.lmm)
        unchanged = after == self.before
        if not trainer.is_global_zero:
            if not unchanged:
                raise RuntimeError(
                    f"the frozen LMM changed during training on rank {trainer.global_rank}"
                )
            return
        report = {
            "questions": self.questions,
            "unchanged": unchanged,
            "before": self.before,
            "after": after,
        }
        out = Path(trainer.default_root_dir) / "chat_check.json"
        out.write_text(json.dumps(report, indent=2))
        for logger in trainer.loggers:
            logger.log_metrics({"lmm_unchanged": float(unchanged)})
        if not unchanged:
            raise RuntimeError(f"the frozen LMM changed during training; see {out}")
        log.info("frozen LMM unchanged by training: same weights, same greedy answers (%s)", out)


class MaskOverlays(L.Callback):
    """Overlays of a few fixed validation samples each epoch, with any logger; W&B extras.

    From the predictions ``validation_step`` returns (nothing is computed twice), the first
    ``num_samples`` validation samples (the same every epoch: validation is not shuffled) are drawn
    into ``<run dir>/overlays/epoch_<k>.png``: image | target | coarse | refined per row, the
    phrases above it in their mask colours. With a ``WandbLogger`` the same samples are logged as
    ``val/overlays``, images with target / coarse / refined masks the W&B UI toggles per phrase, and
    testing logs ``test/phrases``: one row per test phrase with its tags (the synthetic world's
    ``kind``), coarse and refined IoU and its masks, gathered from every rank under DDP (the
    overlays are rank zero's samples).

    Args:
        num_samples: validation samples drawn each epoch.
        row_height: height of each sample's row in the picture, in pixels.
        max_test_rows: at most this many phrases in the W&B test table (an equal share per rank).
    """

    def __init__(self, num_samples: int = 6, row_height: int = 192, max_test_rows: int = 1000):
        self.num_samples = num_samples
        self.row_height = row_height
        self.max_test_rows = max_test_rows
        self.rows: list[tuple] = []
        self.table: list[tuple] = []  # (record, image PNG, mask-bits PNG) per test phrase

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or dataloader_idx != 0:
            return
        for b in range(min(len(batch), self.num_samples - len(self.rows))):
            self.rows.append(sample_masks(batch, outputs, b))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.rows:
            return
        out = Path(trainer.default_root_dir) / "overlays" / f"epoch_{trainer.current_epoch:03d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay_panel(self.rows, self.row_height)).save(out)
        wandb = wandb_logger(trainer)
        if wandb is not None:
            log_overlays(wandb, "val/overlays", self.rows, step=trainer.global_step)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.table = []

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if wandb_logger(trainer) is None:
            return
        share = math.ceil(self.max_test_rows / trainer.world_size)  # of each rank
        for b in range(len(batch)):
            if len(self.table) >= share:
                return
            image, phrases, masks = sample_masks(batch, outputs, b)  # target, coarse, refined
            records = phrase_records(batch.meta[b], phrases, masks[1], masks[2], masks[0])
            picture = png_bytes(as_array(image, np.uint8))  # one object: pickled once per sample
            for k, record in enumerate(records[: share - len(self.table)]):
                bits = sum(m[k].numpy().astype(np.uint8) << i for i, m in enumerate(masks))
                self.table.append((record, picture, png_bytes(bits)))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        wandb = wandb_logger(trainer)
        if wandb is None:
            return
        rows = gather_records(self.table)  # every rank's phrases under DDP (each rank calls it)
        if trainer.is_global_zero and rows:
            wandb.log_table(key="test/phrases", **phrase_table(rows[: self.max_test_rows]))


def phrase_table(rows: list[tuple]) -> dict:
    """W&B ``columns`` and ``data`` of ``(record, image PNG, mask-bits PNG)`` rows: the phrase,
    its tags, its IoUs and the image with its target / coarse / refined masks."""
    import wandb

    fixed = ("image_id", "phrase", "iou_coarse", "iou_refined")
    tags = sorted({key for record, _, _ in rows for key in record} - set(fixed))
    columns = ["phrase", *tags, "iou_coarse", "iou_refined"]
    data = []
    for record, picture, bits in rows:
        bits = from_png(bits)
        sets = [torch.from_numpy(bits[None] >> i & 1) for i in range(3)]  # target, coarse, refined
        masks = wandb_masks([record["phrase"]], sets)
        data.append(
            [record.get(c) for c in columns] + [wandb.Image(from_png(picture), masks=masks)]
        )
    return {"columns": [*columns, "overlay"], "data": data}


def wandb_logger(trainer) -> WandbLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def sample_masks(batch: GroundingBatch, pred: Predictions, b: int) -> tuple:
    """``(image, phrases, [target, coarse, refined])`` of sample ``b``, on the CPU (masks
    ``K x H x W`` bool)."""
    target = batch.masks[b]
    coarse = upsample_logits(pred.coarse_region[b], target.shape[-2:]) > 0
    sets = [m.detach().cpu() for m in (target, coarse, pred.refined[b] > 0)]
    return batch.images[b].cpu(), batch.phrases(b), sets


def log_overlays(wandb: WandbLogger, key: str, rows: list[tuple], step: int | None = None) -> None:
    """``rows`` (:func:`sample_masks`) as W&B images under ``key``, captioned with their phrases,
    with target / coarse / refined masks the W&B UI toggles per phrase."""
    wandb.log_image(
        key=key,
        images=[as_array(image, np.uint8) for image, _, _ in rows],
        step=step,
        caption=[" | ".join(phrases) for _, phrases, _ in rows],
        masks=[wandb_masks(phrases, sets) for _, phrases, sets in rows],
    )


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` (``H x W`` or ``H x W x 3`` uint8) as PNG bytes: compact to send between ranks."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def from_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def wandb_masks(phrases: list[str], mask_sets: list) -> dict:
    """``wandb.Image(masks=...)`` of target / coarse / refined: a class per phrase."""
    labels = {k + 1: phrase for k, phrase in enumerate(phrases)}
    return {
        name: {"mask_data": label_map(masks), "class_labels": labels}
        for name, masks in zip(PANEL_COLUMNS[1:], mask_sets)
    }


def label_map(masks: torch.Tensor) -> np.ndarray:
    """``H x W`` uint8: ``k + 1`` where mask ``k`` is drawn (the smallest on top), 0 elsewhere."""
    ids = torch.arange(1, len(masks) + 1, dtype=torch.uint8)[:, None, None]
    return (disjoint(masks.bool()) * ids).sum(0).to(torch.uint8).numpy()


# val/... metric: its name in metrics.png
VAL_CURVES = {
    "val/giou": "gIoU",
    "val/ciou": "cIoU",
    "val/coarse_giou": "gIoU coarse",
    "val/coarse_ciou": "cIoU coarse",
}


class MetricCurves(L.Callback):
    """``<run dir>/metrics.png`` at the end of fit: train loss per step (and its moving mean), val
    loss, and val gIoU / cIoU (refined and coarse) per epoch.

    Collected from what the run logs, so it works with any logger; kept in checkpoints, so a
    resumed run draws its whole history.
    """

    def __init__(self) -> None:
        self.history: dict[str, list] = {k: [] for k in ("train/loss", "val/loss", *VAL_CURVES)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning divides the loss it passes here by the batches accumulated
        loss = float(outputs["loss"]) * trainer.accumulate_grad_batches
        self.history["train/loss"].append([trainer.global_step, loss])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if "val/loss" in metrics:
            self.history["val/loss"].append([trainer.global_step, float(metrics["val/loss"])])
        for key in VAL_CURVES:
            if key in metrics:
                self.history[key].append([trainer.current_epoch, float(metrics[key])])

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        train = self.history["train/loss"]
        window = max(1, len(train) // 20)
        loss = {"train": train, "val": self.history["val/loss"]}
        if window > 1:
            loss[f"train, mean of {window} steps"] = moving_mean(train, window)
        ious = {name: self.history[key] for key, name in VAL_CURVES.items()}
        charts = {"loss": ("step", loss), "validation IoU (%)": ("epoch", ious)}
        out = Path(trainer.default_root_dir) / "metrics.png"
        Image.fromarray(line_charts(charts)).save(out)
        log.info("curves of the run's metrics: %s", out)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = state_dict["history"]


def moving_mean(points: list, window: int) -> list:
    """``[x, mean of this and the previous window - 1 ys]`` of ``[x, y]`` points (from the
    ``window``-th point on)."""
    ys = np.array([y for _, y in points], dtype=float)
    means = np.convolve(ys, np.ones(window) / window, mode="valid") if len(ys) else []
    return [[x, float(m)] for (x, _), m in zip(points[window - 1 :], means)]

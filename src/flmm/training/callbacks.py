"""Training callbacks: the frozen-LMM check (F-LMM's central promise: training never changes the
LMM) and the pictures a run leaves (mask overlays each epoch, curves of its metrics)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from flmm.model.module import Predictions, phrase_records, upsample_logits
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
        self.before = self.snapshot(trainer, pl_module.lmm)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None:
            return
        after = self.snapshot(trainer, pl_module.lmm)
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


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's bytes, in state-dict order (of this rank's
    shards where the LMM is sharded)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


class MaskOverlays(L.Callback):
    """Overlays of a few fixed validation samples each epoch, with any logger; W&B extras.

    From the predictions ``validation_step`` returns (nothing is computed twice), the first
    ``num_samples`` validation samples (the same every epoch: validation is not shuffled) are drawn
    into ``<run dir>/overlays/epoch_<k>.png``: image | target | coarse | refined per row, the
    phrases above it in their mask colours. With a ``WandbLogger`` the same samples are logged as
    ``val/overlays``, images with target / coarse / refined masks the W&B UI toggles per phrase, and
    testing logs ``test/phrases``: one row per test phrase with its tags (the synthetic world's
    ``kind``), coarse and refined IoU and its masks. Rank zero draws what rank zero sees.

    Args:
        num_samples: validation samples drawn each epoch.
        row_height: height of each sample's row in the picture, in pixels.
        max_test_rows: at most this many phrases in the W&B test table.
    """

    def __init__(self, num_samples: int = 6, row_height: int = 192, max_test_rows: int = 1000):
        self.num_samples = num_samples
        self.row_height = row_height
        self.max_test_rows = max_test_rows
        self.rows: list[tuple] = []
        self.table: list[dict] = []

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
        if wandb_logger(trainer) is None or not trainer.is_global_zero:
            return
        import wandb

        for b in range(len(batch)):
            image, phrases, (target, coarse, refined) = sample_masks(batch, outputs, b)
            records = phrase_records(batch.meta[b], phrases, coarse, refined, target)
            for k, record in enumerate(records[: self.max_test_rows - len(self.table)]):
                sets = [m[k : k + 1] for m in (target, coarse, refined)]
                masks = wandb_masks([phrases[k]], sets)
                self.table.append({**record, "overlay": wandb.Image(image.numpy(), masks=masks)})

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        wandb = wandb_logger(trainer)
        if wandb is None or not self.table:
            return
        fixed = ("image_id", "phrase", "iou_coarse", "iou_refined", "overlay")
        tags = sorted({key for row in self.table for key in row} - set(fixed))
        columns = ["phrase", *tags, "iou_coarse", "iou_refined", "overlay"]
        data = [[row.get(c) for c in columns] for row in self.table]
        wandb.log_table(key="test/phrases", columns=columns, data=data)


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

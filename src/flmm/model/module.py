"""The F-LMM LightningModule: trains and evaluates an :class:`~flmm.model.network.FLMMModel`
(steps, metrics, optimizer and schedule, checkpoint hooks)."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from flmm.lmm import FrozenLMM
from flmm.model.checkpoint import check_metadata, checkpoint_metadata, written_metadata
from flmm.model.metrics import (
    PNGRecallMetric,
    ReferSegMetric,
    intersections_unions,
    ious_from_counts,
)
from flmm.model.network import FLMMModel, Predictions, upsample_logits
from flmm.types import GroundingBatch

log = logging.getLogger(__name__)
# what ``save_hyperparameters`` records, all a checkpoint may pass back to ``__init__``, and their
# defaults: the reference F-LMM's AdamW settings (flmm.model.reference records them in a converted head)
HYPER_PARAMETERS = {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "warmup_ratio": 0.03}


class FLMM(L.LightningModule):
    """Trains and evaluates ``model`` (an :class:`FLMMModel`) with Lightning.

    Args:
        model: the F-LMM computation (frozen LMM, mask head, text prompt, SAM refiner).
        lr, betas, weight_decay: AdamW settings; ``warmup_ratio`` of the steps warm up linearly,
            the rest follow a cosine to 0.

    Checkpoints hold :meth:`FLMMModel.trainable_state_dict` and the metadata of the LMM and SAM
    it fits (:mod:`flmm.model.checkpoint`); :func:`flmm.model.load` reads them back.
    """

    def __init__(
        self,
        model: FLMMModel,
        lr: float = HYPER_PARAMETERS["lr"],
        betas: tuple[float, float] = tuple(HYPER_PARAMETERS["betas"]),
        weight_decay: float = HYPER_PARAMETERS["weight_decay"],
        warmup_ratio: float = HYPER_PARAMETERS["warmup_ratio"],
    ) -> None:
        super().__init__()
        # plain Python values only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "lr": float(lr),
                "betas": [float(b) for b in betas],
                "weight_decay": float(weight_decay),
                "warmup_ratio": float(warmup_ratio),
            }
        )
        self.model = model
        self.test_records: list[dict] = []  # per-phrase IoUs and tags of the last test run
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{stage}": ReferSegMetric()
                for split in ("val", "test")
                for stage in ("coarse", "refined")
            }
        )
        # eval loss: mean over samples, summed over DDP ranks (uneven shards weigh right)
        self.eval_loss = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        # PNG average recall per phrase group, for samples whose meta carries ``png_groups``
        self.png_metrics = nn.ModuleDict(
            {
                f"{split}_{stage}": PNGRecallMetric()
                for split in ("val", "test")
                for stage in ("coarse", "refined")
            }
        )

    @classmethod
    def build(
        cls,
        lmm: FrozenLMM,
        sam: nn.Module,
        base_channels: int = 64,
        target_size: int = 64,
        cache_dir: str | None = None,
        **hyper_parameters,
    ) -> FLMM:
        """:meth:`FLMMModel.build` (heads fitting ``lmm`` and ``sam``, a feature cache at
        ``cache_dir``) with the optimizer's ``hyper_parameters``: the entry point configs use."""
        return cls(
            FLMMModel.build(lmm, sam, base_channels, target_size, cache_dir), **hyper_parameters
        )

    # ---------------------------------------------------------------- parameters and checkpoints
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.trainable_state_dict()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.model.trainable_state_dict()
        checkpoint["flmm"] = written_metadata(self.model)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_metadata(
            checkpoint.get("flmm"), checkpoint_metadata(self.model.lmm, self.model.refiner.sam)
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict)

    def forward(self, batch: GroundingBatch) -> Predictions:
        return self.model(batch)

    # ------------------------------------------------------------------------ lightning steps
    def on_fit_start(self) -> None:
        counts = self.model.parameter_counts()
        log.info(
            "parameters: %s trainable, %s frozen",
            f"{counts['trainable']:,}",
            f"{counts['frozen']:,}",
        )
        for logger in self.loggers:
            logger.log_hyperparams(
                {"params/trainable": counts["trainable"], "params/frozen": counts["frozen"]}
            )

    def training_step(self, batch: GroundingBatch, batch_idx: int) -> torch.Tensor:
        losses = self.model.losses(batch, self(batch))
        parts = {f"train/{k}": v for k, v in losses.items() if k != "loss"}
        self.log_dict(parts, batch_size=len(batch), sync_dist=True)
        self.log("train/loss", losses["loss"], batch_size=len(batch), prog_bar=True, sync_dist=True)
        return losses["loss"]

    def validation_step(
        self, batch: GroundingBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> Predictions:
        return self._evaluate(batch, "val")

    def test_step(
        self, batch: GroundingBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> Predictions:
        return self._evaluate(batch, "test")

    def _evaluate(self, batch: GroundingBatch, split: str) -> Predictions:
        pred = self(batch)
        losses = self.model.losses(batch, pred)
        self.eval_loss[split].update(losses["loss"].detach(), weight=len(batch))
        for b, target in enumerate(batch.masks):
            coarse = upsample_logits(pred.coarse_region[b], target.shape[-2:]) > 0
            refined = pred.refined[b] > 0
            self.metrics[f"{split}_coarse"].update(coarse, target)
            self.metrics[f"{split}_refined"].update(refined, target)
            if "png_groups" in batch.meta[b]:
                groups = batch.meta[b]["png_groups"]
                self.png_metrics[f"{split}_coarse"].update(coarse, target, groups)
                self.png_metrics[f"{split}_refined"].update(refined, target, groups)
            if split == "test":
                self.test_records.extend(
                    phrase_records(batch.meta[b], batch.phrases(b), coarse, refined, target)
                )
        return pred

    def predict_step(
        self, batch: GroundingBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict]:
        """Per sample: ``phrases``, ``spans``, ``meta`` and the ``refined`` and ``coarse`` masks
        (``K x H x W`` bool at the image's size, on the CPU), thresholded as in evaluation."""
        pred = self(batch)
        return [
            {
                "phrases": batch.phrases(b),
                "spans": batch.spans[b],
                "meta": batch.meta[b],
                "refined": (pred.refined[b] > 0).cpu(),
                "coarse": (upsample_logits(pred.coarse_region[b], image.shape[:2]) > 0).cpu(),
            }
            for b, image in enumerate(batch.images)
        ]

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_start(self) -> None:
        self.test_records = []

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, split: str) -> None:
        self.log(f"{split}/loss", self.eval_loss[split].compute(), sync_dist=False)
        self.eval_loss[split].reset()
        for stage in ("coarse", "refined"):
            metric = self.metrics[f"{split}_{stage}"]
            values = metric.compute()
            prefix = f"{split}/" if stage == "refined" else f"{split}/coarse_"
            self.log_dict({f"{prefix}{k.lower()}": v for k, v in values.items()}, sync_dist=False)
            metric.reset()
            png = self.png_metrics[f"{split}_{stage}"]
            if png.update_called:
                values = png.compute()
                self.log_dict({f"{prefix}{k.lower()}": v for k, v in values.items()})
                png.reset()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = warmup_cosine(total, hp.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def warmup_cosine(total_steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to 0."""
    warmup = max(1, round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def phrase_records(
    meta: dict,
    phrases: list[str],
    coarse: torch.Tensor,
    refined: torch.Tensor,
    target: torch.Tensor,
) -> list[dict]:
    """One record per phrase: its text, tags (e.g. the synthetic world's ``kind``) and IoUs."""
    coarse_iou = ious_from_counts(*intersections_unions(coarse, target))
    refined_iou = ious_from_counts(*intersections_unions(refined, target))
    tags = meta.get("tags") or [{} for _ in phrases]
    return [
        {
            "image_id": meta.get("image_id"),
            "phrase": p,
            **t,
            "iou_coarse": float(c),
            "iou_refined": float(r),
        }
        for p, t, c, r in zip(phrases, tags, coarse_iou, refined_iou)
    ]

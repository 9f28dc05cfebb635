"""The F-LMM LightningModule: frozen LMM + attention capture + U-Net mask head + SAM refiner."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from flmm import frame
from flmm.errors import CheckpointMismatchError
from flmm.heads import MaskHead, SamRefiner, TextPrompt
from flmm.lmm import FrozenLMM
from flmm.model.checkpoint import (
    check_metadata,
    checkpoint_metadata,
    load_trainable_state,
    read_checkpoint,
    sam_source,
)
from flmm.model.losses import bce_dice_loss
from flmm.model.metrics import (
    PNGRecallMetric,
    ReferSegMetric,
    intersections_unions,
    ious_from_counts,
)
from flmm.types import CaptureOutput, GroundingBatch, GroundingSample

log = logging.getLogger(__name__)
# what ``save_hyperparameters`` records, all a checkpoint may pass back to ``__init__``, and their
# defaults: the reference F-LMM's AdamW settings (flmm.model.reference records them in a converted head)
HYPER_PARAMETERS = {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "warmup_ratio": 0.03}


@dataclass
class Predictions:
    """Mask logits for every real phrase of a batch, in batch order.

    Attributes:
        coarse: ``N x s x s`` mask-head logits over the square attention frame.
        coarse_region: ``B`` tensors ``K_b x h_b x w_b``, ``coarse`` cropped to each image region.
        refined: ``B`` tensors ``K_b x H_b x W_b``, SAM-refined logits at image resolution.
    """

    coarse: torch.Tensor
    coarse_region: list[torch.Tensor]
    refined: list[torch.Tensor]


@dataclass
class Grounding:
    """What :meth:`FLMM.ground` returns for ``K`` phrases of one ``H x W`` image.

    Attributes:
        phrases, spans: the phrases and their character spans in the text.
        attention: ``K x L x H_heads x h x w`` word-to-image attention (rows merged per phrase).
        coarse: ``K x H x W`` mask-head probabilities.
        refined: ``K x H x W`` SAM-refined probabilities; ``refined > 0.5`` are the masks.
    """

    phrases: list[str]
    spans: list[tuple[int, int]]
    attention: torch.Tensor
    coarse: torch.Tensor
    refined: torch.Tensor

    @property
    def masks(self) -> torch.Tensor:
        return self.refined > 0.5


def phrase_spans(text: str, phrases: list[str]) -> list[tuple[int, int]]:
    """Character spans of ``phrases`` in ``text``, each found after the previous one."""
    spans, start = [], 0
    for phrase in phrases:
        at = text.find(phrase, start)
        if not phrase or at < 0:
            raise ValueError(
                f"phrase {phrase!r} is not in the text {text!r} (after position {start}); pass phrases exactly as they appear in the text, in order"
            )
        spans.append((at, at + len(phrase)))
        start = at + len(phrase)
    return spans


class FLMM(L.LightningModule):
    """Grounds the phrases of a text on an image with a frozen LMM.

    Args:
        lmm: the frozen LMM adapter (never trained).
        mask_head: U-Net from attention maps to coarse mask logits.
        text_prompt: layer-weighted projection of phrase hidden states to SAM prompt tokens.
        refiner: SAM with a frozen image encoder and trainable prompt encoder / mask decoder.
        lr, betas, weight_decay: AdamW settings; ``warmup_ratio`` of the steps warm up linearly,
            the rest follow a cosine to 0.
    """

    def __init__(
        self,
        lmm: FrozenLMM,
        mask_head: MaskHead,
        text_prompt: TextPrompt,
        refiner: SamRefiner,
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
        self.lmm = lmm
        self.mask_head = mask_head
        self.text_prompt = text_prompt
        self.refiner = refiner
        self.test_records: list[dict] = []  # per-phrase IoUs and tags of the last test run
        self.feature_cache = None  # flmm.training.feature_cache.attach (data.cache_dir=...) sets it
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
        **kwargs,
    ) -> FLMM:
        """Build the trainable heads to fit ``lmm`` and ``sam``: the entry point configs use."""
        mask_head = MaskHead(lmm.channels, base_channels=base_channels, target_size=target_size)
        text_prompt = TextPrompt(lmm.hidden_size, lmm.num_text_layers, sam.prompt_encoder.embed_dim)
        return cls(lmm, mask_head, text_prompt, SamRefiner(sam), **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str, lmm: FrozenLMM, sam: nn.Module) -> FLMM:
        """Rebuild F-LMM around ``lmm`` and ``sam`` and load a checkpoint written by training, strictly."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"F-LMM checkpoint not found: {path}; pass the .ckpt a training run wrote (checkpoint=...)"
            )
        ckpt = read_checkpoint(path)
        check_metadata(ckpt.get("flmm"), checkpoint_metadata(lmm, sam))
        head = ckpt["flmm"]["mask_head"]
        hparams = ckpt.get("hyper_parameters", {})
        unknown = sorted(set(hparams) - set(HYPER_PARAMETERS))
        if unknown:
            raise CheckpointMismatchError(
                f"checkpoint {path} has hyperparameters {unknown} this flmm does not know; "
                "it was written by another flmm version: load it with that version or retrain"
            )
        model = cls.build(
            lmm,
            sam,
            base_channels=head["base_channels"],
            target_size=head["target_size"],
            **hparams,
        )
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()

    # ---------------------------------------------------------------- parameters and checkpoints
    def trainable_modules(self) -> dict[str, nn.Module]:
        """The only modules F-LMM trains; checkpoints hold exactly their state."""
        return {
            "mask_head": self.mask_head,
            "text_prompt": self.text_prompt,
            "prompt_encoder": self.refiner.sam.prompt_encoder,
            "mask_decoder": self.refiner.sam.mask_decoder,
        }

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": value
            for name, module in self.trainable_modules().items()
            for key, value in module.state_dict().items()
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["flmm"] = checkpoint_metadata(self.lmm, self.refiner.sam)
        checkpoint["flmm"]["sam"] = sam_source(self.refiner.sam)
        checkpoint["flmm"]["mask_head"] = {
            "base_channels": self.mask_head.base_channels,
            "target_size": self.mask_head.target_size,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_metadata(checkpoint.get("flmm"), checkpoint_metadata(self.lmm, self.refiner.sam))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not strict:
            raise ValueError("flmm loads checkpoints strictly; non-strict loading is not supported")
        return load_trainable_state(self.trainable_modules(), state_dict)

    # ---------------------------------------------------------------------------- forward pass
    def forward(self, batch: GroundingBatch) -> Predictions:
        if self.feature_cache is not None:
            return self.predict(batch, *self.feature_cache.lookup(batch))
        return self.predict(batch, self.lmm(batch))

    def predict(
        self, batch: GroundingBatch, capture: CaptureOutput, embedded: tuple | None = None
    ) -> Predictions:
        """Coarse and refined logits from what the frozen LMM captured for ``batch``.

        ``embedded`` (SAM image embeddings and input sizes, e.g. from a feature cache) skips SAM's
        image encoder.
        """
        coarse = self.mask_head(capture.maps[capture.phrase_mask].float())
        prompts = self.text_prompt(capture.hidden.float(), layer_dim=1)
        embeddings, input_sizes = embedded or self.refiner.embed_images(batch.images)
        coarse_region = [
            frame.crop(c, r) for c, r in zip(coarse.split(batch.num_phrases), capture.region)
        ]
        texts = [
            [prompts[b][capture.token_phrase[b] == k] for k in range(n)]
            for b, n in enumerate(batch.num_phrases)
        ]
        sizes = [tuple(image.shape[:2]) for image in batch.images]
        refined = self.refiner(embeddings, coarse_region, texts, input_sizes, sizes)
        return Predictions(coarse, coarse_region, refined)

    @torch.no_grad()
    def ground(self, image: np.ndarray, text: str, phrases: list[str]) -> Grounding:
        """Masks for ``phrases`` of ``text`` on an ``H x W x 3`` uint8 ``image``.

        Phrases are matched in order, each after the previous one, exactly as written in ``text``.
        """
        return self.ground_batch([image], [text], [phrases])[0]

    @torch.no_grad()
    def ground_batch(
        self, images: list[np.ndarray], texts: list[str], phrases: list[list[str]]
    ) -> list[Grounding]:
        """:meth:`ground` for several images in one LMM forward and one SAM pass.

        Every image needs at least one phrase; images may differ in size.
        """
        spans = [phrase_spans(t, p) for t, p in zip(texts, phrases)]
        samples = [
            GroundingSample(image, text, s, np.zeros((len(s), *image.shape[:2]), dtype=bool))
            for image, text, s in zip(images, texts, spans)
        ]
        batch = GroundingBatch.collate(samples).to(self.device)
        capture = self.lmm(batch)
        pred = self.predict(batch, capture)
        out = []
        for b, (image, s) in enumerate(zip(images, spans)):
            maps = capture.maps[b, : len(s)].unflatten(1, (self.lmm.num_layers, -1)).cpu()
            coarse = upsample_logits(pred.coarse_region[b], image.shape[:2]).sigmoid().cpu()
            refined = pred.refined[b].sigmoid().cpu()
            out.append(Grounding(list(phrases[b]), s, maps, coarse, refined))
        return out

    def losses(self, batch: GroundingBatch, pred: Predictions) -> dict[str, torch.Tensor]:
        """BCE + Dice on the coarse logits (mask-head resolution) and the refined ones (image resolution)."""
        size = pred.coarse.shape[-1]
        frames = [frame.targets(m, size) for m in batch.masks]
        target = torch.cat([t for t, _ in frames])
        weight = torch.cat([w.expand_as(t) for t, w in frames])
        coarse_bce, coarse_dice = bce_dice_loss(pred.coarse, target, weight)
        refined_bce, refined_dice = _refined_losses(pred.refined, batch.masks)
        total = coarse_bce + coarse_dice + refined_bce + refined_dice
        return {
            "loss": total,
            "coarse_bce": coarse_bce,
            "coarse_dice": coarse_dice,
            "refined_bce": refined_bce,
            "refined_dice": refined_dice,
        }

    # ------------------------------------------------------------------------ lightning steps
    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
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
        losses = self.losses(batch, self(batch))
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
        losses = self.losses(batch, pred)
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


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize ``K x h x w`` logits to ``K x size``."""
    return F.interpolate(
        logits[None].float(), size=tuple(size), mode="bilinear", align_corners=False
    )[0]


def _refined_losses(
    refined: list[torch.Tensor], masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE + Dice over every phrase at its image's resolution, averaged over phrases."""
    bce, dice, n = 0.0, 0.0, 0
    for logits, target in zip(refined, masks):
        b, d = bce_dice_loss(logits, target.float())
        bce, dice, n = bce + b * len(logits), dice + d * len(logits), n + len(logits)
    return bce / n, dice / n


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

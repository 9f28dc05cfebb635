"""Callbacks that check F-LMM's central promise: training never changes the frozen LMM."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from flmm.model.module import upsample_logits
from flmm.overlay import overlay_row

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
    """Log image / target / coarse / refined overlays of the first validation batch to W&B.

    Uses the predictions ``validation_step`` returns, so nothing is computed twice.

    A no-op unless a ``WandbLogger`` is among the trainer's loggers.

    Args:
        max_images: overlays logged per validation epoch.
    """

    def __init__(self, max_images: int = 4) -> None:
        self.max_images = max_images

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        wandb = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb is None or batch_idx != 0 or not trainer.is_global_zero:
            return
        pred = outputs  # the Predictions validation_step returned for this batch
        panels, captions = [], []
        for b in range(min(self.max_images, len(batch))):
            coarse = upsample_logits(pred.coarse_region[b], batch.masks[b].shape[-2:]) > 0
            panels.append(
                overlay_row(batch.images[b], [batch.masks[b], coarse, pred.refined[b] > 0])
            )
            captions.append(" | ".join(batch.phrases(b)))
        wandb.log_image(
            key="val/overlays", images=panels, caption=captions, step=trainer.global_step
        )

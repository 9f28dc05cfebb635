"""F-LMM's computation: frozen LMM -> attention capture -> U-Net mask head -> SAM refiner.

:class:`FLMMModel` is a plain ``nn.Module`` from a :class:`~flmm.types.GroundingBatch` to coarse
and refined mask logits and their losses; :class:`flmm.model.module.FLMM` trains and evaluates it
with Lightning, :class:`flmm.model.predictor.FLMMPredictor` grounds images and texts with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flmm import frame
from flmm.heads import MaskHead, SamRefiner, TextPrompt
from flmm.heads.losses import bce_dice_loss
from flmm.lmm import FrozenLMM
from flmm.model.checkpoint import load_trainable_state
from flmm.model.feature_cache import FeatureCache
from flmm.types import CaptureOutput, GroundingBatch

log = logging.getLogger(__name__)


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


class FLMMModel(nn.Module):
    """Grounds the phrases of a batch's texts on its images with a frozen LMM.

    Args:
        lmm: the frozen LMM adapter (never trained).
        mask_head: U-Net from attention maps to coarse mask logits.
        text_prompt: layer-weighted projection of phrase hidden states to SAM prompt tokens.
        refiner: SAM with a frozen image encoder and trainable prompt encoder / mask decoder.
        feature_cache: a :class:`~flmm.model.feature_cache.FeatureCache` of ``lmm`` and
            ``refiner``'s frozen outputs (None: computed every time).
    """

    def __init__(
        self,
        lmm: FrozenLMM,
        mask_head: MaskHead,
        text_prompt: TextPrompt,
        refiner: SamRefiner,
        feature_cache=None,
    ) -> None:
        super().__init__()
        self.lmm = lmm
        self.mask_head = mask_head
        self.text_prompt = text_prompt
        self.refiner = refiner
        self.feature_cache = feature_cache

    @classmethod
    def build(
        cls,
        lmm: FrozenLMM,
        sam: nn.Module,
        base_channels: int = 64,
        target_size: int = 64,
        cache_dir: str | Path | None = None,
    ) -> FLMMModel:
        """Build the trainable heads to fit ``lmm`` and ``sam``; with ``cache_dir``, a feature
        cache of their frozen outputs there (:mod:`flmm.model.feature_cache`)."""
        mask_head = MaskHead(lmm.channels, base_channels=base_channels, target_size=target_size)
        text_prompt = TextPrompt(lmm.hidden_size, lmm.num_text_layers, sam.prompt_encoder.embed_dim)
        refiner = SamRefiner(sam)
        return cls(lmm, mask_head, text_prompt, refiner, feature_cache(cache_dir, lmm, refiner))

    def with_feature_cache(self, cache) -> FLMMModel:
        """This model's modules (shared, not copied) with frozen outputs read from ``cache`` (a
        :class:`~flmm.model.feature_cache.FeatureCache`; None: none)."""
        return FLMMModel(self.lmm, self.mask_head, self.text_prompt, self.refiner, cache)

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
        """``<module>.<param>`` tensors of :meth:`trainable_modules`: what checkpoints hold."""
        return {
            f"{name}.{key}": value
            for name, module in self.trainable_modules().items()
            for key, value in module.state_dict().items()
        }

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a :meth:`trainable_state_dict` strictly (nothing else is ever loaded)."""
        if not strict:
            raise ValueError("flmm loads checkpoints strictly; non-strict loading is not supported")
        return load_trainable_state(self.trainable_modules(), state_dict)

    @property
    def device(self) -> torch.device:
        """Where the trainable heads are (the LMM may be placed elsewhere by ``device_map``)."""
        return next(self.mask_head.parameters()).device

    # ---------------------------------------------------------------------------- forward pass
    def forward(self, batch: GroundingBatch) -> Predictions:
        """Coarse and refined logits of every phrase of ``batch`` (texts answer the grounding
        instruction); frozen outputs from the feature cache where it has them."""
        if self.feature_cache is not None:
            return self.decode(batch, *self.feature_cache.lookup(batch))
        return self.decode(batch, self.lmm(batch))

    def decode(
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

    def losses(self, batch: GroundingBatch, pred: Predictions) -> dict[str, torch.Tensor]:
        """BCE + Dice on the coarse logits (mask-head resolution) and the refined ones (image
        resolution): ``loss`` (their sum) and each part, scalars."""
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


def feature_cache(cache_dir: str | Path | None, lmm: FrozenLMM, refiner: SamRefiner):
    """A :class:`~flmm.model.feature_cache.FeatureCache` at ``cache_dir`` (None or empty:
    None, no cache)."""
    if not cache_dir:
        return None
    cache = FeatureCache(cache_dir, lmm, refiner)
    log.info(
        "frozen-feature cache at %s (LMM %s, SAM %s)",
        cache_dir,
        cache.lmm_store.folder.name,
        cache.sam_store.folder.name,
    )
    return cache


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

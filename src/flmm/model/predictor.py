"""Grounding with a trained F-LMM: masks for the phrases of a text on an image.

:class:`FLMMPredictor` wraps an :class:`~flmm.model.network.FLMMModel` as segment-anything's
``SamPredictor`` wraps ``Sam``: numpy images and strings in, probabilities and masks out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flmm.model.network import FLMMModel, upsample_logits
from flmm.types import GroundingBatch, GroundingSample


@dataclass
class Grounding:
    """What :meth:`FLMMPredictor.ground` returns for ``K`` phrases of one ``H x W`` image.

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


class FLMMPredictor:
    """Grounds phrases on ``H x W x 3`` uint8 images with ``model`` (put in eval mode).

    Every call takes what it grounds as arguments (the question included), so one predictor
    serves several threads.
    """

    def __init__(self, model: FLMMModel) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def ground(
        self, image: np.ndarray, text: str, phrases: list[str], question: str | None = None
    ) -> Grounding:
        """Masks for ``phrases`` of ``text`` on ``image``; ``text`` answers ``question`` (None:
        F-LMM's grounding instruction).

        Phrases are matched in order, each after the previous one, exactly as written in ``text``.
        """
        return self.ground_batch([image], [text], [phrases], question)[0]

    @torch.no_grad()
    def ground_batch(
        self,
        images: list[np.ndarray],
        texts: list[str],
        phrases: list[list[str]],
        question: str | None = None,
    ) -> list[Grounding]:
        """:meth:`ground` for several images in one LMM forward and one SAM pass.

        Every image needs at least one phrase; images may differ in size.
        """
        spans = [phrase_spans(t, p) for t, p in zip(texts, phrases)]
        samples = [
            GroundingSample(image, text, s, np.zeros((len(s), *image.shape[:2]), dtype=bool))
            for image, text, s in zip(images, texts, spans)
        ]
        batch = GroundingBatch.collate(samples).to(self.model.device)
        capture = self.model.lmm(batch, question)
        pred = self.model.decode(batch, capture)
        layers = self.model.lmm.num_layers
        out = []
        for b, (image, s) in enumerate(zip(images, spans)):
            maps = capture.maps[b, : len(s)].unflatten(1, (layers, -1)).cpu()
            coarse = upsample_logits(pred.coarse_region[b], image.shape[:2]).sigmoid().cpu()
            refined = pred.refined[b].sigmoid().cpu()
            out.append(Grounding(list(phrases[b]), s, maps, coarse, refined))
        return out

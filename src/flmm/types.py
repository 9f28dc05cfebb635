"""Batch and output dataclasses shared by data, LMM adapters, heads and the LightningModule.

Conventions: images are ``H x W x 3`` uint8 RGB arrays; masks are boolean ``H x W`` at the image's
own resolution; a phrase is a character span ``(start, end)`` into the text to ground.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class GroundingSample:
    """One image, the text grounded on it, and one mask per phrase.

    Attributes:
        image: ``H x W x 3`` uint8 RGB.
        text: the assistant-turn text (referring expressions joined, or a caption).
        spans: ``K`` character spans ``(start, end)`` of the phrases inside ``text``.
        masks: ``K x H x W`` bool, one per phrase.
        meta: free-form record info (image id, ref ids, phrase tags such as ``kind``).
    """

    image: np.ndarray
    text: str
    spans: list[tuple[int, int]]
    masks: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.spans) != len(self.masks):
            raise ValueError(f"{len(self.spans)} phrase spans but {len(self.masks)} masks")
        for start, end in self.spans:
            if not 0 <= start < end <= len(self.text):
                raise ValueError(f"phrase span ({start}, {end}) is outside the text {self.text!r}")

    @property
    def phrases(self) -> list[str]:
        return [self.text[s:e] for s, e in self.spans]


@dataclass
class GroundingBatch:
    """A collated batch of ``B`` samples with ``K_b`` phrases each (ragged, kept as lists).

    Attributes:
        images: ``B`` uint8 tensors ``H_b x W_b x 3``.
        texts: ``B`` strings.
        spans: ``B`` lists of ``K_b`` character spans.
        masks: ``B`` bool tensors ``K_b x H_b x W_b``.
        meta: ``B`` dicts.
    """

    images: list[torch.Tensor]
    texts: list[str]
    spans: list[list[tuple[int, int]]]
    masks: list[torch.Tensor]
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_phrases(self) -> list[int]:
        return [len(s) for s in self.spans]

    def phrases(self, b: int) -> list[str]:
        return [self.texts[b][s:e] for s, e in self.spans[b]]

    @classmethod
    def collate(cls, samples: list[GroundingSample]) -> GroundingBatch:
        return cls(
            images=[torch.from_numpy(np.ascontiguousarray(s.image)) for s in samples],
            texts=[s.text for s in samples],
            spans=[list(s.spans) for s in samples],
            masks=[torch.from_numpy(np.ascontiguousarray(s.masks, dtype=bool)) for s in samples],
            meta=[s.meta for s in samples],
        )

    def to(self, device: torch.device | str) -> GroundingBatch:
        return GroundingBatch(
            images=[i.to(device) for i in self.images],
            texts=self.texts,
            spans=self.spans,
            masks=[m.to(device) for m in self.masks],
            meta=self.meta,
        )


@dataclass
class CaptureOutput:
    """What one frozen LMM forward pass yields for grounding.

    Attributes:
        maps: ``B x K x C x h x w`` word-to-image attention per phrase (rows merged), ``C = L*H``
            (``2*L*H`` for any-res families); zeros for padded phrases.
        phrase_mask: ``B x K`` bool, True for real phrases.
        hidden: ``B x S x R x D`` hidden states of the phrase tokens from the last ``S`` layers.
        token_phrase: ``B x R`` long, phrase index of each hidden-state row, -1 for padding.
        region: ``B x 4`` float, the image's ``(top, left, height, width)`` on the attention
            frame as fractions of its side (:mod:`flmm.frame`: centred, the rest is padding).
    """

    maps: torch.Tensor
    phrase_mask: torch.Tensor
    hidden: torch.Tensor
    token_phrase: torch.Tensor
    region: torch.Tensor

"""The one call of a family's HF processor, shared by grounding and chat, so that both hand the
model the same image tokens and pixels for an image."""

from __future__ import annotations

import numpy as np
import torch
from transformers import BatchFeature

from flmm.lmm.families import Family


def process(processor, family: Family, images: list[np.ndarray], texts: list[str]) -> BatchFeature:
    """``processor`` on ``H x W x 3`` uint8 ``images`` and prompts ``texts``, right-padded
    tensors, with the family's ``processor_kwargs``.

    For the ``"tiles"`` grid rule it adds ``image_sizes`` (``I x 2`` long, each image's height and
    width): InternVL's processor tiles by them but does not return them, and its model's
    ``forward`` accepts (and does not use) them. For the ``"crops"`` rule the images go in one
    list per prompt (SmolVLM's processor reads a flat list as one prompt's images): one image
    per prompt, or all of them in a single prompt.
    """
    if family.grid == "crops":
        images = [[image] for image in images] if len(images) == len(texts) else [images]
    enc = processor(
        images=images,
        text=texts,
        return_tensors="pt",
        padding=True,
        input_data_format="channels_last",
        **family.processor_kwargs,
    )
    if family.grid == "tiles":
        enc["image_sizes"] = torch.tensor([image.shape[:2] for image in images])
    return enc

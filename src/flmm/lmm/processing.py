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
    ``forward`` accepts (and does not use) them.

    A family with ``images_per_prompt`` hands the processor one list of images per prompt (Gemma
    3's reads a flat list as one prompt's images): grounding has one image per prompt, chat one
    prompt with every image.

    Prompts whose chat template already starts with the BOS token (Gemma 3's) get no second one,
    as transformers' own ``apply_chat_template(tokenize=True)`` decides.
    """
    bos = processor.tokenizer.bos_token
    with_bos = bos is not None and all(text.startswith(bos) for text in texts)
    if family.images_per_prompt:
        images_in = [images] if len(texts) == 1 else [[image] for image in images]
    enc = processor(
        images=images_in if family.images_per_prompt else images,
        text=texts,
        return_tensors="pt",
        padding=True,
        input_data_format="channels_last",
        **({"add_special_tokens": False} if with_bos else {}),
        **family.processor_kwargs,
    )
    if family.grid == "tiles":
        enc["image_sizes"] = torch.tensor([image.shape[:2] for image in images])
    return enc

"""A frozen LMM's own answers: one user turn (images, a question) to the generated assistant turn.

The images and the prompt go through the same processor call as grounding's
(:func:`flmm.lmm.processing.process`), so an answer is grounded on the image tokens it was
generated from.
"""

from __future__ import annotations

import numpy as np
import torch

from flmm.lmm.processing import process, processor_images
from flmm.lmm.prompts import check_length, generation_prompt


def chat_inputs(
    lmm, images: list[np.ndarray], question: str, answer_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Model inputs of one user turn (``images`` in order, then ``question``) to ``lmm`` (a
    ``FrozenLMM``), ready to generate the assistant turn, which starts with ``answer_prefix``.

    Each image is ``H x W x 3`` uint8; several images need a processor that takes several
    image entries in one turn (LLaVA's does). The processor runs with the family's
    ``processor_kwargs``, as for grounding.
    """
    tensors = [torch.as_tensor(np.ascontiguousarray(i)) for i in images]
    arrays, _ = processor_images(lmm.processor, lmm.family, tensors)
    text = generation_prompt(lmm.processor, lmm.family, len(arrays), question) + answer_prefix
    inputs = process(lmm.processor, lmm.family, arrays, [text])
    check_length(lmm, inputs, [question])
    return lmm.to_model(inputs)


@torch.no_grad()
def generate(lmm, images: list[np.ndarray], question: str, answer_prefix: str = "", **gen) -> str:
    """``lmm``'s answer to ``question`` about ``images`` via HF ``generate`` (the new text after
    ``answer_prefix``); ``gen`` goes to ``generate`` unchanged."""
    inputs = chat_inputs(lmm, images, question, answer_prefix)
    out = lmm.model.generate(**inputs, **gen)
    return lmm.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def answer(lmm, image: torch.Tensor, question: str, max_new_tokens: int = 24) -> str:
    """``lmm``'s greedy answer to ``question`` about an ``H x W x 3`` uint8 image."""
    arrays, _ = processor_images(lmm.processor, lmm.family, [torch.as_tensor(image)])
    text = generation_prompt(lmm.processor, lmm.family, 1, question)
    inputs = lmm.to_model(process(lmm.processor, lmm.family, arrays, [text]))
    out = lmm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return lmm.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

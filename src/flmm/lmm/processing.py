"""The one call of a family's HF processor, shared by grounding and chat, so that both hand the
model the same image tokens and pixels for an image; the images it is handed; and the one
rendering of a conversation."""

from __future__ import annotations

import numpy as np
import torch
from transformers import BatchFeature

from flmm import frame
from flmm.lmm.families import Family

# PaliGemma's prompt (its checkpoints ship no chat template): the images, the user turn as the
# prefix, "\n", the answer and <eos>. A newline ends PaliGemma's prefix, so the user turn's
# newlines become spaces.
PREFIX_LM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}"
    "{{ c['text'] | replace('\\n', ' ') }}{% endfor %}{{ '\\n' }}"
    "{% else %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


def render(processor, family: Family, conversation: list[dict], **kwargs) -> str:
    """The conversation as the prompt string of the family's chat template (the processor's own,
    or :data:`PREFIX_LM_TEMPLATE` for a ``prefix_lm`` family); ``kwargs`` go to
    ``apply_chat_template`` (``add_generation_prompt``...)."""
    template = PREFIX_LM_TEMPLATE if family.prefix_lm else None
    return processor.apply_chat_template(
        conversation, chat_template=template, tokenize=False, **kwargs
    )


def process(processor, family: Family, images: list[np.ndarray], texts: list[str]) -> BatchFeature:
    """``processor`` on ``H x W x 3`` uint8 ``images`` and prompts ``texts``, right-padded
    tensors, with the family's ``processor_kwargs``.

    For the ``"tiles"`` grid rule it adds ``image_sizes`` (``I x 2`` long, each image's height and
    width): InternVL's processor tiles by them but does not return them, and its model's
    ``forward`` accepts (and does not use) them.

    A family with ``images_per_prompt`` hands the processor one list of images per prompt (Gemma
    3's reads a flat list as one prompt's images): grounding has one image per prompt, chat one
    prompt with every image. A ``prefix_lm`` family goes through :func:`prefix_and_suffix`.

    Prompts whose chat template already starts with the BOS token (Gemma 3's) get no second one,
    as transformers' own ``apply_chat_template(tokenize=True)`` decides.
    """
    kwargs = {
        "return_tensors": "pt",
        "padding": True,
        "input_data_format": "channels_last",
        **family.processor_kwargs,
    }
    bos = processor.tokenizer.bos_token
    if bos is not None and all(text.startswith(bos) for text in texts):
        kwargs["add_special_tokens"] = False
    given = images
    if family.images_per_prompt:
        given = [images] if len(texts) == 1 else [[image] for image in images]
    if family.prefix_lm:
        enc = prefix_and_suffix(processor, given, texts, kwargs)
    else:
        enc = processor(images=given, text=texts, **kwargs)
    if family.grid == "tiles":
        enc["image_sizes"] = torch.tensor([image.shape[:2] for image in images])
    return enc


def prefix_and_suffix(processor, images, texts: list[str], kwargs: dict) -> BatchFeature:
    """PaliGemma's processor on prompts ``<image>prefix\\nanswer`` (:data:`PREFIX_LM_TEMPLATE`):
    the prefix goes in as its ``text`` (it adds ``<bos>`` after the images and the ``\\n``), the
    answer as its ``suffix`` (it adds ``<eos>``), so ``token_type_ids`` are 0 over the image and
    the prefix (attended bidirectionally) and 1 over the answer (causally), as PaliGemma is
    trained. Without answers it is a generation prompt; an answer still being written (chat's
    ``answer_prefix``, one prompt) loses the ``<eos>``."""
    heads, tails = zip(*(text.partition("\n")[::2] for text in texts))
    eos = processor.tokenizer.eos_token
    suffixes = [tail.removesuffix(eos) for tail in tails] if any(tails) else None
    enc = processor(images=images, text=list(heads), suffix=suffixes, **kwargs)
    enc.pop("labels")  # the processor's training labels: flmm computes no LM loss
    if suffixes is None or all(tail.endswith(eos) for tail in tails):
        return enc
    if len(texts) > 1:
        raise RuntimeError("an unfinished PaliGemma answer is continued one prompt at a time")
    return BatchFeature({k: v if k == "pixel_values" else v[:, :-1] for k, v in enc.items()})


def processor_images(
    processor, family: Family, images: list[torch.Tensor]
) -> tuple[list[np.ndarray], torch.Tensor]:
    """Processor-ready ``H x W x 3`` uint8 arrays of ``images`` (padded to a centred square with
    :func:`pad_colour`, if the family needs it) and their ``B x 4`` regions
    (:func:`flmm.frame.region`)."""
    arrays = [img.cpu().numpy() for img in images]
    region = torch.stack([frame.region(*a.shape[:2]) for a in arrays])
    if not family.pad_to_square:
        return arrays, region
    return [frame.pad_to_square(a, pad_colour(processor)) for a in arrays], region


def pad_colour(processor) -> np.ndarray:
    """The image processor's own padding colour (``background_color``), else its mean colour
    (``3`` uint8)."""
    image_processor = processor.image_processor
    colour = getattr(image_processor, "background_color", None)
    if colour is None:
        colour = np.asarray(getattr(image_processor, "image_mean", None) or [0.0] * 3) * 255
    return np.round(np.asarray(colour)).astype(np.uint8)

"""Pictures of masks: every overlay flmm draws (training panels, evaluation, ``flmm ground``, web).

Masks are drawn with ``torchvision.utils.draw_segmentation_masks``, each in its own palette colour,
blended once with the image at ``alpha``. Where masks overlap, the smaller mask is drawn on top
(no muddy double tint, no blacked-out overlap) and every mask's outline is drawn in full colour, so
a mask covered by a smaller one still shows.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_segmentation_masks

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]],
    dtype=np.uint8,
)
LEGEND_ROW = 18


def phrase_colour(k: int) -> np.ndarray:
    """RGB colour (uint8) of the ``k``-th mask or phrase."""
    return PALETTE[k % len(PALETTE)]


def as_array(x, dtype) -> np.ndarray:
    """A numpy array of ``x`` (numpy or a torch tensor on any device)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def overlay(image, masks, alpha: float = 0.5) -> np.ndarray:
    """``H x W x 3`` uint8: ``image`` (``H x W x 3`` uint8) with each of the ``K x H x W`` masks
    tinted in its own colour (numpy arrays or tensors)."""
    image = torch.from_numpy(as_array(image, np.uint8)).permute(2, 0, 1)
    masks = torch.from_numpy(as_array(masks, bool))
    if masks.shape[0] == 0:
        return image.permute(1, 2, 0).numpy().copy()
    colours = [tuple(int(c) for c in phrase_colour(k)) for k in range(masks.shape[0])]
    drawn = draw_segmentation_masks(image, disjoint(masks), alpha=alpha, colors=colours)
    for edge, colour in zip(outlines(masks), colours):
        drawn = draw_segmentation_masks(drawn, edge, alpha=1.0, colors=colour)
    return drawn.permute(1, 2, 0).numpy()


def disjoint(masks: torch.Tensor) -> torch.Tensor:
    """``masks`` with every overlap given to the smallest mask covering it."""
    area = masks.flatten(1).sum(1).float()
    area[area == 0] = float("inf")
    owner = torch.where(masks, area[:, None, None], float("inf")).argmin(0)
    return masks & (owner[None] == torch.arange(len(masks))[:, None, None])


def outlines(masks: torch.Tensor) -> torch.Tensor:
    """The pixels of each mask with a 4-neighbour outside it."""
    inside = torch.nn.functional.pad(masks.float()[:, None], (1, 1, 1, 1))
    eroded = -torch.nn.functional.max_pool2d(-inside, 3, stride=1)
    return masks & (eroded[:, 0] < 1)


def overlay_row(image, mask_sets: list) -> np.ndarray:
    """The image, then one overlay per mask set (e.g. target, coarse, refined), side by side."""
    image = as_array(image, np.uint8)
    return np.concatenate([image] + [overlay(image, m) for m in mask_sets], axis=1)


def render_overlay(
    image: np.ndarray, masks: np.ndarray, phrases: list[str], min_side: int = 384
) -> np.ndarray:
    """The image with each of the ``K x H x W`` masks tinted in its colour, upscaled to at least
    ``min_side`` pixels, above a legend (a colour swatch and the phrase per row)."""
    tinted = overlay(image, masks)
    scale = max(1, -(-min_side // max(image.shape[:2])))
    picture = Image.fromarray(tinted).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST
    )
    canvas = Image.new("RGB", (picture.width, picture.height + LEGEND_ROW * len(phrases) + 4))
    canvas.paste((255, 255, 255), (0, 0, *canvas.size))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, phrase in enumerate(phrases):
        top = picture.height + 2 + k * LEGEND_ROW
        draw.rectangle((4, top + 2, 18, top + 14), fill=tuple(int(c) for c in phrase_colour(k)))
        draw.text((24, top + 2), phrase, fill=(0, 0, 0))
    return np.asarray(canvas)

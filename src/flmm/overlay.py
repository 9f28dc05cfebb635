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


PANEL_COLUMNS = ("image", "target", "coarse", "refined")


def overlay_panel(rows: list[tuple], row_height: int = 192) -> np.ndarray:
    """One picture of several samples: a header naming the columns, then per sample its phrases
    (each in its mask colour) above ``overlay_row(image, mask_sets)``, scaled to ``row_height``.

    Args:
        rows: ``(image, phrases, mask_sets)`` per sample, ``mask_sets`` as for :func:`overlay_row`
            (``PANEL_COLUMNS`` names them when there are three: target, coarse, refined).
    """
    strips = [scaled_row(overlay_row(image, sets), image, row_height) for image, _, sets in rows]
    width = max(s.width for s in strips)
    height = LEGEND_ROW + sum(LEGEND_ROW + s.height for s in strips)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    panel = strips[0].width // (len(rows[0][2]) + 1)
    for c, name in enumerate(PANEL_COLUMNS[: len(rows[0][2]) + 1]):
        draw.text((c * panel + 4, 3), name, fill=(0, 0, 0))
    top = LEGEND_ROW
    for strip, (_, phrases, _) in zip(strips, rows):
        left = 4
        for k, phrase in enumerate(phrases):
            text = phrase if k == len(phrases) - 1 else f"{phrase} |"
            draw.text((left, top + 3), text, fill=tuple(int(c) for c in phrase_colour(k)))
            left += int(draw.textlength(text + " "))
        canvas.paste(strip, (0, top + LEGEND_ROW))
        top += LEGEND_ROW + strip.height
    return np.asarray(canvas)


def scaled_row(row: np.ndarray, image, row_height: int) -> Image.Image:
    """``row`` (panels of ``image``'s size side by side) resized to ``row_height``, each panel
    keeping the image's aspect; nearest-neighbour when enlarging, so mask edges stay crisp."""
    h, w = as_array(image, np.uint8).shape[:2]
    panel_width = max(1, round(w * row_height / h))
    size = (panel_width * (row.shape[1] // w), row_height)
    return Image.fromarray(row).resize(size, Image.NEAREST if row_height >= h else Image.BOX)

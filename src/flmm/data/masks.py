"""COCO segmentations (polygon, multi-polygon, RLE) to exact boolean masks, through pycocotools;
COCO panoptic id maps (``rgb2id``); boxes of masks, grown for crops, and a mask's largest
connected region; grounded phrases as JSON records (``phrase_record``)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Encode a COCO ``segmentation`` as one compressed RLE for an ``height x width`` image.

    Accepts a list of polygons ``[[x1, y1, x2, y2, ...], ...]`` (polygons with fewer than three
    points are dropped, as they cover nothing and pycocotools would read four numbers as a box),
    an uncompressed RLE (``counts`` a list) or a compressed RLE (``counts`` a string or bytes).
    """
    if isinstance(segmentation, list):
        check_polygons(segmentation)
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        check_rle(segmentation, height, width)
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return {"size": list(segmentation["size"]), "counts": segmentation["counts"]}
    raise ValueError(
        f"unsupported COCO segmentation {str(segmentation)[:60]}: expected a list of polygons "
        "or an RLE dict with 'counts' and 'size'"
    )


def check_polygons(polygons: list) -> None:
    """``ValueError`` unless ``polygons`` is a list of flat ``[x1, y1, x2, y2, ...]`` number lists."""
    for i, polygon in enumerate(polygons):
        if not isinstance(polygon, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon
        ):
            raise ValueError(f"polygon {i} is not a flat list of numbers")
        if len(polygon) % 2:
            raise ValueError(
                f"polygon {i} has an odd number of coordinates ({len(polygon)}); "
                "polygons are x, y pairs"
            )


def check_rle(rle: dict, height: int, width: int) -> None:
    """``ValueError`` (``TypeError`` for counts of another type) unless ``rle`` is a COCO RLE of
    an ``height x width`` image: its ``size`` is ``[height, width]`` and its run lengths (a list,
    or a compressed string) are whole numbers >= 0 adding up to ``height * width`` (pycocotools
    trusts both, and decodes a wrong one into a mask of another shape, or refuses it only when a
    sample is read)."""
    size = list(rle["size"]) if isinstance(rle["size"], (list, tuple)) else rle["size"]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} is not its image's [height, width] [{height}, {width}]")
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(_run_length(c) for c in counts):
            raise ValueError("RLE counts must be whole numbers >= 0")
    elif isinstance(counts, (str, bytes)):
        counts = compressed_counts(counts.encode() if isinstance(counts, str) else counts)
    else:
        raise TypeError(f"RLE counts is a {type(counts).__name__}, not a list or a string")
    if sum(counts) != height * width:
        raise ValueError(
            f"RLE counts cover {sum(counts)} pixels, not height x width = {height * width}"
        )


def _run_length(c) -> bool:
    whole = isinstance(c, int) and not isinstance(c, bool)
    return (whole or isinstance(c, float) and c.is_integer()) and c >= 0


def compressed_counts(counts: bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string, decoded as pycocotools' ``rleFrString``
    does (5 bits per character from ``'0'``, a continuation bit, runs after the second stored
    as differences); ``ValueError`` for a string that is not one."""
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        c = char - 48
        if not 0 <= c < 64:
            raise ValueError(f"RLE counts hold {chr(char)!r}, not part of a compressed RLE")
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            if shift > 60:
                raise ValueError("RLE counts hold a run length longer than 64 bits")
            continue
        if c & 0x10:
            value -= 1 << shift  # sign-extend
        value += runs[-2] if len(runs) > 2 else 0
        if value < 0:
            raise ValueError("RLE counts decode to a negative run length")
        runs.append(value)
        value = shift = 0
    if shift:
        raise ValueError("RLE counts end in the middle of a run length")
    return runs


def rle_area(rle: dict) -> int:
    """Number of foreground pixels of a compressed RLE, without decoding it."""
    return int(mask_utils.area(rle))


def decode_rle(rle: dict) -> np.ndarray:
    """Decode a compressed RLE to an ``H x W`` bool mask."""
    return mask_utils.decode(rle).astype(bool)


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` to an ``height x width`` bool mask (pixel-exact)."""
    return decode_rle(segmentation_to_rle(segmentation, height, width))


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode an ``H x W`` bool mask as a JSON-ready compressed RLE (``counts`` a str)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` box of an ``H x W`` bool mask (zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]


def phrase_record(text: str, span: tuple[int, int], mask: np.ndarray) -> dict:
    """A grounded phrase as JSON (``flmm predict``, the web page's download): its ``text``,
    character ``span``, COCO ``box`` ``[x, y, w, h]`` and ``area`` of the ``H x W`` bool ``mask``
    (pixels), and the ``mask`` as compressed RLE (:func:`mask_to_rle`)."""
    return {
        "text": text,
        "span": [int(i) for i in span],
        "box": [int(v) for v in mask_to_bbox(mask)],
        "area": int(mask.sum()),
        "mask": mask_to_rle(mask),
    }


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic id of each pixel of an ``H x W x 3`` uint8 id map: ``R + 256 G + 256^2 B``."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb2id`: ``H x W`` ids (below 256^3) to an ``H x W x 3`` uint8 id map."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (end-exclusive) of the True pixels of a non-empty ``H x W`` mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def expand_box(
    box: tuple[int, int, int, int], size: tuple[int, int], ratio: float = 0.1, min_pad: int = 4
) -> tuple[int, int, int, int]:
    """Grow ``box`` by ``ratio`` of its side (at least ``min_pad`` px), clipped to ``(H, W)``."""
    x0, y0, x1, y1 = box
    px = max(min_pad, round((x1 - x0) * ratio))
    py = max(min_pad, round((y1 - y0) * ratio))
    height, width = size
    return max(0, x0 - px), max(0, y0 - py), min(width, x1 + px), min(height, y1 + py)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean ``H x W`` mask (all False if it is empty):
    what a crop around a predicted mask should hold, without the specks SAM leaves elsewhere."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))

"""Small Panoptic Narrative Grounding fixtures in the exact on-disk formats of its release.

:func:`write_png_fixture` writes ``root/annotations/png_coco_<split>.json`` (narratives with
string image ids and string segment ids, as released), ``panoptic_<split>.json`` (COCO panoptic:
images, annotations with ``segments_info``, categories with ``isthing``), the RGB id maps under
``annotations/panoptic_segmentation/<split>/`` (ids above 255 and 65535, so all three channels
matter) and ``images/<split>/``: an RGB JPEG, a grayscale and an RGBA PNG, a corrupt and a
missing image; a plural segment naming two instances, stuff, a segment never grounded, one
naming an unknown segment id, one of zero area, a narrative with nothing grounded, one whose
image has no panoptic entry; splits train2017 and val2017. It returns the source masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 18, "name": "dog", "supercategory": "animal", "isthing": 1, "color": [0, 0, 142]},
    {"id": 187, "name": "sky", "supercategory": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 193, "name": "grass", "supercategory": "plant", "isthing": 0, "color": [0, 128, 0]},
]
# image id: (split, file name, height, width, PIL mode or "corrupt" / "missing")
IMAGES = {
    139: ("val2017", "000000000139.jpg", 30, 40, "RGB"),
    285: ("val2017", "000000000285.png", 24, 24, "L"),
    632: ("val2017", "000000000632.png", 20, 28, "RGBA"),
    724: ("val2017", "000000000724.jpg", 16, 16, "corrupt"),
    776: ("val2017", "000000000776.jpg", 16, 16, "missing"),
    9: ("train2017", "000000000009.jpg", 18, 22, "RGB"),
}
# image id: {segment id: (category id, rows, cols)}; the rest of the image is id 0 (void)
SEGMENTS = {
    139: {
        3: (1, slice(5, 25), slice(2, 12)),
        300: (1, slice(8, 28), slice(15, 22)),
        70000: (187, slice(0, 5), slice(0, 40)),
    },
    285: {7: (18, slice(4, 20), slice(3, 15)), 66051: (193, slice(20, 24), slice(0, 24))},
    632: {12: (1, slice(2, 18), slice(4, 9))},
    724: {1: (1, slice(1, 9), slice(1, 9))},
    776: {1: (1, slice(1, 9), slice(1, 9))},
    9: {
        40: (1, slice(0, 9), slice(0, 11)),
        41: (18, slice(9, 18), slice(11, 22)),
        131072: (193, slice(9, 18), slice(0, 11)),
    },
}
ZERO_AREA = {285: {5: 193}}  # listed in segments_info with area 0, absent from the id map


def _seg(utterance: str, ids=(), plural=False, noun=None) -> dict:
    noun = bool(ids) if noun is None else noun
    return {
        "utterance": utterance,
        "segment_ids": [str(i) for i in ids],
        "plural": plural,
        "noun": noun,
    }


NARRATIVES = {
    "val2017": [
        (
            139,
            [
                _seg("In this image we can see"),
                _seg("two people", [3, 300], plural=True),
                _seg("standing and"),
                _seg("a dog", noun=True),
                _seg("under"),
                _seg("the sky", [70000]),
                _seg("."),
            ],
        ),
        (
            285,
            [
                _seg("A bear", [7]),
                _seg("and"),
                _seg("something", [999]),
                _seg("on"),
                _seg("the grass", [5]),
            ],
        ),
        (632, [_seg("This is a picture of nothing in particular.")]),
        (632, [_seg("a person", [12]), _seg("in a room")]),
        (724, [_seg("a broken picture of"), _seg("someone", [1])]),
        (776, [_seg("a lost picture of"), _seg("someone", [1])]),
        (424242, [_seg("an image nobody has", [1])]),
    ],
    "train2017": [
        (
            9,
            [
                _seg("a man", [40]),
                _seg("with"),
                _seg("his dog", [41]),
                _seg("on"),
                _seg("the lawn", [131072]),
            ],
        ),
    ],
}


def id_map(image_id: int) -> np.ndarray:
    """``H x W`` int panoptic ids of an image (0 where no segment)."""
    _, _, h, w, _ = IMAGES[image_id]
    ids = np.zeros((h, w), dtype=np.int64)
    for seg_id, (_, rows, cols) in SEGMENTS[image_id].items():
        ids[rows, cols] = seg_id
    return ids


def _encode(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def _segments_info(image_id: int) -> list[dict]:
    ids = id_map(image_id)
    infos = []
    for seg_id, (cat, _, _) in SEGMENTS[image_id].items():
        ys, xs = np.nonzero(ids == seg_id)
        bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
        infos.append(
            {"id": seg_id, "category_id": cat, "iscrowd": 0, "bbox": bbox, "area": len(xs)}
        )
    for seg_id, cat in ZERO_AREA.get(image_id, {}).items():
        infos.append(
            {"id": seg_id, "category_id": cat, "iscrowd": 0, "bbox": [0, 0, 0, 0], "area": 0}
        )
    return infos


def _write_image(path: Path, h: int, w: int, mode: str, seed: int) -> None:
    if mode == "missing":
        return
    if mode == "corrupt":
        path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
        return
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


def write_png_fixture(root: str | Path) -> dict[int, dict[int, np.ndarray]]:
    """Write the fixture at ``root``; return image id -> segment id -> its bool mask."""
    root = Path(root)
    for split in ("train2017", "val2017"):
        (root / "annotations" / "panoptic_segmentation" / split).mkdir(parents=True)
        (root / "images" / split).mkdir(parents=True)
        ids = [i for i, info in IMAGES.items() if info[0] == split]
        images = [
            {"id": i, "file_name": IMAGES[i][1], "height": IMAGES[i][2], "width": IMAGES[i][3]}
            for i in ids
        ]
        annotations = [
            {"image_id": i, "file_name": f"{i:012d}.png", "segments_info": _segments_info(i)}
            for i in ids
        ]
        panoptic = {
            "info": {},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": CATEGORIES,
        }
        (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(panoptic))
        narratives = [
            {
                "image_id": str(i),
                "annotator_id": 0,
                "caption": " ".join(s["utterance"] for s in segs),
                "segments": segs,
            }
            for i, segs in NARRATIVES[split]
        ]
        (root / "annotations" / f"png_coco_{split}.json").write_text(json.dumps(narratives))
        for i in ids:
            _, name, h, w, mode = IMAGES[i]
            Image.fromarray(_encode(id_map(i))).save(
                root / "annotations" / "panoptic_segmentation" / split / f"{i:012d}.png"
            )
            _write_image(root / "images" / split / name, h, w, mode, seed=i)
    return {i: {s: id_map(i) == s for s in SEGMENTS[i]} for i in IMAGES}

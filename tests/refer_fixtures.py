"""Small ``refer``-layout fixtures in the exact on-disk formats of RefCOCO.

:func:`write_refer_fixture` writes ``root/refcoco/instances.json``, ``root/refcoco/refs(unc).p``
and ``root/images/`` holding: polygons, a multi-polygon, RLEs with compressed (string) and
uncompressed (list) counts, crowd regions, an RGB JPEG, a grayscale and an RGBA PNG, a corrupt
and a missing image, refs with several sentences, empty sentences and a zero-area mask, over the
splits train / val / testA / testB. It returns what a reader should find.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

IMAGES = {  # id: (file name, height, width, PIL mode or "corrupt" / "missing")
    1: ("COCO_train2014_000000000001.png", 40, 50, "RGB"),
    2: ("COCO_train2014_000000000002.png", 30, 30, "L"),
    3: ("COCO_train2014_000000000003.png", 24, 32, "RGBA"),
    4: ("COCO_train2014_000000000004.jpg", 36, 28, "RGB"),
    5: ("COCO_train2014_000000000005.jpg", 20, 20, "corrupt"),
    6: ("COCO_train2014_000000000006.jpg", 20, 20, "missing"),
}


def _blob(height: int, width: int, seed: int) -> np.ndarray:
    """An irregular bool mask (a noisy ellipse), so RLE round trips are not trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    ellipse = ((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 4)) ** 2 <= 1
    return ellipse & (rng.random((height, width)) < 0.8)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO crowd-style RLE: ``counts`` a list of run lengths, column-major, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _annotations() -> tuple[list[dict], dict[int, np.ndarray]]:
    """COCO annotations, and the source bool mask of those written as RLE."""
    crowd_1, rle_21 = _blob(40, 50, 1), _blob(30, 30, 2)
    crowd_22, rle_42 = _blob(30, 30, 3), _blob(36, 28, 4)
    anns = [
        (11, 1, [[2.0, 3.0, 20.0, 3.0, 20.0, 25.0, 2.0, 25.0]], 0),
        (
            12,
            1,
            [[25.0, 2.0, 35.0, 2.0, 30.0, 12.0], [36.5, 20.2, 47.3, 21.8, 44.0, 35.6, 38.1, 33.0]],
            0,
        ),  # multi-polygon
        (13, 1, _uncompressed_rle(crowd_1), 1),
        (14, 1, [[0.0, 30.0, 10.0, 30.0, 10.0, 39.0]], 0),  # never referred
        (21, 2, _compressed_rle(rle_21), 0),
        (22, 2, _uncompressed_rle(crowd_22), 1),
        (31, 3, [[4.0, 4.0, 28.0, 4.0, 16.0, 20.0]], 0),
        (32, 3, [[5.0, 5.0, 10.0, 5.0, 15.0, 5.0]], 0),  # collinear: zero area
        (41, 4, [[1.0, 1.0, 20.0, 1.0, 20.0, 30.0, 1.0, 30.0]], 0),
        (42, 4, _compressed_rle(rle_42), 0),
        (51, 5, [[1.0, 1.0, 10.0, 1.0, 10.0, 10.0]], 0),
        (61, 6, [[1.0, 1.0, 10.0, 1.0, 10.0, 10.0]], 0),
    ]
    records = [
        {
            "id": i,
            "image_id": img,
            "category_id": 1,
            "segmentation": seg,
            "iscrowd": crowd,
            "area": 0.0,
            "bbox": [0.0, 0.0, 1.0, 1.0],
        }
        for i, img, seg, crowd in anns
    ]
    return records, {13: crowd_1, 21: rle_21, 22: crowd_22, 42: rle_42}


REFS = [  # ref_id, ann_id, image_id, split, sentences (raw)
    (1, 11, 1, "train", ["the left box", "box on the left side", "leftmost box"]),
    (2, 12, 1, "train", ["two triangles", "the pair of triangles"]),
    (3, 13, 1, "train", ["the crowd"]),
    (4, 21, 2, "train", ["the blob", "  "]),
    (5, 22, 2, "train", ["", " "]),
    (6, 31, 3, "train", ["the triangle."]),
    (7, 32, 3, "train", ["a line"]),
    (8, 41, 4, "val", ["the rectangle", "tall box"]),
    (9, 42, 4, "val", ["the noisy blob", "blob right", "grey thing"]),
    (10, 51, 5, "testA", ["broken image"]),
    (11, 61, 6, "testB", ["missing image"]),
]


def _refs() -> list[dict]:
    refs, sent_id = [], 100
    for ref_id, ann_id, image_id, split, raws in REFS:
        sentences = []
        for raw in raws:
            sent = raw.strip().lower()
            sentences.append({"raw": raw, "sent": sent, "tokens": sent.split(), "sent_id": sent_id})
            sent_id += 1
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": image_id,
                "category_id": 1,
                "split": split,
                "sent_ids": [s["sent_id"] for s in sentences],
                "sentences": sentences,
                "file_name": IMAGES[image_id][0].rsplit(".", 1)[0] + f"_{ann_id}.jpg",
            }
        )
    return refs


def _write_image(path: Path, height: int, width: int, mode: str, seed: int) -> None:
    if mode == "missing":
        return
    if mode == "corrupt":
        path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        return
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


def write_refer_fixture(root: str | Path, dataset: str = "refcoco", split_by: str = "unc") -> dict:
    """Write the fixture under ``root``; return ``{"image_dir", "rle_sources"}``.

    ``rle_sources`` maps the ids of annotations stored as RLE to the bool masks they encode.
    """
    root = Path(root)
    (root / dataset).mkdir(parents=True)
    (root / "images").mkdir()
    anns, sources = _annotations()
    images = [
        {"id": i, "file_name": name, "height": h, "width": w}
        for i, (name, h, w, _) in IMAGES.items()
    ]
    categories = [{"id": 1, "name": "thing", "supercategory": "thing"}]
    instances = {"images": images, "annotations": anns, "categories": categories}
    (root / dataset / "instances.json").write_text(json.dumps(instances))
    with open(root / dataset / f"refs({split_by}).p", "wb") as f:
        pickle.dump(_refs(), f)
    for i, (name, h, w, mode) in IMAGES.items():
        _write_image(root / "images" / name, h, w, mode, seed=i)
    return {"image_dir": root / "images", "rle_sources": sources}

"""The synthetic world also in the Panoptic Narrative Grounding layout: one narrative per scene.

Written beside the refer layout, from its ``instances.json`` (objects' attributes and exact RLE
masks) and ``world.json`` (how many scenes each split holds), so it adds files and changes none::

    root/panoptic_narrative_grounding/annotations/png_coco_<split>.json
    root/panoptic_narrative_grounding/annotations/panoptic_<split>.json
    root/panoptic_narrative_grounding/annotations/panoptic_segmentation/<split>/%012d.png
    root/panoptic_narrative_grounding/images/<split>/synthetic_%06d.png   (hard links)

with ``<split>`` = train2017 / val2017 / test2017 for the world's train / val / test scenes.
Each scene's narrative names every object once: objects sharing colour and shape form one plural
segment ("two red circles"), the others a singular one ("a small blue square"); the background
is a stuff segment. Segment ids: the background 1, each object its annotation id + 1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from flmm.data.masks import decode_rle, id2rgb, mask_to_bbox

PNG_DIR = "panoptic_narrative_grounding"
PNG_SPLITS = {"train": "train2017", "val": "val2017", "test": "test2017"}
BACKGROUND_ID, BACKGROUND_CATEGORY = 1, 100
COUNTS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _phrase(group: list[dict]) -> tuple[str, bool]:
    attrs = group[0]["attributes"]
    if len(group) == 1:
        return f"a {attrs['size']} {attrs['colour']} {attrs['shape']}", False
    plural = {"cross": "crosses"}.get(attrs["shape"], attrs["shape"] + "s")
    return f"{COUNTS[len(group)]} {attrs['colour']} {plural}", True


def narrative_segments(anns: list[dict]) -> list[dict]:
    """PNG segments (``utterance``, ``segment_ids``, ``plural``, ``noun``) naming ``anns``."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for ann in anns:
        groups.setdefault((ann["attributes"]["colour"], ann["attributes"]["shape"]), []).append(ann)
    segments = [_segment("In this picture we can see")]
    for k, group in enumerate(groups.values()):
        if k:
            segments.append(_segment("and" if k == len(groups) - 1 else ","))
        text, plural = _phrase(group)
        segments.append(_segment(text, [a["id"] + 1 for a in group], plural))
    segments += [_segment("on"), _segment("a light background", [BACKGROUND_ID]), _segment(".")]
    return segments


def _segment(utterance: str, ids: list[int] | None = None, plural: bool = False) -> dict:
    ids = ids or []
    return {"utterance": utterance, "segment_ids": ids, "plural": plural, "noun": bool(ids)}


def _id_map(image: dict, anns: list[dict]) -> np.ndarray:
    ids = np.full((image["height"], image["width"]), BACKGROUND_ID, dtype=np.int64)
    for ann in anns:
        ids[decode_rle(ann["segmentation"])] = ann["id"] + 1
    return ids


def _segments_info(ids: np.ndarray, anns: list[dict]) -> list[dict]:
    cats = {BACKGROUND_ID: BACKGROUND_CATEGORY, **{a["id"] + 1: a["category_id"] for a in anns}}
    return [
        {
            "id": seg_id,
            "category_id": cat,
            "iscrowd": 0,
            "bbox": mask_to_bbox(ids == seg_id),
            "area": int((ids == seg_id).sum()),
        }
        for seg_id, cat in cats.items()
    ]


def _split_of(image_id: int, manifest: dict) -> str:
    if image_id <= manifest["n_train"]:
        return "train"
    return "val" if image_id <= manifest["n_train"] + manifest["n_val"] else "test"


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_png_layout(world_root: str | Path, dataset: str = "synthetic") -> Path:
    """Write the PNG layout of the world at ``world_root`` (module docstring); return its root."""
    world_root = Path(world_root)
    instances = json.loads((world_root / dataset / "instances.json").read_text())
    manifest = json.loads((world_root / dataset / "world.json").read_text())
    things = [{**c, "isthing": 1} for c in instances["categories"]]
    stuff = [{"id": BACKGROUND_CATEGORY, "name": "background", "supercategory": "background"}]
    categories = things + [{**stuff[0], "isthing": 0}]
    anns_by_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    tmp = world_root / f".{PNG_DIR}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        files = {s: {"images": [], "annotations": [], "narratives": []} for s in PNG_SPLITS}
        for split, folder in PNG_SPLITS.items():
            (tmp / "annotations" / "panoptic_segmentation" / folder).mkdir(parents=True)
            (tmp / "images" / folder).mkdir(parents=True)
        for image in instances["images"]:
            split = _split_of(image["id"], manifest)
            _write_scene(tmp, world_root, image, anns_by_image.get(image["id"], []), split, files)
        for split, folder in PNG_SPLITS.items():
            panoptic = {k: files[split][k] for k in ("images", "annotations")}
            panoptic["categories"] = categories
            annotations = tmp / "annotations"
            (annotations / f"panoptic_{folder}.json").write_text(json.dumps(panoptic))
            narratives = json.dumps(files[split]["narratives"])
            (annotations / f"png_coco_{folder}.json").write_text(narratives)
        try:
            os.rename(tmp, world_root / PNG_DIR)
        except OSError:
            if not (world_root / PNG_DIR).is_dir():  # else another process wrote it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return world_root / PNG_DIR


def _write_scene(
    out: Path, world_root: Path, image: dict, anns: list[dict], split: str, files: dict
) -> None:
    folder, name = PNG_SPLITS[split], f"{image['id']:012d}.png"
    ids = _id_map(image, anns)
    Image.fromarray(id2rgb(ids)).save(
        out / "annotations" / "panoptic_segmentation" / folder / name, compress_level=1
    )
    _link(world_root / "images" / image["file_name"], out / "images" / folder / image["file_name"])
    segments = narrative_segments(anns)
    caption = " ".join(s["utterance"] for s in segments)
    files[split]["images"].append(image)
    files[split]["annotations"].append(
        {"image_id": image["id"], "file_name": name, "segments_info": _segments_info(ids, anns)}
    )
    narrative = {"image_id": str(image["id"]), "caption": caption, "segments": segments}
    files[split]["narratives"].append(narrative)


def ensure_png_layout(world_root: str | Path) -> Path:
    """Write the PNG layout of an already written world unless it is there."""
    target = Path(world_root) / PNG_DIR
    return target if target.is_dir() else write_png_layout(world_root)

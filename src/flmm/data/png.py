"""Reader of Panoptic Narrative Grounding (PNG) in the layout of its release.

Layout::

    root/annotations/png_coco_<split>.json        narratives: image_id, caption, segments
                                                  [{utterance, segment_ids, plural, noun}]
    root/annotations/panoptic_<split>.json        COCO panoptic: images, annotations
                                                  (file_name, segments_info), categories (isthing)
    root/annotations/panoptic_segmentation/<split>/<file_name>   id maps: id = R + 256 G + 256^2 B
    root/images/<split>/<image file_name>

A narrative becomes one :class:`~flmm.types.GroundingSample`: the utterances joined by single
spaces (so every segment starts and ends on a word boundary and tokenises on its own), one phrase
per grounded segment (``noun`` and at least one segment id), its mask the union of the panoptic
segments it names. Each phrase is tagged ``plural`` (the narrative's flag) and ``thing`` (one of
its panoptic segments has a thing category), giving the PNG metric groups all / things / stuff /
singular / plural.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from flmm.data.datamodule import GroundingDataModule
from flmm.data.masks import rgb2id
from flmm.errors import ConfigError, DataError
from flmm.types import GroundingSample

log = logging.getLogger(__name__)

PROTOCOLS = ("train", "reference")
LAYOUT_HINT = (
    "expected the PNG layout root/annotations/{png_coco_<split>.json, panoptic_<split>.json, "
    "panoptic_segmentation/<split>/} + root/images/<split>/; point `paths.png_root=...` "
    "(or `data.root=...`) at the panoptic_narrative_grounding folder"
)


def png_paths(root: str | Path, split: str) -> dict[str, Path]:
    """Where the narratives, the panoptic json, the id maps and the images of ``split`` live."""
    root = Path(root)
    return {
        "narratives": root / "annotations" / f"png_coco_{split}.json",
        "panoptic": root / "annotations" / f"panoptic_{split}.json",
        "id_maps": root / "annotations" / "panoptic_segmentation" / split,
        "images": root / "images" / split,
    }


def check_png_layout(root: str | Path, split: str) -> dict[str, Path]:
    """The paths of ``split``; ``FileNotFoundError`` naming the first one that is missing."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"PNG data root {root} does not exist; {LAYOUT_HINT}")
    paths = png_paths(root, split)
    for key, path in paths.items():
        present = path.is_dir() if key in ("id_maps", "images") else path.is_file()
        if not present:
            raise FileNotFoundError(f"missing PNG {key} {path}; {LAYOUT_HINT}")
    return paths


@dataclass
class PNGAnnotations:
    """The parsed annotation files of one PNG split, loaded once.

    Attributes:
        narratives: the narratives, in file order.
        images: image id -> COCO image dict (``file_name``, ``height``, ``width``).
        panoptic: image id -> panoptic annotation (``file_name``, ``segments_info``).
        things: category id -> True for thing categories, False for stuff.
        paths: see :func:`png_paths`.
    """

    narratives: list[dict]
    images: dict[int, dict]
    panoptic: dict[int, dict]
    things: dict[int, bool]
    paths: dict[str, Path]


def load_png(root: str | Path, split: str = "val2017") -> PNGAnnotations:
    """Read ``png_coco_<split>.json`` and ``panoptic_<split>.json`` under ``root/annotations``."""
    paths = check_png_layout(root, split)
    files = {}
    for key in ("narratives", "panoptic"):
        try:
            files[key] = json.loads(paths[key].read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"PNG annotation file {paths[key]} is not valid JSON: {err}") from err
    panoptic = files["panoptic"]
    return PNGAnnotations(
        narratives=files["narratives"],
        images={img["id"]: img for img in panoptic["images"]},
        panoptic={int(a["image_id"]): a for a in panoptic["annotations"]},
        things={c["id"]: bool(c["isthing"]) for c in panoptic["categories"]},
        paths=paths,
    )


@dataclass
class _Phrase:
    segment: int  # index into the narrative's segments
    segment_ids: list[int]
    plural: bool
    thing: bool


@dataclass
class _Record:
    narrative: int  # index into PNGAnnotations.narratives
    image_id: int
    phrases: list[_Phrase]


class PNGDataset(Dataset):
    """PNG narratives of one split as grounding samples (module docstring).

    Args:
        root: the ``panoptic_narrative_grounding`` folder (``annotations/``, ``images/``).
        split: ``train2017`` or ``val2017``.
        protocol: ``train`` or ``reference`` (both: a narrative's grounded segments in one sample).
        max_phrases: at most this many phrases per sample; longer narratives give several.
        annotations: already loaded annotation files (skips reading them again).

    Unusable records are skipped and counted in ``skipped`` (reason -> count): a narrative whose
    image has no panoptic entry (``missing_image_entry``) or no grounded segment
    (``no_grounded_segment``); a grounded segment with an empty utterance
    (``empty_utterance``), a segment id absent from the image's ``segments_info``
    (``unknown_segment_id``) or zero total area (``empty_mask``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val2017",
        protocol: str = "reference",
        max_phrases: int | None = None,
        annotations: PNGAnnotations | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(
                f"PNG defines the protocols {PROTOCOLS}, got {protocol!r} (a narrative's segments "
                "are always grounded together)"
            )
        self.split, self.protocol = split, protocol
        self.ann = annotations if annotations is not None else load_png(root, split)
        self.skipped: Counter[str] = Counter()
        records = [r for i, n in enumerate(self.ann.narratives) if (r := self._record(i, n))]
        step = max_phrases or max((len(r.phrases) for r in records), default=1)
        self.records = [
            _Record(r.narrative, r.image_id, r.phrases[i : i + step])
            for r in records
            for i in range(0, len(r.phrases), step)
        ]
        if self.skipped:
            log.warning("PNG %s: skipped %s", split, dict(self.skipped))

    def _record(self, index: int, narrative: dict) -> _Record | None:
        image_id = int(narrative["image_id"])
        if image_id not in self.ann.images or image_id not in self.ann.panoptic:
            self.skipped["missing_image_entry"] += 1
            return None
        infos = {s["id"]: s for s in self.ann.panoptic[image_id]["segments_info"]}
        phrases = [
            p
            for k, segment in enumerate(narrative["segments"])
            if (p := self._phrase(k, segment, infos))
        ]
        if not phrases:
            self.skipped["no_grounded_segment"] += 1
            return None
        return _Record(index, image_id, phrases)

    def _phrase(self, k: int, segment: dict, infos: dict[int, dict]) -> _Phrase | None:
        ids = [int(i) for i in segment["segment_ids"]]
        if not segment.get("noun") or not ids:
            return None
        reason = None
        if not segment["utterance"].strip():
            reason = "empty_utterance"
        elif any(i not in infos for i in ids):
            reason = "unknown_segment_id"
        elif sum(infos[i].get("area", 1) for i in ids) == 0:
            reason = "empty_mask"
        if reason:
            self.skipped[reason] += 1
            return None
        thing = any(self.ann.things[infos[i]["category_id"]] for i in ids)
        return _Phrase(k, ids, bool(segment.get("plural", False)), thing)

    def __len__(self) -> int:
        return len(self.records)

    def _read_rgb(self, path: Path, where: str) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"missing {where} {path}; {LAYOUT_HINT}")
        try:
            with Image.open(path) as img:
                return np.array(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"corrupt or unreadable {where} {path}: {err}") from err

    def load_image(self, image_id: int, narrative: int) -> np.ndarray:
        """``H x W x 3`` uint8 RGB image (grayscale, palette and RGBA converted to RGB)."""
        info = self.ann.images[image_id]
        where = f"image (image_id {image_id}, narrative {narrative})"
        image = self._read_rgb(self.ann.paths["images"] / info["file_name"], where)
        self._check_size(image, info, where)
        return image

    def segment_ids(self, image_id: int, narrative: int) -> np.ndarray:
        """``H x W`` int64 panoptic segment id of every pixel, from the image's PNG id map."""
        panoptic = self.ann.panoptic[image_id]
        name = panoptic.get("file_name", f"{image_id:012d}.png")
        where = f"panoptic id map (image_id {image_id}, narrative {narrative})"
        ids = rgb2id(self._read_rgb(self.ann.paths["id_maps"] / name, where))
        self._check_size(ids, self.ann.images[image_id], where)
        return ids

    @staticmethod
    def _check_size(array: np.ndarray, info: dict, where: str) -> None:
        if array.shape[:2] != (info["height"], info["width"]):
            raise DataError(
                f"{where} is {array.shape[1]}x{array.shape[0]} but panoptic json says "
                f"{info['width']}x{info['height']}"
            )

    def __getitem__(self, index: int) -> GroundingSample:
        record = self.records[index]
        narrative = self.ann.narratives[record.narrative]
        text, spans = join_utterances([s["utterance"] for s in narrative["segments"]])
        ids = self.segment_ids(record.image_id, record.narrative)
        masks = np.stack([np.isin(ids, p.segment_ids) for p in record.phrases])
        for p, mask in zip(record.phrases, masks):
            if not mask.any():
                raise DataError(
                    f"segments {p.segment_ids} of narrative {record.narrative} (image_id "
                    f"{record.image_id}) cover no pixel of its panoptic id map, though "
                    "segments_info gives them an area: the id map and the json disagree"
                )
        meta = {
            "image_id": record.image_id,
            "narrative": record.narrative,
            "segment_ids": [p.segment_ids for p in record.phrases],
            "tags": [{"plural": p.plural, "thing": p.thing} for p in record.phrases],
            "png_groups": [png_groups(p.plural, p.thing) for p in record.phrases],
        }
        phrase_spans = [spans[p.segment] for p in record.phrases]
        return GroundingSample(
            self.load_image(record.image_id, record.narrative), text, phrase_spans, masks, meta
        )


def png_groups(plural: bool, thing: bool) -> list[str]:
    """The PNG metric groups of a phrase besides ``all``."""
    return ["plural" if plural else "singular", "things" if thing else "stuff"]


def join_utterances(utterances: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join utterances with single spaces; return the text and each stripped utterance's span."""
    text, spans = "", []
    for utterance in utterances:
        utterance = utterance.strip()
        if text and utterance:
            text += " "
        spans.append((len(text), len(text) + len(utterance)))
        text += utterance
    return text, spans


class PNGDataModule(GroundingDataModule):
    """Splits of Panoptic Narrative Grounding (evaluation split: ``val2017``).

    Args:
        root: the ``panoptic_narrative_grounding`` folder.
        **kwargs: splits, batch size, limits: see :class:`GroundingDataModule`.
    """

    name = "png"
    eval_protocols = ("reference",)

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str = "val2017",
        **kwargs,
    ) -> None:
        super().__init__(
            train_split=train_split, val_split=val_split, test_split=test_split, **kwargs
        )
        self.root = Path(root)
        self._annotations: dict[str, PNGAnnotations] = {}

    def prepare_data(self) -> None:
        """Fail fast, before any model loads, when a file or folder of a used split is missing."""
        self._check([self.train_split, *self.val_splits, *self.test_splits, *self.eval_splits])

    def prepare_eval(self) -> None:
        """As :meth:`prepare_data` for the evaluation splits only (no train split needed)."""
        self._check(self.eval_splits)

    def _check(self, splits: list[str]) -> None:
        for split in dict.fromkeys(splits):
            check_png_layout(self.root, split)

    def make_dataset(self, split: str, protocol: str) -> PNGDataset:
        if split not in self._annotations:
            self._annotations[split] = load_png(self.root, split)
        return PNGDataset(self.root, split, protocol, self.max_phrases, self._annotations[split])

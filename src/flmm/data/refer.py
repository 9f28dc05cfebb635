"""Reader of the ``refer`` on-disk layout (RefCOCO, RefCOCO+, RefCOCOg and the synthetic world).

Layout::

    root/<dataset>/instances.json      COCO: images, annotations (polygon or RLE), categories
    root/<dataset>/refs(<split_by>).p  pickled list of refs (ref_id, ann_id, image_id, split,
                                       sent_ids, sentences [{raw, sent, tokens, sent_id, ...}])
    image_dir/<file_name>              file_name from instances.json

Three protocols turn refs into :class:`~flmm.types.GroundingSample` s:

- ``train``: one sample per image, every referred object of the split with one sentence chosen at
  random once (seeded), the sentences joined as ``"sent1. sent2."``, one mask per object.
- ``reference``: as ``train`` with the first sentence of every object (F-LMM's evaluation).
- ``per_sentence``: one sample per (object, sentence) pair (LISA-style evaluation).
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

from flmm.data.masks import decode_rle, rle_area, segmentation_to_rle
from flmm.data.refs_file import load_refs
from flmm.errors import ConfigError, DataError
from flmm.types import GroundingSample

log = logging.getLogger(__name__)

PROTOCOLS = ("train", "reference", "per_sentence")
SENTENCE_KEYS = frozenset({"raw", "sent", "tokens", "sent_id"})
IMAGE_FIELDS = frozenset({"id", "file_name", "height", "width"})
ANN_FIELDS = frozenset({"id", "image_id", "segmentation"})
LAYOUT_HINT = (
    "expected the `refer` layout root/<dataset>/instances.json + "
    "root/<dataset>/refs(<split_by>).p; "
    "point `paths.refer_root=...` (or `data.root=...`) at the folder holding <dataset>/"
)


@dataclass
class ReferAnnotations:
    """The parsed annotation files of one ``<dataset>/refs(<split_by>)`` pair, loaded once.

    Attributes:
        images: image id -> COCO image dict (``file_name``, ``height``, ``width``).
        anns: annotation id -> COCO annotation dict.
        refs: the refs, in file order.
        anns_by_image: image id -> annotation ids of that image, in file order.
    """

    images: dict[int, dict]
    anns: dict[int, dict]
    refs: list[dict]
    anns_by_image: dict[int, list[int]]


def check_refer_layout(root: str | Path, dataset: str, split_by: str) -> tuple[Path, Path]:
    """The paths of the annotation files; ``FileNotFoundError`` naming the one that is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"refer data root {root} does not exist; {LAYOUT_HINT}")
    instances_path = root / dataset / "instances.json"
    refs_path = root / dataset / f"refs({split_by}).p"
    for path in (instances_path, refs_path):
        if not path.is_file():
            present = sorted(p.name for p in path.parent.glob("*")) if path.parent.is_dir() else []
            raise FileNotFoundError(
                f"missing annotation file {path} (that folder holds {present}); {LAYOUT_HINT}"
            )
    return instances_path, refs_path


def load_refer(
    root: str | Path, dataset: str = "refcoco", split_by: str = "unc"
) -> ReferAnnotations:
    """Read ``root/<dataset>/instances.json`` and ``root/<dataset>/refs(<split_by>).p``."""
    instances_path, refs_path = check_refer_layout(root, dataset, split_by)
    instances = load_instances(instances_path)
    refs = load_refs(refs_path)
    anns_by_image: dict[int, list[int]] = {}
    for ann in instances["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann["id"])
    return ReferAnnotations(
        images={img["id"]: img for img in instances["images"]},
        anns={ann["id"]: ann for ann in instances["annotations"]},
        refs=refs,
        anns_by_image=anns_by_image,
    )


def load_instances(path: Path) -> dict:
    """``instances.json`` as a dict with lists ``images`` and ``annotations`` of records with ids;
    anything else is a :class:`DataError` naming the file and what is wrong."""
    try:
        instances = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); download it again") from None
    if not isinstance(instances, dict):
        raise DataError(f"{path} holds a {type(instances).__name__}, not a COCO dict")
    for key, fields in (("images", IMAGE_FIELDS), ("annotations", ANN_FIELDS)):
        records = instances.get(key)
        if not isinstance(records, list):
            raise DataError(f"{path} has no list {key!r}; a COCO instances file needs one")
        for index, record in enumerate(records):
            if not isinstance(record, dict) or not fields <= record.keys():
                raise DataError(f"{path}: {key}[{index}] lacks one of {sorted(fields)}")
    return instances


def join_sentences(sentences: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join sentences as ``"sent1. sent2."`` and return the text and each sentence's span.

    A span covers the sentence without the full stop that closes it.
    """
    text, spans = "", []
    for sentence in sentences:
        sentence = sentence.strip().rstrip(".").rstrip()
        if text:
            text += " "
        spans.append((len(text), len(text) + len(sentence)))
        text += sentence + "."
    return text, spans


def _sentence_text(sentence: dict) -> str:
    return (sentence.get("sent") or sentence.get("raw") or "").strip().rstrip(".").strip()


@dataclass
class _Phrase:
    ref: dict
    sentence: dict


class ReferDataset(Dataset):
    """Referring-expression samples of one split of a ``refer``-layout dataset.

    Args:
        root: folder holding ``<dataset>/instances.json`` and ``<dataset>/refs(<split_by>).p``.
        image_dir: folder of the images named by ``file_name`` in ``instances.json``.
        dataset: ``refcoco``, ``refcoco+``, ``refcocog``, ``synthetic``...
        split_by: ``unc``, ``google``, ``umd``.
        split: ``train``, ``val``, ``testA``, ``testB``, ``test``.
        protocol: ``train``, ``reference`` or ``per_sentence`` (module docstring).
        seed: seeds the one-time choice of a sentence per object (``train``).
        max_phrases: at most this many objects per sample; an image with more objects gives
            several samples (``train`` and ``reference``).
        annotations: already loaded annotation files (skips reading them again).

    Refs that cannot be used are skipped and counted in ``skipped`` (reason -> count): every
    sentence empty (``empty_sentences``; single empty sentences count as ``empty_sentence``),
    zero-area mask (``empty_mask``), annotation or image entry missing from ``instances.json``,
    annotation of another image than the ref's (``annotation_of_another_image``).
    """

    def __init__(
        self,
        root: str | Path,
        image_dir: str | Path,
        dataset: str = "refcoco",
        split_by: str = "unc",
        split: str = "train",
        protocol: str = "train",
        seed: int = 0,
        max_phrases: int | None = None,
        annotations: ReferAnnotations | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.image_dir = Path(image_dir)
        self.instances_path = Path(root) / dataset / "instances.json"
        self.split, self.protocol = split, protocol
        self.ann = annotations if annotations is not None else load_refer(root, dataset, split_by)
        self.skipped: Counter[str] = Counter()
        self._rles: dict[int, dict] = {}
        phrases_by_ref = self._usable_refs([r for r in self.ann.refs if r["split"] == split])
        self.records = self._build_records(phrases_by_ref, np.random.default_rng(seed), max_phrases)
        if not self.records:
            log.warning("%s/%s split %r holds no usable refs", dataset, split_by, split)
        if self.skipped:
            log.warning("%s/%s split %r: skipped %s", dataset, split_by, split, dict(self.skipped))

    def _usable_refs(self, refs: list[dict]) -> list[tuple[dict, list[dict]]]:
        usable = []
        for ref in refs:
            sentences = [s for s in ref["sentences"] if _sentence_text(s)]
            if len(sentences) < len(ref["sentences"]):
                self.skipped["empty_sentence"] += len(ref["sentences"]) - len(sentences)
            reason = self._unusable(ref, sentences)
            if reason:
                self.skipped[reason] += 1
            else:
                usable.append((ref, sentences))
        return usable

    def _unusable(self, ref: dict, sentences: list[dict]) -> str | None:
        if not sentences:
            return "empty_sentences"
        if ref["image_id"] not in self.ann.images:
            return "missing_image_entry"
        if ref["ann_id"] not in self.ann.anns:
            return "missing_annotation"
        if self.ann.anns[ref["ann_id"]]["image_id"] != ref["image_id"]:
            return "annotation_of_another_image"
        if rle_area(self.annotation_rle(ref["ann_id"])) == 0:
            return "empty_mask"
        return None

    def _build_records(
        self, refs: list[tuple[dict, list[dict]]], rng: np.random.Generator, max_phrases: int | None
    ) -> list[list[_Phrase]]:
        if self.protocol == "per_sentence":
            return [[_Phrase(ref, s)] for ref, sentences in refs for s in sentences]
        by_image: dict[int, list[_Phrase]] = {}
        for ref, sentences in refs:
            pick = rng.integers(len(sentences)) if self.protocol == "train" else 0
            by_image.setdefault(ref["image_id"], []).append(_Phrase(ref, sentences[pick]))
        if max_phrases is None:
            return list(by_image.values())
        return [
            p[i : i + max_phrases] for p in by_image.values() for i in range(0, len(p), max_phrases)
        ]

    def __len__(self) -> int:
        return len(self.records)

    def annotation_rle(self, ann_id: int) -> dict:
        """Compressed RLE of annotation ``ann_id`` at its image's size (cached)."""
        if ann_id not in self._rles:
            ann = self.ann.anns[ann_id]
            image = self.ann.images[ann["image_id"]]
            height, width = image["height"], image["width"]
            try:
                self._rles[ann_id] = segmentation_to_rle(ann["segmentation"], height, width)
            except (ValueError, TypeError) as err:
                raise DataError(
                    f"{self.instances_path}: annotation {ann_id} (image_id {ann['image_id']}) has "
                    f"an unusable segmentation: {err}; fix or remove that annotation"
                ) from None
        return self._rles[ann_id]

    def annotation_mask(self, ann_id: int) -> np.ndarray:
        """``H x W`` bool mask of annotation ``ann_id``."""
        return decode_rle(self.annotation_rle(ann_id))

    def image_annotations(self, image_id: int) -> list[dict]:
        """Every COCO annotation of image ``image_id`` (referred or not)."""
        return [self.ann.anns[i] for i in self.ann.anns_by_image.get(image_id, [])]

    def load_image(self, image_id: int, ref_ids: list[int] | None = None) -> np.ndarray:
        """``H x W x 3`` uint8 RGB image (grayscale, palette and RGBA converted to RGB)."""
        info = self.ann.images[image_id]
        path = self.image_dir / info["file_name"]
        where = f"image {path} (image_id {image_id}, refs {ref_ids})"
        if not path.is_file():
            raise FileNotFoundError(f"missing {where}; point `data.image_dir=...` at the images")
        try:
            with Image.open(path) as img:
                image = np.array(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"corrupt or unreadable {where}: {err}") from err
        if image.shape[:2] != (info["height"], info["width"]):
            raise DataError(
                f"{where} is {image.shape[1]}x{image.shape[0]} but instances.json says "
                f"{info['width']}x{info['height']}"
            )
        return image

    def __getitem__(self, index: int) -> GroundingSample:
        phrases = self.records[index]
        image_id = phrases[0].ref["image_id"]
        ref_ids = [p.ref["ref_id"] for p in phrases]
        text, spans = join_sentences([_sentence_text(p.sentence) for p in phrases])
        masks = np.stack([self.annotation_mask(p.ref["ann_id"]) for p in phrases])
        meta = {
            "image_id": image_id,
            "ref_ids": ref_ids,
            "ann_ids": [p.ref["ann_id"] for p in phrases],
            "sent_ids": [p.sentence.get("sent_id") for p in phrases],
            "tags": [
                {k: v for k, v in p.sentence.items() if k not in SENTENCE_KEYS} for p in phrases
            ],
        }
        return GroundingSample(self.load_image(image_id, ref_ids), text, spans, masks, meta)

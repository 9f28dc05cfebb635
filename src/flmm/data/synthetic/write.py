"""Write the synthetic world in the ``refer`` layout, so the ordinary reader loads it.

::

    root/synthetic/instances.json   COCO; each annotation also holds ``attributes``
                                    {shape, colour, size}; segmentations are exact RLEs
    root/synthetic/refs(unc).p      splits train/val/test; 1-3 sentences per object, each
                                    sentence dict also holds ``kind`` and ``colour_resolvable``
    root/synthetic/world.json       the generation parameters, written last
    root/images/synthetic_%06d.png
    root/panoptic_narrative_grounding/  the same scenes as PNG narratives (narratives.py)
    root/pope/pope_*.json           POPE question sets of the test split (pope.py)
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from flmm.data.datamodule import ReferDataModule
from flmm.data.masks import mask_to_bbox, mask_to_rle
from flmm.data.png import PNGDataModule
from flmm.data.refer import ReferDataset
from flmm.data.synthetic.corpus import words
from flmm.data.synthetic.expressions import Expression, sample_expressions
from flmm.data.synthetic.narratives import PNG_DIR, ensure_png_layout, write_png_layout
from flmm.data.synthetic.pope import write_pope
from flmm.data.synthetic.world import SHAPES, Scene, sample_scene
from flmm.files import home_or, locked
from flmm.types import GroundingSample

DATASET, SPLIT_BY = "synthetic", "unc"
SPLITS = ("train", "val", "test")


class _Writer:
    """Accumulates images, annotations and refs with running ids."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.refs: list[dict] = []
        self.n_sentences = 0

    def add(self, scene: Scene, split: str, rng: np.random.Generator) -> None:
        image_id = len(self.images) + 1
        file_name = f"synthetic_{image_id:06d}.png"
        Image.fromarray(scene.image).save(self.root / "images" / file_name, compress_level=1)
        h, w = scene.image.shape[:2]
        self.images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for t, obj in enumerate(scene.objects):
            ann_id = len(self.annotations) + 1
            self.annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": SHAPES.index(obj.shape) + 1,
                    "segmentation": mask_to_rle(obj.mask),
                    "area": int(obj.mask.sum()),
                    "bbox": mask_to_bbox(obj.mask),
                    "iscrowd": 0,
                    "attributes": {"shape": obj.shape, "colour": obj.colour, "size": obj.size},
                }
            )
            expressions = sample_expressions(scene, t, rng, int(rng.integers(1, 4)))
            if expressions:
                self._add_ref(expressions, self.annotations[-1], split, file_name)

    def _add_ref(
        self, expressions: list[Expression], ann: dict, split: str, file_name: str
    ) -> None:
        sentences = []
        for e in expressions:
            self.n_sentences += 1
            sentences.append(
                {
                    "raw": e.text,
                    "sent": e.text,
                    "tokens": words(e.text),
                    "sent_id": self.n_sentences,
                    "kind": e.kind,
                    "colour_resolvable": e.colour_resolvable,
                }
            )
        self.refs.append(
            {
                "ref_id": len(self.refs) + 1,
                "ann_id": ann["id"],
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "split": split,
                "sent_ids": [s["sent_id"] for s in sentences],
                "sentences": sentences,
                "file_name": file_name.replace(".png", f"_{ann['id']}.png"),
            }
        )

    def finish(self, manifest: dict) -> None:
        categories = [
            {"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)
        ]
        instances = {
            "images": self.images,
            "annotations": self.annotations,
            "categories": categories,
        }
        folder = self.root / DATASET
        (folder / "instances.json").write_text(json.dumps(instances))
        with open(folder / f"refs({SPLIT_BY}).p", "wb") as f:
            pickle.dump(self.refs, f, protocol=4)
        (folder / "world.json").write_text(json.dumps(manifest, indent=1))


def world_spec(n_train: int, n_val: int, n_test: int, seed: int, image_size: int) -> dict:
    """What identifies a world (its ``world.json``): split sizes, seed and image size."""
    return {
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
        "image_size": image_size,
    }


def write_world(
    root: str | Path, n_train: int, n_val: int, n_test: int, seed: int = 0, image_size: int = 96
) -> Path:
    """Generate the world and write it at ``root`` atomically (built beside it, then renamed).

    Each split draws from its own generator ``default_rng([seed, split_index])``, so the val and
    test scenes do not depend on ``n_train``. Raises ``FileExistsError`` if ``root`` exists.
    """
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} exists; remove it or write the world elsewhere")
    manifest = world_spec(n_train, n_val, n_test, seed, image_size)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "images").mkdir(parents=True)
        (tmp / DATASET).mkdir()
        writer = _Writer(tmp)
        for k, (split, n) in enumerate(zip(SPLITS, (n_train, n_val, n_test))):
            rng = np.random.default_rng([seed, k])
            for _ in range(n):
                writer.add(sample_scene(rng, image_size), split, rng)
        writer.finish(manifest)
        write_png_layout(tmp)
        write_pope(tmp, seed=seed)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_world(
    root: str | Path, n_train: int, n_val: int, n_test: int, seed: int = 0, image_size: int = 96
) -> Path:
    """Write the world at ``root`` unless the same world (same parameters) is already there."""
    root = Path(root)
    wanted = world_spec(n_train, n_val, n_test, seed, image_size)
    if _manifest(root) == wanted and (root / PNG_DIR).is_dir():
        return root  # written whole (renamed into place): reading it needs no lock, nor a write
    # concurrent jobs (ranks, sweep points) write it once
    with locked(root, home_or(root, "paths.world_dir")):
        if not root.exists():
            return write_world(root, n_train, n_val, n_test, seed, image_size)
        found = _manifest(root)
        if found != wanted:
            raise FileExistsError(
                f"{root} holds a different synthetic world ({found}) than asked for ({wanted}); "
                "delete it or choose another `data.root=...`"
            )
        ensure_png_layout(root)  # worlds written before the PNG layout existed gain it here
    return root


def _manifest(root: Path) -> dict | None:
    """The parameters of the world written at ``root`` (None if there is none)."""
    path = root / DATASET / "world.json"
    return json.loads(path.read_text()) if path.is_file() else None


def attribute_oracle_masks(
    dataset: ReferDataset, sample: GroundingSample, attribute: str
) -> np.ndarray:
    """``K x H x W`` bool: per phrase, the union of the image's objects sharing the target's
    ``attribute`` (``colour``, ``shape`` or ``size``): what perfect single-attribute grounding
    would predict. Needs the ``attributes`` that :func:`write_world` stores in annotations."""
    image_anns = dataset.image_annotations(sample.meta["image_id"])
    out = []
    for ann_id in sample.meta["ann_ids"]:
        value = dataset.ann.anns[ann_id]["attributes"][attribute]
        same = [a["id"] for a in image_anns if a["attributes"][attribute] == value]
        out.append(np.any([dataset.annotation_mask(i) for i in same], axis=0))
    return np.stack(out)


class SyntheticDataModule(ReferDataModule):
    """:class:`ReferDataModule` over the synthetic world, written in ``prepare_data`` if missing.

    Args:
        root: where the world lives (``root/synthetic``, ``root/images``).
        n_train / n_val / n_test: scenes per split; world_seed, image_size: generation.
        **kwargs: passed on to :class:`ReferDataModule` (batch_size, val_protocol, seed...).
    """

    def __init__(
        self,
        root: str | Path,
        n_train: int = 2000,
        n_val: int = 200,
        n_test: int = 200,
        world_seed: int = 0,
        image_size: int = 96,
        **kwargs,
    ) -> None:
        super().__init__(root, Path(root) / "images", dataset=DATASET, split_by=SPLIT_BY, **kwargs)
        self.world = world_spec(n_train, n_val, n_test, world_seed, image_size)

    def prepare_data(self) -> None:
        ensure_world(self.root, **self.world)
        super().prepare_data()


class SyntheticPNGDataModule(PNGDataModule):
    """:class:`PNGDataModule` over the synthetic world's PNG layout, written first if missing.

    Args:
        world_root: the synthetic world's folder (its PNG layout lives in
            ``world_root/panoptic_narrative_grounding``).
        n_train / n_val / n_test, world_seed, image_size: the world (as ``data=synthetic``).
        **kwargs: passed on to :class:`PNGDataModule` (splits train2017 / val2017 / test2017).
    """

    def __init__(
        self,
        world_root: str | Path,
        n_train: int = 700,
        n_val: int = 200,
        n_test: int = 400,
        world_seed: int = 0,
        image_size: int = 96,
        **kwargs,
    ) -> None:
        super().__init__(Path(world_root) / PNG_DIR, **kwargs)
        self.world_root = Path(world_root)
        self.world = world_spec(n_train, n_val, n_test, world_seed, image_size)

    def prepare_data(self) -> None:
        ensure_world(self.world_root, **self.world)
        super().prepare_data()

    def prepare_eval(self) -> None:
        ensure_world(self.world_root, **self.world)
        super().prepare_eval()

"""POPE question sets for the synthetic world's test split, in POPE's own layout.

::

    root/pope/pope_random.json        JSON lines {question_id, image, text, label}
    root/pope/pope_popular.json       images are file names under root/images
    root/pope/pope_adversarial.json

An object is a colour and a shape ("red circle"), the way the tiny LLaVA was taught to answer
"is there a red circle?". Per image, up to ``per_label`` present objects give "yes" questions and
as many absent objects give "no" questions (yes and no alternate). As POPE defines them, the
absent objects are drawn uniformly (random), taken from the objects present in the most test
images (popular), or from the objects that co-occur most often with the image's present objects
(adversarial). The world's own generators are not touched: sampling uses its own RNG stream.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from flmm.data.refs_file import load_refs
from flmm.data.synthetic.streams import Stream
from flmm.data.synthetic.world import COLOURS, SHAPES

STRATEGIES = ("random", "popular", "adversarial")
CATEGORIES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


def pope_question(obj: str) -> str:
    """POPE's question about ``obj``: "Is there a red circle in the image?"."""
    article = "an" if obj[0] in "aeiou" else "a"
    return f"Is there {article} {obj} in the image?"


NEGATIVE_KINDS = ("binding", "colour", "shape", "neither")


def negative_kind(asked: str, present: list[str]) -> str:
    """What an absent "colour shape" object shares with the scene's ``present`` ones: "binding"
    (its colour on one object, its shape on another), "colour", "shape" or "neither". Telling a
    "binding" or a "colour" negative from the scene takes the shapes of the objects of that colour."""
    colour, shape = asked.split()
    colours, shapes = {p.split()[0] for p in present}, {p.split()[1] for p in present}
    if colour in colours:
        return "binding" if shape in shapes else "colour"
    return "shape" if shape in shapes else "neither"


def false_yes_by_kind(
    questions: list[tuple[str, str, str]], answers: list[str], objects: dict[str, list[str]]
) -> dict[str, dict[str, float]]:
    """Per :func:`negative_kind`, how many "no" questions there are and the share answered "yes".

    ``questions``: ``(image, asked object, label)``; ``answers``: the parsed "yes" / "no" of each;
    ``objects``: :func:`split_objects`."""
    said: dict[str, list[bool]] = {kind: [] for kind in NEGATIVE_KINDS}
    for (image, asked, label), answer in zip(questions, answers, strict=True):
        if label == "no":
            said[negative_kind(asked, objects[image])].append(answer == "yes")
    return {
        kind: {"n": len(v), "false_yes": round(float(np.mean(v)), 4) if v else None}
        for kind, v in said.items()
    }


def split_objects(root: str | Path, split: str = "test") -> dict[str, list[str]]:
    """``image file name -> objects ("colour shape", sorted, distinct)`` for images of ``split``,
    read from the world written at ``root`` (its ``instances.json`` and ``refs(unc).p``)."""
    scenes = split_attributes(root, split)
    return {
        name: sorted({f"{a['colour']} {a['shape']}" for a in objects})
        for name, objects in scenes.items()
    }


def split_attributes(root: str | Path, split: str = "test") -> dict[str, list[dict[str, str]]]:
    """``image file name -> attributes ({shape, colour, size}) of each of its objects`` for the
    images of ``split`` (in image id order) of the world written at ``root``."""
    folder = Path(root) / "synthetic"
    if not (folder / "instances.json").is_file():
        raise FileNotFoundError(f"no synthetic world at {str(root)!r} (synthetic/instances.json)")
    instances = json.loads((folder / "instances.json").read_text())
    wanted = {r["image_id"] for r in load_refs(folder / "refs(unc).p") if r["split"] == split}
    objects: dict[int, list[dict[str, str]]] = {i: [] for i in wanted}
    for ann in instances["annotations"]:
        if ann["image_id"] in objects:
            objects[ann["image_id"]].append(ann["attributes"])
    names = {img["id"]: img["file_name"] for img in instances["images"]}
    return {names[i]: objects[i] for i in sorted(objects)}


def absent_ranked(present: list[str], strategy: str, frequency: Counter, cooc: Counter) -> list:
    """Absent objects, best first, for the deterministic strategies (ties: frequency, name)."""
    absent = [c for c in CATEGORIES if c not in present]
    if strategy == "popular":
        return sorted(absent, key=lambda c: (-frequency[c], c))
    together = {c: sum(cooc[p, c] for p in present) for c in absent}
    return sorted(absent, key=lambda c: (-together[c], -frequency[c], c))


def pope_sets(
    objects: dict[str, list[str]], per_label: int = 3, seed: int = 0
) -> dict[str, list[dict]]:
    """The three POPE question sets (``strategy -> rows``) for ``image -> present objects``.

    The "yes" objects of an image are the same in all three sets.
    """
    rng = np.random.default_rng([seed, Stream.POPE])
    frequency = Counter(o for present in objects.values() for o in present)
    cooc = Counter((a, b) for p in objects.values() for a in p for b in p if a != b)
    sets: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    for image, present in objects.items():
        n = min(per_label, len(present))
        yes = [present[i] for i in rng.permutation(len(present))[:n]]
        absent = [c for c in CATEGORIES if c not in present]
        no = {"random": [absent[i] for i in rng.permutation(len(absent))[:n]]}
        for strategy in ("popular", "adversarial"):
            no[strategy] = absent_ranked(present, strategy, frequency, cooc)[:n]
        for strategy, rows in sets.items():
            for y, x in zip(yes, no[strategy]):
                for obj, label in ((y, "yes"), (x, "no")):
                    rows.append(
                        {
                            "question_id": len(rows) + 1,
                            "image": image,
                            "text": pope_question(obj),
                            "label": label,
                        }
                    )
    return sets


def write_pope(root: str | Path, per_label: int = 3, seed: int = 0) -> Path:
    """Write ``root/pope/pope_{random,popular,adversarial}.json`` for the world at ``root``'s
    test split (atomically: built beside, then renamed); returns the folder."""
    out = Path(root) / "pope"
    tmp = out.parent / f".pope.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for strategy, rows in pope_sets(split_objects(root), per_label, seed).items():
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (tmp / f"pope_{strategy}.json").write_text(text)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_pope(root: str | Path) -> Path:
    """The POPE folder of the world at ``root``, written first (with the world's seed) if the
    world predates it."""
    out, manifest = Path(root) / "pope", Path(root) / "synthetic" / "world.json"
    if out.is_dir():
        return out
    if not manifest.is_file():
        raise FileNotFoundError(
            f"no synthetic world at {str(root)!r} (synthetic/world.json is missing); run "
            "`python -m flmm.train` once to write it, or set pope_dir=... to POPE files"
        )
    try:
        return write_pope(root, seed=json.loads(manifest.read_text())["seed"])
    except OSError:
        if out.is_dir():  # another process wrote it first
            return out
        raise

"""ReasonSeg-style evaluation: the LMM answers the query, then F-LMM segments what it named.

Data layout (ReasonSeg's, as released with LISA): one folder per split holding ``NAME.jpg`` and
``NAME.json`` with ``text`` (list of queries), ``is_sentence`` (bool) and ``shapes``
(``[{"label": "target" | "ignore" | "flag", "points": [[x, y], ...]}]``, polygons). The target mask
is the union of the ``target`` polygons; ``ignore`` pixels are left out of the scores (polygons are
drawn largest first, so a smaller one on top wins); ``flag`` shapes are deprecated and skipped.
gIoU is the mean per-query IoU (1 when prediction and target are both empty), cIoU is the summed
intersection over the summed union.

`python -m flmm.chat.reasonseg DIR [--limit N] [--relevant-object] [--output results.json]` (model
options as in `python -m flmm.chat.ground`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from flmm.chat.conversation import ChatResult, GroundedChat
from flmm.chat.options import add_model_args, load_chat
from flmm.errors import DataError, FlmmUserError, exit_on_user_error
from flmm.files import write_text_atomic

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class ReasonSegItem:
    """One annotated image: ``H x W`` uint8 ``mask`` (0 background, 1 target, 255 ignore)."""

    image_path: Path
    queries: list[str]
    is_sentence: bool
    mask: np.ndarray


@dataclass
class Reasoned:
    """The answer-then-ground flow on one query: the grounded answer and the ``H x W`` mask."""

    result: ChatResult
    mask: np.ndarray


def polygon_mask(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """``H x W`` uint8 mask of ReasonSeg ``shapes`` (1 target, 255 ignore), largest drawn first."""
    valid = [s for s in shapes if s.get("label", "").lower() != "flag"]
    areas = [_area(s["points"], height, width) for s in valid]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for i in np.argsort(areas, kind="stable")[::-1]:
        value = IGNORE if "ignore" in valid[i]["label"].lower() else 1
        draw.polygon([tuple(map(float, p)) for p in valid[i]["points"]], fill=value, outline=value)
    return np.asarray(canvas)


def _area(points: list, height: int, width: int) -> int:
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(map(float, p)) for p in points], fill=1, outline=1)
    return int(np.asarray(canvas).sum())


def read_item(json_path: Path) -> ReasonSegItem:
    """Read one ``NAME.json`` and find its image ``NAME.jpg`` (or .jpeg / .png) beside it."""
    image_path = next(
        (json_path.with_suffix(s) for s in IMAGE_SUFFIXES if json_path.with_suffix(s).is_file()),
        None,
    )
    if image_path is None:
        raise FileNotFoundError(f"no image beside {json_path} (looked for {IMAGE_SUFFIXES})")
    try:
        anno = json.loads(json_path.read_text(encoding="utf-8", errors="replace"))
        queries, shapes = _queries(anno["text"], json_path), anno["shapes"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise FlmmUserError(
            f"{json_path} is not in the ReasonSeg layout (needs 'text', 'is_sentence', 'shapes'): "
            f"{err!r}"
        ) from err
    check_shapes(shapes, json_path)
    height, width = image_size(image_path, json_path)
    mask = polygon_mask(shapes, height, width)
    return ReasonSegItem(image_path, queries, bool(anno.get("is_sentence", False)), mask)


def check_shapes(shapes, json_path: Path) -> None:
    """A :class:`DataError` naming the file and the shape unless ``shapes`` is a list of dicts,
    each with a string ``label`` and (but ``flag`` shapes, which are skipped) ``points`` a list
    of at least 2 ``[x, y]`` number pairs."""
    if not isinstance(shapes, list):
        raise DataError(f"{json_path}: 'shapes' must be a list of polygons, got {str(shapes)[:60]}")
    for i, shape in enumerate(shapes):
        shape = shape if isinstance(shape, dict) else {}
        label, points = shape.get("label", ""), shape.get("points")
        if isinstance(label, str) and label.lower() == "flag":
            continue
        if not isinstance(label, str) or not _polygon(points):
            raise DataError(
                f"{json_path}: shape {i} is not a polygon ('points' {str(points)[:60]}); each "
                "shape needs a 'label' string and 'points' as at least 2 [x, y] number pairs"
            )


def _polygon(points) -> bool:
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    pairs = isinstance(points, list) and all(isinstance(p, list) and len(p) == 2 for p in points)
    return pairs and len(points) >= 2 and all(number(v) for p in points for v in p)


def image_size(image_path: Path, json_path: Path) -> tuple[int, int]:
    """``(height, width)`` of ``image_path``, decoded once, so that a broken image is reported
    before any model loads."""
    try:
        with Image.open(image_path) as img:
            img.load()
            return img.height, img.width
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{image_path} is not a readable image ({err}); replace it, or remove it and "
            f"{json_path.name}"
        ) from None


def _queries(text, json_path: Path) -> list[str]:
    """ReasonSeg's ``text``: a list of queries, or one query as a string (never its characters)."""
    queries = [text] if isinstance(text, str) else text
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
        raise FlmmUserError(
            f"{json_path}: 'text' must be a query or a list of queries, got {str(text)[:60]!r}"
        )
    return queries


def read_split(root: str | Path) -> list[ReasonSegItem]:
    """Every annotated image of a ReasonSeg split folder, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ReasonSeg split folder not found: {root}")
    items = [read_item(p) for p in sorted(root.glob("*.json"))]
    if not items:
        raise FileNotFoundError(f"no ReasonSeg .json annotations in {root}")
    return items


def reason(
    chat: GroundedChat,
    image: np.ndarray,
    query: str,
    max_new_tokens: int = 32,
    relevant_object: bool = False,
) -> Reasoned:
    """Answer ``query``, then segment what the answer names.

    The answer's key phrases come from the keyword selector (the whole answer without one, or
    when it picks nothing); the mask is the union of their masks. With ``relevant_object`` the
    answer is the visual chain of thought's first step instead ("The object most relevant to the
    question is ...", as the reference's ``reason_seg`` answers after a prefix) and the object it
    names is segmented.
    """
    if relevant_object:
        result = chat.relevant_object(image, query, max_new_tokens)
        return Reasoned(result, result.masks.any(0))
    answer = chat.answer(image, query, max_new_tokens)
    phrases = chat.keywords(image, query, answer) if chat.selector is not None else []
    whole = answer.strip().rstrip(".").strip()
    result = chat.grounded(image, query, answer, phrases or ([whole] if whole else []))
    return Reasoned(result, result.masks.any(0))


def query_counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """Intersection and union of bool ``pred`` and a ReasonSeg ``target`` (255 ignored)."""
    valid = target != IGNORE
    truth = (target == 1) & valid
    pred = pred & valid
    return int((pred & truth).sum()), int((pred | truth).sum())


def scores(counts: list[tuple[int, int]]) -> dict[str, float]:
    """gIoU (mean per-query IoU, 1 for empty-vs-empty) and cIoU (summed I / summed U)."""
    if not counts:
        raise ValueError("no queries to score")
    ious = [i / u if u else 1.0 for i, u in counts]
    total_u = sum(u for _, u in counts)
    ciou = sum(i for i, _ in counts) / total_u if total_u else 1.0
    return {"giou": float(np.mean(ious)), "ciou": float(ciou), "queries": float(len(counts))}


def evaluate(
    chat: GroundedChat,
    items: list[ReasonSegItem],
    max_new_tokens: int = 32,
    relevant_object: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Run :func:`reason` on every query; the scores and one record per query."""
    counts, records = [], []
    for item in items:
        image = np.array(Image.open(item.image_path).convert("RGB"))
        for query in item.queries:
            out = reason(chat, image, query, max_new_tokens, relevant_object)
            inter, union = query_counts(out.mask, item.mask)
            counts.append((inter, union))
            records.append(
                {
                    "image": item.image_path.name,
                    "query": query,
                    "answer": out.result.answer,
                    "phrases": out.result.phrases,
                    "iou": inter / union if union else 1.0,
                }
            )
    return scores(counts), records


def outline(mask: np.ndarray) -> list[list[float]]:
    """A polygon around a row-convex ``H x W`` mask: left edges down, right edges back up."""
    rows = [y for y in range(mask.shape[0]) if mask[y].any()]
    left = [[float(np.argmax(mask[y])), float(y)] for y in rows]
    right = [[float(mask.shape[1] - np.argmax(mask[y, ::-1]) - 1), float(y)] for y in rows]
    return left + right[::-1]


def write_synthetic_split(out_dir: str | Path, n: int, seed: int = 0, image_size: int = 96) -> Path:
    """A ReasonSeg-layout split on the synthetic world: per scene a question whose answer names
    an attribute of one object ("what shape is the leftmost red object?"), target = that object."""
    from flmm.data.synthetic import sample_expressions, sample_scene

    out, rng = Path(out_dir), np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = sample_scene(rng, image_size)
        target = int(rng.integers(len(scene.objects)))
        obj = scene.objects[target]
        expression = sample_expressions(scene, target, rng, 1)[0].text
        asked = "shape" if obj.shape not in expression else "colour"
        shapes = [{"label": "target", "points": outline(obj.mask), "shape_type": "polygon"}]
        anno = {"text": [f"what {asked} is {expression}?"], "is_sentence": True, "shapes": shapes}
        Image.fromarray(scene.image).save(out / f"synthetic_{i:04d}.jpg", quality=95)
        (out / f"synthetic_{i:04d}.json").write_text(json.dumps(anno))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="flmm reasonseg", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("split_dir", help="a ReasonSeg split folder (NAME.jpg + NAME.json)")
    p.add_argument(
        "--write-synthetic",
        type=int,
        metavar="N",
        help="first write N synthetic-world scenes into split_dir in the ReasonSeg layout",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument(
        "--relevant-object",
        action="store_true",
        help='answer with "The object most relevant to the question is ..." and segment that '
        "object (the visual chain of thought's first step) instead of the plain answer",
    )
    p.add_argument(
        "--output",
        help="per-query records, JSON (default: logs/reasonseg/<split folder name>.json)",
    )
    add_model_args(p)
    args = p.parse_args(argv)

    def go() -> None:
        if args.write_synthetic:
            write_synthetic_split(args.split_dir, args.write_synthetic)
        items = read_split(args.split_dir)[: args.limit]
        metrics, records = evaluate(
            load_chat(args), items, args.max_new_tokens, args.relevant_object
        )
        out = Path(args.output or Path("logs/reasonseg") / f"{Path(args.split_dir).name}.json")
        write_text_atomic(out, json.dumps({"metrics": metrics, "queries": records}, indent=2))
        print(
            f"ReasonSeg {args.split_dir}: gIoU {metrics['giou']:.4f} cIoU {metrics['ciou']:.4f} "
            f"over {int(metrics['queries'])} queries; per-query records: {out}"
        )

    exit_on_user_error(go)


if __name__ == "__main__":
    main()

"""`flmm predict SOURCE --output-dir OUT`: ground phrases on many images, models loaded once.

SOURCE is a folder of images (one ``--text`` for all; its ``--phrases``, else the keyword
selector's) or a JSONL file of ``{"image": path, "text": ..., "phrases": [...]}`` records (paths
relative to the file's folder; the keyword selector picks the phrases of a record without them).
Images are grounded ``--batch-size`` at a time, in one LMM forward and one SAM pass per batch.

Per image: ``OUT/<stem>.json`` (image height/width, the text, and per phrase its text, character
span, score = mean refined probability inside the refined mask, box ``[x, y, w, h]`` and area of
that mask, and the refined and coarse masks as COCO RLE), ``<stem>_overlay.png`` unless
``--no-overlay``, ``<stem>_mask<k>.png`` per phrase with ``--save-masks``. Every file is written
under a temporary name and renamed, the JSON last: a rerun skips the images whose JSON exists.
An image that fails (a file that cannot be read, a record the model refuses, such as a text
longer than the LMM's context) is skipped with a warning line naming it (the JSONL file and line)
and why; the others, the rest of its batch included, are written. The failed ones are counted and
listed at the end.

Exit status: 0 every image written; 1 some images failed and were skipped, the others written
(a rerun retries only those); 2 a bad argument or input file stopped the run before any image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from flmm.chat.conversation import GroundedChat
from flmm.chat.ground import load_image
from flmm.chat.options import add_model_args, load_chat
from flmm.data.masks import mask_to_rle, phrase_record
from flmm.errors import FlmmUserError, exit_on_user_error
from flmm.files import remove_orphans, write_atomic, write_text_atomic
from flmm.model.predictor import Grounding, phrase_spans
from flmm.overlay import render_overlay

# exit status when some images were skipped (unreadable, or refused by the model) and the others
# written; 2 is a user error that stopped the run before any image (exit_on_user_error)
SKIPPED = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RECORD = '{"image": "a.png", "text": "a red circle", "phrases": ["red circle"]}'


@dataclass
class Item:
    """One image to ground: its file, text, phrases (None: the selector's), where it was listed."""

    image: Path
    text: str
    phrases: list[str] | None
    where: str

    @property
    def stem(self) -> str:
        return self.image.stem


# ------------------------------------------------------------------------------------ inputs
def read_items(source: Path, text: str | None, phrases: list[str] | None) -> list[Item]:
    """The images of a folder (with ``text``) or the records of a JSONL file, checked."""
    if source.is_dir():
        items = folder_items(source, text, phrases)
    elif source.is_file():
        if text is not None or phrases is not None:
            raise FlmmUserError(
                f"--text/--phrases go with a folder of images; {source} is a file, whose lines "
                f"give each image's text and phrases: {RECORD}"
            )
        items = jsonl_items(source)
    else:
        raise FileNotFoundError(
            f"{source} does not exist: pass a folder of images or a JSONL file of {RECORD}"
        )
    check_items(items)
    return items


def folder_items(folder: Path, text: str | None, phrases: list[str] | None) -> list[Item]:
    if text is None:
        raise FlmmUserError("a folder of images needs --text (the text grounded on each image)")
    if phrases is not None:
        check_phrases(text, phrases, "--phrases")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FlmmUserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {folder}")
    return [Item(f, text, phrases, str(f)) for f in files]


def jsonl_items(path: Path) -> list[Item]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    items = [
        parse_record(line, path.parent, f"{path} line {n}")
        for n, line in enumerate(lines, 1)
        if line.strip()
    ]
    if not items:
        raise FlmmUserError(f"{path} holds no records; write one JSON object per line: {RECORD}")
    return items


def parse_record(line: str, root: Path, where: str) -> Item:
    """An :class:`Item` from one JSONL line; ``where`` names the line in errors."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise FlmmUserError(f"{where} is not valid JSON ({err.msg}); write e.g. {RECORD}") from None
    if not (
        isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("image", "text"))
    ):
        raise FlmmUserError(f'{where} needs "image" and "text" strings, e.g. {RECORD}')
    phrases = record.get("phrases")
    if phrases is not None and not (
        isinstance(phrases, list) and all(isinstance(p, str) for p in phrases)
    ):
        raise FlmmUserError(f'{where}: "phrases" must be a list of strings, e.g. {RECORD}')
    image = root / record["image"]
    if not image.is_file():
        raise FlmmUserError(f"{where}: image not found: {image} (paths are relative to {root})")
    return Item(image, record["text"], phrases, where)


def check_phrases(text: str, phrases: list[str], where: str) -> None:
    try:
        phrase_spans(text, phrases)
    except ValueError as err:
        raise FlmmUserError(f"{where}: {err}") from None


def check_items(items: list[Item]) -> None:
    """Non-empty texts, phrases found in their texts, one output name per image."""
    owner: dict[str, str] = {}
    for item in items:
        if not item.text.strip():
            raise FlmmUserError(f"{item.where}: the text is empty")
        if item.phrases is not None:
            check_phrases(item.text, item.phrases, item.where)
        if item.stem in owner:
            raise FlmmUserError(
                f"{owner[item.stem]} and {item.where} would both write {item.stem}.json; "
                "give the images distinct file names"
            )
        owner[item.stem] = item.where


# ------------------------------------------------------------------------------------ outputs
def mask_record(phrase: str, span: tuple[int, int], refined, coarse) -> dict:
    """One phrase's JSON: text, span, score, box, area, refined and coarse masks as COCO RLE."""
    mask = (refined > 0.5).numpy()
    score = float(refined[mask].mean()) if mask.any() else 0.0
    return {
        **phrase_record(phrase, span, mask),
        "score": round(score, 4),
        "coarse_mask": mask_to_rle((coarse > 0.5).numpy()),
    }


def image_record(item: Item, image: np.ndarray, grounding: Grounding | None) -> dict:
    phrases = []
    if grounding is not None:
        parts = zip(grounding.phrases, grounding.spans, grounding.refined, grounding.coarse)
        phrases = [mask_record(*part) for part in parts]
    height, width = image.shape[:2]
    return {
        "image": str(item.image),
        "height": height,
        "width": width,
        "text": item.text,
        "phrases": phrases,
    }


def save_png_atomic(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def write_outputs(
    out: Path,
    item: Item,
    image: np.ndarray,
    grounding: Grounding | None,
    masks: bool,
    overlay: bool,
) -> int:
    """Write the image's PNGs, then its JSON (the mark of a finished image); its phrase count."""
    record = image_record(item, image, grounding)
    found = grounding.masks.numpy() if grounding is not None else np.zeros((0, *image.shape[:2]))
    if masks:
        for k, mask in enumerate(found, 1):
            save_png_atomic(out / f"{item.stem}_mask{k}.png", mask.astype(np.uint8) * 255)
    if overlay:
        phrases = [p["text"] for p in record["phrases"]]
        save_png_atomic(out / f"{item.stem}_overlay.png", render_overlay(image, found, phrases))
    write_text_atomic(out / f"{item.stem}.json", json.dumps(record) + "\n")
    return len(record["phrases"])


# ---------------------------------------------------------------------------------- grounding
def ground_images(
    chat: GroundedChat, items: list[Item], images: list[np.ndarray]
) -> list[Grounding | None]:
    """Groundings of the images' phrases (the selector's where an item has none), batched;
    None for an image without phrases."""
    phrases = [item.phrases for item in items]
    pick = [k for k, p in enumerate(phrases) if p is None]
    if pick:
        texts = [items[k].text for k in pick]
        for k, found in zip(pick, chat.keywords_batch([images[k] for k in pick], None, texts)):
            phrases[k] = found
    todo = [k for k, p in enumerate(phrases) if p]
    results: list[Grounding | None] = [None] * len(items)
    if todo:
        grounded = chat.ground_batch(
            [images[k] for k in todo], [items[k].text for k in todo], [phrases[k] for k in todo]
        )
        for k, grounding in zip(todo, grounded):
            results[k] = grounding
    return results


def predict(
    chat: GroundedChat, items: list[Item], out: Path, batch_size: int, masks: bool, overlay: bool
) -> tuple[int, list[str]]:
    """Ground and write every item, ``batch_size`` images at a time; the number of phrases
    written and where the skipped items were listed (each named with its reason in a warning
    line as it happens: an image that cannot be read, a record the model refuses)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)  # a run killed outright left them
    count, skipped = 0, []
    with tqdm(total=len(items), unit="img", desc="predict", file=sys.stderr) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            for item, image, grounding in grounded(chat, load_images(batch, skipped), skipped):
                count += write_outputs(out, item, image, grounding, masks, overlay)
            bar.update(len(batch))
    return count, skipped


def skip(item: Item, err: Exception, skipped: list[str]) -> None:
    """Say on one line which item is skipped and why; note it in ``skipped``."""
    tqdm.write(f"flmm: warning: skipping {item.where}: {err}", file=sys.stderr)
    skipped.append(item.where)


def load_images(items: list[Item], skipped: list[str]) -> list[tuple[Item, np.ndarray]]:
    """The items whose image reads, with the image; the others skipped."""
    loaded = []
    for item in items:
        try:
            loaded.append((item, load_image(item.image)))
        except (FlmmUserError, FileNotFoundError) as err:
            skip(item, err, skipped)
    return loaded


def grounded(
    chat: GroundedChat, loaded: list[tuple[Item, np.ndarray]], skipped: list[str]
) -> list[tuple[Item, np.ndarray, Grounding | None]]:
    """Each loaded item with its grounding, in one batch; when the batch fails on a record (a
    text longer than the LMM's context), each item alone, skipping those that fail alone."""
    try:
        return ground_loaded(chat, loaded)
    except FlmmUserError as err:
        if len(loaded) == 1:
            skip(loaded[0][0], err, skipped)
            return []
    done = []
    for one in loaded:
        try:
            done += ground_loaded(chat, [one])
        except FlmmUserError as err:
            skip(one[0], err, skipped)
    return done


def ground_loaded(
    chat: GroundedChat, loaded: list[tuple[Item, np.ndarray]]
) -> list[tuple[Item, np.ndarray, Grounding | None]]:
    items, images = [item for item, _ in loaded], [image for _, image in loaded]
    return list(zip(items, images, ground_images(chat, items, images)))


# ---------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flmm predict",
        description=__doc__.split("\n")[0],
        epilog="Each output JSON is described in docs/predict.md. Exit status: 0 every image "
        "written; 1 some failed and were skipped (each named above), the others written; 2 a bad "
        "argument or input file, nothing done.",
        allow_abbrev=False,
    )
    p.add_argument("source", help="a folder of images, or a JSONL file of " + RECORD)
    p.add_argument("--text", help="with a folder: the text grounded on every image")
    p.add_argument("--phrases", nargs="+", help="with a folder: phrases of --text to ground")
    p.add_argument("--output-dir", default="predictions", help="where the outputs go")
    p.add_argument("--batch-size", type=int, default=8, help="images per model pass")
    p.add_argument("--save-masks", action="store_true", help="one PNG per phrase mask")
    p.add_argument("--no-overlay", action="store_true", help="no overlay PNG per image")
    add_model_args(p, generates=False)
    return p


def run(args: argparse.Namespace) -> int:
    """The command's work; its exit status (:data:`SKIPPED`: some images were skipped)."""
    if args.batch_size < 1:
        raise FlmmUserError(f"--batch-size must be at least 1, got {args.batch_size}")
    items = read_items(Path(args.source), args.text, args.phrases)
    out = Path(args.output_dir)
    todo = [item for item in items if not (out / f"{item.stem}.json").is_file()]
    if len(todo) < len(items):
        print(f"skipping {len(items) - len(todo)} of {len(items)} images: their JSON is in {out}")
    if not todo:
        return 0
    started = time.perf_counter()
    chat = load_chat(args)
    if any(item.phrases is None for item in todo):
        chat.require_selector()
    loaded = time.perf_counter()
    options = (args.save_masks, not args.no_overlay)
    phrases, skipped = predict(chat, todo, out, args.batch_size, *options)
    took = time.perf_counter() - loaded
    done = len(todo) - len(skipped)
    print(
        f"predicted {done} images ({phrases} phrases) in {took:.1f} s = {done / took:.2f} images/s "
        f"(batch size {args.batch_size}; models loaded in {loaded - started:.1f} s); output: {out}"
    )
    if skipped:
        print(
            f"flmm: {len(skipped)} of {len(todo)} images failed and were skipped (exit status "
            f"{SKIPPED}; the reasons are above): {', '.join(skipped)}",
            file=sys.stderr,
        )
    return SKIPPED if skipped else 0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    status = exit_on_user_error(run, args)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()

"""Which image-text-to-text model types of the installed transformers flmm can ground with.

    python scripts/family_reach.py [--types gemma3,paligemma] [--timeout 120] [--memory-gb 4]
        [--docs docs/families.md] [--json logs/family_reach.json]

Over every model type of transformers' ``AutoModelForImageTextToText`` mapping: a type with a
registry row is *served by a row*; a type in :data:`flmm.lmm.derive.UNSERVABLE` is *refused*
with its reason; any other type gets a tiny random model built from its own config class (widths,
layers, heads shrunk on the text and vision sub-configs; the vocabulary, special tokens and chat
template a word-level tokenizer's), saved and loaded back with ``model.lmm.family=auto``: *auto
serves it* when the derived row passes its self-check, else auto's one-line reason is recorded.
A type whose tiny build fails is recorded with the error: that is this script's reach, not
flmm's. Each type runs in a forked child with a wall-clock timeout and an address-space limit.
The registry is read at run time, so the table follows new rows. Writes the table between the
``REACH`` markers of ``--docs``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from tiny_any import build_tiny_any

from flmm.errors import ModelLoadError
from flmm.lmm import FrozenLMM
from flmm.lmm.derive import UNSERVABLE
from flmm.lmm.families import family_of_model_type

ROW, AUTO, UNSERVED, REFUSED, BUILD = "row", "auto", "unservable", "refused", "build failed"
BEGIN, END = "<!-- REACH:BEGIN (scripts/family_reach.py) -->", "<!-- REACH:END -->"


def model_types() -> list[str]:
    """Every model type of transformers' image-text-to-text mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def classify(model_type: str) -> tuple[str, str]:
    """``(status, detail)`` of one type (run in the child)."""
    row = family_of_model_type(model_type)
    if row is not None:
        return ROW, f"row `{row}`"
    if model_type in UNSERVABLE:
        return UNSERVED, UNSERVABLE[model_type]
    with tempfile.TemporaryDirectory(prefix=f"reach_{model_type}_") as folder:
        try:
            build_tiny_any(model_type, Path(folder))
        except Exception as err:  # noqa: BLE001 - any failure is this script's record
            return BUILD, one_line(err)
        try:
            lmm = FrozenLMM.from_pretrained(folder, family="auto")
        except ModelLoadError as err:
            return REFUSED, one_line(err)
        except Exception as err:  # noqa: BLE001 - a traceback where flmm owes a line
            return REFUSED, "NO ONE-LINE ERROR: " + one_line(err)
        return AUTO, f"grid `{lmm.family.grid}`, {lmm.channels} channels"


def one_line(err: BaseException) -> str:
    """``err`` as one line (its type and message, whitespace squashed)."""
    return " ".join(f"{type(err).__name__}: {err}".split())[:2000]


def child(model_type: str, pipe) -> None:
    """Classify ``model_type``; send the result through ``pipe``."""
    torch.set_num_threads(1)
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    try:
        pipe.send(classify(model_type))
    except BaseException as err:  # noqa: BLE001 - MemoryError included
        pipe.send((BUILD, one_line(err) + " " + traceback.format_exc(limit=-1).splitlines()[-1]))


def resident(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) * 1024 if found else 0


def run_one(model_type: str, timeout: float, memory: int) -> tuple[str, str, float]:
    """``(status, detail, seconds)`` of one type in a forked child, killed past ``timeout``
    seconds or ``memory`` resident bytes."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    start = time.monotonic()
    process = context.Process(target=child, args=(model_type, send))
    process.start()
    result = None
    while result is None:
        if receive.poll(0.2):
            result = receive.recv()
        elif time.monotonic() - start > timeout:
            result = (BUILD, f"timed out after {timeout:.0f} s")
        elif resident(process.pid) > memory:
            result = (BUILD, f"over {memory / 2**30:.0f} GB resident memory")
        elif not process.is_alive():
            result = (BUILD, f"child died (exit code {process.exitcode})")
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    return (*result, time.monotonic() - start)


def table(results: dict[str, tuple[str, str, float]]) -> str:
    """The markdown of the reach: counts, then one row per type."""
    counts = {
        s: sum(r[0] == s for r in results.values()) for s in (ROW, AUTO, REFUSED, UNSERVED, BUILD)
    }
    from transformers import __version__

    lines = [
        (
            f"transformers {__version__}: {len(results)} image-text-to-text model types. "
            f"Served by a row: {counts[ROW]}; served by `family=auto` (self-check passed): "
            f"{counts[AUTO]}; refused by `auto` (one line, the reason below): {counts[REFUSED]}; "
            f"refused as unservable: {counts[UNSERVED]}; tiny build failed here (this script's "
            f"generic builder, not a verdict on the type): {counts[BUILD]}."
        ),
        "",
        "| model type | status | detail | s |",
        "|---|---|---|---|",
    ]
    for model_type, (status, detail, seconds) in sorted(results.items()):
        cell = short(detail).replace("|", "\\|")
        lines.append(f"| `{model_type}` | {status} | {cell} | {seconds:.0f} |")
    return "\n".join(lines)


def short(detail: str) -> str:
    """A refusal's reason and the fields it names, without the folder, the derived row's source
    and the advice every refusal repeats."""
    found = re.search(r"\(model_type '[^']+'\): (.*); to use it, .* setting (.*) \(docs", detail)
    if found:
        reason = re.sub(r"the derived row Family\(.*?\) failed", "the derived row failed", found[1])
        detail = f"{reason} [set: {found[2]}]"
    return detail[:300]


def write_docs(path: Path, markdown: str) -> None:
    """Replace the text between the REACH markers of ``path`` (appended with them if absent)."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{markdown}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(
            re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL
        )
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per type")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="resident memory per type")
    parser.add_argument("--docs", type=Path, default=Path("docs/families.md"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    types = [t for t in args.types.split(",") if t] or model_types()
    memory = int(args.memory_gb * 2**30)
    results = {}
    for model_type in types:
        results[model_type] = run_one(model_type, args.timeout, memory)
        status, detail, seconds = results[model_type]
        print(f"{model_type:28s} {status:12s} {seconds:5.0f}s {detail[:150]}", flush=True)
    if not args.types:
        write_docs(args.docs, table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

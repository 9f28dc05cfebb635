"""POPE object-hallucination evaluation: read the layout, answer, parse yes/no, score, resume.

POPE (Li et al., EMNLP 2023) asks "Is there a {object} in the image?" about present and absent
objects, balanced yes/no, in three files that differ in how absent objects are sampled (random,
popular, adversarial). Each file holds JSON lines::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a ...?",
     "label": "yes"}

Every question is answered in one or more *modes*: ``plain`` (the LMM answers directly) and
``vcot`` (visual chain of thought: the LMM names the object most relevant to the question, F-LMM
grounds it, and the LMM answers again looking at the image and the crop of the mask's box).
Answers are appended to a JSON-lines file as they come, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from flmm.errors import FlmmUserError
from flmm.files import write_text_atomic

log = logging.getLogger(__name__)

LABELS = ("yes", "no")
MODES = ("plain", "vcot")
POPE_FILES = ("random", "popular", "adversarial")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unparseable")
NEGATIONS = {"no", "not", "none", "nothing", "never", "nope"}
AFFIRMATIONS = {"yes", "yeah", "yep"}
RECORD_FIELDS = {"question_id", "image", "label", "answer"}


class PopeFormatError(FlmmUserError, ValueError):
    """A POPE question file or an answers file does not have the expected layout."""


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question: ``image`` is a file name relative to the image folder."""

    question_id: int | str
    image: str
    text: str
    label: str


class VisualCoTResult(Protocol):
    """What :meth:`Answerer.visual_cot` returns (``flmm.chat.conversation.VisualCoT`` fits)."""

    object_text: str
    box: tuple[int, int, int, int] | None
    answer: str


class Answerer(Protocol):
    """Answers questions about an ``H x W x 3`` uint8 RGB image (``flmm.chat.conversation.GroundedChat`` fits)."""

    def answer(self, image: np.ndarray, question: str, max_new_tokens: int = 32) -> str: ...

    def visual_cot(
        self, image: np.ndarray, question: str, max_new_tokens: int = 32
    ) -> VisualCoTResult: ...


# ------------------------------------------------------------------------------ the layout
def _question(line: str, where: str) -> PopeQuestion:
    """Parse one JSON line of a POPE file; ``where`` (``file:line``) names it in errors."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        msg = f"{where}: not valid JSON ({err.msg}); each line must be one object"
        raise PopeFormatError(msg) from None
    if not isinstance(row, dict):
        raise PopeFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("question_id", "image", "text", "label") if k not in row]
    if missing:
        raise PopeFormatError(f"{where}: missing field(s) {', '.join(missing)}")
    label = str(row["label"]).strip().lower()
    if label not in LABELS:
        raise PopeFormatError(f"{where}: label must be 'yes' or 'no', got {row['label']!r}")
    if not isinstance(row["question_id"], (int, str)) or isinstance(row["question_id"], bool):
        raise PopeFormatError(f"{where}: question_id must be an integer or a string")
    for key in ("image", "text"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise PopeFormatError(f"{where}: {key} must be a non-empty string")
    return PopeQuestion(row["question_id"], row["image"], row["text"], label)


def read_pope(path: str | Path) -> list[PopeQuestion]:
    """Read a POPE question file (JSON lines; blank lines are skipped).

    Raises :class:`PopeFormatError` naming the file and line of the first malformed line or
    repeated ``question_id``, and ``FileNotFoundError`` if ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"POPE question file {str(path)!r} not found; check pope_dir=...")
    questions: list[PopeQuestion] = []
    seen: dict[int | str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        q = _question(line, f"{path}:{number}")
        if q.question_id in seen:
            raise PopeFormatError(
                f"{path}:{number}: question_id {q.question_id!r} repeats line {seen[q.question_id]}"
            )
        seen[q.question_id] = number
        questions.append(q)
    if not questions:
        raise PopeFormatError(f"{path} holds no questions")
    return questions


# --------------------------------------------------------------------------- yes/no parsing
def parse_yes_no(answer: str) -> str | None:
    """``"yes"``, ``"no"`` or ``None`` (unparseable) for a free-form answer.

    Like POPE's own script, only the first sentence counts and case and punctuation are ignored:
    a first word yes/no decides; otherwise a negation anywhere ("no", "not", "n't"...) means no
    and a "yes" means yes. Unlike it, an answer that says neither is not silently read as an
    answer: it is ``None``.
    """
    sentence = re.split(r"[.!?\n]", answer.strip().lower(), maxsplit=1)[0]
    tokens = re.findall(r"[a-z]+(?:'[a-z]+)?", sentence.replace("\u2019", "'"))
    if tokens and tokens[0] in AFFIRMATIONS:
        return "yes"
    if any(t in NEGATIONS or t.endswith("n't") for t in tokens):
        return "no"
    if any(t in AFFIRMATIONS for t in tokens):
        return "yes"
    return None


# --------------------------------------------------------------------------------- metrics
def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def pope_metrics(labels: Iterable[str], predictions: Iterable[str | None]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes"), yes-ratio, n, unparseable.

    An unparseable prediction (``None``) is always wrong: it is neither a true positive nor a
    false positive, so it lowers accuracy, and recall when the label is "yes"; it never counts
    as a "yes" in precision or the yes-ratio. With no unparseable answers these are POPE's
    figures exactly. Ratios with an empty denominator are 0.
    """
    pairs = list(zip(labels, predictions, strict=True))
    tp = sum(lab == "yes" and pred == "yes" for lab, pred in pairs)
    fp = sum(lab == "no" and pred == "yes" for lab, pred in pairs)
    tn = sum(lab == "no" and pred == "no" for lab, pred in pairs)
    positives = sum(lab == "yes" for lab, _ in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, positives)
    return {
        "accuracy": _ratio(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, len(pairs)),
        "n": len(pairs),
        "unparseable": sum(pred is None for _, pred in pairs),
    }


# -------------------------------------------------------------------------- answers, resume
def read_answers(path: str | Path) -> list[dict]:
    """The answer records of ``path`` (empty if missing), after repairing an interrupted tail.

    A last line cut off mid-write (no trailing newline, not valid JSON) is the trace of an
    interrupted run: it is dropped from the file, and that question is answered again.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records, seen = [], {}
    for number, line in enumerate(_repaired_lines(path), start=1):
        if line.strip():
            record = json.loads(line) if _is_json(line) else None
            if not isinstance(record, dict) or not RECORD_FIELDS <= record.keys():
                raise PopeFormatError(
                    f"{path}:{number}: not an answer record (a JSON object with "
                    f"{', '.join(sorted(RECORD_FIELDS))}); delete the file to start over"
                )
            _check_repeat(seen, record["question_id"], path, number)
            records.append(record)
    return records


def _check_repeat(seen: dict, question_id, path: Path, number: int) -> None:
    """A :class:`PopeFormatError` when ``question_id`` was answered before (one record would
    silently replace the other in the scores)."""
    if question_id in seen:
        raise PopeFormatError(
            f"{path}:{number}: question_id {question_id!r} was already answered at line "
            f"{seen[question_id]}; delete one of the two records (or the file to start over)"
        )
    seen[question_id] = number


def _repaired_lines(path: Path) -> list[str]:
    """The complete lines of ``path``; a cut-off last line is removed, a whole one terminated."""
    text = path.read_text()
    *lines, tail = text.split("\n")
    if tail and _is_json(tail):
        write_text_atomic(path, text + "\n")
        lines.append(tail)
    elif tail:
        write_text_atomic(path, text[: len(text) - len(tail)])
    return lines


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def load_image(image_dir: str | Path, name: str) -> np.ndarray:
    """``H x W x 3`` uint8 RGB image ``image_dir/name``; a clear error if it is missing."""
    path = Path(image_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"image {name!r} of the POPE file not found in {str(image_dir)!r}; check image_dir=..."
        )
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def answer_one(
    answerer: Answerer, image: np.ndarray, q: PopeQuestion, mode: str, max_new_tokens: int
) -> dict:
    """Answer ``q`` in ``mode`` and return its record (raw answer, parsed yes/no, vcot trace)."""
    record: dict = {"question_id": q.question_id, "image": q.image, "label": q.label}
    if mode == "plain":
        record["answer"] = answerer.answer(image, q.text, max_new_tokens=max_new_tokens)
    elif mode == "vcot":
        cot = answerer.visual_cot(image, q.text, max_new_tokens=max_new_tokens)
        box = None if cot.box is None else [int(v) for v in cot.box]
        record.update(answer=cot.answer, object_text=cot.object_text, box=box)
    else:
        raise FlmmUserError(f"unknown POPE mode {mode!r}; choose from {', '.join(MODES)}")
    record["parsed"] = parse_yes_no(record["answer"])
    return record


def answer_file(
    answerer: Answerer,
    questions: list[PopeQuestion],
    image_dir: str | Path,
    out_path: str | Path,
    mode: str,
    max_new_tokens: int = 32,
) -> Iterator[dict]:
    """Answer ``questions`` in ``mode``, appending each record to ``out_path`` (flushed) as it
    comes and yielding it; questions already answered in ``out_path`` are skipped."""
    done = {r["question_id"] for r in read_answers(out_path)}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a") as out:
        for q in questions:
            if q.question_id in done:
                continue
            record = answer_one(answerer, load_image(image_dir, q.image), q, mode, max_new_tokens)
            out.write(json.dumps(record) + "\n")
            out.flush()
            yield record


def score_answers(questions: list[PopeQuestion], records: list[dict]) -> dict[str, float]:
    """:func:`pope_metrics` of the answer ``records`` to ``questions``.

    Records of questions not in ``questions`` (a run with a larger ``limit``) are ignored.
    Raises :class:`PopeFormatError` if a question has no answer, or its record names another
    image or label (an answers file left from different questions).
    """
    by_id = {r["question_id"]: r for r in records}
    for q in questions:
        r = by_id.get(q.question_id)
        if r is None:
            raise PopeFormatError(f"question {q.question_id!r} has no answer record")
        if (r.get("image"), r.get("label")) != (q.image, q.label):
            raise PopeFormatError(
                f"the answer record of question {q.question_id!r} is about {r.get('image')!r} "
                f"(label {r.get('label')!r}), the question about {q.image!r} (label {q.label!r}): "
                "the answers come from other questions; delete the answers file to start over"
            )
    answered = [by_id[q.question_id] for q in questions]
    parsed = [parse_yes_no(r["answer"]) for r in answered]  # the raw answer is authoritative
    metrics = pope_metrics([q.label for q in questions], parsed)
    if any("box" in r for r in answered):  # visual CoT: how often grounding gave a crop
        metrics["grounded"] = sum(r.get("box") is not None for r in answered)
    return metrics


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table with one row per POPE file x mode: ``results[file][mode] -> metrics``."""
    head = "| file | mode | " + " | ".join(METRICS) + " |"
    rows = [head, "|" + "---|" * (len(METRICS) + 2)]
    for name, by_mode in results.items():
        for mode, m in by_mode.items():
            cells = [f"{100 * m[k]:.1f}" for k in METRICS[:5]] + [
                str(int(m[k])) for k in METRICS[5:]
            ]
            rows.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------ a whole run
def check_settings(
    output_dir: str | Path, settings: dict, canonical: Callable[[dict], dict] = dict
) -> None:
    """Record ``settings`` (what the answers depend on) in ``output_dir/pope_run.json``; if
    answers are already there, raise :class:`FlmmUserError` unless they were made with the same
    settings (a resumed run must not mix answers of two models). Both are compared as
    ``canonical`` writes them (what identifies the model, not how its config spelled it)."""
    path = Path(output_dir) / "pope_run.json"
    settings = json.loads(json.dumps(settings))
    answered = any(p.stat().st_size for p in Path(output_dir).glob("answers/*.jsonl"))
    if answered and path.is_file():
        recorded = canonical(json.loads(path.read_text()))
        settings = canonical(settings)
        keys = settings.keys() | recorded.keys()
        changed = sorted(k for k in keys if settings.get(k) != recorded.get(k))
        if changed:
            raise FlmmUserError(
                f"{output_dir} holds answers made with other settings ({', '.join(changed)}: "
                f"{[recorded.get(k) for k in changed]} there, {[settings.get(k) for k in changed]} "
                "now); resume with the same settings or choose another output_dir=..."
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def evaluate(
    answerer: Answerer,
    questions: dict[str, list[PopeQuestion]],
    image_dir: str | Path,
    output_dir: str | Path,
    modes: Iterable[str] = MODES,
    max_new_tokens: int = 32,
    log_every: int = 50,
) -> dict[str, dict[str, dict[str, float]]]:
    """Answer every question set (``name -> questions``) in every mode, resuming from the answers
    already in ``output_dir/answers/<name>.<mode>.jsonl``; returns ``metrics[name][mode]``."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, qs in questions.items():
        for mode in modes:
            path = Path(output_dir) / "answers" / f"{name}.{mode}.jsonl"
            start, count = time.perf_counter(), 0
            for count, _ in enumerate(
                answer_file(answerer, qs, image_dir, path, mode, max_new_tokens), start=1
            ):
                if count % log_every == 0:
                    rate = (time.perf_counter() - start) / count
                    log.info("%s / %s: %d new answers, %.2f s each", name, mode, count, rate)
            log.info("%s / %s: %d new answers, %d in all", name, mode, count, len(qs))
            results.setdefault(name, {})[mode] = score_answers(qs, read_answers(path))
    return results


def read_sets(
    pope_dir: str | Path, files: Iterable[str], limit: int | None = None
) -> dict[str, list[PopeQuestion]]:
    """``file stem -> its first `limit` questions`` (all if None) for each POPE file."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise FlmmUserError(f"limit must be a positive integer or null, got {limit!r}")
    names = list(files)
    if not names:
        raise FlmmUserError("no POPE files given; set files=[pope_random.json, ...]")
    return {Path(f).stem: read_pope(Path(pope_dir) / f)[:limit] for f in names}


def check_modes(modes: Iterable[str]) -> list[str]:
    """``modes`` as a list; a :class:`FlmmUserError` naming the known modes if one is unknown."""
    modes = list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise FlmmUserError(f"unknown or no POPE modes {unknown}; choose from {', '.join(MODES)}")
    return modes

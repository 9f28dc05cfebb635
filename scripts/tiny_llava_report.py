"""What the frozen LMM alone does on the synthetic world's test split (no F-LMM checkpoint needed).

    python scripts/tiny_llava_report.py [--lmm DIR] [--world $FLMM_HOME/synthetic_world] [--limit N]
        [--cot-limit N] [--captions N] [--questions N] [--max-new-tokens N]
        [--repetition-penalty P]
        [--output-dir logs/tiny_llava_report]

- POPE, plain answers, on each synthetic POPE file (first ``--limit`` questions; the same
  answering, parsing, resuming and scoring as ``python -m flmm.chat.evaluate_pope``): accuracy,
  yes-ratio..., and the "no" questions' false-yes share by what the absent object shares with
  the scene (``flmm.data.synthetic.pope.negative_kind``: its colour and shape on two objects,
  its colour only, its shape only, neither).
- the visual chain of thought's first step (the LMM completes "The object most relevant to the
  question is"), on the first ``--cot-limit`` of them: the share that names the asked object.
- caption hallucination, CHAIR-style (:mod:`flmm.data.synthetic.hallucination`): the F-LMM
  description prompt's greedy caption of each test image (first ``--captions``; with
  ``--repetition-penalty``, HF's penalty), the share of the objects it mentions that are not in
  the scene, and the share of the scene's objects it mentions (coverage).
- short answers to the corpus's other questions (where / what colour / shape / size, how many,
  relations; :func:`flmm.data.synthetic.corpus.questions`) about ``--questions`` fresh scenes of a stream
  no stage trains on: exact-match accuracy by kind, beside the share of the kind's most common
  answer (what always giving it would score).
Writes ``report.json`` (and the answer files) in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from flmm.chat.conversation import COT_PREFIX, COT_QUESTION, object_phrase
from flmm.chat.pope import POPE_FILES, evaluate, load_image, read_answers, read_sets
from flmm.data.synthetic.corpus import questions
from flmm.data.synthetic.hallucination import chair
from flmm.data.synthetic.pope import (
    ensure_pope,
    false_yes_by_kind,
    split_attributes,
    split_objects,
)
from flmm.data.synthetic.streams import Stream
from flmm.data.synthetic.world import sample_scene
from flmm.files import flmm_home
from flmm.foundation.cache import SHIPPED
from flmm.lmm import FrozenLMM
from flmm.lmm.families import DEFAULT_INSTRUCTION


class LMMAnswerer:
    """The frozen LMM's greedy answers, as :class:`flmm.chat.pope.Answerer` asks (plain mode only)."""

    def __init__(self, lmm: FrozenLMM) -> None:
        self.lmm = lmm

    def answer(self, image: np.ndarray, question: str, max_new_tokens: int = 32, **gen) -> str:
        return self.lmm.generate(
            [image], question, max_new_tokens=max_new_tokens, do_sample=False, **gen
        )

    def cot_object(self, image: np.ndarray, question: str, max_new_tokens: int = 16) -> str:
        """The object the chain of thought's first step names for ``question``."""
        ask = COT_QUESTION.format(question=question)
        text = self.lmm.generate(
            [image], ask, answer_prefix=COT_PREFIX, max_new_tokens=max_new_tokens, do_sample=False
        )
        return object_phrase(f"{COT_PREFIX} {text.strip()}")


def asked_object(question: str) -> str:
    """The object of a POPE question: "Is there a red circle in the image?" -> "red circle"."""
    found = re.fullmatch(r"is there an? (.+) in the image\?", question.strip().lower())
    if found is None:
        raise ValueError(f"not a POPE question: {question!r}")
    return found.group(1)


def names_asked(phrase: str, asked: str) -> bool:
    """Whether the named ``phrase`` says the asked object's words, in order ("the red circle")."""
    return re.search(rf"\b{re.escape(asked)}\b", phrase.lower()) is not None


def cot_share(answerer: LMMAnswerer, questions, image_dir: Path) -> dict:
    """The share of questions whose chain-of-thought step names the asked object, and examples."""
    named = []
    for q in questions:
        phrase = answerer.cot_object(load_image(image_dir, q.image), q.text)
        named.append((names_asked(phrase, asked_object(q.text)), q.label, q.text, phrase))
    share = float(np.mean([n for n, *_ in named]))
    by_label = {
        lab: float(np.mean([n for n, la, *_ in named if la == lab])) for lab in ("yes", "no")
    }
    return {"share": share, "by_label": by_label, "n": len(named), "examples": named[:6]}


def negatives(questions, answers_file: Path, objects: dict[str, list[str]]) -> dict:
    """The "no" questions' false-yes share by what the absent object shares with the scene
    (``objects``: each test image's objects, :func:`split_objects`)."""
    parsed = {r["question_id"]: r["parsed"] for r in read_answers(answers_file)}
    asked = [(q.image, asked_object(q.text), q.label) for q in questions]
    return false_yes_by_kind(asked, [parsed[q.question_id] for q in questions], objects)


def caption_chair(
    answerer: LMMAnswerer, world: Path, n: int, max_new_tokens: int, penalty: float | None = None
) -> dict:
    """CHAIR of the greedy descriptions of the first ``n`` test images (with HF's
    ``repetition_penalty`` ``penalty``, if given)."""
    scenes = list(split_attributes(world, "test").items())[:n]
    gen = {} if penalty is None else {"repetition_penalty": penalty}
    captions = [
        answerer.answer(
            load_image(world / "images", name), DEFAULT_INSTRUCTION, max_new_tokens, **gen
        )
        for name, _ in scenes
    ]
    examples = [(name, c) for (name, _), c in zip(scenes[:4], captions)]
    out = chair(captions, [objects for _, objects in scenes])
    return out | {"repetition_penalty": penalty, "examples": examples}


def question_kind(text: str) -> str:
    """ "what colour is the circle?" -> "what colour"; "is the circle left of ...?" -> "relation"."""
    return "relation" if text.startswith("is the ") else " ".join(text.split()[:2])


def short_answers(answerer: LMMAnswerer, n_scenes: int, seed: int = 0) -> dict:
    """Exact-match accuracy of the greedy answers to every question of ``n_scenes`` scenes of
    stream ``[seed, Stream.QUESTIONS]``, by kind, with each kind's most common answer's share."""
    rng = np.random.default_rng([seed, Stream.QUESTIONS])
    asked: dict[str, list[tuple[str, str]]] = {}
    for _ in range(n_scenes):
        scene = sample_scene(rng)
        for q in questions(scene, rng):
            said = answerer.answer(scene.image, q.text, max_new_tokens=4)
            asked.setdefault(question_kind(q.text), []).append((said, q.answer))
    return {kind: score_short(pairs) for kind, pairs in sorted(asked.items())}


def score_short(pairs: list[tuple[str, str]]) -> dict:
    """Accuracy of ``(said, answer)`` pairs (case, spaces and a final "." ignored), and the
    share of the most common answer."""
    hits = [said.strip().lower().rstrip(".").strip() == answer for said, answer in pairs]
    common = Counter(answer for _, answer in pairs).most_common(1)[0][1]
    return {"accuracy": sum(hits) / len(pairs), "majority": common / len(pairs), "n": len(pairs)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lmm", default=str(SHIPPED["tiny_llava"]))
    parser.add_argument("--world", type=Path, default=flmm_home() / "synthetic_world")
    parser.add_argument("--limit", type=int, default=200, help="POPE questions per file")
    parser.add_argument("--cot-limit", type=int, default=None, help="of those, asked for CoT")
    parser.add_argument("--captions", type=int, default=200, help="test images to caption")
    parser.add_argument("--questions", type=int, default=60, help="fresh scenes to ask about")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--repetition-penalty", type=float, help="for the captions (default: greedy, none)"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("logs/tiny_llava_report"))
    args = parser.parse_args(argv)
    cot_limit = args.limit if args.cot_limit is None else args.cot_limit
    if min(args.limit, cot_limit, args.captions, args.questions) < 1:
        parser.error("--limit, --cot-limit, --captions and --questions must be positive")
    answerer = LMMAnswerer(FrozenLMM.from_pretrained(args.lmm, dtype="float32").eval())
    pope_dir = ensure_pope(args.world)
    sets = read_sets(pope_dir, [f"pope_{f}.json" for f in POPE_FILES], args.limit)
    image_dir = args.world / "images"
    report = {"lmm": args.lmm, "limit": args.limit}
    pope = evaluate(answerer, sets, image_dir, args.output_dir, ["plain"], max_new_tokens=8)
    report["pope_plain"] = {name: by_mode["plain"] for name, by_mode in pope.items()}
    objects = split_objects(args.world)
    report["pope_false_yes"] = {
        n: negatives(qs, args.output_dir / "answers" / f"{n}.plain.jsonl", objects)
        for n, qs in sets.items()
    }
    report["cot_names_asked"] = {
        n: cot_share(answerer, qs[:cot_limit], image_dir) for n, qs in sets.items()
    }
    report["captions"] = caption_chair(
        answerer, args.world, args.captions, args.max_new_tokens, args.repetition_penalty
    )
    report["short_answers"] = short_answers(answerer, args.questions)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

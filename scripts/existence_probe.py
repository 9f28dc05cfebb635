"""Does the tiny LLaVA answer existence questions on its own training distribution, or only fail
on POPE's test split? One forward pass per question: "yes" if its logit beats "no"'s.

    python scripts/existence_probe.py [--lmm DIR] [--world $FLMM_HOME/synthetic_world] [--n 200]

- ``corpus``: fresh scenes and existence questions drawn exactly as the pretraining corpus draws
  them (:func:`flmm.data.synthetic.questions.existence_question`, single image), by kind (POPE's
  colour + shape, with a size, one attribute alone);
- ``pope_<file>``: the first ``--n`` questions of each synthetic POPE file (test split).

Train-distribution accuracy at chance as well means the model never learned the decision
(recipe / optimisation), not a mismatch between the corpus and the evaluation.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from flmm.chat.pope import POPE_FILES, load_image, read_pope
from flmm.data.synthetic.pope import ensure_pope
from flmm.data.synthetic.questions import ObjectStats, existence_question
from flmm.data.synthetic.streams import Stream
from flmm.data.synthetic.world import SIZES, sample_scene
from flmm.files import flmm_home
from flmm.foundation.cache import SHIPPED
from flmm.lmm import FrozenLMM


def kind(question: str) -> str:
    asked = re.fullmatch(r"Is there an? (.+) in the image\?", question).group(1).split()
    if len(asked) == 1 or asked[-1] == "object":
        return "one attribute"
    return "with size" if asked[0] in SIZES else "colour shape"


class YesNo:
    """The LMM's yes / no decision from the next-token logits after the chat prompt."""

    def __init__(self, lmm: FrozenLMM) -> None:
        self.lmm, tok = lmm, lmm.processor.tokenizer
        self.yes, self.no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")

    @torch.no_grad()
    def __call__(self, image: np.ndarray, question: str) -> tuple[str, float]:
        logits = self.lmm.model(**self.lmm.chat_inputs([image], question)).logits[0, -1]
        p_yes = torch.softmax(logits[[self.yes, self.no]], 0)[0].item()
        return ("yes" if p_yes > 0.5 else "no"), p_yes


def scores(rows: list[tuple[str, str, float]]) -> dict:
    pred, label, p = (np.array(x) for x in zip(*rows))
    return {
        "accuracy": float(np.mean(pred == label)),
        "yes_ratio": float(np.mean(pred == "yes")),
        "p_yes_mean": float(p.mean()),
        "p_yes_std": float(p.std()),  # near 0: the answer does not depend on image or question
        "n": len(rows),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lmm", default=str(SHIPPED["tiny_llava"]))
    parser.add_argument("--world", type=Path, default=flmm_home() / "synthetic_world")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument(
        "--seed", type=int, default=1, help="corpus stream [seed, 102] (0: pretraining's)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    decide = YesNo(FrozenLMM.from_pretrained(args.lmm, dtype="float32").eval())
    by_kind: dict[str, list] = defaultdict(list)
    rng, stats = np.random.default_rng([args.seed, Stream.PRETRAIN]), ObjectStats()
    for _ in range(args.n):
        scene = sample_scene(rng, 96)
        stats.add(scene)
        q = existence_question(scene, rng, stats)
        pred, p = decide(scene.image, q.text)
        by_kind["all"].append((pred, q.answer, p))
        by_kind[kind(q.text)].append((pred, q.answer, p))
    report = {"lmm": args.lmm, "corpus": {k: scores(v) for k, v in by_kind.items()}}
    pope_dir = ensure_pope(args.world)
    for name in POPE_FILES:
        rows = []
        for q in read_pope(pope_dir / f"pope_{name}.json")[: args.n]:
            pred, p = decide(load_image(args.world / "images", q.image), q.text)
            rows.append((pred, q.label, p))
        report[f"pope_{name}"] = scores(rows)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""Which yes / no rules can the tiny LLaVA learn? Fine-tune it briefly on one toy rule and print
the answer loss (a yes / no answer at chance is ln 2 / 2 = 0.347 per answer token: the word and
the end token).

    python scripts/yes_no_controls.py RULE [--lmm DIR] [--steps 150] [--lr 5e-4] [--every 50]
        [--then RULE --then-steps N]

Rules, all "is there a <colour> object in the image?" answered yes / no half the time each:

- ``text``: yes iff the asked colour is red, green or blue (the image does not matter);
- ``image``: yes iff the image (one solid colour) is red, green or blue (the question does not);
- ``match``: yes iff the solid image has the asked colour: the answer depends on neither the
  question nor the image alone, only on both together, as an existence answer does;
- ``colour``: "is there a <colour> object?" on the world's scenes;
- ``exist``: the pretraining corpus's existence questions alone (scenes of the world);
- ``described``: the same existence questions with no image: the scene is given as text, its
  terse caption before the question ("a red circle top left. ... is there a blue square in the
  image?"), so only the language model's in-context matching is tested.

The model is not saved. Measured on the shipped model (one thread): ``text`` and ``image`` fall
to a loss near 0 within 100 steps (0.012, 0.003). ``match`` sits on the chance plateau for about
100-150 steps, then falls (0.22-0.07 by step 400, 0.046 at 600, depending on the sample order):
run it with ``--steps 400`` or more; 150 steps only show the plateau. ``exist`` stays at 0.35
for longer (docs/development/tiny_llava.md, "The existence plateau").
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from flmm.data.synthetic.corpus import Conversation, captions, pixel_labels, pretraining_pairs
from flmm.data.synthetic.questions import ObjectStats, existence_question
from flmm.data.synthetic.world import COLOURS, sample_scene
from flmm.foundation.cache import SHIPPED
from flmm.foundation.pretrain_lmm import make_batch

RULES = ("text", "image", "match", "colour", "exist", "described")
FIRST = ("red", "green", "blue")


def colour_questions(rng: np.random.Generator):
    """Endless "is there a <colour> object?" conversations about scenes, yes half the time."""
    names = list(COLOURS)
    while True:
        scene = sample_scene(rng, 96)
        present = sorted({obj.colour for obj in scene.objects})
        absent = [c for c in names if c not in present]
        yes = bool(rng.random() < 0.5)
        pool = present if yes else absent
        question = f"is there a {pool[rng.integers(len(pool))]} object in the image?"
        yield Conversation([scene.image], [(question, "yes" if yes else "no")], pixel_labels(scene))


def described(rng: np.random.Generator):
    """Endless existence questions about scenes given as text only (no image)."""
    stats = ObjectStats()
    while True:
        scene = sample_scene(rng, 96)
        stats.add(scene)
        q = existence_question(scene, rng, stats)
        text = f"{captions(scene, rng, terse=True)} {q.text}"
        yield Conversation([], [(text, q.answer)], pixel_labels(scene))


def rule_pairs(rule: str, rng: np.random.Generator):
    """Endless conversations of ``rule``."""
    if rule == "described":
        return described(rng)
    if rule == "exist":
        return pretraining_pairs(rng, 96, caption_prob=0.0, exist_prob=1.0)
    return colour_questions(rng) if rule == "colour" else toy(rule, rng)


def toy(rule: str, rng: np.random.Generator):
    """Endless single-turn conversations of ``rule`` on solid images (``text``, ``image``,
    ``match``)."""
    names = list(COLOURS)
    while True:
        scene = sample_scene(rng, 96)
        asked, shown = names[rng.integers(len(names))], names[rng.integers(len(names))]
        if rule == "match":
            yes = bool(rng.random() < 0.5)
            others = [c for c in names if c != asked]
            shown = asked if yes else others[rng.integers(len(others))]
        else:
            yes = (asked if rule == "text" else shown) in FIRST
        image = np.empty_like(scene.image)
        image[...] = COLOURS[shown]
        question = f"is there a {asked} object in the image?"
        yield Conversation([image], [(question, "yes" if yes else "no")], pixel_labels(scene))


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rule", choices=RULES)
    parser.add_argument("--lmm", default=str(SHIPPED["tiny_llava"]))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", action="store_true", help="--lmm's architecture, new weights")
    parser.add_argument("--then", choices=RULES, help="a second rule to train on next")
    parser.add_argument("--then-steps", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 4242])
    processor = AutoProcessor.from_pretrained(args.lmm)
    if args.random:
        model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(args.lmm)).float().train()
    else:
        model = LlavaForConditionalGeneration.from_pretrained(args.lmm, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rule, pairs, losses = args.rule, rule_pairs(args.rule, rng), []
    print(f"{rule}: chance loss {math.log(2) / 2:.3f} per answer token")
    for step in range(1, args.steps + args.then_steps + 1):
        if step == args.steps + 1 and args.then:
            rule, pairs = args.then, rule_pairs(args.then, rng)
        batch = make_batch(processor, [next(pairs) for _ in range(args.batch_size)])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % args.every == 0:
            print(f"{rule}: step {step}, loss {np.mean(losses[-args.every :]):.3f}", flush=True)
    return losses


if __name__ == "__main__":
    main()

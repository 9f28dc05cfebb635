"""Questions about a synthetic scene, with their answers, for the tiny LLaVA's pretraining.

Every question knows the object it is about (``subject``, the phrase the visual chain of thought
names: "the object most relevant to the question is the red circle.") and the object a crop of
the image would show (``target``). Kinds: where / what colour / shape / size of an object named
by a referring expression, how many, existence ("Is there a red circle in the image?", POPE's
wording, balanced yes / no, the absent objects drawn like POPE's random, popular and adversarial
ones) and relations between two objects ("is the red circle left of the blue square?").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from flmm.data.synthetic.expressions import (
    MARGIN,
    RELATIONS,
    sample_expressions,
    unique_noun,
)
from flmm.data.synthetic.pope import CATEGORIES, STRATEGIES, absent_ranked, pope_question
from flmm.data.synthetic.world import COLOURS, PLURALS, SHAPES, SIZES, Scene

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
HARD_NEGATIVES = 3  # popular / adversarial "no" objects are drawn from the top of POPE's ranking


@dataclass(frozen=True)
class Question:
    """A question, its answer, the asked object's phrase (None: no single object is asked about)
    and the index of the object a crop would show (None: none)."""

    text: str
    answer: str
    subject: str | None
    target: int | None


class ObjectStats:
    """Running object counts over the scenes seen so far: how many scenes hold each object
    ("colour shape") and each ordered pair, as POPE's popular and adversarial sampling count."""

    def __init__(self) -> None:
        self.frequency: Counter = Counter()
        self.cooc: Counter = Counter()

    def add(self, scene: Scene) -> None:
        """Count ``scene``'s objects."""
        present = present_objects(scene)
        self.frequency.update(present)
        self.cooc.update((a, b) for a in present for b in present if a != b)


def present_objects(scene: Scene) -> list[str]:
    """The objects of ``scene`` as POPE names them ("colour shape"), sorted and distinct."""
    return sorted({f"{o.colour} {o.shape}" for o in scene.objects})


def region(obj, image_size: int) -> str:
    """Where ``obj`` lies in a 3 x 3 grid: "at the top left", "on the right", "in the center"."""
    row = ("top", "", "bottom")[min(int(3 * obj.y / image_size), 2)]
    col = ("left", "", "right")[min(int(3 * obj.x / image_size), 2)]
    if not row and not col:
        return "in the center"
    if not row:
        return f"on the {col}"
    return f"at the {row} {col}".rstrip()


def object_questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """Where / what colour / shape / size, of each object named by one referring expression (its
    kind drawn first, so relational and size expressions are as frequent as the others)."""
    out = []
    for t, o in enumerate(scene.objects):
        for e in sample_expressions(scene, t, rng, 1):
            said = e.text.split()
            out.append(Question(f"where is {e.text}?", region(o, scene.image.shape[0]), e.text, t))
            if o.colour not in said:
                out.append(Question(f"what colour is {e.text}?", o.colour, e.text, t))
            if o.shape not in said and PLURALS[o.shape] not in said:
                out.append(Question(f"what shape is {e.text}?", o.shape, e.text, t))
            out.append(Question(f"what size is {e.text}?", o.size, e.text, t))
    return out


def count_questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """How many objects of a shape, of a colour."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    n_shape = sum(o.shape == shape for o in scene.objects)
    n_colour = sum(o.colour == colour for o in scene.objects)
    return [
        Question(f"how many {PLURALS[shape]} are there?", NUMBERS[n_shape], None, None),
        Question(f"how many {colour} objects are there?", NUMBERS[n_colour], None, None),
    ]


def relation_questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """ "is the red circle left of the blue square?" about two objects that each have a unique
    name, where the relation or its opposite holds by the expressions' margin (yes / no)."""
    objects, margin = scene.objects, MARGIN * scene.image.shape[0]
    named = [(i, n) for i in range(len(objects)) if (n := unique_noun(objects, i))]
    out = []
    for i, a in named:
        for j, b in named:
            rel = list(RELATIONS)[rng.integers(len(RELATIONS))]
            axis, sign = RELATIONS[rel]
            lead = sign * (objects[i].center[axis] - objects[j].center[axis])
            if i != j and abs(lead) >= margin:
                answer = "yes" if lead > 0 else "no"
                out.append(Question(f"is the {a} {rel} the {b}?", answer, f"the {a}", i))
    return out


def existence_question(
    scene: Scene, rng: np.random.Generator, stats: ObjectStats, near_prob: float = 0.0
) -> Question:
    """ "Is there a red circle in the image?", "yes" or "no" with equal chance. Mostly a colour and
    a shape, as POPE asks; sometimes with a size, or one attribute alone ("a circle", "a red
    object"). "no" objects are absent ones drawn uniformly (random), or among the most frequent
    (popular) or most co-occurring with the scene's objects (adversarial) in ``stats``, the
    counts of the scenes seen so far; with chance ``near_prob``, a near miss instead: a present
    object with its colour or its shape changed (:func:`near_miss`)."""
    present = present_objects(scene)
    yes = bool(rng.random() < 0.5)
    u = rng.random()
    if u < 0.15:
        asked = _attribute_object(scene, rng, yes)
    elif u < 0.35:
        asked = _sized_object(scene, rng, yes, present)
    elif not yes and near_prob and rng.random() < near_prob:
        asked = near_miss(rng, present)
    else:
        asked = _pope_object(rng, yes, present, stats)
    return Question(
        pope_question(asked), "yes" if yes else "no", f"the {asked}", _shown(scene, asked)
    )


def near_miss(rng: np.random.Generator, present: list[str]) -> str:
    """An absent "colour shape" one attribute away from a present one ("a red triangle" beside a
    red diamond, "a blue diamond" beside it): a "no" that only binding colour to shape tells."""
    colour, shape = present[rng.integers(len(present))].split(" ")
    same_colour = [o for s in SHAPES if (o := f"{colour} {s}") not in present]
    same_shape = [o for c in COLOURS if (o := f"{c} {shape}") not in present]  # never empty
    options = same_colour if rng.random() < 0.5 and same_colour else same_shape
    return options[rng.integers(len(options))]


def _pope_object(
    rng: np.random.Generator, yes: bool, present: list[str], stats: ObjectStats
) -> str:
    if yes:
        return present[rng.integers(len(present))]
    strategy = STRATEGIES[rng.integers(len(STRATEGIES))]
    if strategy == "random":
        absent = [c for c in CATEGORIES if c not in present]
        return absent[rng.integers(len(absent))]
    ranked = absent_ranked(present, strategy, stats.frequency, stats.cooc)[:HARD_NEGATIVES]
    return ranked[rng.integers(len(ranked))]


def _sized_object(scene: Scene, rng: np.random.Generator, yes: bool, present: list[str]) -> str:
    """A "size colour shape" object present (yes) or absent (no: half the time a present colour
    and shape in the size it does not have, when there is one)."""
    triples = {f"{o.size} {o.colour} {o.shape}" for o in scene.objects}
    if yes:
        options = sorted(triples)
    else:
        other = sorted({f"{s} {p}" for p in present for s in SIZES} - triples)
        absent = [f"{s} {c}" for c in CATEGORIES if c not in present for s in SIZES]
        options = other if other and rng.random() < 0.5 else absent
    return options[rng.integers(len(options))]


def _attribute_object(scene: Scene, rng: np.random.Generator, yes: bool) -> str:
    """A shape ("circle") or a colour ("red object") present (yes) or absent (no)."""
    if rng.random() < 0.5:
        names, have = list(SHAPES), {o.shape for o in scene.objects}
    else:
        names = [f"{c} object" for c in COLOURS]
        have = {f"{o.colour} object" for o in scene.objects}
    options = sorted(have) if yes else [n for n in names if n not in have] or sorted(have)
    return options[rng.integers(len(options))]


def _shown(scene: Scene, asked: str) -> int:
    """The object a grounding of ``asked`` should find: the best match of its words (ties: the
    first), so an absent object's crop shows its nearest look-alike."""
    said = set(asked.split())
    score = [
        len(said & {o.colour, o.shape, o.size}) + 2 * (said >= {o.colour, o.shape})
        for o in scene.objects
    ]
    return int(np.argmax(score))

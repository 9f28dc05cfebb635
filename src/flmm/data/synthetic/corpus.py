"""Text about synthetic scenes, to pretrain a tiny LLaVA: captions, questions and answers.

Every word a caption, question, answer or referring expression can hold is in
:func:`vocabulary`, split the way :func:`words` splits text, so a word-level tokenizer covers it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from flmm.data.synthetic.expressions import DIRECTIONS, RELATIONS, referring_expressions
from flmm.data.synthetic.world import COLOURS, PLURALS, SHAPES, SIZES, Obj, Scene, sample_scene

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
# F-LMM's own instruction (flmm.lmm.families.DEFAULT_INSTRUCTION): the LMM learns to describe
# scenes in exactly the prompt it is later grounded with.
CAPTION_PROMPT = "please give me a description of the image."
# Words of the fixed templates below and in expressions.py.
TEMPLATE_WORDS = (
    "a an the at in on of is there are what where how many colour shape size yes no object "
    "objects image describe please give me description center larger smaller two leftmost rightmost topmost bottommost "
    "left right top bottom above below"
)
# flmm.chat's visual chain of thought asks for "the object most relevant to the question".
COT_QUESTION = "what is the object most relevant to the question?"
COT_ANSWER = "the object most relevant to the question is"
PUNCTUATION = (".", ",", "?")


def words(text: str) -> list[str]:
    """Split lower-cased ``text`` into words and punctuation marks."""
    return re.findall(r"[a-z]+|[.,?]", text.lower())


def vocabulary() -> list[str]:
    """Every word and punctuation mark the synthetic world's text can produce, sorted."""
    parts = [
        TEMPLATE_WORDS,
        COT_QUESTION,
        COT_ANSWER,
        *COLOURS,
        *SHAPES,
        *PLURALS.values(),
        *SIZES,
        *NUMBERS,
        *RELATIONS,
    ]
    parts += [" ".join(d[2:]) for d in DIRECTIONS.values()]
    return sorted({w for p in parts for w in words(p)} | set(PUNCTUATION))


def region(obj: Obj, image_size: int) -> str:
    """Where ``obj`` lies in a 3 x 3 grid: "at the top left", "on the right", "in the center"."""
    row = ("top", "", "bottom")[min(int(3 * obj.y / image_size), 2)]
    col = ("left", "", "right")[min(int(3 * obj.x / image_size), 2)]
    if not row and not col:
        return "in the center"
    if not row:
        return f"on the {col}"
    return f"at the {row} {col}".rstrip()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _name(scene: Scene, t: int, rng: np.random.Generator, refer_prob: float) -> str:
    """A referring expression of object ``t`` (with chance ``refer_prob``) or "a [size] colour shape"."""
    o = scene.objects[t]
    if rng.random() < refer_prob:
        expressions = referring_expressions(scene, t)
        if expressions:
            return expressions[rng.integers(len(expressions))].text
    noun = f"{o.size} {o.colour} {o.shape}" if rng.random() < 0.5 else f"{o.colour} {o.shape}"
    return f"{_article(noun)} {noun}"


def captions(
    scene: Scene, rng: np.random.Generator, refer_prob: float = 0.0, terse: bool = False
) -> str:
    """Name every object (in random order) and where it is: "a red circle at the top left. ...".

    With chance ``refer_prob`` an object is named by one of its referring expressions ("the
    leftmost square at the bottom."); ``terse`` drops the preposition ("the red circle top left."),
    so the word right after a name is already where the object is: the model has to find the
    named object while it reads the name.
    """
    size = scene.image.shape[0]
    parts = []
    for i in rng.permutation(len(scene.objects)):
        where = region(scene.objects[i], size)
        if terse:
            where = where.split(" the ", 1)[1]
        parts.append(f"{_name(scene, int(i), rng, refer_prob)} {where}.")
    return " ".join(parts)


def _object_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    qa = []
    size = scene.image.shape[0]
    for t, o in enumerate(scene.objects):
        expressions = referring_expressions(scene, t)
        if not expressions:
            continue
        e = expressions[rng.integers(len(expressions))].text
        qa.append((f"where is {e}?", region(o, size)))
        qa.append((f"where is {e}? {COT_QUESTION}", f"{COT_ANSWER} {e}."))
        if o.colour not in e.split():
            qa.append((f"what colour is {e}?", o.colour))
        if o.shape not in e.split() and PLURALS[o.shape] not in e.split():
            qa.append((f"what shape is {e}?", o.shape))
        qa.append((f"what size is {e}?", o.size))
    return qa


def _count_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    n_shape = sum(o.shape == shape for o in scene.objects)
    n_colour = sum(o.colour == colour for o in scene.objects)
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = sorted({(c, s) for c in COLOURS for s in SHAPES} - present)
    # as many "yes" as "no" answers, so that "yes" alone is no better than chance
    pool = sorted(present) if rng.random() < 0.5 else absent
    asked = pool[rng.integers(len(pool))]
    return [
        (f"how many {PLURALS[shape]} are there?", NUMBERS[n_shape]),
        (f"how many {colour} objects are there?", NUMBERS[n_colour]),
        (
            f"is there {_article(asked[0])} {asked[0]} {asked[1]}?",
            "yes" if asked in present else "no",
        ),
    ]


def qa(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Question-answer pairs about ``scene``: where, what colour / shape / size, how many..."""
    return _object_questions(scene, rng) + _count_questions(scene, rng)


def pretraining_pairs(
    rng: np.random.Generator,
    image_size: int = 96,
    n_objects: tuple[int, int] = (3, 5),
    caption_prob: float = 0.5,
    refer_prob: float = 0.0,
    terse: bool = False,
) -> Iterator[tuple[np.ndarray, str, str]]:
    """Endless ``(image, prompt, answer)`` triples on fresh scenes: captions (chance
    ``caption_prob``, see :func:`captions`) or one question-answer pair."""
    while True:
        scene = sample_scene(rng, image_size, n_objects)
        if rng.random() < caption_prob:
            yield scene.image, CAPTION_PROMPT, captions(scene, rng, refer_prob, terse)
        else:
            pairs = qa(scene, rng)
            question, answer = pairs[rng.integers(len(pairs))]
            yield scene.image, question, answer

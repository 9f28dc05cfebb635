"""Text about synthetic scenes, to pretrain a tiny LLaVA: captions, questions and answers.

:func:`pretraining_pairs` mixes captions in F-LMM's own prompt format, existence questions in
POPE's wording, other questions (:mod:`flmm.data.synthetic.questions`), the visual chain of thought
("the object most relevant to the question is ...") on questions about one object, and questions
asked with a second image, a crop around an object, as ``flmm.chat.conversation``'s visual chain of thought asks
again. Scenes come from the generator given, a stream apart from the world's splits
(:data:`~flmm.data.synthetic.streams.Stream.PRETRAIN`), so the held-out val and test scenes are
never pretrained on.

Every word a caption, question, answer or referring expression can hold is in
:func:`vocabulary`, split the way :func:`words` splits text, so a word-level tokenizer covers it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from flmm.data.masks import expand_box, mask_box
from flmm.data.synthetic.expressions import DIRECTIONS, RELATIONS, referring_expressions
from flmm.data.synthetic.questions import (
    NUMBERS,
    ObjectStats,
    Question,
    count_questions,
    existence_question,
    object_questions,
    region,
    relation_questions,
)
from flmm.data.synthetic.world import COLOURS, PLURALS, SHAPES, SIZES, Scene, sample_scene

# F-LMM's own instruction (flmm.lmm.families.DEFAULT_INSTRUCTION): the LMM learns to describe
# scenes in exactly the prompt it is later grounded with.
CAPTION_PROMPT = "please give me a description of the image."
# Words of the fixed templates below and in expressions.py.
TEMPLATE_WORDS = (
    "a an the at in on of is there are what where how many colour shape size yes no object "
    "objects image describe please give me description center larger smaller two leftmost rightmost topmost bottommost "
    "left right top bottom above below"
)
# flmm.chat.conversation's visual chain of thought asks for "the object most relevant to the question".
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


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _name(scene: Scene, t: int, rng: np.random.Generator, refer_prob: float) -> str:
    """A referring expression of object ``t`` (with chance ``refer_prob``) or "a [size] colour
    shape" (the size in 70% of names)."""
    o = scene.objects[t]
    if rng.random() < refer_prob:
        expressions = referring_expressions(scene, t)
        if expressions:
            return expressions[rng.integers(len(expressions))].text
    noun = f"{o.size} {o.colour} {o.shape}" if rng.random() < 0.7 else f"{o.colour} {o.shape}"
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


def qa(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Question-answer pairs about ``scene`` (every kind but existence, see :func:`questions`)."""
    return [(q.text, q.answer) for q in questions(scene, rng)]


def questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """Where, what colour / shape / size, how many, and relations about ``scene``."""
    return (
        object_questions(scene, rng) + count_questions(scene, rng) + relation_questions(scene, rng)
    )


def crop(scene: Scene, t: int) -> np.ndarray:
    """The image inside object ``t``'s box grown as ``flmm.chat.conversation``'s visual chain of thought grows
    it (``h x w x 3`` uint8)."""
    x0, y0, x1, y1 = expand_box(mask_box(scene.objects[t].mask), scene.image.shape[:2])
    return scene.image[y0:y1, x0:x1]


def ask(
    scene: Scene,
    q: Question,
    rng: np.random.Generator,
    cot_prob: float,
    crop_prob: float,
    decoy_prob: float = 0.0,
) -> tuple[list[np.ndarray], str, str]:
    """``(images, prompt, answer)`` of ``q``: with chance ``cot_prob`` (if it asks about one
    object) its chain-of-thought step naming that object; else, with chance ``crop_prob`` (if it
    shows one), the question about the image and the crop of that object; else the question.

    A "no" question's crop shows a random object of the scene instead with chance
    ``decoy_prob``: the visual chain of thought grounds an absent object wherever its attention
    lands, so a crop is no evidence for "yes" (0: no RNG draw, the stream of earlier stages)."""
    if q.subject is not None and rng.random() < cot_prob:
        return [scene.image], f"{q.text} {COT_QUESTION}", f"{COT_ANSWER} {q.subject}."
    if q.target is not None and rng.random() < crop_prob:
        shown = q.target
        if decoy_prob and q.answer == "no" and rng.random() < decoy_prob:
            shown = int(rng.integers(len(scene.objects)))
        return [scene.image, crop(scene, shown)], q.text, q.answer
    return [scene.image], q.text, q.answer


class Conversation(NamedTuple):
    """One pretraining sample: ``images`` (the scene's ``H x W x 3`` uint8 image, then any crop),
    ``turns`` ``[(prompt, answer), ...]``, and ``labels``, ``2 x H x W`` uint8: the colour and the
    shape of the object under each pixel of the scene's image (1-based indices into
    :data:`~flmm.data.synthetic.world.COLOURS` and ``SHAPES``; 0: background)."""

    images: list[np.ndarray]
    turns: list[tuple[str, str]]
    labels: np.ndarray


def pixel_labels(scene: Scene) -> np.ndarray:
    """``2 x H x W`` uint8: each pixel's object colour and shape index (1-based; 0: none)."""
    labels = np.zeros((2, *scene.image.shape[:2]), dtype=np.uint8)
    for o in scene.objects:
        labels[0][o.mask] = list(COLOURS).index(o.colour) + 1
        labels[1][o.mask] = SHAPES.index(o.shape) + 1
    return labels


def any_question(
    scene: Scene,
    rng: np.random.Generator,
    stats: ObjectStats,
    exist_prob: float,
    near_prob: float = 0.0,
) -> Question:
    """An existence question (chance ``exist_prob``; ``near_prob``: its near-miss "no"s, see
    :func:`~flmm.data.synthetic.questions.existence_question`) or one of :func:`questions`."""
    if rng.random() < exist_prob:
        return existence_question(scene, rng, stats, near_prob)
    pool = questions(scene, rng)
    return pool[rng.integers(len(pool))]


def pretraining_pairs(
    rng: np.random.Generator,
    image_size: int = 96,
    n_objects: tuple[int, int] = (3, 5),
    caption_prob: float = 0.5,
    refer_prob: float = 0.0,
    terse: bool = False,
    exist_prob: float = 0.0,
    cot_prob: float = 0.0,
    crop_prob: float = 0.0,
    turns: int = 1,
    stats: ObjectStats | None = None,
    near_prob: float = 0.0,
    decoy_prob: float = 0.0,
) -> Iterator[Conversation]:
    """Endless :class:`Conversation` s about fresh scenes of ``rng``.

    The first turn is a caption (chance ``caption_prob``, see :func:`captions`) or a question
    (an existence question with chance ``exist_prob``, its "no"s near misses with chance
    ``near_prob``, see :func:`any_question`) asked as :func:`ask` says (``decoy_prob``: a
    "no"'s crop shows a random object); ``turns - 1`` more questions follow (text only, no
    crop), so the image is read once for several answers. ``stats`` counts the scenes drawn
    (for POPE-like "no" objects); new if None.
    """
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns}")
    stats = ObjectStats() if stats is None else stats
    while True:
        scene = sample_scene(rng, image_size, n_objects)
        stats.add(scene)
        if rng.random() < caption_prob:
            images, first = [scene.image], (CAPTION_PROMPT, captions(scene, rng, refer_prob, terse))
        else:
            q = any_question(scene, rng, stats, exist_prob, near_prob)
            images, *first = ask(scene, q, rng, cot_prob, crop_prob, decoy_prob)
        more = [any_question(scene, rng, stats, exist_prob, near_prob) for _ in range(turns - 1)]
        talk = [tuple(first)] + [ask(scene, q, rng, cot_prob, 0.0)[1:] for q in more]
        yield Conversation(images, talk, pixel_labels(scene))

"""Caption hallucination, CHAIR-style, from the synthetic world's ground truth.

A caption *mentions* an object wherever it says an object noun (a shape, its plural, "object"),
with the size and colour words right before it: "a small red circle", "the blue object", "the
two triangles". A mention is *hallucinated* when no object of the scene has all the attributes
it says. Bare "object" (no attribute) fits every scene and is not counted. CHAIR's two figures
(Rohrbach et al., 2018): the share of mentions hallucinated (CHAIR_i) and the share of captions
with at least one (CHAIR_s). Their other side, *coverage*: the share of the scenes' objects that
some mention fits (a caption that names one object four times scores low there, not in CHAIR).
"""

from __future__ import annotations

from flmm.data.synthetic.corpus import words
from flmm.data.synthetic.world import COLOURS, PLURALS, SHAPES, SIZES

NOUNS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}, "object": None}
NOUNS["objects"] = None


def mentions(caption: str) -> list[dict[str, str]]:
    """The attributes (``shape``, ``colour``, ``size``) of each object ``caption`` mentions."""
    tokens, out = words(caption), []
    for i, token in enumerate(tokens):
        if token not in NOUNS:
            continue
        said = {"shape": NOUNS[token]} if NOUNS[token] else {}
        for before in reversed(tokens[:i]):
            key = "colour" if before in COLOURS else "size" if before in SIZES else None
            if key is None or key in said:
                break
            said[key] = before
        if said:
            out.append(said)
    return out


def _fits(mention: dict[str, str], obj: dict[str, str]) -> bool:
    return all(obj[k] == v for k, v in mention.items())


def hallucinated(caption: str, objects: list[dict[str, str]]) -> tuple[int, int]:
    """``(hallucinated mentions, mentions)`` of ``caption`` about a scene whose objects have
    the attributes ``objects`` (each a dict with ``shape``, ``colour``, ``size``)."""
    found = mentions(caption)
    return sum(not any(_fits(m, o) for o in objects) for m in found), len(found)


def covered(caption: str, objects: list[dict[str, str]]) -> int:
    """How many of ``objects`` some mention of ``caption`` fits."""
    found = mentions(caption)
    return sum(any(_fits(m, o) for m in found) for o in objects)


def chair(captions: list[str], scenes: list[list[dict[str, str]]]) -> dict[str, float]:
    """CHAIR_i (share of mentions hallucinated), CHAIR_s (share of captions with one), coverage
    (share of the scenes' objects mentioned), counts."""
    counts = [hallucinated(c, s) for c, s in zip(captions, scenes, strict=True)]
    wrong, total = sum(w for w, _ in counts), sum(n for _, n in counts)
    objects = sum(len(s) for s in scenes)
    return {
        "chair_i": wrong / total if total else 0.0,
        "chair_s": sum(w > 0 for w, _ in counts) / len(counts) if counts else 0.0,
        "coverage": sum(map(covered, captions, scenes)) / objects if objects else 0.0,
        "mentions": total,
        "hallucinated": wrong,
        "captions": len(counts),
    }

"""Referring expressions that pick out exactly one object of a synthetic scene.

Kinds: ``colour_shape`` ("the red circle"), ``shape_only`` ("the circle"), ``colour_only`` ("the
red object"), ``size`` ("the small blue square", "the larger of the two triangles"),
``position`` ("the leftmost circle", "the square at the top") and ``relational`` ("the circle left
of the blue square"). Semantics, which a resolver needs: "left of X" means a centre x smaller than
X's, "above X" a centre y smaller than X's; "leftmost" / "on the left" the smallest centre x among
the described objects. Generated positions and relations also hold by a margin, so that they are
visible, and no other described object satisfies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flmm.data.synthetic.world import PLURALS, Obj, Scene

KINDS = ("colour_shape", "shape_only", "colour_only", "size", "position", "relational")
MARGIN = 0.08  # fraction of the image side by which positions and relations must hold
# direction -> (centre axis, sign: -1 when the smallest coordinate wins, superlative, phrase)
DIRECTIONS = {
    "left": (1, -1, "leftmost", "on the left"),
    "right": (1, 1, "rightmost", "on the right"),
    "top": (0, -1, "topmost", "at the top"),
    "bottom": (0, 1, "bottommost", "at the bottom"),
}
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}


@dataclass(frozen=True)
class Expression:
    """A referring expression of ``target`` (an index into ``scene.objects``).

    ``colour_resolvable``: the target's colour is unique in the scene, so perfect colour-only
    grounding would find it whatever the words say.
    """

    text: str
    kind: str
    target: int
    colour_resolvable: bool


def matching(objects: list[Obj], **attrs: str) -> list[int]:
    """Indices of the objects whose attributes (``shape``, ``colour``, ``size``) all match."""
    return [i for i, o in enumerate(objects) if all(getattr(o, k) == v for k, v in attrs.items())]


def _descriptions(objects: list[Obj], t: int) -> list[tuple[str, list[int]]]:
    """Noun phrases for the target's group, each with the indices of the objects it describes."""
    o = objects[t]
    return [
        (o.shape, matching(objects, shape=o.shape)),
        (f"{o.colour} {o.shape}", matching(objects, shape=o.shape, colour=o.colour)),
        ("object", list(range(len(objects)))),
    ]


def unique_noun(objects: list[Obj], i: int) -> str | None:
    o = objects[i]
    if len(matching(objects, shape=o.shape)) == 1:
        return o.shape
    if len(matching(objects, shape=o.shape, colour=o.colour)) == 1:
        return f"{o.colour} {o.shape}"
    return None


def _attribute_expressions(objects: list[Obj], t: int) -> list[tuple[str, str]]:
    o, out = objects[t], []
    if len(matching(objects, colour=o.colour, shape=o.shape)) == 1:
        out.append(("colour_shape", f"the {o.colour} {o.shape}"))
    if len(matching(objects, shape=o.shape)) == 1:
        out.append(("shape_only", f"the {o.shape}"))
    if len(matching(objects, colour=o.colour)) == 1:
        out.append(("colour_only", f"the {o.colour} object"))
    return out


def _size_expressions(objects: list[Obj], t: int) -> list[tuple[str, str]]:
    o, out = objects[t], []
    same_shape = matching(objects, shape=o.shape)
    if len(same_shape) >= 2 and len(matching(objects, shape=o.shape, size=o.size)) == 1:
        out.append(("size", f"the {o.size} {o.shape}"))
    same_cs = matching(objects, shape=o.shape, colour=o.colour)
    same_all = matching(objects, shape=o.shape, colour=o.colour, size=o.size)
    if len(same_cs) >= 2 and len(same_all) == 1:
        out.append(("size", f"the {o.size} {o.colour} {o.shape}"))
    if len(same_shape) == 2 and len({objects[i].size for i in same_shape}) == 2:
        comparative = "larger" if o.size == "large" else "smaller"
        out.append(("size", f"the {comparative} of the two {PLURALS[o.shape]}"))
    return out


def _position_expressions(objects: list[Obj], t: int, margin: float) -> list[tuple[str, str]]:
    out = []
    for noun, group in _descriptions(objects, t):
        if len(group) < 2:
            continue
        for axis, sign, superlative, phrase in DIRECTIONS.values():
            here = objects[t].center[axis]
            lead = min(sign * (here - objects[i].center[axis]) for i in group if i != t)
            if lead >= margin:
                out.append(("position", f"the {superlative} {noun}"))
                out.append(("position", f"the {noun} {phrase}"))
    return out


def _relational_expressions(objects: list[Obj], t: int, margin: float) -> list[tuple[str, str]]:
    out = []
    for noun, group in _descriptions(objects, t)[:2]:
        if len(group) < 2:
            continue
        for j in range(len(objects)):
            landmark = unique_noun(objects, j)
            if j in group or landmark is None:
                continue
            for rel, (axis, sign) in RELATIONS.items():
                ref = objects[j].center[axis]
                holds = sign * (objects[t].center[axis] - ref) >= margin
                others_fail = all(
                    sign * (objects[i].center[axis] - ref) <= 0 for i in group if i != t
                )
                if holds and others_fail:
                    out.append(("relational", f"the {noun} {rel} the {landmark}"))
    return out


def referring_expressions(scene: Scene, target: int) -> list[Expression]:
    """Every expression (of every kind) that picks out exactly object ``target``."""
    objects = scene.objects
    margin = MARGIN * scene.image.shape[0]
    resolvable = len(matching(objects, colour=objects[target].colour)) == 1
    found = (
        _attribute_expressions(objects, target)
        + _size_expressions(objects, target)
        + _position_expressions(objects, target, margin)
        + _relational_expressions(objects, target, margin)
    )
    return [Expression(text, kind, target, resolvable) for kind, text in found]


def sample_expressions(
    scene: Scene, target: int, rng: np.random.Generator, n: int
) -> list[Expression]:
    """Up to ``n`` expressions of ``target``, each of a different kind (kinds drawn at random)."""
    by_kind: dict[str, list[Expression]] = {}
    for e in referring_expressions(scene, target):
        by_kind.setdefault(e.kind, []).append(e)
    kinds = [k for k in KINDS if k in by_kind]
    chosen: list[Expression] = []
    for k in rng.permutation(len(kinds)):
        if len(chosen) < n:
            options = by_kind[kinds[k]]
            chosen.append(options[rng.integers(len(options))])
    return chosen

"""A synthetic world of coloured shapes with exact masks, for grounding experiments on a CPU.

Scenes hold 3-5 non-overlapping objects (shape, colour, size) on a plain, noisy or striped light
background. Distractors often share the colour or the shape of an earlier object, so that colour
alone rarely tells the objects apart. Everything is drawn from a ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 55, 185),
    "orange": (245, 130, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
SIZES = ("small", "large")
SIZE_RADIUS = {"small": 0.085, "large": 0.15}  # half extent, as a fraction of the image side
SHARE_COLOUR, SHARE_SHAPE = 0.4, 0.35  # chance that a distractor copies a colour / a shape
GAP = 2.0  # pixels left between the enclosing circles of two objects


@dataclass
class Obj:
    """One object: attributes, centre ``(y, x)`` in pixels, half extent, exact ``H x W`` mask."""

    shape: str
    colour: str
    size: str
    center: tuple[float, float]
    radius: float
    mask: np.ndarray

    @property
    def y(self) -> float:
        return self.center[0]

    @property
    def x(self) -> float:
        return self.center[1]


@dataclass
class Scene:
    """``image`` is ``H x W x 3`` uint8 RGB; every object's mask covers exactly its pixels."""

    image: np.ndarray
    objects: list[Obj]


def shape_mask(shape: str, center: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """Rasterise ``shape`` (pixel centres inside it) on a ``size x size`` grid, as bool."""
    grid = np.arange(size) + 0.5
    dy, dx = grid[:, None] - center[0], grid[None, :] - center[1]
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        side = 0.85 * radius
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    if shape == "triangle":  # apex up; the base lies at 0.75 radius below the centre
        depth = (dy + radius) / (1.75 * radius)
        return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= radius * depth)
    if shape == "cross":
        arm = radius / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | (
            (np.abs(dy) <= arm) & (np.abs(dx) <= radius)
        )
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _attributes(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    colours, attrs = list(COLOURS), []
    for _ in range(n):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))]
        if attrs:
            u, other = rng.random(), attrs[rng.integers(len(attrs))]
            if u < SHARE_COLOUR:
                colour = other[1]
            elif u < SHARE_COLOUR + SHARE_SHAPE:
                shape = other[0]
        attrs.append((shape, colour, SIZES[rng.integers(len(SIZES))]))
    return attrs


def _place(
    rng: np.random.Generator, radii: list[float], size: int
) -> list[tuple[float, float]] | None:
    centers: list[tuple[float, float]] = []
    for r in radii:
        reach = 1.21 * r  # encloses every shape (the square's corners reach 0.85 * sqrt(2))
        for _ in range(100):
            c = tuple(rng.uniform(reach + 1, size - reach - 1, size=2))
            if all(
                np.hypot(c[0] - o[0], c[1] - o[1]) >= reach + 1.21 * ro + GAP
                for o, ro in zip(centers, radii)
            ):
                centers.append(c)
                break
        else:
            return None
    return centers


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(190, 236)
    image = np.full((size, size, 3), base, dtype=np.int16)
    style = rng.integers(3)
    if style == 1:
        image += rng.integers(-6, 7, size=(size, size, 1), dtype=np.int16)
    elif style == 2:
        period = int(rng.integers(6, 16))
        stripes = ((np.arange(size) // period) % 2 * 10 - 5).astype(np.int16)
        image += stripes[None, :, None] if rng.random() < 0.5 else stripes[:, None, None]
    return image


def sample_scene(
    rng: np.random.Generator, image_size: int = 96, n_objects: tuple[int, int] = (3, 5)
) -> Scene:
    """Draw a scene of ``n_objects[0]..n_objects[1]`` (inclusive) non-overlapping objects."""
    while True:
        attrs = _attributes(rng, int(rng.integers(n_objects[0], n_objects[1] + 1)))
        radii = [SIZE_RADIUS[a[2]] * image_size for a in attrs]
        centers = _place(rng, radii, image_size)
        if centers is not None:
            break
    image = _background(rng, image_size)
    objects = []
    for (shape, colour, size), c, r in zip(attrs, centers, radii):
        mask = shape_mask(shape, c, r, image_size)
        noise = rng.integers(-8, 9, size=(int(mask.sum()), 1))
        image[mask] = np.array(COLOURS[colour], dtype=np.int16) + noise
        objects.append(Obj(shape, colour, size, (float(c[0]), float(c[1])), float(r), mask))
    return Scene(np.clip(image, 0, 255).astype(np.uint8), objects)

"""Line charts of a run's curves drawn with PIL (matplotlib is not a core dependency)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from flmm.overlay import phrase_colour

WIDTH, HEIGHT = 480, 320
MARGIN = {"left": 52, "right": 12, "top": 40, "bottom": 34}
GREY, BLACK = (200, 200, 200), (0, 0, 0)


def line_charts(charts: dict[str, tuple[str, dict[str, list]]]) -> np.ndarray:
    """Charts side by side: ``{title: (x label, {series name: [(x, y), ...]})}``, each series a
    line in its own colour (dots where it has few points; NaNs left out), with a legend above the
    plot and min / max ticks."""
    canvas = Image.new("RGB", (WIDTH * len(charts), HEIGHT), (255, 255, 255))
    for i, (title, (xlabel, series)) in enumerate(charts.items()):
        draw_chart(ImageDraw.Draw(canvas), i * WIDTH, title, xlabel, series)
    return np.asarray(canvas)


def draw_chart(draw: ImageDraw.ImageDraw, left: int, title: str, xlabel: str, series) -> None:
    x0, y0 = left + MARGIN["left"], MARGIN["top"]
    x1, y1 = left + WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]
    draw.text((x0, 4), title, fill=BLACK)
    series = {name: [p for p in pts if np.isfinite(p[1])] for name, pts in series.items()}
    legend = x0
    for k, name in enumerate(series):
        draw.line((legend, 25, legend + 14, 25), fill=colour(k), width=3)
        draw.text((legend + 18, 19), name, fill=BLACK)
        legend += 30 + int(draw.textlength(name))
    draw.rectangle((x0, y0, x1, y1), outline=BLACK)
    draw.text(((x0 + x1) // 2 - 3 * len(xlabel), y1 + 18), xlabel, fill=BLACK)
    points = [p for pts in series.values() for p in pts]
    if not points:
        draw.text((x0 + 8, y0 + 8), "nothing logged", fill=BLACK)
        return
    xs, ys = np.array(points, dtype=float).T
    (xmin, xmax), (ymin, ymax) = padded(xs.min(), xs.max()), padded(ys.min(), ys.max())
    for frac in (0.0, 0.5, 1.0):
        y = y1 - frac * (y1 - y0)
        draw.line((x0, y, x1, y), fill=GREY)
        draw.text((left + 4, y - 6), f"{ymin + frac * (ymax - ymin):.3g}", fill=BLACK)
    for frac, anchor in ((0.0, "la"), (1.0, "ra")):
        draw.text(
            (x0 + frac * (x1 - x0), y1 + 4),
            f"{xmin + frac * (xmax - xmin):g}",
            fill=BLACK,
            anchor=anchor,
        )

    def at(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (
            y1 - y0
        )

    for k, pts in enumerate(series.values()):
        xy = [at(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour(k), width=2)
        for x, y in xy if len(xy) <= 50 else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour(k))


def colour(k: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in phrase_colour(k))


def padded(low: float, high: float) -> tuple[float, float]:
    """An axis range around ``[low, high]`` that is never empty."""
    return (low, high) if high > low else (low - 0.5, high + 0.5)

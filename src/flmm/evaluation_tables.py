"""The tables ``flmm evaluate`` prints and the flat figures it writes, from its nested results
(``dataset -> split -> protocol -> stage -> metric -> value``)."""

from __future__ import annotations

import math

from rich.table import Table

STAGES = ("refined", "coarse")
DISPLAY = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg", "png": "PNG"}
PNG_COLUMNS = ("all", "things", "stuff", "singular", "plural")


def flat_figures(results: dict) -> dict[str, float]:
    """``<dataset>/<split>/<protocol>/<stage>/<metric>`` -> value, for ``metrics.json``."""
    return {
        f"{name}/{split}/{protocol}/{stage}/{metric}": value
        for name, splits in results.items()
        for split, protocols in splits.items()
        for protocol, scores in protocols.items()
        for stage in STAGES
        for metric, value in scores[stage].items()
    }


def refer_tables(results: dict, metric: str) -> Table:
    """Paper-shaped table: one column per dataset split, one row per protocol and stage."""
    columns = [
        (name, split) for name, splits in results.items() if name != "png" for split in splits
    ]
    protocols = list(dict.fromkeys(p for n, s in columns for p in results[n][s]))
    table = Table(title=f"{metric} (x100)")
    table.add_column("protocol / masks")
    for name, split in columns:
        table.add_column(f"{DISPLAY.get(name, name)} {split}", justify="right")
    for protocol in protocols:
        for stage in STAGES:
            row = [
                _cell(results[n][s].get(protocol, {}).get(stage, {}).get(metric))
                for n, s in columns
            ]
            table.add_row(f"{protocol} / {stage}", *row)
    return table


def png_table(results: dict) -> Table:
    """PNG average recall (x100) for all / things / stuff / singular / plural, per stage."""
    table = Table(title="PNG average recall (x100)")
    table.add_column("split / masks")
    for column in PNG_COLUMNS:
        table.add_column(column, justify="right")
    for split, protocols in results.get("png", {}).items():
        for stage in STAGES:
            scores = protocols["reference"][stage]
            table.add_row(
                f"{split} / {stage}", *[_cell(scores.get(f"ar/{c}")) for c in PNG_COLUMNS]
            )
    return table


def _cell(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f}"

"""The report of ``gpu_sizing.py``: its rows (one per family x precision x case), the JSON
header, the c/a ratios of the cached step and the README's markdown table."""

from __future__ import annotations

import importlib.metadata
import platform

import cache_size
import torch
import train_throughput as tt
import transformers

SCHEMA = "flmm-gpu-sizing/1"
TRAIN_CASES = ("train-b8", "train-b1", "ground")
CACHED_CASES = ("reference-b1", "cached-b8", "cached-b8-compiled")
BATCH = {"train-b8": 8, "train-b1": 1, "ground": 1, "reference-b1": 1}
BATCH |= {"cached-b8": 8, "cached-b8-compiled": 8, "quantize-in-memory": None}
NOT_REACHED = "not measured: not reached"
NOT_RUN = "not measured: not run"


def new_row(index: int, family: str, precision: str, case: str) -> dict:
    """A row of group ``index``, not measured yet (numbers None until it is)."""
    return {
        "group": index,
        "family": family,
        "checkpoint": cache_size.HEADLINE[family].checkpoint,
        "precision": precision,
        "case": case,
        "batch": BATCH[case],
        "status": NOT_REACHED,
        "peak_gib": None,
        "samples_per_s": None,
        "seconds_per_pass": None,
        "samples_per_pass": None,
        "note": None,
    }


def new_report(mode: str, families: list[str], budget_s: float, rows: list[dict]) -> dict:
    """The report before anything ran: versions, how memory and time are read, the rows, and the
    feature cache's sizes (which need no GPU)."""
    try:
        bnb = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb = None
    cuda = mode == "gpu"  # smoke and dry-run: the CPU
    return {
        "schema": SCHEMA,
        "mode": mode,
        "machine": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb,
        "memory": "max_memory_allocated" if cuda else "peak RSS (VmHWM)",
        "clock": "wall-clock" if cuda else "process CPU time",
        "budget_s": budget_s,
        "elapsed_s": 0.0,
        "finished": False,
        "families": {
            f: {"checkpoint": cache_size.HEADLINE[f].checkpoint, "builder": None, "shape": None}
            for f in families
        },
        "setup": [],
        "rows": rows,
        "cached_step": {},
        "feature_cache": cache_size.report(),
    }


def line(row: dict) -> str:
    """A row as a progress line."""
    name = f"{row['family']} {row['precision']} {row['case']}"
    if row["status"] != "measured":
        return f"{name}: {row['status']}"
    if row["samples_per_s"] is None:
        return f"{name}: {row['seconds_per_pass']:.1f} s ({row['note']})"
    return f"{name}: {row['peak_gib']:.2f} GiB, {row['samples_per_s']:.2f} samples/s"


def cached_ratios(rows: list[dict]) -> dict:
    """train_throughput's c/a (cached vs the reference's way) with the heads eager and compiled."""
    found = {r["case"]: r for r in rows if r["case"] in CACHED_CASES and r["status"] == "measured"}
    out = {"target": tt.TARGETS["c/a samples/s"][0]}
    for name, case in (("eager", "cached-b8"), ("compiled", "cached-b8-compiled")):
        if {case, "reference-b1"} <= found.keys():
            pair = {"reference": found["reference-b1"], "cached": found[case]}
            out[name] = tt.ratios(pair)["c/a samples/s"]
    return out


def markdown(report: dict) -> str:
    """The README's table: a row per family x precision; train b1, train b8 and ground cells
    (peak GiB, samples/s); the feature cache's MB per sample and its size for the paper's mix on
    each family's first row."""
    columns = ["family (checkpoint)", "precision", "train b1", "train b8", "ground"]
    columns += ["cache MB/sample", "cache for the mix"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for row in report["rows"]:
        if row["case"] in TRAIN_CASES:
            cells.setdefault((row["family"], row["precision"]), {})[row["case"]] = cell(row)
    seen = set()
    for (family, precision), by_case in cells.items():
        first = ["", "", ""]
        if family not in seen:
            seen.add(family)
            cache = report["feature_cache"]["families"][family]
            first = [
                f"{family} ({cache['checkpoint']})",
                f"{cache['mix_bytes_per_sample'] / 1e6:.1f}",
                f"{cache['mix_bytes'] / 1e12:.2f} TB",
            ]
        runs = [by_case.get(c, "") for c in ("train-b1", "train-b8", "ground")]
        lines.append("| " + " | ".join([first[0], precision, *runs, *first[1:]]) + " |")
    return "\n".join(lines)


def cell(row: dict) -> str:
    """``peak GiB, samples/s`` of a measured row; else why not, in a word or two."""
    if row["status"] == "measured":
        return f"{row['peak_gib']:.1f} GiB, {row['samples_per_s']:.2f}/s"
    if row["status"] in (NOT_REACHED, NOT_RUN) or row["status"].startswith("not measured: budget"):
        return "not measured yet"
    return row["status"].split(":")[0]

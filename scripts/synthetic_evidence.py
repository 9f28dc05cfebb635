"""The synthetic world's evidence table (`make evidence`).

Trains F-LMM twice with identical settings on the same world: on the pretrained tiny LLaVA (the
default run) and on the same architecture with random weights (`model/lmm=tiny_random_weights`). Scores
the held-out test split per phrase and prints:
  - gIoU of both, by phrase group, and the gap with a paired bootstrap 95% interval;
  - coarse (mask head) vs refined (SAM) masks;
  - reference rows: a trivial whole-image mask, perfect colour-only and shape-only grounding;
  - whether the frozen LMM's greedy answers were identical before and after training.
Writes `evidence.md` and `evidence.json` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flmm.data.refer import ReferDataset
from flmm.data.synthetic.write import attribute_oracle_masks
from flmm.files import flmm_home

RUNS = {"pretrained": [], "random": ["model/lmm=tiny_random_weights"]}


def train(name: str, out: Path, extra: list[str]) -> tuple[Path, float]:
    """Run `python -m flmm.train` into ``out/name``; returns the run folder and its wall time.
    An earlier run there is kept, renamed ``<name>.before-<its time>``."""
    run_dir = out / name
    if run_dir.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(run_dir.stat().st_mtime))
        run_dir.rename(out / f"{name}.before-{stamp}")
        print(f"kept the earlier {name} run as {out / f'{name}.before-{stamp}'}", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "flmm.train",
        f"output_dir={run_dir}",
        f"task_name=evidence_{name}",
        *RUNS[name],
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    return run_dir, time.time() - start


def load_records(run_dir: Path) -> dict[tuple, dict]:
    lines = (run_dir / "test_phrases.jsonl").read_text().splitlines()
    return {(r["image_id"], r["phrase"]): r for r in map(json.loads, lines)}


def reference_rows(world: Path) -> dict[tuple, dict]:
    """Per-phrase IoU of a whole-image mask and of perfect single-attribute grounding."""
    data = ReferDataset(world, world / "images", "synthetic", "unc", "test", "reference")
    rows = {}
    for sample in data:
        oracles = {a: attribute_oracle_masks(data, sample, a) for a in ("colour", "shape")}
        for k, (phrase, target) in enumerate(zip(sample.phrases, sample.masks)):
            row = {"trivial_whole_image": target.mean()}
            row.update({f"{a}_only_oracle": iou(m[k], target) for a, m in oracles.items()})
            rows[(sample.meta["image_id"], phrase)] = row
    return rows


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(pred, target).sum()
    return float(np.logical_and(pred, target).sum() / union) if union else 1.0


def groups(records: list[dict]) -> dict[str, np.ndarray]:
    """Boolean selections of phrases: all, colour+shape, not colour-resolvable, one per kind."""
    kinds = np.array([r.get("kind", "") for r in records])
    out = {
        "all": np.ones(len(records), bool),
        "colour alone cannot resolve": np.array(
            [not r.get("colour_resolvable", True) for r in records]
        ),
    }
    out.update({f"kind: {k}": kinds == k for k in sorted(set(kinds))})
    return out


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its 95% percentile interval over ``n`` resamples of the phrases."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def table(keys: list[tuple], runs: dict[str, dict], refs: dict[tuple, dict]) -> tuple[str, dict]:
    records = [runs["pretrained"][k] for k in keys]
    head = "| phrases | n | pretrained refined | pretrained coarse | random refined | random coarse | gap (refined) [95% CI] | whole image | colour-only oracle | shape-only oracle |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    summary = {}
    for name, sel in groups(records).items():
        if not sel.any():
            continue
        ks = [k for k, s in zip(keys, sel) if s]
        col = {
            f"{run}_{stage}": 100 * np.array([runs[run][k][f"iou_{stage}"] for k in ks])
            for run in runs
            for stage in ("refined", "coarse")
        }
        ref = {
            r: 100 * np.array([refs[k][r] for k in ks])
            for r in ("trivial_whole_image", "colour_only_oracle", "shape_only_oracle")
        }
        gap = paired_bootstrap(col["pretrained_refined"], col["random_refined"])
        summary[name] = {
            "n": len(ks),
            **{c: float(v.mean()) for c, v in {**col, **ref}.items()},
            "gap": gap,
        }
        cells = [
            f"{col[c].mean():.1f}"
            for c in ("pretrained_refined", "pretrained_coarse", "random_refined", "random_coarse")
        ]
        cells.append(f"{gap[0]:+.1f} [{gap[1]:+.1f}, {gap[2]:+.1f}]")
        cells += [f"{v.mean():.1f}" for v in ref.values()]
        lines.append(f"| {name} | {len(ks)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=Path("logs/evidence"))
    parser.add_argument("--world", type=Path, default=flmm_home() / "synthetic_world")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="score existing runs in --output-dir instead of training",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to both runs")
    args = parser.parse_args()
    walls = {}
    for name in RUNS:
        if not args.reuse:
            _, walls[name] = train(name, args.output_dir, args.overrides)
    runs = {name: load_records(args.output_dir / name) for name in RUNS}
    keys = sorted(set(runs["pretrained"]) & set(runs["random"]))
    text, summary = table(keys, runs, reference_rows(args.world))
    chat = json.loads((args.output_dir / "pretrained" / "chat_check.json").read_text())
    text += f"\n\nFrozen LMM unchanged by F-LMM training (weights fingerprint and greedy answers to {len(chat['questions'])} questions on {len(chat['before']['answers'])} images): {chat['unchanged']}\n"
    text += "Example answer: " + repr(chat["before"]["answers"][0][0]) + "\n"
    if walls:
        text += "Wall times: " + ", ".join(f"{n} {s / 60:.1f} min" for n, s in walls.items()) + "\n"
    print(text)
    (args.output_dir / "evidence.md").write_text(text)
    (args.output_dir / "evidence.json").write_text(
        json.dumps(
            {"groups": summary, "chat_unchanged": chat["unchanged"], "wall_s": walls}, indent=2
        )
    )


if __name__ == "__main__":
    main()

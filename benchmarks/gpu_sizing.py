"""GPU sizing: peak GPU memory and samples/s of every family's headline checkpoint at full depth.

For each family (random weights, built on the GPU in bf16 and saved once with save_pretrained),
loaded in bf16, 4-bit and 8-bit (``FrozenLMM.from_pretrained(..., quantization=...)``):

  train-b8, train-b1  F-LMM's training step (frozen LMM forward with capture, mask head, SAM ViT-L
                      refiner with random weights, losses, backward, AdamW) at batch 8 and 1;
  ground              ``FLMMPredictor.ground`` on one image (inference).

For the first family in bf16, also the cached step (heads only, from the frozen-feature cache) with
the heads eager and ``torch.compile``-d, against the reference's way at batch 1 (the c/a ratio of
``train_throughput.py``), and for it in 4-bit the other route to a quantized model: quantizing in
memory (``from_pretrained(None, state_dict=...)``), no disk. The feature cache's size per sample
and for the paper's mix comes from ``cache_size.py`` (no GPU).

Rows run most valuable first (LLaVA-1.5-7B bf16, then 4-bit, the issue's target, then 8-bit;
then the other families). Each step has a time estimate: one that no longer fits ``--budget-s``
is recorded as "not measured: budget", and one running past twice its estimate + 30 s is stopped.
The JSON is rewritten after every row, so a run cut short keeps what it measured.

    timeout 600 python benchmarks/gpu_sizing.py --json docs/benchmarks/gpu_sizing_h100.json
    python benchmarks/gpu_sizing.py --smoke --json /tmp/sizing.json   # CPU, tiny models, seconds
    python benchmarks/gpu_sizing.py --dry-run                         # the plan and the table
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cache_size
import torch
import train_throughput as tt
from sizing_models import QUANTIZATION, NotMeasured, build_folder, load_lmm, quantize_in_memory
from sizing_report import (
    CACHED_CASES,
    NOT_REACHED,
    NOT_RUN,
    TRAIN_CASES,
    cached_ratios,
    line,
    markdown,
    new_report,
    new_row,
)

from flmm.errors import FlmmUserError
from flmm.files import write_text_atomic
from flmm.model.predictor import FLMMPredictor

PRECISIONS = {"gpu": ("bf16", "4bit", "8bit"), "smoke": ("bf16", "int8", "4bit", "8bit")}
# seconds a step takes on an H100 at 7B (the H200 run's speeds, 4 passes a row): one that no
# longer fits the budget is skipped, one that runs past 2x its estimate + 30 s is stopped
ESTIMATE_S = {
    "build": 60,  # random init on the GPU + save_pretrained of ~15 GB
    "load": 30,  # from the page cache; 4-bit / 8-bit quantize as they load
    "train-b8": 20,
    "train-b1": 15,
    "ground": 10,
    "reference-b1": 15,
    "cached-b8": 15,  # with the caching pass
    "cached-b8-compiled": 120,  # inductor compiles the heads' forward and backward
    "quantize-in-memory": 40,
}


class StepTimeout(BaseException):
    """A step ran past its time limit (a BaseException: library code catching Exception lets it
    through)."""


@dataclass(frozen=True)
class Group:
    """Rows measured on one loaded model: ``family`` in ``precision``."""

    family: str
    precision: str
    cases: tuple[str, ...]


def plan(families: list[str], precisions: list[str]) -> list[Group]:
    """The groups in the order they run: per family its precisions; for the first family also
    the in-memory 4-bit quantizing, and the bf16 cached-step comparison after its own groups."""
    groups = []
    for i, family in enumerate(families):
        for precision in precisions:
            extra = ("quantize-in-memory",) if i == 0 and precision == "4bit" else ()
            groups.append(Group(family, precision, TRAIN_CASES + extra))
        if i == 0 and "bf16" in precisions:
            groups.append(Group(family, "bf16", CACHED_CASES))
    return groups


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`StepTimeout` in this (the main) thread after ``seconds``."""

    def stop(signum, frame):
        raise StepTimeout(f"stopped after {seconds:.0f} s (its time limit, or the budget's end)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(err: BaseException) -> str:
    """A row's status after a step raised ``err`` (one line)."""
    first = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, (NotMeasured, StepTimeout, FlmmUserError)):
        return f"not measured: {first}"
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"failed: {type(err).__name__}: {first}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Run:
    """One sizing run: its settings, its report (rewritten to ``args.json`` after every step),
    its clock and the model folders built so far (family -> folder, or why there is none)."""

    args: argparse.Namespace
    report: dict
    device: str
    workdir: Path
    start: float = field(default_factory=time.monotonic)
    folders: dict = field(default_factory=dict)

    def preset(self, family: str, batch: int) -> tt.Preset:
        """The samples: on a GPU 480 x 640 images of 4 phrases, 16 a pass at batch 8 and 4 at
        batch 1; in the smoke run tiny ones, batch 8 cut to 2, one step a pass."""
        if self.args.smoke:
            base, batch = tt.PRESETS["tiny"], min(batch, 2)
            per_pass = batch
        else:
            base, per_pass = tt.PRESETS["gpu-llava15"], 16 if batch > 1 else 4
        return dataclasses.replace(
            base, family=family, batch=batch, samples=per_pass, dtype="bfloat16"
        )

    def need(self, step: str) -> float:
        """The time limit of ``step``, or :class:`NotMeasured` if its estimate no longer fits."""
        estimate = 0 if self.args.smoke else ESTIMATE_S[step]
        left = self.start + self.args.budget_s - time.monotonic()
        if left <= 0 or left < estimate:
            raise NotMeasured(f"budget (~{estimate} s needed, {max(left, 0):.0f} s left)")
        return left if self.args.smoke else min(left, 2 * estimate + 30)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_text_atomic(self.args.json, json.dumps(self.report, indent=1) + "\n")

    def setup(self, family: str, step: str, seconds: float, **extra) -> None:
        self.report["setup"].append({"family": family, "step": step, "seconds": seconds, **extra})

    def folder(self, family: str) -> Path:
        """The family's saved model, built on first use (a failure is kept, not retried)."""
        if family not in self.folders:
            try:
                self.folders[family] = self.build(family)
            except (Exception, StepTimeout) as err:  # noqa: BLE001 (recorded in its rows)
                status = outcome(err)
                self.folders[family] = status.removeprefix("not measured: ")
                if status == self.folders[family]:
                    self.folders[family] = f"building the model: {status}"
            free_memory()
        found = self.folders[family]
        if isinstance(found, str):
            raise NotMeasured(found)
        return found

    def build(self, family: str) -> Path:
        out = self.workdir / family
        with time_limit(self.need("build")):
            start = time.perf_counter()
            builder = build_folder(family, out, self.preset(family, 8), self.args.smoke)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
        self.setup(family, "build+save", time.perf_counter() - start, gib=size)
        self.report["families"][family]["builder"] = builder
        return out

    def drop_folder(self, family: str) -> None:
        if isinstance(self.folders.get(family), Path):
            shutil.rmtree(self.folders[family], ignore_errors=True)


@contextlib.contextmanager
def loaded(run: Run, group: Group):
    """A rig (:class:`train_throughput.Rig`) around ``group``'s family loaded in its precision."""
    folder = run.folder(group.family)
    with time_limit(run.need("load")):
        start = time.perf_counter()
        lmm = load_lmm(folder, group.family, group.precision, run.device)
        run.setup(group.family, f"load {group.precision}", time.perf_counter() - start)
        cache = run.workdir / "cache" / group.family
        rig = tt.Rig.build(run.preset(group.family, 8), cache, lmm=lmm)
    shape = dataclasses.asdict(cache_size.shape_of(lmm))
    del shape["checkpoint"]  # the model folder
    assumed = dataclasses.asdict(cache_size.HEADLINE[group.family])
    run.report["families"][group.family]["shape"] = {
        **shape,
        "channels": lmm.channels,
        # whether the feature cache's sizes (cache_size.HEADLINE) hold for the loaded model
        "as_cache_size_assumes": all(assumed[k] == v for k, v in shape.items()),
    }
    try:
        yield rig
    finally:
        del rig, lmm
        free_memory()


# ------------------------------------------------------------------------------ the measurements
def measure_steps(run: Run, rig: tt.Rig, row: dict, case: str) -> dict:
    """Median pass of train_throughput's ``case`` at the row's batch size, after a warm-up pass
    (the smoke run warms up only the cache: it checks shapes, not speed)."""
    p = run.preset(row["family"], row["batch"])
    rig.set_samples(p)
    if case == "cached" or not run.args.smoke:
        tt.warm_up(rig, case)
    passes = [tt.measure_pass(rig, case) for _ in range(run.args.repeats)]
    seconds = statistics.median(r["seconds"] for r in passes)
    return {
        "batch": p.batch,
        "peak_gib": max(r["peak_bytes"] for r in passes) / 2**30,
        "samples_per_s": p.samples / seconds,
        "seconds_per_pass": seconds,
        "samples_per_pass": p.samples,
    }


def measure_ground(run: Run, rig: tt.Rig, row: dict) -> dict:
    """``FLMMPredictor.ground`` on one image and its phrases (bf16 autocast), median of the passes after
    a warm-up call (none in the smoke run)."""
    sample = tt.make_samples(run.preset(row["family"], 1))[0]
    phrases = [sample.text[a:b] for a, b in sample.spans]
    rig.optimizer.zero_grad(set_to_none=True)
    model = rig.model.eval()
    predictor = FLMMPredictor(model)

    def ground() -> None:
        with rig.autocast():
            predictor.ground(sample.image, sample.text, phrases)

    if not run.args.smoke:
        ground()
    passes = [tt.measure(ground, rig.preset.device) for _ in range(run.args.repeats)]
    model.train()
    seconds = statistics.median(r["seconds"] for r in passes)
    return {
        "peak_gib": max(r["peak_bytes"] for r in passes) / 2**30,
        "samples_per_s": 1 / seconds,
        "seconds_per_pass": seconds,
        "samples_per_pass": 1,
    }


def measure_compiled(run: Run, rig: tt.Rig, row: dict) -> dict:
    """The cached step with the heads compiled (the compilation happens in the warm-up)."""
    if not run.args.compile_backend:
        raise NotMeasured("no torch.compile backend named (--compile-backend)")
    tt.compile_heads(rig.model, run.args.compile_backend)
    return {**measure_steps(run, rig, row, "cached"), "note": run.args.compile_backend}


MEASURE = {
    "train-b8": lambda run, rig, row: measure_steps(run, rig, row, "flmm"),
    "train-b1": lambda run, rig, row: measure_steps(run, rig, row, "flmm"),
    "ground": measure_ground,
    "reference-b1": lambda run, rig, row: measure_steps(run, rig, row, "reference"),
    "cached-b8": lambda run, rig, row: measure_steps(run, rig, row, "cached"),
    "cached-b8-compiled": measure_compiled,
    "quantize-in-memory": lambda run, rig, row: quantize_in_memory(
        run.folders[row["family"]], row["family"]
    ),
}


# ---------------------------------------------------------------------------------- the runner
def run_row(run: Run, rig: tt.Rig, row: dict) -> None:
    try:
        if row["case"] == "quantize-in-memory" and run.device != "cuda":
            raise NotMeasured("bitsandbytes 4-bit needs CUDA")
        with time_limit(run.need(row["case"])):
            row.update(MEASURE[row["case"]](run, rig, row))
        row["status"] = "measured"
    except (Exception, StepTimeout) as err:  # noqa: BLE001 (recorded; the next row goes on)
        row["status"] = outcome(err)
        free_memory()
    run.save()
    print(line(row), flush=True)


def run_group(run: Run, group: Group, rows: list[dict]) -> None:
    try:
        with loaded(run, group) as rig:
            for row in rows:
                run_row(run, rig, row)
    except (Exception, StepTimeout) as err:  # noqa: BLE001 (recorded; the next group goes on)
        for row in rows:
            if row["status"] == NOT_REACHED:
                row["status"] = outcome(err)
                print(line(row), flush=True)
        free_memory()
    run.save()


def run_all(args: argparse.Namespace) -> dict:
    """Every group in :func:`plan` order (none with ``--dry-run``); the report."""
    mode = "dry-run" if args.dry_run else "smoke" if args.smoke else "gpu"
    groups = plan(args.families, args.precisions)
    rows = [new_row(i, g.family, g.precision, c) for i, g in enumerate(groups) for c in g.cases]
    report = new_report(mode, args.families, args.budget_s, rows)
    device = "cuda" if mode == "gpu" else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # as train_throughput's CPU cases: its CPU time, not the load
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="flmm-sizing-") as tmp:
        run = Run(args, report, device, Path(tmp))
        run.save()  # the plan: a run killed before its first row still says what it meant to do
        last = {g.family: i for i, g in enumerate(groups)}
        for i, group in enumerate(groups):
            rows = [r for r in report["rows"] if r["group"] == i]
            if args.dry_run:
                for row in rows:
                    row["status"] = NOT_RUN
            else:
                run_group(run, group, rows)
            if last[group.family] == i:
                run.drop_folder(group.family)
        report["cached_step"] = cached_ratios(report["rows"])
        report["finished"] = True
        run.save()
    print(markdown(report))
    print(f"cached step vs the reference's way (c/a samples/s): {report['cached_step']}")
    return report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", choices=list(cache_size.HEADLINE))
    parser.add_argument("--precisions", nargs="+", choices=list(QUANTIZATION))
    parser.add_argument("--budget-s", type=float, help="seconds for everything (540; smoke 60)")
    parser.add_argument("--json", type=Path, default=Path("gpu_sizing.json"))
    parser.add_argument("--workdir", type=Path, help="where model folders go (15 GB for a 7B)")
    parser.add_argument("--repeats", type=int, help="timed passes per row, median (3; smoke 1)")
    parser.add_argument("--compile-backend", help="torch.compile backend (inductor; smoke none)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds")
    parser.add_argument("--dry-run", action="store_true", help="the plan, nothing measured")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "gpu"
    args.families = args.families or (["llava"] if args.smoke else [*cache_size.HEADLINE])
    args.precisions = args.precisions or list(PRECISIONS[mode])
    if not args.smoke:
        args.compile_backend = args.compile_backend or "inductor"
    defaults = {"budget_s": 60 if args.smoke else 540, "repeats": 1 if args.smoke else 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not (args.smoke or args.dry_run or torch.cuda.is_available()):
        raise SystemExit(
            "gpu_sizing.py needs a CUDA device; on the CPU run it with --smoke (tiny models) "
            "or --dry-run (the plan and the table, nothing measured)"
        )
    return run_all(args)


if __name__ == "__main__":
    main()

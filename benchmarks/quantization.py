"""What int8 weights do to grounding: the shipped tiny LLaVA in float32 vs torchao int8, on the CPU.

Side by side, in one run, on the synthetic world's test split (the world and the shipped tiny
LLaVA the default run uses), with bfloat16 as a yardstick (the dtype real runs use on GPUs):

  capture    the frozen LMM's phrase-to-image attention maps (max and mean absolute difference
             over real phrases, Pearson correlation of all their values) and the phrase hidden
             states (relative L2 difference), int8 (and bfloat16) vs float32 on the same batches;
  grounding  test gIoU / cIoU, refined (SAM) and coarse (mask head), of ONE trained head (a
             training run's model folder) evaluated with each frozen LMM;
  chat       how many greedy answers equal float32's, over N test images and the frozen-LMM
             check's two questions;
  memory     bytes the LMM's weights are stored in; load and capture time.

    python benchmarks/quantization.py --head logs/train/runs/<time>/model   # ~4 min, 2 cores
    python benchmarks/quantization.py --head ... --capture-samples 32 --answers 8  # a try-out
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from flmm.chat.options import default_checkpoint
from flmm.entry import CONFIG_PATH, setup_configs
from flmm.model.module import FLMM
from flmm.model.pretrained import FLMMHead
from flmm.types import GroundingBatch

# the frozen LMM's loading options per column: float32 the reference, bfloat16 a yardstick (the
# dtype real runs use on GPUs) for how far int8 moves things
KINDS = {"float32": {}, "int8": {"quantization": "int8"}, "bfloat16": {"dtype": "bfloat16"}}
OTHERS = ("int8", "bfloat16")
# the frozen-LMM check's questions (conf/callbacks/default.yaml)
QUESTIONS = (
    "please give me a description of the image.",
    "how many objects are there in the image?",
)
METRICS = ("giou", "coarse_giou", "ciou", "coarse_ciou")


def test_data(overrides: list[str]):
    """The synthetic world's datamodule as ``flmm train`` configures it, set up for testing."""
    setup_configs()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("test")
    return data


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors ``module``'s parameters and buffers are stored in (a quantized tensor
    subclass: its int8 values and scales)."""

    def size(t: torch.Tensor) -> int:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            return sum(size(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    return sum(size(t) for t in [*module.parameters(), *module.buffers()])


def load_heads(head: Path) -> tuple[dict[str, FLMMHead], dict[str, float]]:
    """The trained head with its recorded LMM loaded as each of :data:`KINDS`, and load times."""
    heads, seconds = {}, {}
    for kind, options in KINDS.items():
        start = time.perf_counter()
        heads[kind] = FLMMHead.from_pretrained(head, **options)
        seconds[kind] = time.perf_counter() - start
    return heads, seconds


class CaptureDiff:
    """Running statistics of one kind's captures vs float32's: map differences and correlation
    over real phrases, relative hidden-state difference over phrase rows."""

    def __init__(self) -> None:
        self.max, self.abs_sum, self.count = 0.0, 0.0, 0
        self.sums = torch.zeros(5, dtype=torch.float64)  # x, y, xx, yy, xy
        self.hidden_err, self.hidden_norm = 0.0, 0.0

    def add(self, ref, out) -> None:
        real = ref.phrase_mask
        x, y = ref.maps[real].double().flatten(), out.maps[real].double().flatten()
        self.max = max(self.max, float((x - y).abs().max()))
        self.abs_sum, self.count = self.abs_sum + float((x - y).abs().sum()), self.count + x.numel()
        self.sums += torch.stack([x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])
        self.hidden_err += float((out.hidden - ref.hidden).double().pow(2).sum())
        self.hidden_norm += float(ref.hidden.double().pow(2).sum())

    def result(self) -> dict[str, float]:
        sx, sy, sxx, syy, sxy = self.sums.tolist()
        n = self.count
        corr = (n * sxy - sx * sy) / ((n * sxx - sx * sx) * (n * syy - sy * sy)) ** 0.5
        return {
            "maps max |diff|": self.max,
            "maps mean |diff|": self.abs_sum / n,
            "maps correlation": corr,
            "hidden relative L2 diff": (self.hidden_err / self.hidden_norm) ** 0.5,
        }


def compare_captures(heads: dict, data, samples: int) -> tuple[dict, dict]:
    """Per kind of :data:`OTHERS`, capture differences from float32 over the first ``samples``
    test samples; seconds of capture per kind."""
    diffs, seconds = {k: CaptureDiff() for k in OTHERS}, dict.fromkeys(KINDS, 0.0)
    seen = 0
    for batch in data.test_dataloader():
        outputs = {}
        for kind in KINDS:
            start = time.perf_counter()
            outputs[kind] = heads[kind].model.lmm(batch)
            seconds[kind] += time.perf_counter() - start
        for kind in OTHERS:
            diffs[kind].add(outputs["float32"], outputs[kind])
        seen += len(batch)
        if seen >= samples:
            break
    return {k: d.result() for k, d in diffs.items()}, seconds


def test_scores(model, data) -> dict[str, float]:
    """``trainer.test`` of ``model`` (an :class:`FLMMModel`) on the test split: gIoU / cIoU (x 100), refined and coarse."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics = trainer.test(FLMM(model), datamodule=data, verbose=False)[0]
    return {k: float(metrics[f"test/{k}"]) for k in METRICS}


def same_answers(heads: dict, data, images: int, max_new_tokens: int) -> dict[str, int]:
    """Per kind of :data:`OTHERS`, how many of its greedy answers equal float32's, of
    ``images x len(QUESTIONS)``."""
    batch = GroundingBatch.collate([data.test_sets[0][i] for i in range(images)])
    same = dict.fromkeys(OTHERS, 0)
    for image in batch.images:
        for question in QUESTIONS:
            answers = {
                k: heads[k].model.lmm.generate(
                    [image.numpy()], question, max_new_tokens=max_new_tokens, do_sample=False
                )
                for k in KINDS
            }
            for kind in OTHERS:
                same[kind] += answers[kind] == answers["float32"]
    return same


def row(name: str, values: list, fmt: str = "{:.4f}") -> str:
    return f"{name:<32}" + "".join(f"{fmt.format(v):>16}" for v in values)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--head", help="a trained head folder (default: the newest under ./logs)")
    p.add_argument("--capture-samples", type=int, default=400, help="test samples to compare")
    p.add_argument("--answers", type=int, default=50, help="test images to answer about")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("overrides", nargs="*", help="flmm train overrides picking the data")
    args = p.parse_args(argv)
    head = Path(args.head) if args.head else default_checkpoint()
    torch.manual_seed(0)
    data = test_data(args.overrides)
    heads, load_seconds = load_heads(head)
    capture, capture_seconds = compare_captures(heads, data, args.capture_samples)
    scores = {k: test_scores(heads[k].model, data) for k in KINDS}
    same = same_answers(heads, data, args.answers, args.max_new_tokens)
    print(f"head: {head}\nLMM: {heads['float32'].model.lmm.model_id}\n")
    print(row("", [*KINDS, *(f"{k} - fp32" for k in OTHERS)], "{}"))
    for key in METRICS:
        values = [scores[k][key] for k in KINDS]
        print(row(f"test {key}", [*values, *(v - values[0] for v in values[1:])], "{:.2f}"))
    sizes = [stored_bytes(heads[k].model.lmm) / 2**20 for k in KINDS]
    print(row("LMM weights stored (MiB)", sizes, "{:.2f}"))
    print(row("load head + LMM + SAM (s)", list(load_seconds.values()), "{:.1f}"))
    print(
        row(
            f"capture, {args.capture_samples} samples (s)", list(capture_seconds.values()), "{:.1f}"
        )
    )
    print(f"\ncapture vs float32 on {args.capture_samples} test samples:")
    print(row("", list(OTHERS), "{}"))
    for key in capture["int8"]:
        print(row(f"  {key}", [capture[k][key] for k in OTHERS], "{:.6f}"))
    total = args.answers * len(QUESTIONS)
    print(f"\ngreedy answers identical to float32's, of {total}:")
    print(row("", [f"{same[k]} ({100 * same[k] / total:.0f}%)" for k in OTHERS], "{}"))


if __name__ == "__main__":
    main()

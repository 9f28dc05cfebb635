"""Per-sample training-step time with and without the frozen-feature cache, and the losses.

F-LMM's LMM and SAM image encoder are frozen, so ``data.cache_dir=`` stores their outputs per
sample (``flmm.model.feature_cache``) and later epochs run only the trainable part. This benchmark
trains on batches of the synthetic world three ways, on the same weights (AdamW with lr 0, so
every step costs a real optimizer step but leaves the weights as they were):

  uncached  the frozen LMM and SAM encoder run every step (no cache);
  caching   the first epoch with a cache: compute, store (fp16), read back;
  cached    every later epoch: memory-mapped reads, then the trainable part only.

It prints the per-sample step time of each (uncached and cached: median of ``--repeats``
interleaved passes; caching: its single pass), the speed-up of cached over uncached, and the
largest difference between the per-batch losses:
cached vs caching must be exactly 0 (both use the stored features), cached vs uncached is the
effect of rounding the frozen features to fp16 (relative error <= 2**-11 per value).

Presets (random weights; step time does not depend on the weights' values):
  tiny      the synthetic world's tiny LLaVA (12 x 12 image tokens) and tiny SAM (96 px);
  llava-grid  a LLaVA with LLaVA-1.5's image grid (336 px, 24 x 24 = 576 image tokens; decoder
            1024 wide, 8 layers, 16 heads; vision tower 512 wide, 6 layers) and the tiny SAM:
            the frozen forward dominates the step, as it does in real F-LMM (LLaVA-1.5-7B).

    python benchmarks/feature_cache.py                       # both presets, ~4 min on 2 cores
    python benchmarks/feature_cache.py --preset tiny --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flmm.data.synthetic import SyntheticDataModule
from flmm.foundation.tiny_llava import build_tiny_llava
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.model.network import FLMMModel, feature_cache

PRESETS = {
    "tiny": {"llava": {}, "sam": ("tiny", {}), "base_channels": 16},
    "llava-grid": {
        "llava": {
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 1024,
            "num_layers": 8,
            "num_heads": 16,
            "vision_hidden": 512,
            "vision_layers": 6,
        },
        "sam": ("tiny", {}),
        "base_channels": 16,
    },
}


def build_model(preset: str, workdir: Path) -> FLMMModel:
    """F-LMM around a random LLaVA and SAM of ``preset``'s sizes, in training mode."""
    spec = PRESETS[preset]
    torch.manual_seed(0)
    lmm = FrozenLMM.from_pretrained(str(build_tiny_llava(workdir / preset, **spec["llava"])))
    variant, sizes = spec["sam"]
    model = FLMMModel.build(lmm, build_sam(variant, **sizes), base_channels=spec["base_channels"])
    return model.train()


def world_batches(workdir: Path, batch_size: int, count: int) -> list:
    """The first ``count`` training batches of a small synthetic world."""
    data = SyntheticDataModule(
        workdir / "world", n_train=4 * batch_size * count, n_val=1, n_test=1, batch_size=batch_size
    )
    data.prepare_data()
    data.setup("fit")
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise RuntimeError(f"the world gave {len(batches)} batches, {count} asked for")


def train_step(model: FLMMModel, optimizer: torch.optim.Optimizer, batch) -> tuple[float, float]:
    """One training step (forward, losses, backward, optimizer step): (seconds, loss)."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model.losses(batch, model(batch))["loss"]
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, float(loss.detach())


def run_pass(model, optimizer, batches, cache) -> tuple[float, list[float]]:
    """Seconds per sample over ``batches`` and the per-batch losses, with ``cache`` (or None)."""
    model = model.with_feature_cache(cache)
    seconds, losses = 0.0, []
    for batch in batches:
        t, loss = train_step(model, optimizer, batch)
        seconds += t
        losses.append(loss)
    return seconds / sum(len(b) for b in batches), losses


def measure(preset: str, batch_size: int, count: int, repeats: int) -> dict:
    """Uncached, caching and cached per-sample step times and loss differences for ``preset``."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = build_model(preset, workdir)
        batches = world_batches(workdir, batch_size, count)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
        train_step(model, optimizer, batches[0])  # warm-up (allocator, kernels)
        cache = feature_cache(workdir / "cache", model.lmm, model.refiner)
        caching, fill_losses = run_pass(model, optimizer, batches, cache)
        times = {"uncached": [], "cached": []}
        for _ in range(repeats):
            t, plain_losses = run_pass(model, optimizer, batches, None)
            times["uncached"].append(t)
            t, cached_losses = run_pass(model, optimizer, batches, cache)
            times["cached"].append(t)
        uncached, cached = (statistics.median(times[k]) for k in ("uncached", "cached"))
        return {
            "preset": preset,
            "samples": sum(len(b) for b in batches),
            "uncached": uncached,
            "caching": caching,
            "cached": cached,
            "speedup": uncached / cached,
            "vs_uncached": max(abs(a - b) for a, b in zip(cached_losses, plain_losses)),
            "vs_caching": max(abs(a - b) for a, b in zip(cached_losses, fill_losses)),
            "loss": statistics.mean(plain_losses),
            "entries": sum(1 for _ in (workdir / "cache").glob("*/*/*.pt")),
        }


def print_table(rows: list[dict]) -> None:
    """The results as a Markdown table."""
    print(
        "| preset | samples | uncached ms/sample | caching pass ms/sample | cached ms/sample "
        "| speed-up | mean loss | max abs loss diff cached vs uncached | cached vs caching |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['samples']} | {1e3 * r['uncached']:.1f} | "
            f"{1e3 * r['caching']:.1f} | {1e3 * r['cached']:.1f} | {r['speedup']:.1f}x | "
            f"{r['loss']:.4f} | {r['vs_uncached']:.2e} | {r['vs_caching']:.1e} |"
        )


def main() -> None:
    """Parse the arguments, run the presets, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="all")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    presets = list(PRESETS) if args.preset == "all" else [args.preset]
    rows = [measure(p, args.batch_size, args.batches, args.repeats) for p in presets]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print_table(rows)


if __name__ == "__main__":
    main()

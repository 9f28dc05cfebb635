"""Rebuild the shipped foundation models (`python -m flmm.foundation`, `make foundation`).

Builds the tiny SAM (on the CPU, minutes) and the tiny LLaVA (on CUDA when present, else the CPU)
from scratch with the recipes of ``model=tiny`` (float32, into the cache; an interrupted LLaVA
pretraining resumes), then writes half-precision copies and
the recipes they come from into the shipped folder: ``tiny_llava/`` (``save_pretrained``: config,
safetensors, processor and tokenizer files), ``tiny_sam.pth`` (a state dict) and
``recipe.json`` (with how many greedy answers of the half-precision copy equal the float32
original's). Loading converts the half-precision weights to the configured dtype.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoProcessor, LlavaForConditionalGeneration

from flmm.data.synthetic.corpus import pretraining_pairs
from flmm.data.synthetic.streams import Stream
from flmm.foundation.cache import (
    RECIPE_FILE,
    SHIPPED,
    cached_tiny_llava,
    cached_tiny_sam,
    ensure_tiny_llava,
    llava_recipe,
    sam_recipe,
)
from flmm.lmm import FrozenLMM

log = logging.getLogger(__name__)


def recipe_args(node: DictConfig) -> dict:
    """The keyword arguments of an ``ensure_tiny_*`` config node (no ``_target_``, no cache)."""
    keep = [k for k in node if k not in ("_target_", "cache_dir")]
    return OmegaConf.to_container(OmegaConf.masked_copy(node, keep), resolve=True)


def llava_args(args: dict) -> dict:
    """``args`` of :func:`~flmm.foundation.cache.ensure_tiny_llava` with its defaults filled in."""
    defaults = inspect.signature(ensure_tiny_llava).parameters
    full = {k: args.get(k, p.default) for k, p in defaults.items() if k != "cache_dir"}
    return full | {"corpus": dict(full["corpus"] or {})}


def export_llava(src: str | Path, out: Path) -> None:
    """Copy the float32 ``save_pretrained`` folder ``src`` to ``out`` in half precision."""
    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).half()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(src).save_pretrained(out)
    shutil.copy(Path(src) / "pretraining.json", out / "pretraining.json")


def export_agreement(original: str | Path, copy: str | Path, n: int = 60, seed: int = 0) -> dict:
    """How many of ``n`` greedy answers of the half-precision ``copy`` (loaded as float32) equal
    the float32 ``original``'s: first turns of pretraining conversations (captions and questions,
    existence questions included) about scenes of their own RNG stream."""
    models = [FrozenLMM.from_pretrained(str(p), dtype="float32").eval() for p in (original, copy)]
    rng = np.random.default_rng([seed, Stream.AGREEMENT])
    pairs = pretraining_pairs(rng, caption_prob=0.3, exist_prob=0.5, cot_prob=0.2)
    same = 0
    for _ in range(n):
        images, [(prompt, _)], _ = next(pairs)
        answers = {m.generate(images, prompt, max_new_tokens=40, do_sample=False) for m in models}
        same += len(answers) == 1
    return {"identical": same, "of": n}


def export_sam(src: str | Path, out: Path) -> None:
    """Copy the float32 SAM state dict ``src`` to ``out`` in half precision."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out)


def build_foundation(cache_dir: str, llava: dict, sam: dict, out_dir: Path) -> dict:
    """Build both models afresh with these recipe arguments (float32, in ``cache_dir``), export
    them to ``out_dir``, write ``out_dir/recipe.json``; returns what it wrote there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    built, start = {}, time.time()
    llava_path = cached_tiny_llava(cache_dir, **llava_args(llava), fresh=True)
    export_llava(llava_path, out_dir / SHIPPED["tiny_llava"].name)
    recipe, seconds = llava_recipe(**llava), round(time.time() - start, 1)
    agreement = export_agreement(llava_path, out_dir / SHIPPED["tiny_llava"].name)
    built["tiny_llava"] = {"recipe": recipe, "seconds": seconds, "half_vs_float32": agreement}
    start = time.time()
    sam_path = cached_tiny_sam(cache_dir, **sam, fresh=True)
    export_sam(sam_path, out_dir / SHIPPED["tiny_sam"].name)
    built["tiny_sam"] = {"recipe": sam_recipe(**sam), "seconds": round(time.time() - start, 1)}
    (out_dir / RECIPE_FILE.name).write_text(json.dumps(built, indent=2) + "\n")
    return built


def build(cfg: DictConfig) -> dict:
    """Rebuild as configured and print how long each model took."""
    out_dir = Path(cfg.shipped_dir) if cfg.shipped_dir else RECIPE_FILE.parent
    start = time.time()
    llava, sam = recipe_args(cfg.model.lmm.name_or_path), recipe_args(cfg.model.sam.checkpoint)
    log.info("building the tiny LLaVA on %s", "cuda" if torch.cuda.is_available() else "cpu")
    built = build_foundation(cfg.paths.foundation_dir, llava, sam, out_dir)
    for name, info in built.items():
        print(f"{name}: built in {info['seconds'] / 60:.1f} min")
    print(f"foundation models written to {out_dir} in {(time.time() - start) / 60:.1f} min")
    return built

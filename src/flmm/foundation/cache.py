"""Build the synthetic world's foundation models once, cache them, return their paths.

Each function returns the path a user's real model would have (a ``save_pretrained`` folder, a SAM
state dict), so the configs hand it to the ordinary loaders. Builds are seeded, atomic (written to
a temporary folder, then renamed) and guarded by a file lock, so concurrent ranks build once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from flmm.data.synthetic.corpus import vocabulary
from flmm.data.synthetic.world import sample_scene
from flmm.foundation.pretrain_lmm import pretrain_tiny_llava
from flmm.foundation.pretrain_sam import pretrain_tiny_sam
from flmm.foundation.tiny_llava import build_tiny_llava

log = logging.getLogger(__name__)
# bump when the tiny models' architecture, vocabulary or training code changes what a recipe builds
TINY_VERSION = 2


def ensure_tiny_llava(
    cache_dir: str,
    pretrain_steps: int = 2000,
    seed: int = 0,
    batch_size: int = 32,
    image_size: int = 96,
    lr: float = 1e-3,
    corpus: dict | None = None,
) -> str:
    """Path of the tiny LLaVA pretrained for ``pretrain_steps`` (0: random weights), built if missing.

    ``corpus`` holds the keyword arguments of
    :func:`~flmm.data.synthetic.corpus.pretraining_pairs`. The folder name carries a digest of
    the whole recipe, so a changed recipe builds a new model instead of reusing a stale one.
    """
    corpus = dict(corpus or {})
    recipe = {"version": TINY_VERSION, "image_size": image_size}
    if pretrain_steps:
        recipe |= {"batch_size": batch_size, "lr": lr, "corpus": corpus}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    out = Path(cache_dir) / f"tiny_llava_seed{seed}_steps{pretrain_steps}_{digest}"
    return _build_once(
        out, lambda tmp: _build_llava(tmp, pretrain_steps, seed, batch_size, image_size, lr, corpus)
    )


def ensure_tiny_sam(
    cache_dir: str, pretrain_steps: int = 600, seed: int = 0, image_size: int = 96
) -> str:
    """Path of the tiny SAM state dict pretrained on the world's promptable segmentation."""
    out = Path(cache_dir) / f"tiny_sam_seed{seed}_steps{pretrain_steps}.pth"
    scenes = world_scenes(image_size)
    return _build_once(
        out,
        lambda tmp: pretrain_tiny_sam(
            tmp, scenes, steps=pretrain_steps, seed=seed, max_seconds=None
        ),
    )


def world_scenes(image_size: int):
    """A scene sampler for SAM pretraining: ``rng -> (image, list of object masks)``."""

    def sample(rng: np.random.Generator):
        scene = sample_scene(rng, image_size=image_size)
        return scene.image, [obj.mask for obj in scene.objects]

    return sample


def _build_llava(
    tmp: Path, steps: int, seed: int, batch_size: int, image_size: int, lr: float, corpus: dict
) -> None:
    init = tmp.parent / f"{tmp.name}-init"
    _remove(init)
    build_tiny_llava(init, vocabulary(), image_size=image_size, seed=seed)
    if not steps:
        init.rename(tmp)
        return
    pretrain_tiny_llava(
        init, tmp, steps, batch_size, lr, seed=seed, image_size=image_size, corpus=corpus
    )
    shutil.rmtree(init)


def _build_once(out: Path, build) -> str:
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            tmp = out.parent / f".{out.name}.partial"
            _remove(tmp)
            log.info("building %s (cached for later runs)", out)
            # the global RNGs are left as they were, so a run that builds the models first
            # initialises its heads exactly like a later run that finds them cached
            with torch.random.fork_rng():
                build(tmp)
            tmp.rename(out)
    return str(out)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

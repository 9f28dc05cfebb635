"""Build the synthetic world's foundation models once, cache them, return their paths.

Each function returns the path a user's real model would have (a ``save_pretrained`` folder, a SAM
state dict), so the configs hand it to the ordinary loaders. Builds are seeded, atomic (written to
a temporary folder, then renamed) and guarded by a file lock, so concurrent ranks build once.
"""

from __future__ import annotations

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


def ensure_tiny_llava(
    cache_dir: str,
    pretrain_steps: int = 2000,
    seed: int = 0,
    batch_size: int = 32,
    image_size: int = 96,
) -> str:
    """Path of the tiny LLaVA pretrained for ``pretrain_steps`` (0: random weights), built if missing."""
    out = Path(cache_dir) / f"tiny_llava_seed{seed}_steps{pretrain_steps}"
    return _build_once(
        out, lambda tmp: _build_llava(tmp, pretrain_steps, seed, batch_size, image_size)
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


def _build_llava(tmp: Path, steps: int, seed: int, batch_size: int, image_size: int) -> None:
    init = tmp.parent / f"{tmp.name}-init"
    _remove(init)
    build_tiny_llava(init, vocabulary(), image_size=image_size, seed=seed)
    if steps:
        pretrain_tiny_llava(
            init, tmp, steps=steps, batch_size=batch_size, seed=seed, image_size=image_size
        )
        shutil.rmtree(init)
    else:
        init.rename(tmp)


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

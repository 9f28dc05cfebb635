"""The self-check of a row that ``model.lmm.family=auto`` derived, run once at load, before
anything trains: the registry tests' two checks on probe images.

1. the grids agree with the model's own placement of the image features
   (:mod:`flmm.lmm.grid_checks`) for a wide and a tall image;
2. the captured phrase-to-image attention equals HF's eager attention weights of the same forward
   (:mod:`flmm.attention.eager_reference`).
"""

from __future__ import annotations

import numpy as np
import torch

from flmm.attention.eager_reference import eager_maps
from flmm.lmm.grid_checks import check_grids
from flmm.types import GroundingBatch, GroundingSample

PROBES = ((60, 90), (90, 40))
TEXT, PHRASE = "a red circle", (2, 12)
# largest |capture - eager| accepted (float32 softmax of the same scores)
TOLERANCE = 1e-4


def probe_batch() -> GroundingBatch:
    """Random images of the :data:`PROBES` shapes, each with the text ``"a red circle"`` and its
    phrase ``"red circle"``."""
    rng = np.random.default_rng(0)
    samples = []
    for height, width in PROBES:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((1, height, width), dtype=bool)
        samples.append(GroundingSample(image, TEXT, [PHRASE], mask))
    return GroundingBatch.collate(samples)


def self_check(lmm) -> None:
    """Raise (an ``AssertionError`` naming the check, or the error of the step that failed)
    unless ``lmm`` (a :class:`flmm.lmm.FrozenLMM`) passes both checks on :func:`probe_batch`."""
    batch = probe_batch()
    inputs = lmm.encode(batch)
    token_phrase, region = inputs.pop("token_phrase"), inputs.pop("region")
    layouts = check_grids(lmm, inputs)
    cols, _ = lmm.image_columns(inputs["input_ids"])
    raw = eager_maps(lmm, inputs, token_phrase, cols, 1).to(region.device)
    expected = lmm.to_grid(raw, layouts, region)
    maps = lmm(batch).maps
    gap = float((maps - expected.to(maps)).abs().max())
    if maps.shape != expected.shape or not gap <= TOLERANCE:
        raise AssertionError(f"captured attention differs from eager attention by {gap:.2g}")
    if not torch.isfinite(maps).all() or not (maps.flatten(2).sum(-1) > 0).all():
        raise AssertionError("a probe's attention map is empty or not finite")

"""Build a SAM by variant name and load its checkpoint strictly."""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from flmm.errors import CheckpointMismatchError
from flmm.foundation.tiny_sam import build_tiny_sam

SAM_BUILDERS = {
    "vit_b": sam_model_registry["vit_b"],
    "vit_l": sam_model_registry["vit_l"],
    "vit_h": sam_model_registry["vit_h"],
    "tiny": build_tiny_sam,
}
MAX_KEYS_SHOWN = 5


def build_sam(variant: str, checkpoint: str | Path | None = None, **tiny_sizes: int) -> Sam:
    """Build SAM ``variant`` (``vit_b|vit_l|vit_h|tiny``) and load ``checkpoint`` strictly.

    ``tiny_sizes`` are forwarded to ``build_tiny_sam`` (tiny only). Without a checkpoint the
    weights stay randomly initialised.
    """
    if variant not in SAM_BUILDERS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {list(SAM_BUILDERS)}")
    if tiny_sizes and variant != "tiny":
        raise ValueError(f"sizes {tiny_sizes} only apply to the 'tiny' SAM, not {variant!r}")
    sam = SAM_BUILDERS[variant](**tiny_sizes)
    if checkpoint is not None:
        load_sam_checkpoint(sam, checkpoint, variant)
    return sam.eval()


def load_sam_checkpoint(sam: Sam, checkpoint: str | Path, variant: str) -> None:
    """Load a plain ``state_dict`` file into ``sam``; raise a readable error on any mismatch."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {path}. Download {path.name} (segment-anything's release) "
            f"into paths.sam_checkpoint_dir, or pass model.sam.checkpoint=/path/to/{path.name}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    problems = state_dict_mismatches(sam.state_dict(), state)
    if problems:
        raise CheckpointMismatchError(
            f"SAM checkpoint {path} does not match variant {variant!r}: " + "; ".join(problems)
        )
    sam.load_state_dict(state, strict=True)


def state_dict_mismatches(expected: dict, found: dict) -> list[str]:
    """Human-readable lists of the first missing, unexpected and wrongly shaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    named = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": shapes}
    return [
        f"{len(keys)} {name} (first: {', '.join(keys[:MAX_KEYS_SHOWN])})"
        for name, keys in named.items()
        if keys
    ]

"""Build a SAM by variant name (the released ViTs, or a tiny one from the same classes for CPU
recipes and tests) and load its checkpoint strictly."""

from __future__ import annotations

import weakref
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

from flmm.errors import CheckpointMismatchError
from flmm.files import load_torch_file


def build_tiny_sam(
    img_size: int = 96,
    patch_size: int = 8,
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 2,
    prompt_dim: int = 64,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 256,
    decoder_heads: int = 2,
    mask_in_chans: int = 16,
) -> Sam:
    """A SAM with the released architecture at tiny sizes (randomly initialised, in eval mode).

    The image embedding is ``prompt_dim x (img_size/patch_size)^2``; the mask-input frame is 4x the
    embedding grid (48 x 48 with the defaults).
    """
    grid = img_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            out_chans=prompt_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=0,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=prompt_dim,
            transformer=TwoWayTransformer(
                depth=decoder_depth,
                embedding_dim=prompt_dim,
                mlp_dim=decoder_mlp_dim,
                num_heads=decoder_heads,
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=prompt_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


# segment-anything's own builders ("default" is its alias of vit_h) and flmm's tiny SAM
SAM_BUILDERS = {
    **{name: build for name, build in sorted(sam_model_registry.items()) if name != "default"},
    "tiny": build_tiny_sam,
}
SAM_VARIANTS = tuple(SAM_BUILDERS)
MAX_KEYS_SHOWN = 5
# what build_sam built each live SAM from, kept beside segment-anything's objects (never on them)
SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    SOURCES[sam] = {"variant": variant, "checkpoint": checkpoint and str(checkpoint)}
    return sam.eval()


def built_from(sam: Sam) -> dict:
    """``{"variant", "checkpoint"}`` :func:`build_sam` built ``sam`` from (both None for a SAM
    built elsewhere): what a checkpoint or head folder records to rebuild it."""
    return SOURCES.get(sam) or {"variant": None, "checkpoint": None}


def load_sam_checkpoint(sam: Sam, checkpoint: str | Path, variant: str) -> None:
    """Load a plain ``state_dict`` file into ``sam``; raise a readable error on any mismatch."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {path}. Download {path.name} (segment-anything's release) "
            f"into paths.sam_checkpoint_dir, or pass model.sam.checkpoint=/path/to/{path.name}"
        )
    state = load_torch_file(path, "SAM checkpoint")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointMismatchError(
            f"SAM checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors; "
            "pass segment-anything's released sam_vit_*.pth (model.sam.checkpoint=...)"
        )
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

"""A tiny SAM built from the pip ``segment_anything`` classes, for CPU recipes and tests."""

from __future__ import annotations

from functools import partial

from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn


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

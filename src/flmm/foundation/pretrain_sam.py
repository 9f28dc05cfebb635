"""Pretrain the tiny SAM on promptable segmentation (box, point and noisy mask prompts).

F-LMM later prompts SAM with a coarse mask (plus a box and text), so besides SAM's usual box and
point prompts the tiny SAM also learns from noisy low-resolution versions of the true mask.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from flmm.heads.losses import bce_dice_loss
from flmm.heads.sam_build import build_tiny_sam
from flmm.heads.sam_refiner import boxes_from_masks, mask_prompt, preprocess_image

Scene = tuple[np.ndarray, list[np.ndarray]]  # image H x W x 3 uint8, masks of H x W bool
PROMPT_MODES = ("box", "points", "mask", "box+mask")


def pretrain_tiny_sam(
    out_path: str | Path,
    scenes_fn: Callable[[np.random.Generator], Scene],
    steps: int = 2000,
    batch_size: int = 8,
    seed: int = 0,
    lr: float = 1e-3,
    max_seconds: float | None = 150.0,
    masks_per_image: int = 4,
    sizes: dict | None = None,
    progress: bool = True,
) -> list[float]:
    """Train every part of a tiny SAM and save its ``state_dict`` to ``out_path`` (atomically).

    Args:
        out_path: where the ``.pth`` state dict goes (loadable with ``build_sam("tiny", path)``).
        scenes_fn: ``rng -> (image H x W x 3 uint8, list of H x W bool masks)``.
        steps: optimiser steps; training also stops after ``max_seconds``. The learning rate warms
            up then decays (cosine) with whichever of the two budgets runs out first.
        batch_size: images per step; up to ``masks_per_image`` prompts per image.
        sizes: keyword sizes for ``build_tiny_sam``.

    Returns:
        The loss (BCE + Dice) of every step taken.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    sam = build_tiny_sam(**(sizes or {})).train()
    optimizer = torch.optim.AdamW(sam.parameters(), lr=lr, weight_decay=0.01)
    start, losses = time.monotonic(), []
    bar = tqdm(range(steps), desc="pretrain tiny SAM", disable=not progress)
    for step in bar:
        elapsed = time.monotonic() - start
        if max_seconds is not None and elapsed > max_seconds:
            break
        done = max(step / steps, elapsed / max_seconds if max_seconds else 0.0)
        optimizer.param_groups[0]["lr"] = lr * lr_factor(done, warmup=min(0.05, 20 / steps))
        loss = batch_loss(sam, [scenes_fn(rng) for _ in range(batch_size)], rng, masks_per_image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    save_atomically(sam.eval().state_dict(), Path(out_path))
    return losses


def lr_factor(done: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of training, then cosine decay to 0.

    ``done`` is the fraction of training done: of the steps, or of ``max_seconds`` if further.
    """
    if done < warmup:
        return (done + 1e-3) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (done - warmup) / (1.0 - warmup))))


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def batch_loss(
    sam: Sam, scenes: list[Scene], rng: np.random.Generator, masks_per_image: int
) -> torch.Tensor:
    """Mean BCE + Dice over the scenes, each with one random prompt mode for its masks."""
    inputs, input_sizes = zip(*(preprocess_image(sam, torch.from_numpy(im)) for im, _ in scenes))
    embeddings = sam.image_encoder(torch.stack(inputs))
    losses = []
    for embedding, input_size, (_, masks) in zip(embeddings, input_sizes, scenes):
        masks = [m for m in masks if m.any()]
        if not masks:
            continue
        keep = rng.permutation(len(masks))[:masks_per_image]
        target = torch.from_numpy(np.stack([masks[i] for i in keep]))
        logits = predict(sam, embedding[None], target, input_size, rng)
        bce, dice = bce_dice_loss(logits, target)
        losses.append(bce + dice)
    return torch.stack(losses).mean() if losses else embeddings.sum() * 0.0


def predict(
    sam: Sam,
    embedding: torch.Tensor,
    target: torch.Tensor,
    input_size: tuple[int, int],
    rng: np.random.Generator,
) -> torch.Tensor:
    """Prompt SAM from ``K x H x W`` true masks; return ``K x H x W`` logits."""
    mode = PROMPT_MODES[rng.integers(len(PROMPT_MODES))]
    points = point_prompts(target, input_size, rng) if mode == "points" else None
    boxes = box_prompts(target, input_size, rng) if "box" in mode else None
    masks = noisy_mask_prompts(sam, target, input_size, rng) if "mask" in mode else None
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
    low_res, _ = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return sam.postprocess_masks(low_res, input_size, tuple(target.shape[-2:]))[:, 0]


def box_prompts(
    target: torch.Tensor, input_size: tuple[int, int], rng: np.random.Generator
) -> torch.Tensor:
    """``K x 4`` xyxy boxes of the masks in the input frame, corners jittered by ~10% of a side."""
    boxes = boxes_from_masks(target, input_size)
    sides = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + sides * torch.from_numpy(rng.normal(0.0, 0.1, boxes.shape)).float()


def point_prompts(
    target: torch.Tensor, input_size: tuple[int, int], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-3 positive points per mask (``K x n x 2`` xy in the input frame, ``K x n`` labels 1)."""
    n = int(rng.integers(1, 4))
    scale = torch.tensor([input_size[1] / target.shape[2], input_size[0] / target.shape[1]])
    coords = []
    for mask in target:
        ys, xs = np.nonzero(mask.numpy())
        pick = rng.integers(len(ys), size=n)
        coords.append(torch.from_numpy(np.stack([xs[pick], ys[pick]], axis=1)).float() * scale)
    return torch.stack(coords), torch.ones(len(target), n, dtype=torch.int)


def noisy_mask_prompts(
    sam: Sam, target: torch.Tensor, input_size: tuple[int, int], rng: np.random.Generator
) -> torch.Tensor:
    """Coarse-mask-like dense prompts: the mask at a low resolution as noisy logits."""
    grid = int(rng.choice([8, 12, 16, 24]))
    coarse = F.adaptive_avg_pool2d(target[:, None].float(), grid)[:, 0]
    logits = (2.0 * coarse - 1.0) * float(rng.uniform(2.0, 8.0))
    noise = rng.normal(0.0, rng.uniform(0.5, 3.0), logits.shape)
    logits = logits + torch.from_numpy(noise).float()
    return mask_prompt(sam, logits, input_size)

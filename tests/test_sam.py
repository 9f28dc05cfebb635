"""build_sam's strict checkpoint loading and a short tiny-SAM pretraining run."""

import numpy as np
import pytest
import torch

from flmm.errors import CheckpointMismatchError
from flmm.foundation.pretrain_sam import pretrain_tiny_sam
from flmm.heads import build_sam


def shapes_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """A 48 x 64 image with 2-3 coloured rectangles or discs on a plain background."""
    h, w = 48, 64
    image = np.empty((h, w, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    ys, xs = np.mgrid[:h, :w]
    masks = []
    for _ in range(rng.integers(2, 4)):
        cy, cx, r = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(4, 10)
        if rng.random() < 0.5:
            mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= r**2
        else:
            mask = (abs(ys - cy) <= r) & (abs(xs - cx) <= r + rng.integers(-3, 4))
        masks = [m & ~mask for m in masks] + [mask]
        image[mask] = rng.integers(0, 256, 3)
    return image, masks


def test_missing_checkpoint_names_path_and_config_key(tmp_path):
    path = tmp_path / "sam_vit_l.pth"
    with pytest.raises(FileNotFoundError, match="model.sam.checkpoint=") as err:
        build_sam("tiny", path)
    assert str(path) in str(err.value)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown SAM variant"):
        build_sam("vit_xl")


def test_tiny_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    sam = build_sam("tiny")
    path = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), path)
    loaded = build_sam("tiny", path)
    for key, value in sam.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_wrong_keys_and_shapes_are_named(tmp_path):
    state = build_sam("tiny").state_dict()
    renamed = {
        ("junk." + k if k.startswith("mask_decoder.iou_token") else k): v for k, v in state.items()
    }
    torch.save(renamed, tmp_path / "renamed.pth")
    match = r"variant 'tiny'.*missing keys.*mask_decoder\.iou_token"
    with pytest.raises(CheckpointMismatchError, match=match):
        build_sam("tiny", tmp_path / "renamed.pth")
    torch.save(build_sam("tiny", embed_dim=32).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches.*image_encoder"):
        build_sam("tiny", tmp_path / "narrow.pth")


def test_pretrain_lowers_loss_and_saves_loadable_checkpoint(tmp_path):
    path = tmp_path / "sam" / "tiny.pth"
    losses = pretrain_tiny_sam(
        path, shapes_scene, steps=20, batch_size=2, seed=0, max_seconds=None, progress=False
    )
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert not path.with_name("tiny.pth.tmp").exists()
    build_sam("tiny", path)

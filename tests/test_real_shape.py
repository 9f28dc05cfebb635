"""Every registered family at its headline checkpoint's published widths and processor settings.

``make test-real`` (marker ``real_shape``, not in ``make test``): each family is built once per
module by :func:`flmm.foundation.real_shape.build_real_shape` (random weights, 2 text + 2 vision
layers, every width, head count and processor setting as published), loaded through
``FrozenLMM.from_pretrained`` as a hub checkpoint is, and fed real-size images through its real
processor: the image-token counts and the grids flmm derives against the model's own placement of
the features, capture against eager attention, one training step, grounding and chat.

Image sizes are written W x H (as screens are); the arrays are H x W.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, compose_cfg
from omegaconf import OmegaConf

from flmm.attention.eager_reference import eager_maps
from flmm.chat.conversation import GroundedChat
from flmm.foundation.real_shape import build_real_shape, published
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM, list_lmms
from flmm.lmm.grid_checks import check_grids
from flmm.model.network import FLMMModel
from flmm.train import train
from flmm.types import GroundingBatch, GroundingSample

pytestmark = pytest.mark.real_shape

SIZES = {"640x480": (480, 640), "480x640": (640, 480), "1920x1080": (1080, 1920)}
SIZES["300x2000"] = (2000, 300)  # W x H -> H x W
TEXT = "the red circle left of a blue square"
PHRASES = ["red circle", "blue square"]
QUESTION = "what is in the image?"


# decoder layers kept where two do not fit the tier's memory: a Mistral Small 3.1 layer (5120 wide,
# a 32768 MLP) holds 555M parameters, 2.2 GB in float32, and the train test loads a second copy
TEXT_LAYERS = {"mistral3": 1}


@dataclass
class Real:
    family: str
    path: Path
    lmm: FrozenLMM


@pytest.fixture(scope="module", params=list_lmms())
def real(request, tmp_path_factory) -> Real:
    """A family's real-shape model, built and loaded once, freed after its tests (pytest holds a
    fixture's value a while longer: the model goes, so one family's model is in memory at a time)."""
    folder = tmp_path_factory.mktemp(f"real_{request.param}")
    build_real_shape(request.param, folder, TEXT_LAYERS.get(request.param, 2))
    gc.collect()
    real = Real(request.param, folder, FrozenLMM.from_pretrained(folder, family=request.param))
    yield real
    del real.lmm
    shutil.rmtree(folder)
    gc.collect()


def sample(size: str, seed: int = 0) -> GroundingSample:
    """A noise image of ``size`` (W x H) with :data:`TEXT` and a box mask per phrase."""
    height, width = SIZES[size]
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    masks = np.zeros((len(PHRASES), height, width), dtype=bool)
    masks[0, : height // 2, : width // 3] = True
    masks[1, height // 2 :, width // 2 :] = True
    spans = [(TEXT.index(p), TEXT.index(p) + len(p)) for p in PHRASES]
    return GroundingSample(image, TEXT, spans, masks)


@pytest.mark.parametrize("size", list(SIZES))
def test_real_shape_image_tokens_and_grids(real, size, record_property):
    """The processor's image tokens and flmm's grids agree with where the model itself places the
    image features (square: their count; any-res: the newline embeddings; Qwen: its 2-D rope)."""
    lmm = real.lmm
    enc = lmm.encode(GroundingBatch.collate([sample(size)]))
    layouts = check_grids(lmm, enc)
    count = int((enc["input_ids"][0] == lmm.image_token_id).sum())
    assert count == sum(grid.num_tokens for grid, _ in layouts[0])
    height, width = SIZES[size]
    # the finest grid (any-res high-res, Qwen's, InternVL's tile mosaic) follows the image's aspect
    # ratio; a base grid or a thumbnail is square
    finest = max((grid for grid, _ in layouts[0]), key=lambda grid: grid.num_tokens)
    if lmm.family.grid != "square":
        assert (finest.height > finest.width) == (height > width)
    record_property("image_tokens", count)
    record_property("grids", [(g.height, g.width) for g, _ in layouts[0]])


def test_real_shape_capture_matches_eager(real):
    """Capture at real widths equals HF's eager attention weights of the same model."""
    lmm = real.lmm
    batch = GroundingBatch.collate([sample("640x480")])
    inputs = lmm.encode(batch)
    token_phrase, region = inputs.pop("token_phrase"), inputs.pop("region")
    cols, counts = lmm.image_columns(inputs["input_ids"])
    raw = eager_maps(lmm, inputs, token_phrase, cols, len(PHRASES))
    expected = lmm.to_grid(raw, lmm.layouts(inputs, counts), region)
    maps = lmm(batch).maps
    assert maps.shape == (1, len(PHRASES), lmm.channels, *lmm.grid) == expected.shape
    assert (maps - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_real_shape_training_step(real):
    """One optimiser step of the full F-LMM; only the head and the refiner learn."""
    torch.manual_seed(0)
    model = FLMMModel.build(real.lmm, build_sam("tiny"), base_channels=8)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    first = model.mask_head.encoder[0][0].convs[0].conv.weight
    before = first.detach().clone()
    batch = GroundingBatch.collate([sample("480x640")])
    loss = model.losses(batch, model(batch))["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, first)
    assert first.shape[1] == real.lmm.channels
    assert not any(p.grad is not None for p in real.lmm.parameters())


def test_real_shape_ground_and_chat(real):
    """Grounding and a grounded conversation give masks of the image's size and an answer."""
    torch.manual_seed(0)
    chat = GroundedChat(FLMMModel.build(real.lmm, build_sam("tiny"), base_channels=8))
    strip = sample("300x2000").image
    grounding = chat.ground(strip, TEXT, PHRASES)
    assert grounding.refined.shape == (len(PHRASES), *strip.shape[:2])
    assert grounding.refined.isfinite().all()
    image = sample("640x480").image
    result = chat.chat(image, QUESTION, phrases=[], max_new_tokens=3)
    assert result.answer.strip() and result.masks.shape == (0, *image.shape[:2])
    first = result.answer.split()[0]  # what chat grounds when the answer names it
    result = chat.grounded(image, QUESTION, result.answer, [first])
    assert result.phrases == [first] and result.masks.shape == (1, *image.shape[:2])


@pytest.fixture(scope="module")
def world_root(tmp_path_factory) -> Path:
    """One home (a small synthetic world, the tiny SAM) for every family's training run."""
    return tmp_path_factory.mktemp("real_shape_runs")


def real_lmm_config(family: str) -> str:
    """The ``model/lmm`` option of the family's headline checkpoint."""
    checkpoint = published(family)["checkpoint"]
    (name,) = [
        path.stem
        for path in (CONF / "model" / "lmm").glob("*.yaml")
        if not path.name.startswith("_") and OmegaConf.load(path).get("name_or_path") == checkpoint
    ]
    return name


def test_real_shape_train_command(real, world_root):
    """``flmm train`` with the family's real LMM config (bfloat16, as a user runs it) pointed at
    the real-shape folder: fit, checkpoint, test, the frozen-LMM check."""
    run = world_root / real.family
    overrides = [
        f"paths.home_dir={world_root}",
        "model=llava",  # the model settings every real model config shares
        f"model/lmm={real_lmm_config(real.family)}",
        f"model.lmm.name_or_path={real.path}",
        "model/sam=tiny",
        "model.sam.checkpoint.pretrain_steps=2",
        "model.base_channels=8",
        *("data.n_train=4", "data.n_val=2", "data.n_test=2", "data.batch_size=2"),
        "trainer.max_epochs=1",
        *("trainer.limit_train_batches=1", "trainer.limit_val_batches=1"),
        *("trainer.limit_test_batches=1", "trainer.accelerator=cpu"),
        "callbacks.frozen_lmm_check.num_images=1",
        "callbacks.frozen_lmm_check.max_new_tokens=2",
        "callbacks.mask_overlays.num_samples=2",
    ]
    cfg = compose_cfg(run, overrides)
    assert cfg.model.lmm.dtype == "bfloat16"
    metrics = train(cfg)
    assert 0.0 <= metrics["test/giou"] <= 100.0
    ckpt = torch.load(run / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["flmm"]["family"] == real.family
    assert ckpt["flmm"]["channels"] == real.lmm.channels
    assert json.loads((run / "run" / "chat_check.json").read_text())["unchanged"]

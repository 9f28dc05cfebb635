"""The weighted mixture of datasets (the paper's training set), on the refer and PNG fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import compose_cfg
from png_fixtures import write_png_fixture
from refer_fixtures import write_refer_fixture

from flmm.data import ReferDataModule
from flmm.data.mix import MixDataModule, repeat_by_weight
from flmm.data.png import PNGDataModule
from flmm.errors import ConfigError
from flmm.train import train


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    images = write_refer_fixture(root / "refer")["image_dir"]
    write_png_fixture(root / "png")
    return root, images


def components(roots) -> dict:
    root, images = roots
    refcoco = ReferDataModule(root / "refer", images, eval_splits=["val", "testA"])
    return {"png": PNGDataModule(root / "png"), "refcoco": refcoco}


def test_repeat_by_weight():
    rng = np.random.default_rng(0)
    assert list(repeat_by_weight(3, 1.0, rng)) == [0, 1, 2]
    assert list(repeat_by_weight(3, 2.0, rng)) == [0, 1, 2, 0, 1, 2]
    half = repeat_by_weight(10, 0.5, rng)
    assert len(half) == 5 and len(set(half)) == 5
    assert len(repeat_by_weight(4, 1.5, rng)) == 6 and len(repeat_by_weight(0, 2.0, rng)) == 0


def test_mixture_counts_and_samples(roots):
    dm = MixDataModule(components(roots), weights={"png": 2.0}, batch_size=2, seed=1)
    dm.setup("fit")
    mix = dm.train_set
    assert mix.counts == {"png": 2, "refcoco": 3}  # 1 PNG train narrative x 2; 3 refcoco images
    texts = [mix[i].text for i in range(len(mix))]
    assert texts[0] == texts[1] == "a man with his dog on the lawn"
    assert all(t.endswith(".") for t in texts[2:])
    assert len(dm.val_sets) == 2 and len(dm.val_dataloader()) == 2
    sets = dm.eval_sets(["reference", "per_sentence"])
    assert [(s.dataset_name, s.split, s.protocol) for s in sets] == [
        ("png", "val2017", "reference"),
        ("refcoco", "val", "reference"),
        ("refcoco", "val", "per_sentence"),
        ("refcoco", "testA", "reference"),
        ("refcoco", "testA", "per_sentence"),
    ]


def test_bad_weights_are_named(roots):
    with pytest.raises(ConfigError, match=r"refcocoplus"):
        MixDataModule(components(roots), weights={"refcocoplus": 1.0})
    with pytest.raises(ConfigError, match=r"negative \['png'\]"):
        MixDataModule(components(roots), weights={"png": -1.0})


def test_train_on_the_mixture_one_batch(roots):
    root, images = roots
    cfg = compose_cfg(
        root,
        [
            "data=mix",
            "~data.components.refcoco_plus",
            "~data.components.refcocog",
            "~data.weights.refcoco_plus",
            "~data.weights.refcocog",
            f"paths.png_root={root / 'png'}",
            f"paths.refer_root={root / 'refer'}",
            f"paths.coco_train2014={images}",
            "data.num_workers=0",
            "data.components.png.num_workers=0",
            "data.components.refcoco.num_workers=0",
            "data.batch_size=2",
            "model/lmm=tiny_random_weights",
            "model.sam.checkpoint.pretrain_steps=2",
            "model.base_channels=8",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "trainer.accelerator=cpu",
            "callbacks.frozen_lmm_check.num_images=1",
            "test=false",
        ],
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["val/giou"] <= 100.0
    assert 0.0 <= metrics["val/ar/all"] <= 100.0  # the PNG loader's phrases carry groups
    assert json.loads((root / "run" / "metrics.json").read_text()) == metrics


def test_synthetic_mixture_composes_and_sets_up(tmp_path):
    import hydra

    world = ["n_train=6", "n_val=2", "n_test=2", "image_size=48"]
    overrides = [f"data.components.{c}.{w}" for c in ("synthetic", "png") for w in world]
    cfg = compose_cfg(tmp_path, ["data=mix_synthetic", *overrides])
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set.counts == {"synthetic": 6, "png": 6}
    assert [len(d) for d in dm.val_sets] == [2, 2]
    names = {(s.dataset_name, s.split) for s in dm.eval_sets(["reference", "per_sentence"])}
    assert names == {
        ("synthetic", "val"),
        ("synthetic", "test"),
        ("png", "val2017"),
        ("png", "test2017"),
    }

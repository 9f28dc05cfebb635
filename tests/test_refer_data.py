"""The refer-layout reader: exact masks, the three protocols, errors and skips, the datamodule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from refer_fixtures import IMAGES, write_refer_fixture

from flmm.data import ReferDataModule, ReferDataset, join_sentences, load_refer
from flmm.types import GroundingBatch


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    info = write_refer_fixture(root)
    return root, info


def dataset(fixture, split="train", protocol="reference", **kwargs) -> ReferDataset:
    root, info = fixture
    return ReferDataset(root, info["image_dir"], "refcoco", "unc", split, protocol, **kwargs)


def coco_decode(segmentation, height, width) -> np.ndarray:
    """pycocotools' own path (COCO.annToMask), written out independently of flmm."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def test_masks_are_pixel_exact(fixture):
    data = dataset(fixture)
    rle_sources = fixture[1]["rle_sources"]
    for ann_id, ann in data.ann.anns.items():
        _, h, w, _ = IMAGES[ann["image_id"]]
        mask = data.annotation_mask(ann_id)
        assert mask.dtype == bool and mask.shape == (h, w)
        np.testing.assert_array_equal(mask, coco_decode(ann["segmentation"], h, w))
        if ann_id in rle_sources:
            np.testing.assert_array_equal(mask, rle_sources[ann_id])
    assert data.annotation_mask(11)[3:25, 2:20].all() and data.annotation_mask(12).sum() > 50


def test_samples_carry_their_refs_masks(fixture):
    data = dataset(fixture)
    for sample in (data[i] for i in range(len(data))):
        assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
        assert sample.masks.shape == (len(sample.spans), *sample.image.shape[:2])
        for mask, ann_id in zip(sample.masks, sample.meta["ann_ids"]):
            np.testing.assert_array_equal(mask, data.annotation_mask(ann_id))


def test_reference_protocol_first_sentences_per_image(fixture):
    data = dataset(fixture, protocol="reference")
    assert [data[i].text for i in range(len(data))] == [
        "the left box. two triangles. the crowd.",
        "the blob.",
        "the triangle.",
    ]
    first = data[0]
    assert first.phrases == ["the left box", "two triangles", "the crowd"]
    assert first.meta["image_id"] == 1 and first.meta["ref_ids"] == [1, 2, 3]
    assert first.meta["sent_ids"] == [100, 103, 105]
    assert first.meta["tags"] == [{}, {}, {}]
    val = dataset(fixture, split="val")
    assert len(val) == 1 and val[0].text == "the rectangle. the noisy blob."


def test_train_protocol_picks_one_sentence_once_seeded(fixture):
    texts = {s: [x.text for x in dataset(fixture, protocol="train", seed=s)] for s in range(6)}
    assert texts[0] == [s.text for s in dataset(fixture, protocol="train", seed=0)]
    assert len({tuple(t) for t in texts.values()}) > 1
    data = dataset(fixture, protocol="train", seed=3)
    assert [data[0].text for _ in range(3)] == [data[0].text] * 3  # chosen once, not per access
    sentences = {
        1: ["the left box", "box on the left side", "leftmost box"],
        2: ["two triangles", "the pair of triangles"],
        3: ["the crowd"],
    }
    for phrase, ref_id in zip(data[0].phrases, data[0].meta["ref_ids"]):
        assert phrase in sentences[ref_id]


def test_per_sentence_protocol(fixture):
    data = dataset(fixture, protocol="per_sentence")
    assert len(data) == 8  # 3 + 2 + 1 + 1 (one empty dropped) + 1; empty / zero-area refs skipped
    assert [s.text for s in data][:3] == ["the left box.", "box on the left side.", "leftmost box."]
    assert all(len(s.spans) == 1 for s in data)
    assert len(dataset(fixture, split="val", protocol="per_sentence")) == 5


def test_join_sentences_spans():
    text, spans = join_sentences(["the dog", "a cat.", " the man  "])
    assert text == "the dog. a cat. the man."
    assert [text[s:e] for s, e in spans] == ["the dog", "a cat", "the man"]


def test_max_phrases_splits_images(fixture):
    data = dataset(fixture, max_phrases=2)
    assert [len(s.spans) for s in data] == [2, 1, 1, 1]


def test_skips_are_counted(fixture):
    for protocol in ("train", "reference", "per_sentence"):
        skipped = dict(dataset(fixture, protocol=protocol).skipped)
        assert skipped == {"empty_sentence": 3, "empty_sentences": 1, "empty_mask": 1}
    assert dict(dataset(fixture, split="val").skipped) == {}


def test_grayscale_and_rgba_become_rgb(fixture):
    data = dataset(fixture)
    gray, rgba = data[1].image, data[2].image
    assert gray.shape == (30, 30, 3) and (gray[..., 0] == gray[..., 2]).all()
    assert rgba.shape == (24, 32, 3)


def test_missing_files_name_the_file_and_the_fix(fixture, tmp_path):
    root, info = fixture
    with pytest.raises(FileNotFoundError, match="paths.refer_root"):
        ReferDataset(tmp_path / "nowhere", info["image_dir"])
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)\.p.*data\.root"):
        ReferDataset(root, info["image_dir"], split_by="google")
    with pytest.raises(FileNotFoundError, match="instances.json"):
        load_refer(root, "refcoco+", "unc")


def test_bad_images_name_file_and_ref(fixture):
    with pytest.raises(ValueError, match=r"000000000005\.jpg.*refs \[10\]"):
        dataset(fixture, split="testA")[0]
    with pytest.raises(FileNotFoundError, match=r"000000000006\.jpg.*refs \[11\]"):
        dataset(fixture, split="testB")[0]


def test_unknown_protocol(fixture):
    with pytest.raises(ValueError, match="protocol"):
        dataset(fixture, protocol="lisa")


def test_datamodule_batches(fixture):
    root, info = fixture
    dm = ReferDataModule(
        root,
        info["image_dir"],
        val_split=["val", "train"],
        test_split="val",
        val_protocol="per_sentence",
        batch_size=2,
        max_eval_samples=4,
    )
    dm.setup("fit")
    dm.setup("test")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, GroundingBatch) and len(batch) == 2
    assert all(m.dtype == torch.bool for m in batch.masks)
    val_loaders = dm.val_dataloader()
    assert [len(loader.dataset) for loader in val_loaders] == [4, 4]
    assert len(dm.test_dataloader().dataset) == 4
    assert len(dm.train_set) == 3


def test_refcocog_umd_eval_sets(tmp_path):
    images = write_refer_fixture(tmp_path, "refcocog", "umd")["image_dir"]
    dm = ReferDataModule(tmp_path, images, "refcocog", "umd", eval_splits=["val", "testA"])
    dm.prepare_eval()
    sets = dm.eval_sets(["reference", "per_sentence", "lisa"])
    assert [(s.dataset_name, s.split, s.protocol, len(s.data)) for s in sets] == [
        ("refcocog", "val", "reference", 1),
        ("refcocog", "val", "per_sentence", 5),
        ("refcocog", "testA", "reference", 1),
        ("refcocog", "testA", "per_sentence", 1),
    ]
    assert sets[0].data[0].text == "the rectangle. the noisy blob."
    assert all(not s.skipped for s in sets)

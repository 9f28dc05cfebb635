"""The PNG reader: exact union masks, text and spans, groups, skips, errors, the datamodule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from png_fixtures import id_map, write_png_fixture

from flmm.data.masks import id2rgb, rgb2id
from flmm.data.png import (
    PNGDataModule,
    PNGDataset,
    join_utterances,
    load_png,
)
from flmm.data.synthetic import SyntheticPNGDataModule
from flmm.types import GroundingBatch


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("png")
    return root, write_png_fixture(root)


def test_rgb2id_round_trip_uses_all_three_channels():
    ids = np.array([[0, 255, 256], [65535, 65536, 70000 + 256 * 3]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    assert tuple(rgb[1, 1]) == (0, 0, 1)


def test_union_masks_are_pixel_exact(fixture):
    root, sources = fixture
    data = PNGDataset(root, "val2017")
    sample = data[0]
    assert sample.meta["image_id"] == 139
    np.testing.assert_array_equal(sample.masks[0], sources[139][3] | sources[139][300])
    np.testing.assert_array_equal(sample.masks[1], sources[139][70000])
    np.testing.assert_array_equal(data.segment_ids(139, 0), id_map(139))
    train = PNGDataset(root, "train2017")[0]
    np.testing.assert_array_equal(train.masks[2], sources[9][131072])
    assert train.masks.shape == (3, 18, 22)


def test_text_spans_and_groups(fixture):
    root, _ = fixture
    sample = PNGDataset(root, "val2017")[0]
    assert sample.text == ("In this image we can see two people standing and a dog under the sky .")
    assert sample.phrases == ["two people", "the sky"]  # "a dog" has no segment: not grounded
    assert sample.meta["tags"] == [
        {"plural": True, "thing": True},
        {"plural": False, "thing": False},
    ]
    assert sample.meta["png_groups"] == [["plural", "things"], ["singular", "stuff"]]
    assert sample.meta["segment_ids"] == [[3, 300], [70000]]


def test_join_utterances():
    text, spans = join_utterances([" a man ", "", "with", "his dog"])
    assert text == "a man with his dog"
    assert [text[s:e] for s, e in spans] == ["a man", "", "with", "his dog"]


def test_skips_are_counted_and_images_converted(fixture):
    root, _ = fixture
    data = PNGDataset(root, "val2017")
    assert dict(data.skipped) == {
        "unknown_segment_id": 1,
        "empty_mask": 1,
        "no_grounded_segment": 1,
        "missing_image_entry": 1,
    }
    assert [r.image_id for r in data.records] == [139, 285, 632, 724, 776]
    gray, rgba = data[1], data[2]
    assert gray.phrases == ["A bear"] and gray.image.shape == (24, 24, 3)
    assert (gray.image[..., 0] == gray.image[..., 1]).all()
    assert rgba.image.shape == (20, 28, 3) and rgba.phrases == ["a person"]


def test_bad_images_name_the_file_and_the_record(fixture):
    root, _ = fixture
    data = PNGDataset(root, "val2017")
    with pytest.raises(ValueError, match=r"corrupt.*image_id 724, narrative 4.*000000000724\.jpg"):
        data[3]
    with pytest.raises(FileNotFoundError, match=r"image_id 776, narrative 5.*000000000776\.jpg"):
        data[4]


def test_id_map_disagreeing_with_json_is_an_error(fixture, tmp_path):
    root, _ = fixture
    ann = load_png(root, "val2017")
    ann.panoptic[139]["segments_info"].append(
        {"id": 5, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 4}
    )
    ann.narratives[0]["segments"][1]["segment_ids"] = ["5"]
    with pytest.raises(ValueError, match=r"segments \[5\] of narrative 0 \(image_id 139\)"):
        PNGDataset(root, "val2017", annotations=ann)[0]


def test_max_phrases_and_protocols(fixture):
    root, _ = fixture
    data = PNGDataset(root, "train2017", max_phrases=2)
    assert [s.phrases for s in data] == [["a man", "his dog"], ["the lawn"]]
    with pytest.raises(ValueError, match="per_sentence"):
        PNGDataset(root, "val2017", protocol="per_sentence")


def test_missing_files_name_the_file_and_the_fix(fixture, tmp_path):
    root, _ = fixture
    with pytest.raises(FileNotFoundError, match="paths.png_root"):
        PNGDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"png_coco_test2017\.json.*paths\.png_root"):
        load_png(root, "test2017")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "png_coco_val2017.json").write_text("[{")
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text("{}")
    (tmp_path / "annotations" / "panoptic_segmentation" / "val2017").mkdir(parents=True)
    (tmp_path / "images" / "val2017").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"png_coco_val2017\.json is not valid JSON"):
        load_png(tmp_path, "val2017")


def test_datamodule(fixture, tmp_path):
    root, _ = fixture
    dm = PNGDataModule(root, batch_size=2, max_eval_samples=2)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, GroundingBatch) and batch.masks[0].dtype == torch.bool
    assert len(dm.val_sets[0]) == 2
    sets = dm.eval_sets(["reference", "per_sentence"])
    assert [(s.dataset_name, s.split, s.protocol) for s in sets] == [
        ("png", "val2017", "reference")
    ]
    assert sets[0].skipped["unknown_segment_id"] == 1
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match="png_coco_train2017.json"):
        PNGDataModule(tmp_path).prepare_data()


def test_synthetic_world_png_layout_matches_its_refer_layout(tmp_path):
    from flmm.data.refer import ReferDataset
    from flmm.data.synthetic import write_world

    root = write_world(tmp_path / "world", 6, 4, 2, seed=3, image_size=48)
    refer = ReferDataset(root, root / "images", "synthetic", "unc", "val", "reference")
    dm = SyntheticPNGDataModule(root, 6, 4, 2, world_seed=3, image_size=48, batch_size=2)
    dm.prepare_eval()
    (png_val,) = [s.data for s in dm.eval_sets(["reference"]) if s.split == "val2017"]
    assert len(png_val) == 4 and not png_val.skipped
    for sample in png_val:
        objects = [a for a in refer.image_annotations(sample.meta["image_id"])]
        union = np.any([refer.annotation_mask(a["id"]) for a in objects], axis=0)
        np.testing.assert_array_equal(np.any(sample.masks[:-1], axis=0), union)
        np.testing.assert_array_equal(sample.masks[-1], ~union)  # the background, stuff
        assert sample.phrases[-1] == "a light background"
        assert sample.meta["png_groups"][-1] == ["singular", "stuff"]
        for phrase, groups, ids in zip(
            sample.phrases[:-1], sample.meta["png_groups"][:-1], sample.meta["segment_ids"]
        ):
            assert ("plural" in groups) == (len(ids) > 1) == (phrase.split()[0] != "a")
    image = png_val[0].image
    np.testing.assert_array_equal(image, refer.load_image(png_val[0].meta["image_id"]))

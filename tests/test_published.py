"""The published facts of each family's headline checkpoint (``flmm/foundation/published``) and
the real-shape builder's config and processor, checked without building any weights (the models
themselves run in ``make test-real``)."""

from __future__ import annotations

import json
import operator
from importlib import resources
from pathlib import Path

import pytest
import tomllib
import torch
import transformers

from flmm.errors import ConfigError
from flmm.foundation.real_shape import (
    SUB_CONFIGS,
    cut_depth,
    published,
    real_processor,
    real_shape_config,
)
from flmm.foundation.tiny_models import SPECIAL_TOKENS, family_tokenizer
from flmm.lmm import get_family, list_lmms

FAMILIES = list_lmms()
# what the builder may change: the depth and what follows it, the vocabulary and token ids
CUT = {
    "num_hidden_layers",
    "depth",
    "layer_types",
    "fullatt_block_indexes",
    "global_attn_indexes",
    "deepstack_visual_indexes",
    "num_local_experts",
    "n_routed_experts",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
}
TOKEN_IDS = {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"}
TOKEN_IDS |= {f"{kind}_{end}_token_id" for kind in ("image", "video") for end in ("start", "end")}


def config_class(family: str):
    return getattr(transformers, get_family(family).model_class).config_class


def tokenizer(family: str):
    return family_tokenizer(SPECIAL_TOKENS[family], None)


@pytest.mark.parametrize("family", FAMILIES)
def test_published_facts_name_their_checkpoint_and_sources(family):
    facts = published(family)
    assert facts["checkpoint"] in get_family(family).checkpoints
    assert facts["source"]["config"] and facts["source"]["processor"]
    assert isinstance(facts["unconfirmed"], list)
    assert facts["config"]["model_type"] == config_class(family).model_type
    # the tiny models' special tokens are the hub tokenizers' strings
    assert facts["special_tokens"] == SPECIAL_TOKENS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_real_shape_config_differs_only_in_depth_and_vocabulary(family):
    facts = published(family)
    full = config_class(family).from_dict(facts["config"]).to_dict()
    built = real_shape_config(family, tokenizer(family), 2, 2).to_dict()
    for name in SUB_CONFIGS:
        if name in full:
            changed = {k for k, v in full[name].items() if built[name].get(k) != v}
            assert changed <= CUT, f"{name}: {changed - CUT}"
            assert built[name].get("depth", built[name].get("num_hidden_layers")) == 2
    top = {k for k, v in full.items() if k not in SUB_CONFIGS and built.get(k) != v}
    assert top <= TOKEN_IDS | {f"{t}_token_index" for t in ("image", "video", "boi", "eoi")}
    for path, value in facts["defaults_filled"].items():
        full_depth = real_shape_config(family, tokenizer(family), None, None)
        assert operator.attrgetter(path)(full_depth) == value


@pytest.mark.parametrize("family", FAMILIES)
def test_full_depth_is_the_published_depth(family):
    """``text_layers=None``: the published decoder, built on the meta device (no memory)."""
    facts = config_class(family).from_dict(published(family)["config"])
    text = get_family(family).text_config
    config = real_shape_config(family, tokenizer(family), None, None)
    with torch.device("meta"):
        model = getattr(transformers, get_family(family).model_class)(config)
    layers = operator.attrgetter(get_family(family).decoder_layers)(model)
    assert len(layers) == getattr(facts, text).num_hidden_layers > 2
    assert getattr(config, text).hidden_size == getattr(facts, text).hidden_size


def test_cut_depth_keeps_the_pattern_of_the_last_layers():
    qwen = {"depth": 32, "fullatt_block_indexes": [7, 15, 23, 31]}
    cut_depth(qwen, 2)
    assert qwen == {"depth": 2, "fullatt_block_indexes": [1]}
    sam = {
        "num_hidden_layers": 12,
        "global_attn_indexes": [2, 5, 8, 11],
        "layer_types": list(range(12)),
    }
    cut_depth(sam, 4)
    assert sam == {
        "num_hidden_layers": 4,
        "global_attn_indexes": [0, 3],
        "layer_types": [8, 9, 10, 11],
    }
    deepstack = {"depth": 27, "deepstack_visual_indexes": [8, 16, 24]}
    cut_depth(deepstack, 2)  # DeepStack stays active: the taps move to the first kept layer
    assert deepstack == {"depth": 2, "deepstack_visual_indexes": [0]}
    deepstack = {"depth": 27, "deepstack_visual_indexes": [8, 16, 24]}
    cut_depth(deepstack, 12)
    assert deepstack == {"depth": 12, "deepstack_visual_indexes": [0, 1, 9]}
    whole = {"num_hidden_layers": 3}
    cut_depth(whole, None)
    assert whole == {"num_hidden_layers": 3}
    with pytest.raises(ConfigError, match=r"text_layers must be None or in \[1, 3\] .*got 4"):
        cut_depth(whole, 4, "text_layers")
    with pytest.raises(
        ConfigError, match=r"qwen2_5_vl vision_layers \(vision_config\) must be .*32"
    ):
        real_shape_config("qwen2_5_vl", tokenizer("qwen2_5_vl"), 2, 40)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.endswith("_moe")])
def test_real_shape_cuts_experts_with_the_depth(family):
    """A cut mixture-of-experts decoder keeps 2 x top-k experts (each of its published shape);
    the full-depth build keeps them all."""
    text = get_family(family).text_config
    cut = getattr(real_shape_config(family, tokenizer(family), 2, 2), text)
    full = getattr(real_shape_config(family, tokenizer(family), None, None), text)
    count = "n_routed_experts" if hasattr(full, "n_routed_experts") else "num_experts"
    assert getattr(cut, count) == 2 * cut.num_experts_per_tok < getattr(full, count)
    assert cut.moe_intermediate_size == full.moe_intermediate_size


def plain(value):
    """JSON-comparable: tuples as lists, enums as their values, dict-likes as dicts."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", None) or dict(v)))


@pytest.mark.parametrize("family", FAMILIES)
def test_real_processor_has_the_published_settings_after_a_round_trip(family, tmp_path):
    """The processor saved with the model loads back with every published setting."""
    settings = published(family)["processor"]
    real_processor(family, tokenizer(family)).save_pretrained(tmp_path)
    loaded = getattr(transformers, get_family(family).processor_class).from_pretrained(tmp_path)
    image = loaded.image_processor
    assert type(image).__name__ == settings["image_processor"]["image_processor_type"].removesuffix(
        "Fast"
    )
    for key, value in settings["image_processor"].items():
        if getattr(image, key, None) is not None and key != "image_processor_type":
            assert plain(getattr(image, key)) == plain(value), key
    for key, value in settings["processor"].items():
        assert getattr(loaded, key) == value, key


def test_published_facts_ship_with_the_package():
    """Every family's facts are package data (the sizing benchmark reads them where flmm is
    installed, not from a checkout)."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    shipped = project["tool"]["setuptools"]["package-data"]["flmm.foundation"]
    assert "published/*.json" in shipped
    folder = resources.files("flmm.foundation").joinpath("published")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{f}.json" for f in FAMILIES)

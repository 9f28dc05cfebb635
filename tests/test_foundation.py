"""The shipped foundation models: recipe up to date, small, half precision that loads as float32;
the pretraining resumes exactly; the recipe still runs (slow)."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import hydra
import numpy as np
import pytest
import tomllib
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from flmm.data.synthetic.corpus import (
    vocabulary,
)
from flmm.data.synthetic.streams import Stream
from flmm.data.synthetic.world import sample_scene
from flmm.entry import CONFIG_PATH
from flmm.errors import ConfigError
from flmm.foundation import build as build_module
from flmm.foundation import cache, pretrain_lmm
from flmm.foundation.tiny_llava import build_tiny_llava
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM

CONF = Path(CONFIG_PATH)
MAX_SHIPPED_MB = 50


def default_node(group: str) -> dict:
    """The recipe arguments of the default tiny LLaVA (``lmm``) or tiny SAM (``sam``)."""
    node = OmegaConf.load(CONF / f"model/{group}/tiny.yaml")
    return node.name_or_path if group == "lmm" else node.checkpoint


def test_shipped_files_were_built_from_the_current_recipe(tmp_path):
    built = json.loads(cache.RECIPE_FILE.read_text())
    hint = "the recipe changed since the shipped models were built: run `make foundation`"
    llava = build_module.recipe_args(default_node("lmm"))
    sam = build_module.recipe_args(default_node("sam"))
    assert built["tiny_llava"]["recipe"] == cache.llava_recipe(**llava), hint
    assert built["tiny_sam"]["recipe"] == cache.sam_recipe(**sam), hint
    for group, name in (("lmm", "tiny_llava"), ("sam", "tiny_sam")):
        node = OmegaConf.merge(default_node(group), {"cache_dir": str(tmp_path)})
        assert hydra.utils.instantiate(node) == str(cache.SHIPPED[name])
    assert not any(tmp_path.iterdir())  # nothing was built


def test_a_changed_recipe_is_not_served_the_shipped_files(tmp_path):
    llava = build_module.recipe_args(default_node("lmm"))
    recipe = cache.llava_recipe(**llava)
    assert cache.shipped_path("tiny_llava", recipe) == str(cache.SHIPPED["tiny_llava"])
    for changed in ({"pretrain_steps": 7}, {"corpus": {**llava["corpus"], "turns": 9}}):
        assert cache.shipped_path("tiny_llava", cache.llava_recipe(**(llava | changed))) is None
    path = cache.ensure_tiny_llava(str(tmp_path), pretrain_steps=0)
    assert Path(path).parent == tmp_path


def test_shipped_files_are_small_half_precision_and_packaged():
    files = [p for p in cache.SHIPPED_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_SHIPPED_MB * 2**20
    with safe_open(cache.SHIPPED["tiny_llava"] / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    sam = torch.load(cache.SHIPPED["tiny_sam"], weights_only=True)
    assert {v.dtype for v in sam.values() if v.is_floating_point()} == {torch.float16}
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["flmm.foundation"]
    for p in files:  # a wheel carries them
        name = p.relative_to(cache.SHIPPED_DIR.parent).as_posix()
        assert any(fnmatch(name, pattern) for pattern in patterns), name


def test_shipped_models_load_in_float32():
    lmm = FrozenLMM.from_pretrained(str(cache.SHIPPED["tiny_llava"]), dtype="float32")
    assert {p.dtype for p in lmm.model.parameters()} == {torch.float32}
    config = lmm.model.config  # the architecture cache.WORLD_LLAVA builds
    assert config.vision_feature_layer == cache.WORLD_LLAVA["vision_feature_layer"]
    assert config.vision_config.num_hidden_layers == cache.WORLD_LLAVA["vision_layers"]
    sam = build_sam("tiny", cache.SHIPPED["tiny_sam"])
    assert {p.dtype for p in sam.parameters()} == {torch.float32}
    image = sample_scene(np.random.default_rng(0), 96).image
    answer = lmm.generate([image], "Please give me a description of the image.", max_new_tokens=8)
    assert answer.strip()


CORPUS = {"caption_prob": 0.5, "exist_prob": 0.5, "cot_prob": 0.3, "crop_prob": 0.3, "turns": 2}


def pretrain(model, out, state_path, steps: int = 4) -> list[float]:
    return pretrain_lmm.pretrain_tiny_llava(
        model,
        out,
        steps,
        batch_size=2,
        warmup=2,
        corpus=CORPUS,
        device="cpu",
        state_path=state_path,
        checkpoint_every=2,
        vision_aux=0.5,
    )


def test_interrupted_pretraining_resumes_exactly(tmp_path, monkeypatch):
    model = build_tiny_llava(tmp_path / "m", vocabulary(), num_layers=1, vision_layers=1)
    straight = pretrain(model, tmp_path / "a", None)
    real, calls = pretrain_lmm.make_batch, []

    def dies_at_step_three(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pretrain_lmm, "make_batch", dies_at_step_three)
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        pretrain(model, tmp_path / "b", state)
    assert state.is_file() and not (tmp_path / "b").exists()
    monkeypatch.setattr(pretrain_lmm, "make_batch", real)
    resumed = pretrain(model, tmp_path / "b", state)
    assert resumed == straight and not state.exists()
    a = (tmp_path / "a/model.safetensors").read_bytes()
    assert a == (tmp_path / "b/model.safetensors").read_bytes()


def test_patch_probe_reads_each_samples_scene_image(tmp_path):
    model = build_tiny_llava(tmp_path / "m", vocabulary(), num_layers=1, vision_layers=1)
    processor = AutoProcessor.from_pretrained(model)
    llava = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    scene, other = np.full((96, 96, 3), 200, np.uint8), np.zeros((96, 96, 3), np.uint8)
    crop = np.full((20, 30, 3), 90, np.uint8)
    samples = [([scene, crop], [("where?", "left")]), ([other], [("what?", "red")])]
    batch = pretrain_lmm.make_batch(processor, samples)
    _, features = pretrain_lmm.first_image_features(llava, batch, lambda: llava(**batch))
    alone = pretrain_lmm.make_batch(processor, [([scene], [("x", "y")]), ([other], [("x", "y")])])
    _, want = pretrain_lmm.first_image_features(llava, alone, lambda: llava(**alone))
    torch.testing.assert_close(features, want)
    probe = pretrain_lmm.PatchProbe(features.shape[-1], patch=8)
    labels = torch.zeros(2, 2, 96, 96, dtype=torch.uint8)
    labels[:, :, :48] = 3  # the top half is colour 3 and shape 3
    with torch.no_grad():
        for head in probe.heads:
            head.weight.zero_()
            head.bias.copy_((torch.arange(head.out_features) == 0).float() * 20)
        background = probe.loss(features, labels)
    # every patch is called background, surely: right on the bottom half (loss 0), wrong on the
    # top half (loss 20), for both heads
    assert abs(background.item() - 20) < 0.01


def test_later_stages_go_on_from_the_cached_model_before_them(tmp_path, monkeypatch):
    real, calls = cache.pretrain_tiny_llava, []

    def second_stage_dies_once(src, out, steps, *args, **kwargs):
        calls.append(kwargs.get("stream", Stream.PRETRAIN))
        if calls == [Stream.PRETRAIN, Stream.INSTRUCT]:
            raise KeyboardInterrupt
        return real(src, out, steps, *args, **kwargs)

    monkeypatch.setattr(cache, "pretrain_tiny_llava", second_stage_dies_once)
    instruct = {"steps": 2, "lr": 1e-4, "corpus": {"caption_prob": 0.0, "exist_prob": 1.0}}
    args = {"pretrain_steps": 2, "batch_size": 2, "instruct": instruct}
    with pytest.raises(KeyboardInterrupt):
        cache.ensure_tiny_llava(str(tmp_path), **args)
    path = Path(cache.ensure_tiny_llava(str(tmp_path), **args))
    # the rerun did not pretrain again: it went on with the instruction stage
    assert calls == [Stream.PRETRAIN, Stream.INSTRUCT, Stream.INSTRUCT]
    info = json.loads((path / "pretraining.json").read_text())
    assert (info["stream"], info["corpus"], info["steps"]) == (
        Stream.INSTRUCT,
        instruct["corpus"],
        2,
    )
    assert (info["previous_stage"]["stream"], info["previous_stage"]["steps"]) == (
        Stream.PRETRAIN,
        2,
    )
    # a VQA stage goes on from the cached instruction-stage model: nothing before it is redone
    vqa = {"steps": 2, "lr": 1e-4, "corpus": {"caption_prob": 0.0, "exist_prob": 1.0}}
    last = Path(cache.ensure_tiny_llava(str(tmp_path), **args, vqa=vqa))
    assert calls[3:] == [Stream.VQA]
    info = json.loads((last / "pretraining.json").read_text())["previous_stage"]
    assert (info["stream"], info["previous_stage"]["stream"]) == (Stream.INSTRUCT, Stream.PRETRAIN)
    models = [p for p in tmp_path.iterdir() if p.suffix != ".lock"]
    assert len(models) == 3 and path in models and last in models
    # a near-miss negatives stage goes on from the cached VQA-stage model
    negatives = vqa | {"corpus": vqa["corpus"] | {"near_prob": 1.0}}
    final = Path(cache.ensure_tiny_llava(str(tmp_path), **args, vqa=vqa, negatives=negatives))
    assert calls[4:] == [Stream.NEGATIVES]
    info = json.loads((final / "pretraining.json").read_text())
    assert (info["corpus"]["near_prob"], info["previous_stage"]["stream"]) == (1.0, Stream.VQA)
    # fresh: every stage again
    assert cache.cached_tiny_llava(str(tmp_path), fresh=True, **args, vqa=vqa) == str(last)
    assert calls[5:] == [Stream.PRETRAIN, Stream.INSTRUCT, Stream.VQA]
    assert cache.llava_recipe(2, instruct=instruct)["instruct"] == instruct
    assert cache.llava_recipe(2, instruct=instruct | {"steps": 0}) == cache.llava_recipe(2)
    with pytest.raises(ConfigError, match="vqa takes steps, lr, corpus; got"):
        cache.llava_recipe(2, vqa=vqa | {"step": 3})


def test_the_vision_stage_trains_the_tower_alone(tmp_path):
    model = build_tiny_llava(tmp_path / "m", vocabulary(), num_layers=1, vision_layers=2)
    before = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32).state_dict()
    pretrain_lmm.pretrain_vision_tower(model, steps=2, batch_size=2)
    after = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.vision_tower.") for k in changed)
    recipe = cache.llava_recipe(2, vision_stage={"steps": 5, "lr": 1e-3})
    assert recipe["vision_stage"] == {"steps": 5, "lr": 1e-3}
    assert cache.llava_recipe(2, vision_stage={"steps": 0, "lr": 1e-3}) == cache.llava_recipe(2)


def test_steps_scale_shortens_every_stage_and_records_the_steps():
    llava = build_module.recipe_args(default_node("lmm"))
    assert llava["steps_scale"] == 1.0
    assert cache.llava_recipe(**llava) == cache.llava_recipe(**(llava | {"steps_scale": 1}))
    quick = cache.llava_recipe(**(llava | {"steps_scale": 0.01}))
    assert "steps_scale" not in quick and quick["pretrain_steps"] == llava["pretrain_steps"] // 100
    for stage in ("vision_stage", *cache.LATER_STAGES):  # every stage, a future one too
        assert quick[stage]["steps"] == max(1, round(llava[stage]["steps"] / 100))
        assert quick[stage]["lr"] == llava[stage]["lr"]
    assert cache.llava_recipe(**(llava | {"steps_scale": 1e-9}))["negatives"]["steps"] == 1
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="steps_scale must be in"):
            cache.llava_recipe(**(llava | {"steps_scale": bad}))


@pytest.mark.slow
def test_the_recipe_still_runs(tmp_path):
    llava = build_module.recipe_args(default_node("lmm")) | {"steps_scale": 1e-4, "batch_size": 2}
    sam = build_module.recipe_args(default_node("sam")) | {"pretrain_steps": 2}
    built = build_module.build_foundation(str(tmp_path / "cache"), llava, sam, tmp_path / "out")
    assert built["tiny_llava"]["recipe"] == cache.llava_recipe(**llava)
    recipe = json.loads((tmp_path / "out/recipe.json").read_text())
    assert recipe["tiny_sam"]["recipe"] == cache.sam_recipe(**sam)
    lmm = FrozenLMM.from_pretrained(str(tmp_path / "out/tiny_llava"), dtype="float32")
    assert lmm.generate([np.zeros((96, 96, 3), np.uint8)], "where?", max_new_tokens=2) is not None
    build_sam("tiny", tmp_path / "out/tiny_sam.pth")

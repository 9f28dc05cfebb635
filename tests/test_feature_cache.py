"""The frozen-feature cache: same predictions and losses, keys, atomic writes, a training run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY, compose_cfg
from safetensors.torch import load_file, save_file

from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.model.feature_cache import FeatureCache, join_capture, split_capture
from flmm.model.network import FLMMModel
from flmm.train import train


@pytest.fixture(scope="module")
def model(tiny_llava_dir):
    torch.manual_seed(0)
    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir))
    return FLMMModel.build(lmm, build_sam("tiny"), base_channels=8).eval()


def fp16_rounded(capture):
    """The capture as the cache stores it: floating tensors rounded through fp16."""
    return join_capture(split_capture(capture), capture.maps.device)


def test_cached_predictions_match_the_frozen_models(model, ragged_batch, tmp_path):
    with torch.no_grad():
        plain = model(ragged_batch)
        plain_loss = model.losses(ragged_batch, plain)["loss"]
        cache = FeatureCache(tmp_path, model.lmm, model.refiner)
        heads = (model.mask_head, model.text_prompt, model.refiner)
        with_cache = FLMMModel(model.lmm, *heads, feature_cache=cache)
        filling = with_cache(ragged_batch)  # computes and stores every entry
        cached = with_cache(ragged_batch)  # reads every entry back
        rounded = model.decode(
            ragged_batch,
            fp16_rounded(model.lmm(ragged_batch)),
            cache.embed_images(ragged_batch.images),
        )
    assert cache.misses == {"lmm": 3, "sam": 3} and cache.hits == {"lmm": 3, "sam": 6}
    for a, b in zip(filling.refined, cached.refined):
        assert torch.equal(a, b)
    # the cache only rounds the frozen features to fp16: bitwise equal to that rounding ...
    assert torch.equal(cached.coarse, rounded.coarse)
    # ... and within fp16 rounding of the fp32 features (relative 2**-11 on the inputs)
    cached_loss = model.losses(ragged_batch, cached)["loss"]
    assert abs(float(cached_loss - plain_loss)) < 1e-3 * float(plain_loss)
    assert torch.allclose(cached.coarse, plain.coarse, atol=2e-2)


def test_keys_depend_on_image_text_spans_and_lmm_settings(model, ragged_batch, tmp_path):
    cache = FeatureCache(tmp_path, model.lmm, model.refiner)
    keys = {cache.sample_key(ragged_batch, b) for b in range(3)}
    assert len(keys) == 3
    reworded = ragged_batch.to("cpu")  # the same image and spans, another text
    reworded.texts = ["One red circle, left!", *ragged_batch.texts[1:]]
    assert reworded.phrases(0) == ragged_batch.phrases(0)
    assert cache.sample_key(reworded, 0) != cache.sample_key(ragged_batch, 0)
    shifted = ragged_batch.to("cpu")
    shifted.spans = [[(0, 3)], *ragged_batch.spans[1:]]
    assert cache.sample_key(shifted, 0) != cache.sample_key(ragged_batch, 0)
    other = ragged_batch.to("cpu")
    other.images = [ragged_batch.images[0].flip(0), *ragged_batch.images[1:]]
    assert cache.sample_key(other, 0) != cache.sample_key(ragged_batch, 0)
    assert cache.image_key(other.images[0]) != cache.image_key(ragged_batch.images[0])
    model.lmm.merge = "max"
    try:
        other_settings = FeatureCache(tmp_path, model.lmm, model.refiner)
    finally:
        model.lmm.merge = "mean"
    assert other_settings.lmm_id != cache.lmm_id and other_settings.sam_id == cache.sam_id
    identity = json.loads((other_settings.lmm_store.folder / "identity.json").read_text())
    assert identity["merge"] == "max" and identity["model_id"] == model.lmm.model_id


def test_keys_depend_on_the_lmm_id_dtype_and_weight_files(
    model, ragged_batch, tiny_llava_dir, tmp_path, monkeypatch
):
    """Each of these alone changes every sample key: another stale cache would feed one model's
    features to another's training."""
    key = FeatureCache(tmp_path, model.lmm, model.refiner).sample_key(ragged_batch, 0)

    def key_now(lmm) -> str:
        return FeatureCache(tmp_path, lmm, model.refiner).sample_key(ragged_batch, 0)

    half = FrozenLMM.from_pretrained(str(tiny_llava_dir), dtype="bfloat16")
    assert half.model_id == model.lmm.model_id and key_now(half) != key
    # hub ids: no local files, so only the id tells them apart
    monkeypatch.setattr(model.lmm, "_model_id", "org/model-a")
    hub_a = key_now(model.lmm)
    monkeypatch.setattr(model.lmm, "_model_id", "org/model-b")
    assert key_now(model.lmm) != hub_a
    monkeypatch.undo()
    copy = shutil.copytree(tiny_llava_dir, tmp_path / "copy")
    lmm = FrozenLMM.from_pretrained(str(copy))
    before = key_now(lmm)
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    size, name = weights.stat().st_size, max(tensors)
    tensors[name] = tensors[name] + 1.0  # the same names, shapes and size, other values
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size and key_now(lmm) != before


@pytest.mark.parametrize("attribute, value", [("revision", "a" * 40), ("quantization", "int8")])
def test_lmm_key_changes_with_revision_and_quantization(model, tmp_path, attribute, value):
    """Captures of another hub commit or of a quantized LMM are other features."""
    plain = FeatureCache(tmp_path, model.lmm, model.refiner)
    saved = getattr(model.lmm, attribute)
    setattr(model.lmm, attribute, value)
    try:
        other = FeatureCache(tmp_path, model.lmm, model.refiner)
    finally:
        setattr(model.lmm, attribute, saved)
    assert other.lmm_id != plain.lmm_id and other.sam_id == plain.sam_id
    identity = json.loads((other.lmm_store.folder / "identity.json").read_text())
    assert identity[attribute] == value


def test_interrupted_write_leaves_no_entry_and_is_redone(
    model, ragged_batch, tmp_path, monkeypatch
):
    cache = FeatureCache(tmp_path, model.lmm, model.refiner)
    real_save = torch.save

    def killed(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise KeyboardInterrupt("killed between writing and renaming")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.capture(ragged_batch)
    monkeypatch.setattr(torch, "save", real_save)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.tmp"))
    # a corrupt entry (e.g. written by a broken disk) is recomputed, not trusted
    key = cache.sample_key(ragged_batch, 0)
    cache.lmm_store.path(key).parent.mkdir(parents=True, exist_ok=True)
    cache.lmm_store.path(key).write_bytes(b"not a tensor file")
    with torch.no_grad():
        cache.capture(ragged_batch)
    assert cache.misses["lmm"] == 3 + 3 and len(list(tmp_path.rglob("*.pt"))) == 3
    shapes = cache.capture_shapes(len(ragged_batch.spans[0]))
    assert cache.lmm_store.load(key, shapes)["maps"].dtype == torch.float16


def test_unwritable_cache_dir_is_a_user_error(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Exception, match="data.cache_dir"):
        FeatureCache(blocker / "cache", model.lmm, model.refiner)


def test_training_with_data_cache_dir_fills_then_reads_the_cache(tmp_path):
    cache_dir = tmp_path / "features"
    overrides = [*TINY, "test=false", "callbacks=none"]
    train(compose_cfg(tmp_path, [*overrides, "train=false"]))  # builds the foundation models
    plain = train(compose_cfg(tmp_path, overrides))
    overrides.append(f"data.cache_dir={cache_dir}")
    filling = train(compose_cfg(tmp_path, overrides))
    entries = {p: p.stat().st_mtime_ns for p in cache_dir.glob("*/*/*.pt")}
    # 2 train batches + 1 val batch of 4 samples; SAM entries are per image
    assert len([p for p in entries if p.parts[-3].startswith("lmm-")]) == 12
    assert 0 < len([p for p in entries if p.parts[-3].startswith("sam-")]) <= 12
    cached = train(compose_cfg(tmp_path, overrides))  # same seed: the same batches, all cached
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("*/*/*.pt")} == entries
    for key in ("train/loss", "val/loss"):
        assert cached[key] == filling[key]  # both read the stored fp16 features
        assert abs(cached[key] - plain[key]) < 1e-3 * plain[key]  # fp16 rounding of the inputs

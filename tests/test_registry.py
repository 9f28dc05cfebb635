"""Every registered LMM family, through a tiny model of its real HF classes saved and reloaded.

Parametrised over ``list_lmms()``: a new family row is tested automatically
(``pytest -k registry``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import CONF, TINY, compose_cfg, make_sample
from omegaconf import OmegaConf

from flmm import frame
from flmm.attention.capture import capture, phrase_rows
from flmm.attention.eager_reference import eager_maps
from flmm.errors import ConfigError, ModelLoadError
from flmm.foundation.tiny_models import BUILDERS, build_tiny_lmm
from flmm.heads import build_sam
from flmm.lmm import Family, FrozenLMM, get_family, list_lmms
from flmm.lmm.grid_checks import GRID_CHECKS
from flmm.lmm.grids import PARTS
from flmm.lmm.processing import pad_colour, processor_images
from flmm.model import load
from flmm.model.module import FLMM
from flmm.train import train
from flmm.types import GroundingBatch

FAMILIES = list_lmms()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory):
    """``family -> folder`` of a random tiny model of that family, each built once per session."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_lmm(tmp_path_factory.mktemp(f"tiny_{family}"), family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_lmms(tiny_dirs):
    """``family -> FrozenLMM`` loaded from its saved folder, each loaded once per session."""
    loaded: dict[str, FrozenLMM] = {}

    def get(family: str) -> FrozenLMM:
        if family not in loaded:
            loaded[family] = FrozenLMM.from_pretrained(tiny_dirs(family), family=family)
        return loaded[family]

    return get


def lmm_options() -> list[Path]:
    """The ``model/lmm`` option files, less the shared part they include (``_loading.yaml``)."""
    return [p for p in (CONF / "model" / "lmm").glob("*.yaml") if not p.name.startswith("_")]


def lmm_option(path: Path) -> dict:
    """An option file's settings over ``_loading.yaml`` where its defaults include it."""
    own = OmegaConf.load(path)
    shared = "_loading" in own.get("defaults", [])
    base = OmegaConf.load(path.parent / "_loading.yaml") if shared else {}
    own.pop("defaults", None)
    return OmegaConf.to_container(OmegaConf.merge(base, own))


def test_registry_every_family_has_a_tiny_builder_and_a_real_config():
    """What adding a family takes: its registry row, its tiny builder, one real-model config."""
    assert set(FAMILIES) == {"llava", *BUILDERS}
    real = {lmm_option(path).get("family") for path in lmm_options()}
    assert set(FAMILIES) <= real
    with pytest.raises(ConfigError, match="known families: .*qwen2_5_vl"):
        get_family("minigemini")
    with pytest.raises(ValueError, match="grid must be one of"):
        Family("new", "NewForConditionalGeneration", "NewProcessor", (), grid="hexagonal")
    with pytest.raises(ValueError, match="needs a grid_size"):
        Family("new", "NewForConditionalGeneration", "NewProcessor", (), grid="thw")


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_loads_frozen_with_contract_shapes(family, tiny_lmms, ragged_batch):
    lmm = tiny_lmms(family)
    config = lmm.model.config.text_config
    parts = PARTS[get_family(family).grid]
    assert lmm.channels == parts * config.num_hidden_layers * config.num_attention_heads
    assert parts == (
        2
        if family
        in ("llava_next", "llava_onevision", "internvl", "smolvlm", "idefics3", "aya_vision")
        else 1
    )
    assert not any(p.requires_grad for p in lmm.parameters()) and not lmm.training
    out = lmm(ragged_batch)
    assert out.maps.shape == (3, 3, lmm.channels, *lmm.grid)
    assert out.maps[~out.phrase_mask].abs().sum() == 0
    expected = torch.tensor([[15, 0, 60, 90], [0, 25, 90, 40], [0, 0, 1, 1]]) / torch.tensor(
        [[90.0], [90.0], [1.0]]
    )
    assert torch.allclose(out.region.cpu(), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_maps_stay_inside_the_image_region(family, tiny_lmms, ragged_batch):
    """Grids of unpadded families land on the image's centred region of the frame only;
    those of square-padded families cover the whole frame (the model saw the padded square)."""
    lmm = tiny_lmms(family)
    maps = lmm(ragged_batch).maps
    side = lmm.grid[0]
    tall = maps[1, 0].sum(0)  # a 90 x 40 image: columns right of 40/90 of the frame are padding
    _, left, _, width = frame.cells(frame.region(90, 40), side)
    if get_family(family).pad_to_square:
        assert (tall > 0).all()
    else:
        outside = tall.clone()
        outside[:, left : left + width] = 0
        assert (tall[:, left : left + width] > 0).all() and outside.abs().sum() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_image_tokens_match_processor_and_model(family, tiny_lmms, ragged_batch):
    """Grids against the processor's own outputs and the model's own placement of features."""
    lmm = tiny_lmms(family)
    enc = lmm.encode(ragged_batch)
    cols, counts = lmm.image_columns(enc["input_ids"])
    layouts = lmm.layouts(enc, counts)
    for b, (layout, count) in enumerate(zip(layouts, counts)):
        parts = {tuple(index.tolist()) for _, index in layout}  # a repeated part counts once
        on_grid = [i for part in parts for i in part]
        assert len(set(on_grid)) == len(on_grid) <= count
        assert torch.equal(
            enc["input_ids"][b, cols[b, :count]], torch.full((count,), lmm.image_token_id)
        )
        grid = layout[-1][0]
        height, width = ragged_batch.images[b].shape[:2]
        if get_family(family).grid in ("anyres", "thw", "native"):  # the grid has its aspect
            assert (grid.height > grid.width) == (height > width)
            assert (grid.height < grid.width) == (height < width)
    GRID_CHECKS[get_family(family).grid](lmm, enc, cols, counts, layouts)


def squashed(text: str) -> str:
    """``text`` lowercased without whitespace: what a tokenizer's decode keeps of it."""
    return "".join(text.lower().split())


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_phrase_tokens_spell_their_phrase(family, tiny_lmms):
    """The tokens ``token_phrase`` gives phrase ``k`` decode to phrase ``k``: phrases at the start
    and the end of a text, of several words, of words of several tokens (``red-circle``)."""
    batch = GroundingBatch.collate(
        [
            make_sample(
                "red-circle left of the blue square and a green star",
                ["red-circle", "blue square", "green star"],
                40,
                60,
            ),
            make_sample("the dark-blue ring", ["the", "dark-blue ring"], 50, 30, seed=1),
        ]
    )
    lmm = tiny_lmms(family)
    enc = lmm.encode(batch)
    for b in range(len(batch)):
        for k, phrase in enumerate(batch.phrases(b)):
            ids = enc["input_ids"][b][enc["token_phrase"][b] == k]
            assert squashed(lmm.processor.tokenizer.decode(ids)) == squashed(phrase), (b, k)
        assert set(enc["token_phrase"][b].tolist()) == {-1, *range(batch.num_phrases[b])}


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_chat_still_answers(family, tiny_lmms, ragged_batch):
    """The frozen model's own greedy generation works through the adapter, as before capture."""
    lmm = tiny_lmms(family)
    image = ragged_batch.images[0]
    answer = lmm.answer(image, "what is in the image?", max_new_tokens=3)
    assert isinstance(answer, str) and answer.strip()
    assert lmm.generate([image.numpy()], "what is in the image?", max_new_tokens=3) == answer


# inputs that hold the prompt's tokens (Gemma 3 marks its image tokens in token_type_ids); every
# other model input is the image's
TEXT_KEYS = {
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "token_type_ids",
    "token_phrase",
    "region",
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(60, 90), (90, 40)])
def test_registry_chat_sees_the_image_tokens_grounding_sees(family, shape, tiny_lmms):
    """``chat_inputs`` and grounding's ``encode`` give the model the same image: the same image
    tokens (count and ids) and the same pixel tensors, the family's processor arguments included."""
    lmm = tiny_lmms(family)
    batch = GroundingBatch.collate([make_sample("a red circle", ["red circle"], *shape)])
    ground = lmm.encode(batch)
    chat = lmm.chat_inputs([batch.images[0].numpy()], "where is the red circle?")
    image_ids = [lmm.image_token_id, *getattr(lmm.processor, "image_token_ids", [])]

    def image_tokens(ids: torch.Tensor) -> torch.Tensor:
        return ids[torch.isin(ids, torch.tensor(image_ids))]

    assert torch.equal(image_tokens(chat["input_ids"][0]), image_tokens(ground["input_ids"][0]))
    keys = set(ground) - TEXT_KEYS
    assert "pixel_values" in keys and keys == set(chat) - TEXT_KEYS
    for key in keys:
        assert torch.equal(chat[key], ground[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_chat_and_grounding_see_the_same_image_tokens(family, tiny_lmms):
    """Generation (``chat_inputs``) and grounding (``encode``) process an image with the same
    settings (the family's ``processor_kwargs``), so an answer is grounded on the image tokens it
    was generated from; an image wider than InternVL's tile would otherwise be tiled for one only."""
    lmm = tiny_lmms(family)
    sample = make_sample("red circle", ["red"], 70, 230)
    chat = lmm.chat_inputs([sample.image], "what is in the image?")
    enc = lmm.encode(GroundingBatch.collate([sample]))
    assert int((chat["input_ids"] == lmm.image_token_id).sum()) == int(
        (enc["input_ids"] == lmm.image_token_id).sum()
    )
    assert torch.equal(chat["pixel_values"], enc["pixel_values"])


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_runs_in_bfloat16(family, tiny_dirs, tiny_lmms, ragged_batch):
    """The real configs load every family in bfloat16: every float input (DeepSeek-VL 7B's
    ``high_res_pixel_values`` too) reaches the model in its dtype; the maps stay float32, near
    the float32 model's."""
    lmm = FrozenLMM.from_pretrained(tiny_dirs(family), family=family, dtype="bfloat16")
    maps = lmm(ragged_batch).maps
    reference = tiny_lmms(family)(ragged_batch).maps
    assert maps.dtype == torch.float32 and maps.isfinite().all()
    assert torch.cosine_similarity(maps.flatten(), reference.flatten(), dim=0) > 0.99
    assert lmm.answer(ragged_batch.images[0], "what is in the image?", max_new_tokens=2).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_extreme_aspect_ratios(family, tiny_lmms):
    """Slivers and a 1-pixel image: grids still agree with the processor and the model."""
    batch = GroundingBatch.collate(
        [make_sample("red circle", ["red"], h, w, seed=i) for i, (h, w) in enumerate(SLIVERS)]
    )
    lmm = tiny_lmms(family)
    enc = lmm.encode(batch)
    cols, counts = lmm.image_columns(enc["input_ids"])
    layouts = lmm.layouts(enc, counts)
    GRID_CHECKS[get_family(family).grid](lmm, enc, cols, counts, layouts)
    maps = lmm(batch).maps
    assert maps.shape == (len(SLIVERS), 1, lmm.channels, *lmm.grid) and maps.isfinite().all()
    assert (maps.flatten(2).sum(-1) > 0).all()


SLIVERS = [(8, 100), (100, 8), (500, 20), (1, 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_capture_matches_eager(family, tiny_lmms, ragged_batch):
    lmm = tiny_lmms(family)
    inputs = lmm.encode(ragged_batch)
    token_phrase, region = inputs.pop("token_phrase"), inputs.pop("region")
    cols, counts = lmm.image_columns(inputs["input_ids"])
    raw = eager_maps(lmm, inputs, token_phrase, cols, 3)
    expected = lmm.to_grid(raw, lmm.layouts(inputs, counts), region)
    maps = lmm(ragged_batch).maps
    assert maps.shape == expected.shape
    assert (maps - expected).abs().max() <= 1e-5


def test_registry_capture_follows_sliding_window_layers(tiny_lmms):
    """Aya Vision's tiny Cohere2 decoder has a sliding-window layer (a 32-token window, shorter
    than the prompt) and a full-attention one: in the capture, the sliding layer gives exactly
    zero to the image tokens a window or more before every phrase token, the full layer does not
    (with capture equal to eager above, the capture follows each layer's own mask)."""
    lmm = tiny_lmms("aya_vision")
    inputs = lmm.encode(
        GroundingBatch.collate([make_sample("a red circle", ["red circle"], 60, 90)])
    )
    token_phrase = inputs.pop("token_phrase")
    inputs.pop("region")
    cols, _ = lmm.image_columns(inputs["input_ids"])
    rows, row_phrase = phrase_rows(token_phrase)
    with torch.no_grad(), capture(rows, row_phrase, cols, 1) as state:
        lmm.model(**inputs, logits_to_keep=1)
    maps = state.stacked()[0, 0]  # L x H x P
    far = cols[0] <= rows[0].min() - lmm.text_config.sliding_window
    kinds = lmm.text_config.layer_types
    sliding, full = kinds.index("sliding_attention"), kinds.index("full_attention")
    assert far.any() and not far.all()
    assert (maps[sliding][:, far] == 0).all() and (maps[sliding][:, ~far] > 0).any()
    assert (maps[full][:, far] > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_hidden_states_are_hf_hidden_states(family, tiny_lmms, ragged_batch):
    """The text prompts read HF's ``hidden_states[-S:]`` (the last one after the final norm)."""
    lmm = tiny_lmms(family)
    out = lmm(ragged_batch)
    inputs = lmm.encode(ragged_batch)
    token_phrase = inputs.pop("token_phrase")
    inputs.pop("region")
    with torch.no_grad():
        states = lmm.model(**inputs, output_hidden_states=True).hidden_states
    rows, _ = phrase_rows(token_phrase)
    expected = torch.stack(states[-lmm.num_text_layers :], 1)
    expected = expected.gather(
        2, rows[:, None, :, None].expand(-1, expected.shape[1], -1, expected.shape[-1])
    )
    keep = (out.token_phrase >= 0)[:, None, :, None]
    assert (out.hidden - expected.float() * keep).abs().max() < 1e-5


def _own_padding_pixels(lmm, image: np.ndarray) -> torch.Tensor:
    """``pixel_values`` of ``image`` padded by the family's own processor code: LLaVA's
    ``LlavaImageProcessor(do_pad=True)`` with the checkpoint's settings, DeepSeek-VL's own pad."""
    processor = lmm.processor.image_processor
    if lmm.family.name == "llava":
        settings = {
            k: getattr(processor, k) for k in ("size", "crop_size", "image_mean", "image_std")
        }
        processor = transformers.LlavaImageProcessor(do_pad=True, **settings)
    pixels = processor(images=[image], return_tensors="pt", input_data_format="channels_last")
    return pixels["pixel_values"][0]


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).pad_to_square])
@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
def test_registry_padding_matches_the_processors_own(family, shape, tiny_lmms):
    """A wide and a tall image padded here (centred, the processor's fill) give the pixels the
    family's own padding gives; padding at the top-left would not."""
    lmm = tiny_lmms(family)
    image = np.zeros((*shape, 3), dtype=np.uint8)
    image[shape[0] // 4 : shape[0] // 2, shape[1] // 4 : shape[1] // 2] = 255
    own = _own_padding_pixels(lmm, image)
    processor = lmm.processor.image_processor
    fill = pad_colour(lmm.processor)

    def pixels(padded):
        out = processor(images=[padded], return_tensors="pt", input_data_format="channels_last")
        return out["pixel_values"][0]

    ours = pixels(processor_images(lmm.processor, lmm.family, [torch.as_tensor(image)])[0][0])
    side = max(shape)
    top_left = np.empty((side, side, 3), dtype=np.uint8)
    top_left[...] = fill
    top_left[: shape[0], : shape[1]] = image
    wrong = (pixels(top_left) - own).abs().mean()
    assert (ours - own).abs().mean() < 0.1 * wrong


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
def test_registry_object_lands_on_its_cells(family, shape, tiny_lmms):
    """An object's pixels in what the model sees and its mask's cells on the frame coincide, for
    a wide and a tall image: the mask targets follow the same centred placement as the image."""
    lmm = tiny_lmms(family)
    image = np.zeros((*shape, 3), dtype=np.uint8)
    mask = np.zeros(shape, dtype=bool)
    mask[shape[0] // 8 : shape[0] // 2, shape[1] // 8 : shape[1] // 2] = True
    image[mask] = 255
    size = 16
    target, weight = frame.targets(torch.as_tensor(mask)[None], size)
    region = frame.region(*shape)
    if lmm.family.pad_to_square:
        padded = processor_images(lmm.processor, lmm.family, [torch.as_tensor(image)])[0][0]
        seen = torch.as_tensor(padded).float().mean(-1)
        seen = torch.nn.functional.interpolate(seen[None, None], (size, size), mode="area")[0]
    else:  # the model sees the image itself; the frame holds it at its region
        seen = frame.place(torch.as_tensor(image).float().mean(-1)[None, None], region, size)[0]
    bright = seen[0] > 127
    assert (bright == target[0].bool()).float().mean() > 0.95
    assert torch.equal(
        frame.crop(weight, region).bool(), torch.ones_like(frame.crop(weight, region)).bool()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_training_step_and_checkpoint_metadata(family, tiny_lmms, ragged_batch, tmp_path):
    """One optimiser step of the full F-LMM; the checkpoint records channels and grid, reloads."""
    lmm = tiny_lmms(family)
    torch.manual_seed(0)
    model = FLMM.build(lmm, build_sam("tiny"), base_channels=8, lr=1e-3)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = model.model.mask_head.encoder[0][0].convs[0].conv.weight.detach().clone()
    loss = model.model.losses(ragged_batch, model(ragged_batch))["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(
        first, model.model.mask_head.encoder[0][0].convs[0].conv.weight
    )
    assert first.shape[1] == lmm.channels
    assert not any(p.grad is not None for p in lmm.parameters())
    ckpt: dict = {"hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    assert ckpt["flmm"]["channels"] == lmm.channels and ckpt["flmm"]["grid"] == list(lmm.grid)
    assert ckpt["flmm"]["family"] == family
    torch.save(ckpt, tmp_path / "last.ckpt")
    again = load(tmp_path / "last.ckpt", lmm=lmm, sam=build_sam("tiny"))
    assert torch.equal(
        again.mask_head.encoder[0][0].convs[0].conv.weight,
        model.model.mask_head.encoder[0][0].convs[0].conv.weight,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_configs_name_real_checkpoints(family):
    """Real configs load the family's own hub checkpoints."""
    real = {}
    for path in lmm_options():
        cfg = lmm_option(path)
        if "_target_" not in cfg:  # a delta over another lmm config
            continue
        assert cfg.get("trust_remote_code") is False, f"{path.name} must not trust remote code"
        if cfg.get("family") == family and isinstance(cfg["name_or_path"], str):
            real[path.stem] = cfg["name_or_path"]
    assert real and set(real.values()) <= set(get_family(family).checkpoints)


def test_registry_grid_size_override(tiny_dirs, ragged_batch):
    lmm = FrozenLMM.from_pretrained(tiny_dirs("qwen2_5_vl"), family="qwen2_5_vl", grid_size=6)
    assert lmm.grid == (6, 6) and lmm(ragged_batch).maps.shape[-2:] == (6, 6)
    with pytest.raises(ConfigError, match="model.lmm.grid_size"):
        FrozenLMM.from_pretrained(tiny_dirs("qwen2_5_vl"), family="qwen2_5_vl", grid_size=0)


def test_registry_wrong_family_names_the_right_one(tiny_dirs):
    with pytest.raises(ModelLoadError, match="model.lmm.family=qwen2_5_vl"):
        FrozenLMM.from_pretrained(tiny_dirs("qwen2_5_vl"), family="llava")


def test_registry_remote_code_is_not_run_by_default(tmp_path):
    """A checkpoint that exists only as remote code is refused unless trust_remote_code=True."""
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "mini_gemini", "auto_map": {"AutoConfig": "remote.Config"}})
    )
    marker = tmp_path / "ran"
    (tmp_path / "remote.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        FrozenLMM.from_pretrained(tmp_path, family="llava")
    assert not marker.exists()


def test_registry_tiny_config_composes_for_every_family(tmp_path):
    for family in FAMILIES:
        cfg = compose_cfg(tmp_path, [f"model={family}_tiny"])
        assert cfg.model.lmm.family == cfg.model.lmm.name_or_path.family == family
        assert cfg.model.lmm.name_or_path._target_.endswith("ensure_tiny_lmm")
        assert cfg.model.lmm.grid_size == get_family(family).tiny_grid_size


@pytest.fixture(scope="session")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root (synthetic world, foundation cache) shared by the end-to-end runs."""
    return tmp_path_factory.mktemp("registry_runs")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_registry_train_one_epoch(family, world_root):
    """``python -m flmm.train model=<family>_tiny``: fit, checkpoint and test on the world."""
    shared = [f"paths.home_dir={world_root}"]
    overrides = [o for o in TINY if not o.startswith("model.lmm.")]
    root = world_root / family
    metrics = train(compose_cfg(root, [f"model={family}_tiny", *shared, *overrides]))
    assert 0.0 <= metrics["test/giou"] <= 100.0
    ckpt = torch.load(root / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["flmm"]["family"] == family
    assert f"tiny_{family}" in ckpt["flmm"]["lmm_id"]
    text = json.loads((Path(ckpt["flmm"]["lmm_id"]) / "config.json").read_text())["text_config"]
    parts = PARTS[get_family(family).grid]
    layers, heads = text["num_hidden_layers"], text["num_attention_heads"]
    assert ckpt["flmm"]["channels"] == parts * layers * heads

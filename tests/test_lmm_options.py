"""Loading the frozen LMM as HF users do: dtype, device_map, attention, hub revision and cache."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from flmm.chat.conversation import GroundedChat
from flmm.chat.options import add_model_args, load_chat
from flmm.errors import ConfigError, ModelLoadError
from flmm.evaluate import load_model
from flmm.foundation.cache import SHIPPED
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.lmm.loading import placed_dtype, resolve_dtype
from flmm.model.checkpoint import read_checkpoint
from flmm.model.module import FLMM
from flmm.model.pretrained import FLMMHead, head_config

REPO, OTHER = "flmm-test/tiny-llava", "flmm-test/other-llava"
MAIN, V2 = "1" * 40, "2" * 40
PROBE = "model.language_model.layers.0.self_attn.q_proj.weight"
STORED = "language_model.model.layers.0.self_attn.q_proj.weight"  # PROBE as the file names it


def hub_cache(root: Path, lmm_dir: Path) -> Path:
    """A HF hub cache holding ``REPO`` at two commits: ``main`` (the tiny LLaVA) and tag ``v2``
    (the same with one weight matrix doubled), as ``from_pretrained`` would have downloaded it."""
    repo = root / f"models--{REPO.replace('/', '--')}"
    for commit, ref in ((MAIN, "main"), (V2, "v2")):
        shutil.copytree(lmm_dir, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    weights = repo / "snapshots" / V2 / "model.safetensors"
    state = load_file(weights)
    state[STORED] = state[STORED] * 2
    save_file(state, weights, metadata={"format": "pt"})
    return root


def probe(lmm: FrozenLMM) -> torch.Tensor:
    return lmm.model.get_parameter(PROBE).detach()


def test_auto_dtype_is_bfloat16_only_where_the_lmm_runs_on_cuda(monkeypatch):
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:1") == resolve_dtype("auto", {"": 0}) == torch.bfloat16
    assert resolve_dtype("auto", None, "4bit") == torch.bfloat16  # bitsandbytes runs on CUDA
    assert resolve_dtype("float16", "cuda") == torch.float16
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16  # as transformers takes it too
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", "auto") == torch.float32  # accelerate falls back to the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto", "auto") == torch.bfloat16
    # loaded on the CPU, then moved: "auto" follows where it goes
    assert placed_dtype("auto", None, "cuda") == "bfloat16"
    assert placed_dtype("auto", None, "cpu") == "float32"
    assert placed_dtype("auto", "cuda", "cpu") == placed_dtype("auto", None, None) == "auto"
    assert placed_dtype("float32", None, "cuda") == "float32"
    with pytest.raises(ConfigError, match="model.lmm.dtype must be 'auto' or one of"):
        resolve_dtype("half")


def test_hub_options_reach_the_model_the_processor_and_the_config_check(tiny_llava_dir, tmp_path):
    """revision / cache_dir / local_files_only select one snapshot for every file, and the
    commit it came from is recorded."""
    cache = hub_cache(tmp_path, tiny_llava_dir)
    hub = {"cache_dir": str(cache), "local_files_only": True}
    main = FrozenLMM.from_pretrained(REPO, **hub)
    tagged = FrozenLMM.from_pretrained(REPO, revision="v2", **hub)
    pinned = FrozenLMM.from_pretrained(REPO, revision=MAIN, **hub)
    assert (main.revision, tagged.revision, pinned.revision) == (MAIN, V2, MAIN)
    assert torch.equal(probe(tagged), 2 * probe(main)) and torch.equal(probe(pinned), probe(main))
    assert main.model_id == REPO and main.processor.image_token_id == main.image_token_id
    with pytest.raises(ModelLoadError, match="could not load") as info:
        FrozenLMM.from_pretrained(REPO, revision="v3", **hub)
    assert "\n" not in str(info.value)


def test_a_local_folder_records_no_revision(tiny_llava_dir):
    assert FrozenLMM.from_pretrained(tiny_llava_dir).revision is None


def test_attn_implementation_is_the_vision_towers_and_capture_still_runs(
    tiny_llava_dir, ragged_batch
):
    plain = FrozenLMM.from_pretrained(tiny_llava_dir)
    eager = FrozenLMM.from_pretrained(tiny_llava_dir, attn_implementation="eager")
    config = eager.model.config
    assert config.vision_config._attn_implementation == "eager"
    assert config.text_config._attn_implementation == "flmm_capture"
    first, second = plain(ragged_batch), eager(ragged_batch)
    assert torch.allclose(first.maps, second.maps, atol=1e-6)
    assert torch.allclose(first.hidden, second.hidden, atol=1e-5)


def test_unavailable_attention_is_one_line(tiny_llava_dir):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ModelLoadError, match="FlashAttention2.*attn_implementation") as info:
        FrozenLMM.from_pretrained(tiny_llava_dir, attn_implementation="flash_attention_2")
    assert "\n" not in str(info.value)


def test_a_placed_lmm_stays_where_device_map_put_it(tiny_llava_dir):
    """Moves and casts of the module holding it (FLMM.to, Lightning) skip an LMM that a
    device_map placed; an LMM loaded without one follows them."""
    placed = FrozenLMM.from_pretrained(tiny_llava_dir, device_map="cpu")
    loose = FrozenLMM.from_pretrained(tiny_llava_dir)
    assert placed.placed and not loose.placed
    holder = torch.nn.ModuleDict({"placed": placed, "loose": loose}).to(torch.float64)
    assert holder["placed"].model.dtype == torch.float32
    assert holder["loose"].model.dtype == torch.float64


def test_a_cuda_device_map_without_cuda_is_one_line(tiny_llava_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device_map='cuda:0'.*no CUDA GPU is visible"):
        FrozenLMM.from_pretrained(tiny_llava_dir, device_map="cuda:0")


# ---------------------------------------------------- heads and checkpoints of a hub LMM
@pytest.fixture(scope="module")
def hub(tiny_llava_dir, tmp_path_factory) -> dict:
    """Hub options that load ``REPO`` (and ``OTHER``, at ``main`` only) from a local cache,
    offline."""
    cache = hub_cache(tmp_path_factory.mktemp("hub"), tiny_llava_dir)
    other = cache / f"models--{OTHER.replace('/', '--')}"
    shutil.copytree(tiny_llava_dir, other / "snapshots" / MAIN)
    (other / "refs").mkdir()
    (other / "refs" / "main").write_text(MAIN)
    return {"cache_dir": str(cache), "local_files_only": True}


@pytest.fixture(scope="module")
def tagged(hub, tmp_path_factory) -> tuple[Path, Path]:
    """A head folder and a ``.ckpt`` made for ``REPO`` at tag ``v2``, loaded with int8 weights."""
    lmm = FrozenLMM.from_pretrained(REPO, revision="v2", quantization="int8", **hub)
    model = FLMM.build(lmm, build_sam("tiny", SHIPPED["tiny_sam"]), base_channels=8)
    root = tmp_path_factory.mktemp("heads")
    FLMMHead(model, head_config(model)).save_pretrained(root / "head")
    ckpt: dict = {"hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, root / "head.ckpt")
    return root / "head", root / "head.ckpt"


def test_heads_and_checkpoints_record_the_lmm_commit_and_quantization(tagged):
    config = json.loads((tagged[0] / "config.json").read_text())
    assert (config["lmm"]["revision"], config["lmm"]["quantization"]) == (V2, "int8")
    metadata = config["metadata"], read_checkpoint(tagged[1])["flmm"]
    for saved in metadata:
        assert (saved["lmm_revision"], saved["lmm_quantization"]) == (V2, "int8")


def test_loading_a_head_uses_the_recorded_commit_unless_told(tagged, hub, caplog):
    recorded = FLMMHead.from_pretrained(tagged[0], **hub).model.lmm
    # the quantization is the loader's choice: recorded for the reader, not applied
    assert (recorded.revision, recorded.quantization) == (V2, None)
    with caplog.at_level(logging.WARNING, logger="flmm.model.checkpoint"):
        told = FLMMHead.from_pretrained(tagged[0], lmm_revision="main", **hub).model.lmm
    assert told.revision == MAIN and torch.equal(2 * probe(told), probe(recorded))
    # another LMM than the recorded one loads its own default branch
    assert FLMMHead.from_pretrained(tagged[0], lmm=OTHER, **hub).model.lmm.revision == MAIN
    lines = [r.getMessage() for r in caplog.records if "revision" in r.getMessage()]
    assert len(lines) == 1 and V2 in lines[0] and MAIN in lines[0] and "\n" not in lines[0]


def test_the_chat_api_takes_the_lmm_options_apart_from_the_heads(tagged, hub):
    chat = GroundedChat.from_pretrained(
        str(tagged[0]),
        dtype="bfloat16",
        quantization="int8",
        attn_implementation="eager",
        device_map="cpu",
        **hub,
    )
    lmm = chat.lmm
    assert (lmm.revision, lmm.quantization, lmm.placed) == (V2, "int8", True)
    assert lmm.model.dtype == torch.bfloat16
    assert lmm.model.config.vision_config._attn_implementation == "eager"
    from_checkpoint = GroundedChat.from_checkpoint(REPO, str(tagged[1]), **hub).lmm
    assert from_checkpoint.revision == V2 and from_checkpoint.model.dtype == torch.float32
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    assert chat.ground(image, "red circle", ["red circle"]).masks.shape == (1, 32, 32)


def test_the_command_line_options_reach_the_lmm(tagged, monkeypatch):
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    argv = ["--checkpoint", str(tagged[0]), "--lmm-revision", "main", "--quantization", "int8"]
    argv += ["--dtype", "bfloat16", "--device-map", "auto", "--attn-implementation", "eager"]
    received = {}
    monkeypatch.setattr(
        GroundedChat, "from_pretrained", classmethod(lambda cls, *a, **kw: received.update(kw))
    )
    load_chat(parser.parse_args(argv))
    assert received == {
        "selector": None,
        "lmm_revision": "main",
        "quantization": "int8",
        "dtype": "bfloat16",
        "device_map": "auto",
        "attn_implementation": "eager",
        "device": None,
        "trust_remote_code": False,
        "decoding": None,
        "family": None,
        "sam_variant": None,
    }


def test_flmm_evaluate_loads_a_head_folder_as_model_lmm_says(tagged, hub):
    overrides = [f"checkpoint={tagged[0]}", "model.lmm.quantization=int8"]
    overrides += [f"model.lmm.cache_dir={hub['cache_dir']}", "model.lmm.local_files_only=true"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    lmm = load_model(cfg).model.lmm
    assert (lmm.revision, lmm.quantization) == (V2, "int8")

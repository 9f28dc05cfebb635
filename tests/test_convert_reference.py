"""The reference's released checkpoints, converted: key names and shapes as the reference writes
them (a tiny fixture built from the same module trees), strict loading, identical outputs."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, compose_cfg
from omegaconf import OmegaConf

from flmm.errors import CheckpointMismatchError
from flmm.foundation.tiny_models import build_tiny_lmm
from flmm.heads import MaskHead, build_sam
from flmm.lmm import FrozenLMM
from flmm.lmm.grids import TokenGrid, to_frame
from flmm.model.checkpoint import SHAPE_KEYS
from flmm.model.convert_reference import main
from flmm.model.loader import load
from flmm.model.reference import RELEASED, Released, Target, convert, expected_state

LMM_PREFIX = {"llava": "llava", "llava_next": "llava", "deepseek_vl": "deepseek_vl"}
LMM_PREFIX["deepseek_vl_hybrid"] = "deepseek_vl"
BASE = 4  # tiny mask head width


@pytest.fixture(scope="module")
def tiny_lmm(tmp_path_factory):
    """``family -> FrozenLMM``, a random tiny model of each family, built once per module."""
    loaded: dict[str, FrozenLMM] = {}

    def get(family: str) -> FrozenLMM:
        if family not in loaded:
            folder = build_tiny_lmm(tmp_path_factory.mktemp(f"tiny_{family}"), family)
            loaded[family] = FrozenLMM.from_pretrained(folder, family=family)
        return loaded[family]

    return get


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` with every parameter drawn at random (norm weights and biases included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def reference_state(target: Target) -> dict[str, torch.Tensor]:
    """A state dict with the reference's key names and shapes for ``target`` at tiny size: mask
    head (channels in the reference's grid, layer, head order), SAM wrapper (image encoder
    included), text projection and layer weights, and some frozen LMM tensors."""
    head = randomised(MaskHead(target.channels, BASE), 0)
    sam = randomised(build_sam(target.sam_variant), 1)
    proj = randomised(torch.nn.Linear(target.hidden_size, sam.prompt_encoder.embed_dim), 2)
    prefix = LMM_PREFIX[target.family]
    return {
        **{f"mask_head.{k}": v for k, v in head.state_dict().items()},
        **{f"sam.model.{k}": v for k, v in sam.state_dict().items()},
        **{f"text_proj.{k}": v for k, v in proj.state_dict().items()},
        "text_layer_weights": torch.randn(target.num_layers),
        f"{prefix}.language_model.model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
        f"{prefix}.language_model.model.norm.weight": torch.randn(4),
    }


def tiny_target(lmm: FrozenLMM) -> Target:
    return Target.of(lmm, "tiny")


def saved(tmp_path: Path, obj, name: str = "reference.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def attention(target: Target, k: int = 3, side: int = 5) -> torch.Tensor:
    """``k x L x G x H x side x side`` positive attention maps."""
    gen = torch.Generator().manual_seed(3)
    shape = (k, target.num_layers, target.parts, target.num_heads, side, side)
    return torch.rand(shape, generator=gen)


@pytest.mark.parametrize("row", list(RELEASED))
def test_released_row_converts_to_a_strictly_loading_checkpoint(row, tiny_lmm, tmp_path):
    """Every released row's family: convert, load through ``flmm.model.load``, same outputs."""
    lmm = tiny_lmm(RELEASED[row].target.family)
    target = tiny_target(lmm)
    ref = reference_state(target)
    wrapped = {"meta": {"epoch": 8, "iter": 1000}, "state_dict": ref}  # mmengine's layout
    out = saved(tmp_path, convert(saved(tmp_path, wrapped), target), "converted.ckpt")
    sam = build_sam("tiny")
    model = load(str(out), lmm=lmm, sam=sam)

    maps = attention(target)
    ours = maps.flatten(1, 3)  # layer, grid, head: flmm.lmm.grids.to_frame
    theirs = maps.transpose(1, 2).flatten(1, 3)  # grid, layer, head: the reference's torch.cat
    source = MaskHead(target.channels, BASE)
    source.load_state_dict({k[10:]: v for k, v in ref.items() if k.startswith("mask_head.")})
    with torch.no_grad():
        torch.testing.assert_close(model.mask_head(ours), source.eval()(theirs))
    assert torch.equal(model.text_prompt.layer_weights, ref["text_layer_weights"])
    assert torch.equal(model.text_prompt.proj.weight, ref["text_proj.weight"])
    for name, value in sam.mask_decoder.state_dict().items():
        assert torch.equal(value, ref[f"sam.model.mask_decoder.{name}"])
    assert torch.equal(
        sam.prompt_encoder.point_embeddings[0].weight,
        ref["sam.model.prompt_encoder.point_embeddings.0.weight"],
    )


def test_converted_metadata(tiny_lmm, tmp_path):
    lmm = tiny_lmm("llava_next")
    target = tiny_target(lmm)
    ckpt = convert(saved(tmp_path, reference_state(target)), target)
    meta = ckpt["flmm"]
    assert meta["num_text_layers"] == lmm.num_layers == lmm.num_text_layers  # all layers mixed
    assert {k: meta[k] for k in SHAPE_KEYS} == {
        "family": "llava_next",
        "channels": lmm.channels,
        "grid": list(lmm.grid),
        "hidden_size": lmm.hidden_size,
        "num_text_layers": lmm.num_layers,
        "sam_prompt_dim": build_sam("tiny").prompt_encoder.embed_dim,
    }
    assert meta["mask_head"] == {"base_channels": BASE, "target_size": 64}
    assert meta["sam_variant"] == "tiny" and meta["converted_from"] == "reference.pth"
    assert "pytorch-lightning_version" in ckpt


def test_flmm_channel_order_is_layer_grid_head():
    """What the conversion assumes of ``to_frame``: channel ``(l, g, h)`` at ``(l*G + g)*H + h``."""
    layers, heads = 2, 3
    grid = TokenGrid(2, 2)
    token_grid = torch.arange(8) // 4  # tokens 0-3 on grid 0, 4-7 on grid 1
    maps = 100.0 * torch.arange(layers)[:, None, None] + torch.arange(heads)[None, :, None]
    maps = (maps + 10.0 * token_grid)[None]  # 1 x L x H x 8
    frame = to_frame(maps, [(grid, torch.arange(4)), (grid, torch.arange(4, 8))], 2)
    expected = [
        100 * ly + 10 * g + h for ly in range(layers) for g in range(2) for h in range(heads)
    ]
    assert frame[0, :, 0, 0].tolist() == expected


@pytest.mark.parametrize("row", list(RELEASED))
def test_released_table_matches_configs_and_shapes(row, tmp_path):
    """Each row names its conf/model/lmm entry, its experiment and the options that evaluate it
    (all composing to its LMM), and its file in docs/convert_reference.md; its shapes fit F-LMM +
    SAM ViT-L."""
    released = RELEASED[row]
    lmm_cfg = OmegaConf.load(CONF / "model" / "lmm" / f"{row}.yaml")
    assert (lmm_cfg.name_or_path, lmm_cfg.family) == (
        released.target.lmm_id,
        released.target.family,
    )
    for overrides in ([f"experiment={released.experiment}"], released.evaluate_args.split()):
        assert compose_cfg(tmp_path, overrides).model.lmm.name_or_path == released.target.lmm_id
    table = (CONF.parents[2] / "docs" / "convert_reference.md").read_text()
    assert f"| `{row}` | `{released.file_name}` | `{released.experiment}` |" in table
    state = expected_state(released.target, 64, 64)
    assert state["mask_head.encoder.0.0.convs.0.conv.weight"].shape[1] == released.target.channels
    assert state["text_prompt.layer_weights"].shape == (released.target.num_layers,)
    assert state["text_prompt.proj.weight"].shape == (256, released.target.hidden_size)


@pytest.fixture
def tiny_row(tiny_lmm, monkeypatch):
    """A released row for the tiny LLaVA, so the command line runs at tiny size."""
    target = tiny_target(tiny_lmm("llava"))
    monkeypatch.setitem(RELEASED, "tiny", Released(target, "configs/tiny.py", "none", "model=tiny"))
    return target


def test_command_line_writes_the_checkpoint(tiny_row, tmp_path, capsys):
    ref = saved(tmp_path, reference_state(tiny_row))
    main([str(ref), "--model", "tiny"])
    out = ref.with_suffix(".ckpt")
    assert f"wrote {out}" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["flmm"]["lmm_id"] == tiny_row.lmm_id


def run_failing(argv: list[str], capsys) -> str:
    """The one-line error ``main(argv)`` reports, after checking exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    message = err[err.index("flmm: error: ") :]
    assert message.count("\n") == 1
    return message


def test_unknown_key_is_named(tiny_row, tmp_path, capsys):
    ref = saved(tmp_path, {**reference_state(tiny_row), "key_phrase_head.fc.weight": torch.ones(1)})
    assert "key_phrase_head.fc.weight" in run_failing([str(ref), "--model", "tiny"], capsys)


def test_shape_mismatch_names_the_reference_key(tiny_row, tmp_path, capsys):
    state = reference_state(tiny_row)
    state["text_layer_weights"] = torch.zeros(tiny_row.num_layers + 1)
    err = run_failing([str(saved(tmp_path, state)), "--model", "tiny"], capsys)
    assert "text_layer_weights" in err and "Pick the --model" in err


def test_missing_or_unsafe_files_are_one_line_errors(tiny_row, tmp_path, capsys):
    assert "not found" in run_failing([str(tmp_path / "nope.pth"), "--model", "tiny"], capsys)
    unsafe = {"state_dict": reference_state(tiny_row), "cfg": argparse.Namespace(lr=1)}
    err = run_failing([str(saved(tmp_path, unsafe)), "--model", "tiny"], capsys)
    assert "argparse.Namespace" in err and "never unpickles" in err
    assert "weights_only" not in err  # never the advice that would run the file's code
    assert "no state dict" in run_failing(
        [str(saved(tmp_path, {"a": 1})), "--model", "tiny"], capsys
    )


def test_wrong_row_is_a_mismatch(tiny_lmm, tmp_path):
    """A LLaVA-NeXT head converted for a LLaVA-1.5 LMM: shapes differ, nothing is written."""
    target = tiny_target(tiny_lmm("llava_next"))
    ref = saved(tmp_path, reference_state(target))
    other = dataclasses.replace(target, family="llava")
    with pytest.raises(CheckpointMismatchError, match="mask_head.encoder.0.0.convs.0.conv.weight"):
        convert(ref, other)


class MissingOps(types.ModuleType):
    """Stands in for ``mmcv.ops`` where mmcv-lite has no compiled ops: ``mmseg.models`` imports
    names from it that the UNet never uses."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


@pytest.fixture
def mmseg_unet(monkeypatch):
    """mmseg's ``UNet`` and ``InterpConv`` (skipped where mmsegmentation is not installed)."""
    pytest.importorskip("mmseg")
    try:
        import mmcv.ops  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "mmcv.ops", MissingOps("mmcv.ops"))
    from mmseg.models.backbones.unet import InterpConv, UNet

    return UNet, InterpConv


def unet_head_forward(unet, conv_seg, x: torch.Tensor, upsample_input: int = 64) -> torch.Tensor:
    """The reference's ``UNetHead.forward``: normalise each channel, up-sample, zero-pad to a
    multiple of 8 at the bottom/right, UNet, crop, ``conv_seg``."""
    x = x / x.sum((-2, -1), keepdim=True).clamp(min=1e-12)
    scale = max(1.0, upsample_input / max(x.shape[-2:]))
    x = F.interpolate(x, scale_factor=scale, mode="bilinear")
    h, w = x.shape[-2:]
    padded = x.new_zeros(*x.shape[:2], math.ceil(h / 8) * 8, math.ceil(w / 8) * 8)
    padded[..., :h, :w] = x
    return conv_seg(unet(padded)[-1][..., :h, :w])[:, 0]


def test_mask_head_is_the_references_mmseg_unet(mmseg_unet):
    """mmseg's UNet as the reference configures it + ``conv_seg``: same keys and shapes as
    ``MaskHead``, and the same logits once its weights are loaded strictly."""
    unet_class, interp_conv = mmseg_unet
    channels, base = 12, BASE
    unet = unet_class(
        in_channels=channels,
        base_channels=base,
        num_stages=4,
        strides=(1, 1, 1, 1),
        enc_num_convs=(2, 2, 2, 2),
        dec_num_convs=(2, 2, 2),
        downsamples=(True, True, True),
        enc_dilations=(1, 1, 1, 1),
        dec_dilations=(1, 1, 1),
        norm_cfg={"type": torch.nn.GroupNorm, "num_groups": 1},
        upsample_cfg={"type": interp_conv},
    )
    conv_seg = randomised(torch.nn.Conv2d(base, 1, 1), 1)
    reference = {**randomised(unet, 0).state_dict()}
    reference.update({f"conv_seg.{k}": v for k, v in conv_seg.state_dict().items()})
    head = MaskHead(channels, base)
    assert {k: v.shape for k, v in head.state_dict().items()} == {
        k: v.shape for k, v in reference.items()
    }
    head.load_state_dict(reference)
    maps = torch.rand(2, channels, 12, 9, generator=torch.Generator().manual_seed(4))
    unet.eval()  # mmseg's UNet.train returns None, so no chaining
    with torch.no_grad():
        expected = unet_head_forward(unet, conv_seg, maps)
        torch.testing.assert_close(head.eval()(maps), expected)

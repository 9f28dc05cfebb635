"""What a downloaded head folder or checkpoint can do: run no code, and fail in one line when
damaged.

Nothing read from a downloaded file decides to run code: every load path (a ``.ckpt``, a head
folder, a hub id) runs an LMM's shipped code only when the user says so.

The LMM here is the tiny LLaVA whose config.json also names a remote config module
(``auto_map``); importing that module writes a marker file. Each test checks that the marker is
never written without the user's flag, and one positive control shows it is written with it (so
the marker would catch a load path that obeyed the file).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from huggingface_hub import hub_mixin
from test_hostile_inputs import one_line_error

from flmm.chat.conversation import GroundedChat
from flmm.chat.options import load_chat
from flmm.errors import FlmmUserError
from flmm.files import umask
from flmm.foundation.cache import SHIPPED
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.model import loader
from flmm.model.checkpoint import read_checkpoint
from flmm.model.module import FLMM
from flmm.model.pretrained import FLMMHead, head_config

REFUSAL = r"needs code shipped with its checkpoint.*trust_remote_code=True"


@pytest.fixture(scope="module")
def marker_lmm(tiny_llava_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny LLaVA whose config asks for ``remote.MarkerConfig``, and the marker
    file importing ``remote.py`` writes."""
    folder = shutil.copytree(tiny_llava_dir, tmp_path_factory.mktemp("remote") / "lmm")
    marker = folder.parent / "code_ran"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "remote.MarkerConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlavaConfig\n\n\n"
        "class MarkerConfig(LlavaConfig):\n    pass\n"
    )
    return folder, marker


@pytest.fixture(scope="module")
def trained(marker_lmm, tmp_path_factory) -> tuple[Path, Path]:
    """A head folder and a ``.ckpt`` made for the marker LMM, both recording that its code was
    trusted when they were written (as a shared head of a remote-code LMM would)."""
    lmm = FrozenLMM.from_pretrained(marker_lmm[0], family="llava")
    model = FLMM.build(lmm, build_sam("tiny", SHIPPED["tiny_sam"]), base_channels=8)
    root = tmp_path_factory.mktemp("heads")
    config = head_config(model)
    config["lmm"] |= {"remote_code": True, "trust_remote_code": True}
    FLMMHead(model, config).save_pretrained(root / "head")
    ckpt: dict = {"hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    ckpt["flmm"]["trust_remote_code"] = True
    torch.save(ckpt, root / "head.ckpt")
    return root / "head", root / "head.ckpt"


def cli_args(checkpoint: Path, trust: bool = False) -> argparse.Namespace:
    return argparse.Namespace(
        checkpoint=str(checkpoint),
        lmm=None,
        sam=None,
        sam_variant=None,
        selector=None,
        family=None,
        device="cpu",
        dtype="float32",
        trust_remote_code=trust,
    )


def test_a_head_folder_never_turns_on_remote_code(trained, marker_lmm):
    folder, _ = trained
    with pytest.raises(FlmmUserError, match=REFUSAL):
        GroundedChat.from_pretrained(str(folder))
    with pytest.raises(FlmmUserError, match=REFUSAL):
        load_chat(cli_args(folder))
    assert not marker_lmm[1].exists()


def test_a_hub_head_never_turns_on_remote_code(trained, marker_lmm, monkeypatch):
    """A hub id goes through huggingface_hub's download calls, served here from the folder."""
    folder = trained[0]
    monkeypatch.setattr(
        hub_mixin, "hf_hub_download", lambda repo_id, filename, **kw: folder / filename
    )
    monkeypatch.setattr(loader, "snapshot_download", lambda repo_id, **kw: str(folder))
    with pytest.raises(FlmmUserError, match=REFUSAL):
        FLMMHead.from_pretrained("someone/shared-head")
    assert not marker_lmm[1].exists()


def test_a_folder_of_the_old_format_loads_without_running_code(trained, marker_lmm, tmp_path):
    """Folders written before ``remote_code`` recorded ``trust_remote_code``, which was obeyed."""
    folder = shutil.copytree(trained[0], tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["lmm"]["remote_code"]
    (folder / "config.json").write_text(json.dumps(config))
    chat = GroundedChat.from_pretrained(str(folder))
    assert chat.lmm.trust_remote_code is False
    assert not marker_lmm[1].exists()


def test_a_checkpoint_never_turns_on_remote_code(trained, marker_lmm):
    chat = load_chat(cli_args(trained[1]))
    assert chat.lmm.trust_remote_code is False
    assert not marker_lmm[1].exists()


def test_the_users_flag_alone_runs_the_code(trained, marker_lmm):
    """The positive control: with the user's flag the code runs, so the marker is a real check."""
    chat = load_chat(cli_args(trained[0], trust=True))
    assert chat.lmm.trust_remote_code is True
    assert marker_lmm[1].exists()
    marker_lmm[1].unlink()


DAMAGED_FOLDERS = {
    "invalid_json": ("config.json", lambda b: b[:-20], r"config.json is not valid JSON \(.*line"),
    "list": (
        "config.json",
        lambda b: b"[1, 2]",
        r"config.json holds a JSON list, not a head config",
    ),
    "no_lmm": ("config.json", lambda b: drop_lmm(b), r"config.json lacks \['lmm'\]"),
    "truncated_weights": (
        "model.safetensors",
        lambda b: b[: len(b) // 2],
        r"model.safetensors is truncated or not a safetensors file",
    ),
}


def drop_lmm(raw: bytes) -> bytes:
    config = json.loads(raw)
    del config["lmm"]
    return json.dumps(config).encode()


@pytest.mark.parametrize("kind", sorted(DAMAGED_FOLDERS))
def test_a_damaged_head_folder_is_one_line(trained, tmp_path, capsys, kind):
    name, damage, message = DAMAGED_FOLDERS[kind]
    folder = shutil.copytree(trained[0], tmp_path / "head")
    (folder / name).write_bytes(damage((folder / name).read_bytes()))
    err = one_line_error(capsys, load_chat, cli_args(folder, trust=True))
    assert str(folder) in err and re.search(message, err), err
    assert "damaged: copy it again" in err


@pytest.mark.parametrize("content", [b"not a checkpoint", b"", b"\x80\x02]q\x00."])
def test_a_sam_checkpoint_that_is_no_checkpoint_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "sam_vit_b.pth"
    path.write_bytes(content)
    err = one_line_error(capsys, build_sam, "tiny", path)
    assert str(path) in err and ("cannot be read" in err or "not a state dict" in err), err


def test_a_checkpoint_holding_objects_is_refused_without_torchs_advice(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": argparse.Namespace(run="code")}, path)
    err = one_line_error(capsys, read_checkpoint, path)
    assert "argparse.Namespace" in err and "never unpickles" in err
    assert "weights_only" not in err and "trust" not in err, err


def test_a_head_folder_is_readable_to_colleagues(trained):
    """Head folders are shared: every file gets a plain open()'s mode, not safetensors' 0600."""
    expected = 0o666 & ~umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in trained[0].iterdir()}
    assert modes == dict.fromkeys(["README.md", "config.json", "model.safetensors"], expected)

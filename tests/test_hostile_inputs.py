"""Hostile but fair inputs: no code runs from data files, each mistake is one line (exit code 2)
or a counted skip, nothing finished is lost. One case per probe of issue 18."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, TINY, paths_at
from refer_fixtures import _refs, write_refer_fixture

from flmm.data import ReferDataset, load_refer
from flmm.errors import exit_on_user_error


def one_line_error(capsys, fn, *args, **kwargs) -> str:
    """Run ``fn`` as an entry point does; assert it ends with exit code 2, no traceback and one
    ``flmm: error:`` line (progress bars may share stderr); return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(fn, *args, **kwargs)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flmm: error: ")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------- refer files
@pytest.fixture
def refer(tmp_path) -> Path:
    write_refer_fixture(tmp_path)
    return tmp_path


def write_refs(root: Path, refs) -> None:
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)


def edit_instances(root: Path, edit) -> None:
    path = root / "refcoco" / "instances.json"
    instances = json.loads(path.read_text())
    edit(instances)
    path.write_text(json.dumps(instances))


def train_set(root: Path) -> ReferDataset:
    return ReferDataset(root, root / "images", "refcoco", "unc", "train", "reference")


class Payload:
    """Pickles as "call ``fn(*args)``": what a crafted refs file runs under ``pickle.load``."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload", ["os.system", "builtins.open"])
def test_refs_pickle_payload_does_not_run(refer, tmp_path, capsys, payload):
    marker = tmp_path / "pwned"
    call = (
        Payload(os.system, f"touch {marker}")
        if payload == "os.system"
        else Payload(open, str(marker), "w")
    )
    write_refs(refer, [*_refs(), {"ref_id": 99, "evil": call}])
    err = one_line_error(capsys, load_refer, refer)
    assert not marker.exists()
    assert (
        "refs(unc).p" in err and ("system" in err or "open" in err) and "nothing in it ran" in err
    )


def test_refs_file_that_is_not_a_pickle(refer, capsys):
    (refer / "refcoco" / "refs(unc).p").write_text("ref_id,ann_id\n1,11\n")
    err = one_line_error(capsys, load_refer, refer)
    assert "refs(unc).p is not a readable refs pickle" in err


def test_truncated_refs_file(refer, capsys):
    path = refer / "refcoco" / "refs(unc).p"
    path.write_bytes(path.read_bytes()[:100])
    assert "truncated" in one_line_error(capsys, load_refer, refer)


def test_ref_without_split(refer, capsys):
    refs = _refs()
    del refs[3]["split"]
    write_refs(refer, refs)
    err = one_line_error(capsys, load_refer, refer)
    assert "ref #3 (ref_id 4) has no 'split'" in err


def test_sentence_that_is_not_text(refer, capsys):
    refs = _refs()
    refs[0]["sentences"][0]["sent"] = ["the", "left", "box"]
    write_refs(refer, refs)
    err = one_line_error(capsys, load_refer, refer)
    assert "ref #0 (ref_id 1): a sentence's 'sent' is not a string" in err


def test_refs_file_holding_a_dict(refer, capsys):
    write_refs(refer, {"refs": _refs()})
    assert "holds a dict, not the list of refs" in one_line_error(capsys, load_refer, refer)


def test_invalid_instances_json(refer, capsys):
    (refer / "refcoco" / "instances.json").write_text('{"images": [')
    assert "instances.json is not valid JSON" in one_line_error(capsys, load_refer, refer)


def test_instances_json_without_annotations(refer, capsys):
    edit_instances(refer, lambda d: d.pop("annotations"))
    assert "has no list 'annotations'" in one_line_error(capsys, load_refer, refer)


def test_empty_dict_segmentation(refer, capsys):
    edit_instances(refer, lambda d: d["annotations"][0].update(segmentation={}))
    err = one_line_error(capsys, train_set, refer)
    assert "annotation 11" in err and "unsupported COCO segmentation" in err


def test_polygon_with_odd_coordinate_count(refer, capsys):
    edit_instances(refer, lambda d: d["annotations"][0]["segmentation"][0].append(7.0))
    err = one_line_error(capsys, train_set, refer)
    assert "annotation 11" in err and "odd number of coordinates (9)" in err


# annotation id, damage to its segmentation, what the line says (image 2: 30 x 30, image 1: 40 x 50)
BROKEN_RLES = {
    "size_of_another_image": (
        21,
        lambda seg: seg.update(size=[20, 30]),
        "RLE size [20, 30] is not its image's [height, width] [30, 30]",
    ),
    "garbage_counts": (
        21,
        lambda seg: seg.update(counts="abc!!!"),
        "RLE counts hold '!', not part of a compressed RLE",
    ),
    "counts_that_end_mid_run": (21, lambda seg: seg.update(counts="0i"), "in the middle of a run"),
    "counts_not_adding_up": (
        13,
        lambda seg: seg["counts"].append(5),
        "RLE counts cover 2005 pixels, not height x width = 2000",
    ),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_RLES))
def test_broken_rle_names_the_file_and_annotation(refer, capsys, kind):
    ann_id, damage, message = BROKEN_RLES[kind]

    def edit(instances):
        damage(next(a for a in instances["annotations"] if a["id"] == ann_id)["segmentation"])

    edit_instances(refer, edit)
    err = one_line_error(capsys, train_set, refer)
    assert f"{refer / 'refcoco' / 'instances.json'}: annotation {ann_id} " in err
    assert message in err and "fix or remove that annotation" in err


def damaged(data: bytes, seed: int) -> bytes:
    """``data`` with 1 to 3 of its bytes overwritten, at places and with values drawn from ``seed``."""
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


# (pickle protocol, seed of the damage): what the unpickler raised on them before it was caught
# (protocol 2 is the refer toolkit's, written by Python 2)
DAMAGED_REFS = [
    (2, 1),  # UnpicklingError: pickle data was truncated
    (2, 40),  # AttributeError: 'dict' object has no attribute 'add'
    (2, 185),  # AttributeError, though every opcode is whole
    (2, 284),  # MemoryError: a BINBYTES8 of 7.5e18 bytes
    (4, 819),  # MemoryError: a BYTEARRAY8 of 2.3e18 bytes
    (4, 1651),  # OverflowError: FRAME length exceeds system's maximum
    (4, 2795),  # OverflowError: BINUNICODE exceeds system's maximum size
]


@pytest.mark.parametrize("protocol, seed", DAMAGED_REFS)
def test_refs_file_with_damaged_bytes_is_one_line(refer, capsys, protocol, seed):
    path = refer / "refcoco" / "refs(unc).p"
    path.write_bytes(damaged(pickle.dumps(_refs(), protocol=protocol), seed))
    tracemalloc.start()
    try:
        err = one_line_error(capsys, load_refer, refer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{path} is not a readable refs pickle" in err and peak < 2**24, (err, peak)


def test_refs_file_storing_at_a_huge_memo_index(refer, capsys):
    """The C unpickler would grow its memo to 2e15 entries (16 PB) for this one opcode."""
    good = pickle.dumps(_refs(), protocol=2)
    assert good[3:5] == b"q\x00"  # BINPUT 0: the list of refs stored at memo index 0
    path = refer / "refcoco" / "refs(unc).p"
    path.write_bytes(good[:3] + b"p1000000000000000\n" + good[5:])  # PUT at index 10^15
    err = one_line_error(capsys, load_refer, refer)
    assert f"{path} is not a readable refs pickle" in err
    assert "stores at memo index 1,000,000,000,000,000, beyond a file of" in err


def test_ref_pointing_at_another_images_annotation_is_skipped_and_counted(refer):
    refs = _refs()
    refs[0]["ann_id"] = 21  # ref 1 is on image 1; annotation 21 belongs to image 2
    write_refs(refer, refs)
    data = train_set(refer)
    assert data.skipped["annotation_of_another_image"] == 1
    assert all(p.ref["ref_id"] != 1 for record in data.records for p in record)


# ---------------------------------------------------------------------------- config numbers
def composed(root: Path, config: str, *overrides: str):
    """``conf/<config>.yaml`` with ``overrides``, reading and writing under ``root``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=[*paths_at(root), *overrides])


@pytest.mark.parametrize(
    "entry, override, message",
    [
        ("train", "data.batch_size=-1", "got -1 (set data.batch_size=8)"),
        ("train", "data.batch_size=0", "got 0 (set data.batch_size=8)"),
        ("train", "data.batch_size=abc", "got 'abc' (set data.batch_size=8)"),
        ("evaluate", "data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
        ("train", "data.num_workers=-2", "data.num_workers must be an integer >= 0, got -2"),
        ("train", "trainer.max_epochs=many", "trainer.max_epochs must be an integer >= -1"),
        ("train", "trainer.limit_train_batches=1.5", "or a fraction in [0.0, 1.0], got 1.5"),
        ("train", "model.lr=-0.001", "model.lr must be a positive number, got -0.001"),
    ],
)
def test_bad_numbers_are_refused_before_anything_is_built(
    tmp_path, monkeypatch, capsys, entry, override, message
):
    import importlib

    import hydra

    run = getattr(importlib.import_module(f"flmm.{entry}"), entry)
    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **k: pytest.fail("built first"))
    cfg = composed(tmp_path, entry, override, "checkpoint=none.ckpt")
    err = one_line_error(capsys, run, cfg)
    assert message in err and err.startswith(f"flmm: error: {override.split('=')[0]} must be ")


# ------------------------------------------------------------------- homes and run folders
def train_at_home(tmp_path: Path, monkeypatch, capsys) -> str:
    """``flmm train`` (the synthetic world, tiny models: written to flmm's home, $FLMM_HOME) in
    ``tmp_path``, a small world; the one error line it ends with before any model is built."""
    import hydra
    from hydra import compose, initialize_config_dir

    from flmm.train import train

    build = hydra.utils.instantiate

    def data_only(node, *args, **kwargs):
        assert "n_train" in node, "no error on writing the world: the models were being built"
        return build(node, *args, **kwargs)

    monkeypatch.setattr(hydra.utils, "instantiate", data_only)
    run = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}"]
    run += ["data.n_train=2", "data.n_val=1", "data.n_test=1"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return one_line_error(capsys, train, compose("train", overrides=run))


def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


def read_only(monkeypatch, folder: Path) -> None:
    """``folder`` as a read-only folder looks, even to root (who may write anywhere)."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and Path(p) != folder)


def test_flmm_home_that_is_a_file(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("")
    monkeypatch.setenv("FLMM_HOME", str(home))
    err = train_at_home(tmp_path, monkeypatch, capsys)
    assert (
        err == f"flmm: error: FLMM_HOME={home} is a file, not a folder: point FLMM_HOME at a folder"
    )


@pytest.mark.parametrize("refused", ["folder", "lock"])
def test_read_only_flmm_home(tmp_path, monkeypatch, capsys, refused):
    from filelock import FileLock

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("FLMM_HOME", str(home))
    if refused == "folder":
        read_only(monkeypatch, home)
    else:  # a folder that looks writable, but its lock file cannot be made (another user's)
        monkeypatch.setattr(FileLock, "acquire", refuse)
    where = home if refused == "folder" else home / "synthetic_world.lock"
    err = train_at_home(tmp_path, monkeypatch, capsys)
    assert f"cannot write to {where} (read-only): set FLMM_HOME=... to a writable folder" in err


def test_a_written_world_is_read_from_a_read_only_home(tmp_path, monkeypatch):
    from filelock import FileLock

    from flmm.data.synthetic import ensure_world

    root = ensure_world(tmp_path / "synthetic_world", 2, 1, 1)
    read_only(monkeypatch, tmp_path)
    monkeypatch.setattr(FileLock, "acquire", lambda self: pytest.fail("locked to read"))
    assert ensure_world(tmp_path / "synthetic_world", 2, 1, 1) == root


def run_start(output_dir: Path, capsys) -> str:
    """What the callbacks of conf/hydra/default.yaml do when Hydra starts ``flmm evaluate
    output_dir=...`` (before it makes that folder): the one error line."""
    import hydra
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", [f"output_dir={output_dir}"], return_hydra_config=True)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.hydra.callbacks.values()]
    return one_line_error(capsys, lambda: [c.on_run_start(config=cfg) for c in callbacks])


def test_run_folder_under_a_file(tmp_path, capsys):
    (tmp_path / "runs").write_text("")
    err = run_start(tmp_path / "runs" / "a", capsys)
    assert (
        err
        == f"flmm: error: {tmp_path / 'runs'} is a file, not a folder: point output_dir at a folder"
    )


def test_read_only_run_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    read_only(monkeypatch, tmp_path / "runs")
    err = run_start(tmp_path / "runs" / "a", capsys)
    assert err.endswith(
        f"cannot write to {tmp_path / 'runs'} (read-only): set output_dir=... to a writable folder"
    )


# ------------------------------------------------------------------------------- checkpoints
def tiny_checkpoint(tiny_run) -> Path:
    return tiny_run[0] / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def tiny_models(tiny_run) -> tuple:
    """The tiny run's frozen LMM and SAM, loaded once."""
    import hydra

    cfg = tiny_run[1]
    return hydra.utils.instantiate(cfg.model.lmm), hydra.utils.instantiate(cfg.model.sam)


BROKEN_CHECKPOINTS = {
    "empty": (lambda good: b"", "is empty, truncated or not a torch file"),
    "truncated": (lambda good: good[: len(good) // 2], "is empty, truncated or not a torch"),
    "list": (lambda good: torch_bytes([1, 2, 3]), "holds a list, not a checkpoint"),
    "unknown_hparams": (
        lambda good: torch_bytes(with_hparams(good, momentum=0.9)),
        r"hyperparameters \['momentum'\] this flmm does not know",
    ),
}


def torch_bytes(obj) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def with_hparams(good: bytes, **hparams) -> dict:
    import io

    import torch

    ckpt = torch.load(io.BytesIO(good), weights_only=True)
    ckpt["hyper_parameters"].update(hparams)
    return ckpt


@pytest.mark.parametrize("kind", sorted(BROKEN_CHECKPOINTS))
def test_broken_checkpoint_is_one_line(tiny_run, tiny_models, tmp_path, capsys, kind):
    from flmm.model import load

    make, message = BROKEN_CHECKPOINTS[kind]
    path = tmp_path / f"{kind}.ckpt"
    path.write_bytes(make(tiny_checkpoint(tiny_run).read_bytes()))
    lmm, sam = tiny_models
    err = one_line_error(capsys, load, str(path), lmm=lmm, sam=sam)
    assert str(path) in err and re.search(message, err), err


def test_truncated_last_ckpt_names_the_previous_good_one(tiny_run, tmp_path, capsys):
    from omegaconf import OmegaConf

    from flmm.training.run_folder import resolve_checkpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    good = tiny_checkpoint(tiny_run).read_bytes()
    (folder / "epoch_000.ckpt").write_bytes(good)
    (folder / "last.ckpt").write_bytes(good[:1000])
    cfg = OmegaConf.create({"checkpoint": "last", "paths": {"output_dir": str(tmp_path / "run")}})
    err = one_line_error(capsys, resolve_checkpoint, cfg)
    assert "last.ckpt" in err and f"use checkpoint={folder / 'epoch_000.ckpt'}" in err


def test_checkpoint_last_is_the_newest_runs_last_ckpt_not_a_hub_id(
    tiny_run, tmp_path, monkeypatch, capsys
):
    """``--checkpoint last`` (ground, predict, reasonseg, web) and ``checkpoint=last``
    (evaluate) name the newest run's ``last.ckpt`` under ``./logs``, through one function."""
    from omegaconf import OmegaConf

    from flmm.chat import options
    from flmm.evaluate import resolve_last

    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, options.chosen_checkpoint, "last")
    assert f"--checkpoint last: no training run under {tmp_path / 'logs'} has written" in err
    good = tiny_checkpoint(tiny_run).read_bytes()
    for name, mtime in (("new", 2), ("old", 1)):
        last = tmp_path / "logs" / "train" / "runs" / name / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        last.write_bytes(good)
        os.utime(last, (mtime, mtime))
    newest = Path("logs/train/runs/new/checkpoints/last.ckpt")
    loaded = []
    stub = type("Chat", (), {"from_pretrained": lambda *a, **k: loaded.append(a[0])})
    monkeypatch.setattr(options, "GroundedChat", stub)  # no from_pretrained: no hub lookup
    options.load_chat(options_parser().parse_args(["--checkpoint", "last"]))
    assert loaded == [str(newest)]
    cfg = OmegaConf.create({"checkpoint": "last", "paths": {"log_dir": "logs"}})
    resolve_last(cfg)
    assert cfg.checkpoint == str(newest)
    (newest.parent / "epoch_000.ckpt").write_bytes(good)
    newest.write_bytes(good[:1000])  # killed while saving
    err = one_line_error(capsys, options.chosen_checkpoint, "last")
    assert f"use --checkpoint {newest.parent / 'epoch_000.ckpt'}" in err


def options_parser():
    import argparse

    from flmm.chat.options import add_model_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return parser


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    import torch

    from flmm.model.checkpoint import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill in the middle of writing

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["state_dict"]["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path, mask):
    """A head folder is shared: its files are 0644 (under umask 022), as ``open()`` makes them,
    even when the writer creates its file private (as ``mkstemp`` does: 0600)."""
    from flmm.files import write_atomic, write_text_atomic

    def private(tmp: Path) -> None:
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))

    previous = os.umask(mask)
    try:
        write_atomic(tmp_path / "model.safetensors", private)
        write_text_atomic(tmp_path / "config.json", "{}")
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "config.json", "plain.txt"], 0o666 & ~mask)


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    import os
    import subprocess

    from flmm.files import remove_orphans

    gone = subprocess.Popen(["true"])
    gone.wait()  # a writer killed outright: its process is gone, its temporary file stays
    orphan = tmp_path / f".a.v1.json.{gone.pid}.0f.tmp"
    live = tmp_path / f".a.json.{os.getpid()}.1f.tmp"  # a writer still at work
    kept = [live, tmp_path / ".notes.tmp", tmp_path / "a.json"]  # not write_atomic's
    for p in (orphan, *kept):
        p.write_text("half")
    remove_orphans(tmp_path)
    assert not orphan.exists() and all(p.exists() for p in kept)


def test_resuming_from_another_familys_checkpoint_is_refused_before_the_lmm_loads(
    tiny_run, tmp_path, capsys
):
    import torch
    from omegaconf import OmegaConf

    from flmm.training.run_folder import resolve_checkpoint

    ckpt = torch.load(tiny_checkpoint(tiny_run), weights_only=True)
    ckpt["flmm"]["family"] = "internvl"
    torch.save(ckpt, tmp_path / "internvl.ckpt")
    cfg = OmegaConf.create(
        {"checkpoint": str(tmp_path / "internvl.ckpt"), "model": {"lmm": {"family": "llava"}}}
    )
    err = one_line_error(capsys, resolve_checkpoint, cfg)
    assert "family: checkpoint 'internvl' vs configured 'llava'" in err


def test_family_mismatch_is_refused_before_the_lmm_loads(tiny_run, capsys):
    from omegaconf import OmegaConf

    from flmm.evaluate import load_model

    cfg = OmegaConf.create(
        {
            "checkpoint": str(tiny_checkpoint(tiny_run)),
            # no such LMM: were it loaded first, the error would be about its path
            "model": {"lmm": {"family": "qwen2_5_vl", "name_or_path": "/no/such/lmm"}, "sam": {}},
        }
    )
    err = one_line_error(capsys, load_model, cfg)
    assert "family: checkpoint 'llava' vs configured 'qwen2_5_vl'" in err


# -------------------------------------------------------------------------------- evaluation
def eval_cfg(tiny_run, out: Path, *overrides: str):
    """``conf/evaluate.yaml`` on the refer fixture beside the tiny run, with its checkpoint."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    root = tiny_run[0]
    if not (root / "data" / "refer").exists():
        write_refer_fixture(root / "data" / "refer")
    model = [o for o in TINY if o.startswith("model.")]
    data = ["data=refcoco", f"paths.coco_train2014={root / 'data' / 'refer' / 'images'}"]
    settings = [*data, "data.num_workers=0", "trainer.accelerator=cpu", "logger=csv"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[*paths_at(root), *model, *settings, *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.checkpoint = str(tiny_checkpoint(tiny_run))
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_evaluation_keeps_finished_splits_and_a_rerun_skips_them(tiny_run, tmp_path, capsys):
    import flmm.evaluate as ev

    out, splits = tmp_path / "eval", "data.eval_splits=[val,testA]"
    cfg = eval_cfg(tiny_run, out, splits, "protocols=[reference]", "preflight=false")
    err = one_line_error(capsys, ev.evaluate, cfg)
    assert "corrupt or unreadable image" in err and "image_id 5" in err
    saved = sorted(p.name for p in (out / "splits").iterdir())
    assert saved == ["refcoco__val__reference.json"]
    first = {p.name: p.stat().st_mtime_ns for p in (out / "splits").iterdir()}

    scored = []
    score_set = ev.score_set
    with pytest.MonkeyPatch.context() as mp:  # the broken image repaired; only testA is scored
        mp.setattr(ev, "score_set", lambda *a: scored.append(a[4].split) or score_set(*a))
        mp.setattr(
            ReferDataset,
            "load_image",
            lambda self, image_id, ref_ids=None: np.zeros(
                (self.ann.images[image_id]["height"], self.ann.images[image_id]["width"], 3),
                np.uint8,
            ),
        )
        figures = ev.evaluate(eval_cfg(tiny_run, out, splits, "protocols=[reference]"))
    assert scored == ["testA"]
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "splits").iterdir() if p.name in first
    } == first
    assert {k.split("/")[1] for k in figures} == {"val", "testA"}
    headers = [p.read_text().splitlines()[0] for p in (out / "csv").rglob("metrics.csv")]
    assert any("refcoco/testA/reference/refined/giou" in h.split(",") for h in headers)


def test_preflight_reports_every_broken_image_before_the_model_loads(tiny_run, tmp_path, capsys):
    import flmm.evaluate as ev

    cfg = eval_cfg(tiny_run, tmp_path, "data.eval_splits=[val,testA,testB]")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "load_model", lambda cfg: pytest.fail("the model loaded before pre-flight"))
        err = one_line_error(capsys, ev.evaluate, cfg)
    assert "pre-flight: 2 of 3 samples cannot be read" in err and "image_id 5" in err
    assert "preflight=false" in err


# ----------------------------------------------------------------------- text and the CLI
def test_text_longer_than_the_context_is_refused(tiny_models, sample_factory, capsys):
    from flmm.types import GroundingBatch

    lmm = tiny_models[0]
    text = "the red circle " + "and more " * 2500  # 5,000+ words, 2,048 positions
    batch = GroundingBatch.collate([sample_factory(text, ["red circle"], 24, 24)])
    err = one_line_error(capsys, lmm, batch)
    assert "more than the 2048 positions" in err and "shorten it by at least" in err
    err = one_line_error(capsys, lmm.chat_inputs, [np.zeros((24, 24, 3), np.uint8)], text)
    assert "more than the 2048 positions" in err


def huge_png(path: Path, side: int = 20000) -> Path:
    """A valid 1 x 1 PNG whose header claims ``side x side`` pixels (a decompression bomb)."""
    import struct
    import zlib

    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    header = b"IHDR" + struct.pack(">II", side, side) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(data))
    return path


def test_ground_cli_decompression_bomb(tmp_path, capsys):
    from flmm.chat.ground import load_image

    err = one_line_error(capsys, load_image, huge_png(tmp_path / "bomb.png"))
    assert "bomb.png" in err and "too large" in err


@pytest.mark.parametrize(
    "text, phrases, message",
    [
        ("   ", None, "the text is empty"),
        ("the red circle", ["blue square"], "phrase 'blue square' is not in the text"),
        ("the red circle", [""], "phrase '' is not in the text"),
    ],
)
def test_ground_cli_text_and_phrases(capsys, text, phrases, message):
    from flmm.chat.ground import run

    image = np.zeros((8, 8, 3), np.uint8)
    assert message in one_line_error(capsys, run, None, image, text, phrases, "ground")


# ------------------------------------------------------------------ silent wrong results
def test_reasonseg_text_as_one_string_is_one_query(tmp_path, capsys):
    from PIL import Image

    from flmm.chat.reasonseg import read_item

    Image.new("RGB", (8, 6)).save(tmp_path / "a.jpg")
    anno = {"text": "what is the red thing?", "is_sentence": True, "shapes": []}
    (tmp_path / "a.json").write_text(json.dumps(anno))
    assert read_item(tmp_path / "a.json").queries == ["what is the red thing?"]
    (tmp_path / "a.json").write_text(json.dumps({**anno, "text": [1, 2]}))
    err = one_line_error(capsys, read_item, tmp_path / "a.json")
    assert "'text' must be a query or a list of queries" in err


REASONSEG_BREAKS = {  # what is broken -> (image bytes or None: a valid image, shapes, message)
    "corrupt_image": (b"not a jpeg", [], "a.jpg is not a readable image (cannot identify"),
    "truncated_image": ("half", [], "a.jpg is not a readable image (Truncated File Read)"),
    "one_number_point": (None, [{"label": "target", "points": [[1]]}], "('points' [[1]])"),
    "no_points": (None, [{"label": "target"}], "a.json: shape 0 is not a polygon"),
    "label_not_text": (None, [{"label": 3, "points": [[1, 1], [4, 4]]}], "a 'label' string"),
}


@pytest.mark.parametrize("kind", sorted(REASONSEG_BREAKS))
def test_reasonseg_broken_image_or_polygon_before_the_model_loads(
    tmp_path, monkeypatch, capsys, kind
):
    import io

    from PIL import Image

    from flmm.chat import reasonseg

    image, shapes, message = REASONSEG_BREAKS[kind]
    jpeg = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(jpeg, "JPEG")
    good = jpeg.getvalue()
    (tmp_path / "a.jpg").write_bytes(good[: len(good) // 2] if image == "half" else image or good)
    anno = {"text": ["what is it?"], "is_sentence": False, "shapes": shapes}
    (tmp_path / "a.json").write_text(json.dumps(anno))
    monkeypatch.setattr(reasonseg, "load_chat", lambda args: pytest.fail("models loaded"))
    err = one_line_error(capsys, reasonseg.main, [str(tmp_path)])
    assert str(tmp_path) in err and message in err


def test_pope_answers_with_a_repeated_question_id(tmp_path, capsys):
    from flmm.chat.pope import read_answers

    record = {"question_id": 7, "image": "a.jpg", "label": "yes", "answer": "Yes"}
    lines = [record, {**record, "question_id": 8}, {**record, "answer": "No"}]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    err = one_line_error(capsys, read_answers, path)
    assert "answers.jsonl:3: question_id 7 was already answered at line 1" in err


def test_frozen_lmm_check_on_a_val_split_smaller_than_its_image_count():
    from types import SimpleNamespace

    import torch

    from flmm.training.callbacks import FrozenLMMCheck

    class Answering(torch.nn.Linear):
        def answer(self, image, question, max_new_tokens):
            return f"{image.shape[0]} rows"

    val = [SimpleNamespace(image=np.zeros((h, 4, 3), np.uint8)) for h in (5, 6)]
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_sets=[val]))
    snapshot = FrozenLMMCheck(["size?"], num_images=4).snapshot(trainer, Answering(2, 2))
    assert snapshot["answers"] == [["5 rows"], ["6 rows"]]


def test_feature_cache_entry_of_another_format_is_recomputed(tiny_models, tmp_path, caplog):
    import torch

    from flmm.model.feature_cache import FORMAT_VERSION, LMM_FIELDS, EntryStore, lmm_identity

    store = EntryStore(tmp_path, {"format": FORMAT_VERSION}, LMM_FIELDS)
    shapes = {name: (1,) for name in LMM_FIELDS}
    store.save("ab01", {"maps": torch.zeros(2), "box": torch.zeros(4)})  # an older layout
    assert store.load("ab01", shapes) is None and "recomputing it" in caplog.text
    store.save("ab02", {name: torch.zeros(1) for name in LMM_FIELDS})
    assert set(store.load("ab02", shapes)) == LMM_FIELDS
    assert lmm_identity(tiny_models[0])["format"] == FORMAT_VERSION


def test_feature_cache_entry_of_the_wrong_shapes_is_recomputed(
    tiny_models, ragged_batch, tmp_path, caplog
):
    """Right fields, wrong shapes (another grid, a cut file): recomputed, not a crash mid-epoch."""
    import torch

    from flmm.heads import SamRefiner
    from flmm.model.feature_cache import FeatureCache

    lmm, sam = tiny_models
    cache = FeatureCache(tmp_path, lmm, SamRefiner(sam))
    fresh = cache.lookup(ragged_batch)
    key = cache.sample_key(ragged_batch, 1)
    entry = dict(cache.lmm_store.load(key, cache.capture_shapes(len(ragged_batch.spans[1]))))
    entry["maps"] = entry["maps"][..., :-1]
    entry["hidden"] = entry["hidden"][:, :-1]
    cache.lmm_store.save(key, entry)
    image_key = cache.image_key(ragged_batch.images[0])
    cache.sam_store.save(
        image_key, {"embedding": torch.zeros(3, 2, 2), "input_size": torch.ones(2)}
    )
    again = cache.lookup(ragged_batch)
    assert caplog.text.count("recomputing it") == 2, caplog.text
    assert cache.misses == {"lmm": 3 + 1, "sam": 3 + 1}
    assert torch.allclose(again[0].maps, fresh[0].maps)
    alone = cache.refiner.embed_images(ragged_batch.images[:1])[0][0]  # recomputed on its own
    assert torch.equal(again[1][0][0], alone.half().float())
    assert torch.equal(again[1][0][1:], fresh[1][0][1:])


# ------------------------------------------------------------------------------ the web page
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 makes the page reachable from other machines"),
        (["--host", "0.0.0.0", "--allow-remote"], "--allow-remote needs a login"),
    ],
)
def test_web_refuses_a_non_loopback_bind_without_auth(monkeypatch, capsys, argv, message):
    from flmm.chat import web

    monkeypatch.delenv(web.AUTH_ENV, raising=False)
    monkeypatch.setattr(web, "load_chat", lambda args: pytest.fail("models loaded"))
    monkeypatch.setattr(web, "launch", lambda *a, **k: pytest.fail("the page started"))
    assert message in one_line_error(capsys, web.main, argv)


def test_web_login_comes_from_the_environment_or_a_file(monkeypatch, tmp_path):
    from flmm.chat.web_access import AUTH_ENV, serving_auth

    monkeypatch.setenv(AUTH_ENV, "ada:s3cret:with:colons")
    assert serving_auth("0.0.0.0", True, None) == [("ada", "s3cret:with:colons")]
    assert serving_auth("127.0.0.1", False, None) == [("ada", "s3cret:with:colons")]
    (tmp_path / "users").write_text("ada:one\nbob:two\n")
    assert serving_auth("::", True, str(tmp_path / "users")) == [("ada", "one"), ("bob", "two")]


def serve(monkeypatch, argv: list[str]) -> dict:
    """``flmm web argv`` with the models and the server stubbed; what ``launch`` was given."""
    from flmm.chat import web

    launched = {}
    monkeypatch.setattr(web, "load_chat", lambda args: None)
    monkeypatch.setattr(web, "build_app", lambda chat, limits: "app")
    monkeypatch.setattr(web, "launch", lambda *a, **k: launched.update(k))
    web.main(argv)
    return launched


def test_web_serves_https_with_a_certificate_and_warns_of_a_login_over_http(
    monkeypatch, tmp_path, capsys
):
    from flmm.chat import web
    from flmm.chat.web_access import AUTH_ENV

    launch = web.launch  # serve() stubs it
    monkeypatch.setenv(AUTH_ENV, "ada:s3cret")
    remote = ["--host", "0.0.0.0", "--allow-remote"]
    assert serve(monkeypatch, remote)["tls"] == {}
    out, err = capsys.readouterr()
    warning = [line for line in err.splitlines() if line.startswith("WARNING: ")]
    assert len(warning) == 1 and "plain HTTP" in warning[0] and "--ssl-certfile" in warning[0]
    assert "on http://0.0.0.0:7860" in out
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN PEM-----")
    tls = ["--ssl-certfile", str(tmp_path / "cert.pem"), "--ssl-keyfile", str(tmp_path / "key.pem")]
    launched = serve(monkeypatch, [*remote, *tls])
    assert launched["tls"] == {
        "ssl_certfile": str(tmp_path / "cert.pem"),
        "ssl_keyfile": str(tmp_path / "key.pem"),
        "ssl_verify": False,
    }
    out, err = capsys.readouterr()
    assert "WARNING" not in err and "on https://0.0.0.0:7860" in out
    gradio = type("Blocks", (), {"launch": lambda self, **kwargs: kwargs})()
    assert launched["tls"].items() <= launch(gradio, web.Limits(), tls=launched["tls"]).items()
    serve(monkeypatch, [])  # this machine only: nothing crosses the network
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ssl-certfile", "{d}/cert.pem"], "--ssl-certfile and --ssl-keyfile go together"),
        (
            ["--ssl-certfile", "{d}/absent.pem", "--ssl-keyfile", "{d}/key.pem"],
            "--ssl-certfile {d}/absent.pem does not exist",
        ),
        (
            ["--ssl-certfile", "{d}/cert.pem", "--ssl-keyfile", "{d}"],
            "--ssl-keyfile {d} cannot be read (Is a directory)",
        ),
    ],
)
def test_web_certificate_files_are_checked_before_the_models_load(
    monkeypatch, tmp_path, capsys, argv, message
):
    from flmm.chat import web

    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN PEM-----")
    monkeypatch.setattr(web, "load_chat", lambda args: pytest.fail("models loaded"))
    argv = [a.format(d=tmp_path) for a in argv]
    assert message.format(d=tmp_path) in one_line_error(capsys, web.main, argv)


def test_web_clients_see_no_server_paths_or_raw_exceptions(tmp_path, caplog):
    import gradio as gr

    from flmm.chat.web import Limits, respond

    class Broken:
        def stream(self, *args, **kwargs):
            raise KeyError("/srv/secret/weights.bin")

    upload = tmp_path / "gradio" / "0123abcd" / "notes.png"
    upload.parent.mkdir(parents=True)
    upload.write_text("not an image")
    with pytest.raises(gr.Error) as bad:
        list(respond(None, Limits(), str(upload), "what is this?", "", "auto"))
    assert "notes.png" in bad.value.message and str(upload.parent) not in bad.value.message
    from PIL import Image

    Image.new("RGB", (8, 8)).save(upload)
    with pytest.raises(gr.Error) as internal:
        list(respond(Broken(), Limits(), str(upload), "what is this?", "", "chat"))
    assert "internal error" in internal.value.message and "secret" not in internal.value.message
    assert "/srv/secret/weights.bin" in caplog.text  # logged on the server
    with pytest.raises(gr.Error, match="phrases field has 501 characters"):
        list(respond(None, Limits(), str(upload), "what?", "x" * 501, "auto"))


def test_web_uploads_are_deleted_on_a_schedule():
    from flmm.chat.web import Limits, build_app

    app = build_app(None, Limits(keep_files_s=60))
    assert app.delete_cache == (60, 60)  # every 60 s, files older than 60 s are deleted

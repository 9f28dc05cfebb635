"""The `flmm` command: every subcommand answers --help naming its options, one spelling per
concept (old or foreign spellings get a line naming the right one), where things go (flmm's home,
run folders under the current folder, a user's conf/local/)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flmm import cli
from flmm.chat.options import default_checkpoint
from flmm.entry import CONFIG_PATH
from flmm.files import flmm_home
from flmm.model import checkpoint
from flmm.model.checkpoint import LAST

ROOT = Path(__file__).resolve().parents[1]
# the options each command has, per concept: checkpoint, device, dtype, output folder / file
OPTIONS = {
    "train": ["checkpoint=", "trainer.accelerator=", "model.lmm.dtype=", "output_dir="],
    "evaluate": ["checkpoint=", "trainer.accelerator=", "model.lmm.dtype=", "output_dir="],
    "pope": ["checkpoint=", "device=", "model.lmm.dtype=", "output_dir="],
    "train-selector": ["device=", "model.lmm.dtype=", "output=", "output_dir="],
    "ground": ["--checkpoint", "--device", "--dtype", "--output"],
    "web": ["--checkpoint", "--device", "--dtype"],
    "predict": ["--checkpoint", "--device", "--dtype", "--output-dir"],
    "reasonseg": ["--checkpoint", "--device", "--dtype", "--output", "--relevant-object"],
    "convert-reference": ["--output"],
}


def run_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """``flmm ARGV`` in this process: exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main rewrites it
    # Hydra sets up logging with handlers on this test's captured streams: later tests must not
    # inherit them (they would log to a closed file)
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        code = cli.main(list(argv))
    except SystemExit as stop:
        code = stop.code or 0
    finally:
        logging.root.handlers[:], logging.root.level = handlers, level
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_command_has_its_options_listed():
    assert set(OPTIONS) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_answers_help(command, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0, err
    missing = [o for o in OPTIONS[command] if o not in out]
    assert not missing, f"flmm {command} --help does not name {missing}:\n{out}"


@pytest.mark.parametrize(
    ("command", "override", "use"),
    [
        ("train", "ckpt_path=last", "checkpoint=PATH"),
        ("evaluate", "ckpt_path=x.ckpt", "checkpoint=PATH"),
        ("evaluate", "+ckpt_path=x.ckpt", "checkpoint=PATH"),
        ("train-selector", "save_to=s.pt", "output=PATH"),
        ("train", "device=cuda", "trainer.accelerator=cpu|gpu (or trainer=gpu)"),
        ("pope", "dtype=bfloat16", "model.lmm.dtype=NAME"),
    ],
)
def test_old_spellings_name_the_new_one(command, override, use, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, command, override)
    key = override.lstrip("+").split("=")[0]
    assert code == 2
    assert err == f"flmm: error: {key}= is not an option of this command: use {use}\n"


def test_home_is_flmm_home_else_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("FLMM_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert flmm_home() == tmp_path / "xdg" / "flmm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert flmm_home() == tmp_path / "user" / ".cache" / "flmm"
    monkeypatch.setenv("FLMM_HOME", str(tmp_path / "home"))
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        paths = compose("train").paths
    # the world and the foundation models in the home; runs, real data, SAM under the cwd
    assert paths.world_dir == f"{tmp_path}/home/synthetic_world"
    assert paths.foundation_dir == f"{tmp_path}/home/foundation"
    assert (paths.log_dir, paths.refer_root) == ("./logs", "./data/refer")


def test_default_checkpoint_is_the_newest_run_under_this_folders_logs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no F-LMM checkpoint under"):
        default_checkpoint()
    for name, mtime in (("a", 1), ("b", 2)):
        ckpt = tmp_path / "logs" / "train" / "runs" / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.touch()
        os.utime(ckpt, (mtime, mtime))
    assert default_checkpoint() == Path("logs/train/runs/b/checkpoints/last.ckpt")
    # a run's model folder (written after its checkpoints) is preferred: it names LMM and SAM
    config = tmp_path / "logs" / "train" / "runs" / "b" / "model" / "config.json"
    config.parent.mkdir()
    config.touch()
    os.utime(config, (3, 3))
    assert default_checkpoint() == Path("logs/train/runs/b/model")
    os.utime(tmp_path / "logs/train/runs/a/checkpoints/last.ckpt", (4, 4))  # a resumed run
    assert default_checkpoint() == Path("logs/train/runs/a/checkpoints/last.ckpt")


def recorded_run(root: Path, name: str, overrides: list[str], mtime: int) -> Path:
    """A run folder under ``root/logs`` with the ``.hydra/`` record Hydra writes (the composed
    config, unresolved, and the command line's overrides) and a ``last.ckpt`` dated ``mtime``."""
    run = root / "logs" / "train" / "runs" / name
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / LAST).touch()
    os.utime(run / "checkpoints" / LAST, (mtime, mtime))
    return run


def test_the_newest_run_taken_by_default_is_not_a_debug_run(monkeypatch, tmp_path, capsys):
    """Newer debug runs (debug=..., fast_dev_run, limit_train_batches) are passed over, for
    the default checkpoint and for `last`; the run taken is printed in one line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "resumable_last", lambda folder, option: folder / LAST)
    recorded_run(tmp_path, "real", ["model.lr=0.001"], 1)
    recorded_run(tmp_path, "debug", ["debug=fdr"], 2)
    recorded_run(tmp_path, "limit", ["trainer.limit_train_batches=4"], 3)
    real = Path("logs/train/runs/real")
    assert default_checkpoint() == real / "checkpoints" / LAST
    assert checkpoint.newest_last(Path("logs")) == real / "checkpoints" / LAST
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"run: {real} (the newest under logs; skipped 2 debug run(s))"] * 2
    shutil.rmtree(real)  # only debug runs: the newest of them, said so
    assert default_checkpoint() == Path("logs/train/runs/limit/checkpoints") / LAST
    assert "only debug runs there (trainer.limit_train_batches=4)" in capsys.readouterr().err


def test_conf_local_of_the_current_folder_sets_a_users_paths(tmp_path):
    """conf/local/default.yaml where a command runs is merged into its config; overrides win."""
    local = tmp_path / "conf" / "local" / "default.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("paths:\n  refer_root: /data/refer\n  png_root: /data/png\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def job(*overrides: str) -> str:
        cmd = [sys.executable, "-m", "flmm.cli", "train", "--cfg", "job", *overrides]
        out = subprocess.run(
            cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "not available" not in out.stderr  # no warning in folders without conf/
        return out.stdout

    config = job("paths.png_root=/elsewhere")
    assert "refer_root: /data/refer" in config and "png_root: /elsewhere" in config
    shutil.rmtree(tmp_path / "conf")
    assert "refer_root: ${paths.data_dir}/refer" in job()

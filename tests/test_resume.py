"""A run killed mid-epoch resumes from its last checkpoint and ends as the uninterrupted run; a
run stopped by SIGTERM saves its state first and exits 143."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY, paths_at, run_flmm
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from flmm.training.stopping import CheckpointOnSigterm, sigterm_exit_status

TESTS = Path(__file__).resolve().parent
# 2 epochs x 3 steps, a checkpoint after every step; the kill comes at step 4 (epoch 1, batch 1)
RUN = [
    *[o for o in TINY if not o.startswith(("trainer.max_epochs", "trainer.limit_train"))],
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "+callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.progress_bar=null",
]
KILL_STEP = 4


class KillAtStep(L.Callback):
    """Ends the process at once (``os._exit``: no clean-up, as SIGKILL) when training reaches
    ``step``, i.e. right after the checkpoint of step ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os._exit(137)


class SigtermAtStep(L.Callback):
    """When training reaches ``step``: sends this process SIGTERM, or with ``marker`` writes that
    file and waits (up to a minute) for a SIGTERM from outside."""

    def __init__(self, step: int, marker: str | None = None) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.marker is None:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        Path(self.marker).touch()
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class CountSteps(L.Callback):
    """Appends the global step of every training batch this process runs to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step}\n")


def run_train(root: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = (f"output_dir={run_dir}", *RUN, *overrides)
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return run_flmm("train", root, *args, PYTHONPATH=path)


def trained_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    # build the tiny foundation models first: building them draws random numbers before the
    # heads are initialised, so only runs that find them built start from the same weights
    warm = run_train(tmp_path, tmp_path / "warm", "train=false", "test=false")
    assert warm.returncode == 0, warm.stderr[-3000:]
    whole = run_train(tmp_path, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = tmp_path / "killed"
    crash = [f"+callbacks.kill._target_={__name__}.KillAtStep", f"+callbacks.kill.step={KILL_STEP}"]
    first = run_train(tmp_path, killed, *crash)
    assert first.returncode == 137, first.stderr[-3000:]
    assert not (killed / "metrics.json").exists()
    saved = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == KILL_STEP and saved["epoch"] == 1  # mid-epoch
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 1}
    ]

    steps = tmp_path / "steps_after_resume.txt"
    count = [f"+callbacks.count._target_={__name__}.CountSteps", f"+callbacks.count.path={steps}"]
    resumed = run_train(tmp_path, killed, "checkpoint=last", *count)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    # 2 epochs x 3 steps: only steps 5 and 6 remain (global step after each: 5, 6)
    assert steps.read_text().split() == ["5", "6"]

    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    got = json.loads((killed / "metrics.json").read_text())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    final, reference = trained_state(killed), trained_state(tmp_path / "whole")
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_checkpoint_to_a_missing_file_is_a_user_error(tmp_path):
    result = run_train(tmp_path, tmp_path / "run", f"checkpoint={tmp_path / 'nope.ckpt'}")
    assert result.returncode == 2
    assert "flmm: error: checkpoint=" in result.stderr and "checkpoint=last" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_new_run_stops_before_an_earlier_runs_checkpoints(tmp_path):
    """Lightning would write ``last-v1.ckpt`` beside them and leave ``last.ckpt`` stale."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"an earlier run")
    result = run_train(tmp_path, tmp_path / "run")
    assert result.returncode == 2
    assert "already holds an earlier run's checkpoints (last.ckpt)" in result.stderr
    assert "new output_dir=" in result.stderr and "checkpoint=last" in result.stderr
    assert "Traceback" not in result.stderr
    assert (folder / "last.ckpt").read_bytes() == b"an earlier run"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


def test_sigterm_saves_the_run_then_exits_143_and_the_run_resumes_after_that_step(tmp_path):
    """The mechanism, on Lightning's BoringModel (32 batches an epoch: SIGTERM comes mid-epoch)."""

    def fit(*callbacks: L.Callback, resume: Path | None = None) -> None:
        checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = L.Trainer(
            max_steps=6,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            callbacks=[checkpoints, CheckpointOnSigterm(), *callbacks],
        )
        trainer.fit(BoringModel(), ckpt_path=resume)

    with pytest.raises(SystemExit) as stop, sigterm_exit_status("checkpoint=last"):
        fit(SigtermAtStep(2))
    assert stop.value.code == 128 + signal.SIGTERM
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3  # the step under way when the signal came was finished
    steps = tmp_path / "steps.txt"
    fit(CountSteps(str(steps)), resume=tmp_path / "last.ckpt")
    assert steps.read_text().split() == ["4", "5", "6"]


def test_flmm_train_stopped_by_sigterm_saves_its_state_and_exits_143(tiny_run, tmp_path):
    root, run = tiny_run[0], tmp_path / "run"
    marker = tmp_path / "at_step_1"
    stop = [f"+callbacks.stop._target_={__name__}.SigtermAtStep", "+callbacks.stop.step=1"]
    stop += [f"+callbacks.stop.marker={marker}"]
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    run_args = [o for o in RUN if "every_n_train_steps" not in o]  # last.ckpt at epoch ends only
    cmd = [
        sys.executable,
        "-m",
        "flmm.train",
        *paths_at(root),
        *run_args,
        f"output_dir={run}",
        *stop,
    ]
    process = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 143, output[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["epoch"] == 0  # mid-epoch: 3 steps an epoch
    assert f"the run's state at step 2 is in {run / 'checkpoints' / 'last.ckpt'}" in output
    assert "stopped by SIGTERM (exit status 143); to go on, rerun with checkpoint=last" in output
    assert not (run / "metrics.json").exists() and not (run / "run.lock").exists()

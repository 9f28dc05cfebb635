"""One run per run folder: a live run's lock refuses a second run, a dead run's is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_flmm

from flmm.errors import FlmmUserError
from flmm.run_lock import LOCK, acquire, release


@pytest.fixture
def live_pid():
    """The pid of a running process that is not this one."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def hold(folder: Path, pid: int, host: str | None = None, job: str | None = None) -> Path:
    """A lock in ``folder`` as the run ``pid`` on ``host`` (this one) would have left it."""
    folder.mkdir(parents=True, exist_ok=True)
    owner = {"pid": pid, "host": host or socket.gethostname(), "job": job, "since": "09:00"}
    (folder / LOCK).write_text(json.dumps(owner))
    return folder / LOCK


def test_a_run_holds_its_folder_and_releases_it(tmp_path):
    lock = acquire(tmp_path / "run")
    owner = json.loads(lock.read_text())
    assert lock == tmp_path / "run" / LOCK
    assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
    release(lock)
    assert not lock.exists()
    acquire(tmp_path / "run")  # resuming in one's own folder after the run ended


def test_a_folder_a_live_run_holds_is_refused(tmp_path, live_pid):
    lock = hold(tmp_path, live_pid)
    with pytest.raises(FlmmUserError) as refused:
        acquire(tmp_path)
    message = str(refused.value)
    assert (
        f"{tmp_path} is in use by another run (pid {live_pid} on {socket.gethostname()}" in message
    )
    assert "pass another output_dir=" in message and f"delete {lock}" in message
    assert json.loads(lock.read_text())["pid"] == live_pid  # left alone
    release(lock)  # not this process's: stays
    assert lock.exists()


def test_another_hosts_lock_is_refused_another_run_of_this_slurm_job_taken_over(
    tmp_path, monkeypatch, caplog
):
    hold(tmp_path, 1, host="node-17", job="4242")
    with pytest.raises(FlmmUserError, match="pid 1 on node-17"):
        acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the job requeued on this node
    acquire(tmp_path)
    assert "left by an earlier run of SLURM job 4242 (requeued); taking it over" in caplog.text


def test_a_dead_runs_lock_is_taken_over_with_a_log_line(tmp_path, caplog):
    pid = dead_pid()
    lock = hold(tmp_path, pid)
    acquire(tmp_path)
    assert f"the run that held it (pid {pid} on {socket.gethostname()}) is gone" in caplog.text
    assert json.loads(lock.read_text())["pid"] != pid


def test_a_second_training_run_into_a_live_runs_folder_stops_before_writing(tmp_path, live_pid):
    run = tmp_path / "run"
    hold(run, live_pid)
    missing = f"checkpoint={tmp_path / 'nope.ckpt'}"  # were it not refused: exit 2 at once
    result = run_flmm("train", tmp_path, f"output_dir={run}", missing)
    errors = [line for line in result.stderr.splitlines() if line.startswith("flmm: error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert f"{run} is in use by another run (pid {live_pid} on" in errors[0]
    assert "Traceback" not in result.stderr
    assert [p.name for p in run.iterdir()] == [LOCK]  # not even Hydra's .hydra/ and log


def test_a_killed_runs_folder_is_taken_over_and_freed_when_the_run_ends(tmp_path):
    run = tmp_path / "run"
    pid = dead_pid()
    hold(run, pid)
    missing = f"checkpoint={tmp_path / 'nope.ckpt'}"  # the run stops early, with exit status 2
    result = run_flmm("train", tmp_path, f"output_dir={run}", missing)
    assert result.returncode == 2 and "flmm: error: checkpoint=" in result.stderr
    assert f"the run that held it (pid {pid} on" in result.stdout + result.stderr
    assert (run / ".hydra").is_dir() and not (run / LOCK).exists()

"""One run per run folder: ``<folder>/run.lock`` names the process that holds the folder.

Two runs writing into one folder overwrite each other's config, metrics and model folder and
leave ``last.ckpt`` beside ``last-v1.ckpt``. So a run takes the lock of its folder before
anything is written there (the Hydra callback :class:`RunFolderLock`, before Hydra writes the
run's ``.hydra/`` config) and a second run into a folder a live run holds stops with one line.
The lock holds the owner's pid and host, and the scheduler's job id (``$SLURM_JOB_ID``) if any.
A lock whose process is gone (a run killed outright removes nothing) is stale: the next run
takes it over with a log line, as it does a lock an earlier run of its own requeued SLURM job
left on another node. A run removes its lock when it ends, so resuming in its folder
(``checkpoint=last``) works.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from flmm.errors import FlmmUserError, exit_on_user_error
from flmm.files import alive

log = logging.getLogger(__name__)
LOCK = "run.lock"
# ranks of the processes of one run (DDP, other nodes): only the first one locks its folder
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def this_process() -> dict:
    """What a lock records of its owner."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def acquire(folder: Path) -> Path:
    """Take ``folder``'s lock (creating the folder); a :class:`FlmmUserError` if a live run
    holds it. The lock is released when this process ends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock, owner = folder / LOCK, this_process()
    if not create(lock, owner):
        take_over(lock, read_owner(lock))
        if not create(lock, owner):
            raise FlmmUserError(f"{folder}: another run took its lock meanwhile ({lock})")
    atexit.register(release, lock)
    return lock


def create(lock: Path, owner: dict) -> bool:
    """Write ``lock`` whole if it does not exist (a linked temporary file: no run ever reads a
    half-written lock); False if it exists."""
    tmp = lock.with_name(f".{LOCK}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(owner) + "\n")
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def read_owner(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def take_over(lock: Path, owner: dict) -> None:
    """Remove ``lock`` if the process it names is gone (or is this one); a
    :class:`FlmmUserError` naming it if it may still be running."""
    me, pid, host = this_process(), owner.get("pid"), owner.get("host")
    if (host, pid) == (me["host"], me["pid"]):
        lock.unlink(missing_ok=True)  # an earlier run of this process (tests, notebooks)
        return
    if host == me["host"] and isinstance(pid, int) and not alive(pid):
        log.warning(
            "%s: the run that held it (pid %s on %s) is gone; taking it over", lock, pid, host
        )
    elif owner.get("job") and owner.get("job") == me["job"]:
        log.warning(
            "%s: left by an earlier run of SLURM job %s (requeued); taking it over", lock, me["job"]
        )
    else:
        raise FlmmUserError(
            f"{lock.parent} is in use by another run (pid {pid} on {host}, since "
            f"{owner.get('since')}): two runs in one folder overwrite each other's checkpoints, "
            f"metrics and model; pass another output_dir=, or wait for it to end (if that run "
            f"is gone, delete {lock})"
        )
    lock.unlink(missing_ok=True)


def release(lock: Path) -> None:
    """Remove ``lock`` if this process holds it."""
    me, owner = this_process(), read_owner(lock)
    if (owner.get("host"), owner.get("pid")) == (me["host"], me["pid"]):
        lock.unlink(missing_ok=True)


def first_process() -> bool:
    """Whether this is the process that starts the run, not another rank of it."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


class RunFolderLock(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): lock a run's folder before Hydra writes
    into it (a multirun: each job's folder as the job starts); unlock it when the run ends."""

    def __init__(self) -> None:
        self.held: dict[str, Path] = {}

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.lock(config.hydra.run.dir)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self.unlock(config.hydra.run.dir)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self.lock(config.hydra.runtime.output_dir)

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self.unlock(config.hydra.runtime.output_dir)

    def lock(self, folder: str) -> None:
        if first_process():
            self.held[folder] = exit_on_user_error(acquire, Path(folder))

    def unlock(self, folder: str) -> None:
        lock = self.held.pop(folder, None)
        if lock is not None:
            release(lock)

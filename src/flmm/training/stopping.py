"""A run stopped by SIGTERM (a scheduler's pre-emption or time limit, ``kill``) saves where it is
and ends with exit status 143 (128 + SIGTERM), so that a scheduler tells it from a finished run
and ``checkpoint=last`` resumes it.

Lightning catches SIGTERM during ``fit``/``test`` and, once the step under way is done, raises
its ``SIGTERMException``: a ``SystemExit`` without a code, which ends the process with status 0.
:class:`CheckpointOnSigterm` writes ``last.ckpt`` from Lightning's ``on_exception`` hook (the
loader's position in the epoch included, as in any checkpoint); :func:`sigterm_exit_status`
then turns the exception into exit status 143.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from flmm.model.checkpoint import LAST

log = logging.getLogger(__name__)
SIGTERM_STATUS = 128 + signal.SIGTERM


class CheckpointOnSigterm(L.Callback):
    """Write the checkpoint folder's ``last.ckpt`` when ``fit`` stops on SIGTERM."""

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        folder = checkpoint_dir(trainer)
        if folder is None:
            log.warning("SIGTERM: no checkpoint folder (callbacks=none), no checkpoint written")
            return
        trainer.save_checkpoint(folder / LAST)
        log.warning(
            "SIGTERM: the run's state at step %d is in %s", trainer.global_step, folder / LAST
        )


def checkpoint_dir(trainer: L.Trainer) -> Path | None:
    """Where the run's :class:`ModelCheckpoint` writes (``last.ckpt`` among them)."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath)
    return None


@contextmanager
def sigterm_exit_status(resume: str) -> Iterator[None]:
    """End with exit status 143 and one log line saying how to go on (``resume``: the options of
    the command's rerun), instead of 0, where Lightning stopped on SIGTERM."""
    try:
        yield
    except SIGTERMException:
        log.warning(
            "stopped by SIGTERM (exit status %d); to go on, rerun with %s", SIGTERM_STATUS, resume
        )
        raise SystemExit(SIGTERM_STATUS) from None

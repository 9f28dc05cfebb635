"""Errors caused by a user's input (paths, configs, checkpoints).

Entry points report these as one message naming the problem and the fix, without a traceback
(:func:`exit_on_user_error`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from hydra.errors import InstantiationException


class FlmmUserError(Exception):
    """Base class of errors whose message tells the user what to change."""


class CheckpointMismatchError(FlmmUserError, RuntimeError):
    """A checkpoint does not fit the configured LMM or SAM."""


class ModelLoadError(FlmmUserError, RuntimeError):
    """A model could not be loaded from the configured path or hub id."""


class DataError(FlmmUserError, ValueError):
    """A data file is corrupt or disagrees with its annotations; the message names file and record."""


class ConfigError(FlmmUserError, ValueError):
    """A configured value is not one of those allowed; the message lists them."""


class MissingExtraError(FlmmUserError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs {package}, which is not installed: pip install 'flmm[{extra}]'"
        )


USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, FlmmUserError)


def exit_on_user_error(fn: Callable, *args, **kwargs):
    """Run ``fn``; a user error ends the process with one clear message and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except (InstantiationException, *USER_ERRORS) as err:
        cause = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if not isinstance(cause, USER_ERRORS):
            raise
        print(f"flmm: error: {cause}", file=sys.stderr)
        sys.exit(2)

"""Where flmm keeps what it generates, how it writes files that must not be left half-written, and
how it reads torch files a user hands in without letting them run code."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from flmm.errors import DataError


def flmm_home() -> Path:
    """Home of the foundation models' cache and the generated synthetic world (``paths.home_dir``):
    ``$FLMM_HOME``, else the per-user cache folder (``$XDG_CACHE_HOME/flmm``, ``~/.cache/flmm``)."""
    if os.environ.get("FLMM_HOME"):
        return Path(os.environ["FLMM_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flmm"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place: a crash,
    or another process writing the same file, leaves the old file or a whole new one, never half
    of one (the temporary file is removed if ``write`` fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_orphans(folder: Path) -> None:
    """Remove the temporary files that :func:`write_atomic` writers killed outright left in
    ``folder`` (their process is gone, so nothing removed them); live writers' stay."""
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.rsplit(".", 3)  # ".<name>", pid, random hex, "tmp"
        if len(parts) == 4 and parts[1].isdigit() and not _alive(int(parts[1])):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` of ``text``."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def load_torch_file(path: Path, what: str) -> object:
    """``torch.load(path, weights_only=True)`` of a file a user hands in (``what`` names its kind).

    Tensors and plain containers only: a file holding other Python objects, or one that is empty,
    truncated or no torch file at all, is a one-line :class:`DataError` naming it. The message
    never suggests ``weights_only=False``: flmm unpickles nothing that could run code.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch.load raises KeyError, IndexError... on junk)
        raise DataError(f"{what} {path} cannot be read: {_load_failure(err)}") from None


def _load_failure(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in flmm's words (torch's own message
    suggests running the file's code)."""
    if "Weights only load failed" in str(err):
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        kind = f" (such as {found.group(1)})" if found else ""
        return (
            f"it holds Python objects{kind} besides tensors, which flmm never unpickles; it was "
            "not written by flmm, or was changed since"
        )
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return f"it is empty, truncated or not a torch file ({first})"

"""Where flmm keeps what it generates, how it writes files that must not be left half-written, and
how it reads torch files a user hands in without letting them run code."""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock

from flmm.errors import DataError, FlmmUserError


def flmm_home() -> Path:
    """Home of the foundation models' cache and the generated synthetic world (``paths.home_dir``):
    ``$FLMM_HOME``, else the per-user cache folder (``$XDG_CACHE_HOME/flmm``, ``~/.cache/flmm``)."""
    if os.environ.get("FLMM_HOME"):
        return Path(os.environ["FLMM_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flmm"


def home_or(path: str | Path, option: str) -> str:
    """What points ``path`` elsewhere: ``FLMM_HOME`` when it lies in :func:`flmm_home`, else
    the config ``option`` (``paths.world_dir``...)."""
    return "FLMM_HOME" if Path(path).is_relative_to(flmm_home()) else option


def check_writable(path: str | Path, setting: str) -> None:
    """A :class:`FlmmUserError` naming ``setting`` (what points ``path`` elsewhere) unless
    ``path``, or the nearest folder above it that exists, is a folder this process may write
    in. Creates nothing."""
    path = Path(path).absolute()
    nearest = next(p for p in (path, *path.parents) if os.path.exists(p))
    if not nearest.is_dir():
        raise FlmmUserError(
            f"{_named(nearest)} is a file, not a folder: point {setting} at a folder"
        )
    if not os.access(nearest, os.W_OK):
        raise not_writable(nearest, setting)


def writable_folder(path: str | Path, setting: str) -> Path:
    """``path``, made if missing, after :func:`check_writable`."""
    check_writable(path, setting)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise not_writable(path, setting, err) from None
    return Path(path)


@contextmanager
def locked(path: str | Path, setting: str) -> Iterator[None]:
    """Hold the file lock ``<path>.lock`` (processes writing ``path`` take turns), in a
    :func:`writable_folder`."""
    writable_folder(Path(path).parent, setting)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire()
    except OSError as err:
        raise not_writable(lock.lock_file, setting, err) from None
    try:
        yield
    finally:
        lock.release()


def not_writable(path: str | Path, setting: str, err: OSError | None = None) -> FlmmUserError:
    """The error for a ``path`` that cannot be written, with ``setting`` as the way out."""
    read_only = err is None or isinstance(err, PermissionError) or err.errno == errno.EROFS
    why = "read-only" if read_only else err.strerror
    return FlmmUserError(f"cannot write to {path} ({why}): set {setting}=... to a writable folder")


def _named(path: Path) -> str:
    home = os.environ.get("FLMM_HOME")
    return f"FLMM_HOME={path}" if home and Path(home).absolute() == path else str(path)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place: a crash,
    or another process writing the same file, leaves the old file or a whole new one, never half
    of one (the temporary file is removed if ``write`` fails). The file gets the mode a plain
    ``open()`` gives (0644 under the usual umask), whatever mode ``write`` created it with, so
    that a shared folder stays readable to its group and others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """This process's umask, read from ``/proc/self/status`` where there is one: setting it to
    read it (``os.umask``) would give files other threads create meanwhile the mode 0666."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_orphans(folder: Path) -> None:
    """Remove the temporary files that :func:`write_atomic` writers killed outright left in
    ``folder`` (their process is gone, so nothing removed them); live writers' stay."""
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.rsplit(".", 3)  # ".<name>", pid, random hex, "tmp"
        if len(parts) == 4 and parts[1].isdigit() and not alive(int(parts[1])):
            tmp.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running."""
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

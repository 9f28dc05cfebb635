"""Where flmm keeps what it generates, and how it writes files that must not be left half-written."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def flmm_home() -> Path:
    """Home of the foundation models' cache and the generated synthetic world (``paths.home_dir``):
    ``$FLMM_HOME``, else the per-user cache folder (``$XDG_CACHE_HOME/flmm``, ``~/.cache/flmm``)."""
    if os.environ.get("FLMM_HOME"):
        return Path(os.environ["FLMM_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flmm"


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

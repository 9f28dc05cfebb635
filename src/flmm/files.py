"""Where flmm keeps what it generates, and how it writes files that must not be left half-written."""

from __future__ import annotations

import os
from pathlib import Path


def flmm_home() -> Path:
    """Home of the foundation models' cache and the generated synthetic world (``paths.home_dir``):
    ``$FLMM_HOME``, else the per-user cache folder (``$XDG_CACHE_HOME/flmm``, ``~/.cache/flmm``)."""
    if os.environ.get("FLMM_HOME"):
        return Path(os.environ["FLMM_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flmm"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place: a crash
    leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

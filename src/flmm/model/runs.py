"""Which training run a command takes when none is named: the newest that is not a debug run.

``flmm ground``, ``flmm predict``, ``flmm web``... (no ``--checkpoint``) and ``--checkpoint last``
/ ``checkpoint=last`` take a file of the newest run under ``logs/``. A debug run (composed with
``debug=...``, or with ``trainer.fast_dev_run`` or ``trainer.limit_train_batches`` set) is
skipped while a real run is there; the run taken is printed in one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

HYDRA_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"


def run_folder(path: Path) -> Path:
    """The run folder holding ``path`` (a file under ``<run>/model/`` or ``<run>/checkpoints/``):
    the nearest folder above it with Hydra's ``.hydra/``, else the parent of its folder."""
    for folder in Path(path).parents:
        if (folder / HYDRA_CONFIG).is_file():
            return folder
    return Path(path).parent.parent


def read_yaml(path: Path):
    """``path``'s YAML as plain data (interpolations left unresolved); None where it is missing
    or unreadable."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 (any unreadable record: the run is taken as a real one)
        return None


def debug_reason(run: Path) -> str | None:
    """Why ``run`` is a debug run (``debug=fdr``, ``trainer.fast_dev_run``...), from its
    ``.hydra/`` record; None for a real run or a folder without that record."""
    overrides = read_yaml(run / HYDRA_OVERRIDES)
    for override in overrides if isinstance(overrides, list) else []:
        if str(override).lstrip("+~").startswith("debug="):
            return str(override)
    config = read_yaml(run / HYDRA_CONFIG)
    trainer = config.get("trainer") if isinstance(config, dict) else None
    trainer = trainer if isinstance(trainer, dict) else {}
    for key in ("fast_dev_run", "limit_train_batches"):
        if trainer.get(key) not in (None, False, 1.0):
            return f"trainer.{key}={trainer[key]}"
    return None


def newest_real(found: list[Path], logs: Path) -> Path | None:
    """The newest of ``found`` (files of runs under ``logs``) outside debug runs, else the newest
    of all; prints the run taken and why in one line (stderr). None if ``found`` is empty."""
    if not found:
        return None
    ordered = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    reasons = {p: debug_reason(run_folder(p)) for p in ordered}
    real = [p for p in ordered if reasons[p] is None]
    taken = real[0] if real else ordered[0]
    skipped = len({run_folder(p) for p in ordered if reasons[p] is not None})
    if real:
        why = f"skipped {skipped} debug run(s)" if skipped else "no debug runs there"
    else:
        why = f"only debug runs there ({reasons[taken]})"
    print(f"run: {run_folder(taken)} (the newest under {logs}; {why})", file=sys.stderr)
    return taken

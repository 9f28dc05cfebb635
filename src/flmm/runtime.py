"""What the Hydra entry points share: the config location, trainer assembly, reports, user errors."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from flmm.errors import FlmmUserError

log = logging.getLogger(__name__)

CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")

# Errors caused by the user's input (paths, configs, checkpoints): reported as one message.
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


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a callbacks/logger group."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(c)
        for c in group.values()
        if isinstance(c, DictConfig) and "_target_" in c
    ]


def build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def checkpoint_report(trainer: L.Trainer, model) -> None:
    """Log trainable vs frozen parameters and the size of the checkpoints written."""
    counts = model.parameter_counts()
    callback = trainer.checkpoint_callback
    paths = {
        p
        for p in (
            getattr(callback, "best_model_path", ""),
            getattr(callback, "last_model_path", ""),
        )
        if p
    }
    sizes = {Path(p).name: Path(p).stat().st_size / 2**20 for p in paths if Path(p).exists()}
    log.info(
        "trainable parameters %s, frozen %s; checkpoints: %s",
        f"{counts['trainable']:,}",
        f"{counts['frozen']:,}",
        ", ".join(f"{n} {mb:.2f} MiB" for n, mb in sorted(sizes.items())) or "none written",
    )
    if trainer.logger is not None and sizes:
        trainer.logger.log_metrics({"checkpoint_mib": max(sizes.values())})


def write_metrics(metrics: dict, output_dir: str) -> dict[str, float]:
    """Write ``metrics.json`` in the run folder and print the figures as a table."""
    values = {
        k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in sorted(metrics.items())
    }
    out = Path(output_dir) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(values, indent=2))
    table = Table(title=f"flmm metrics ({out})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in values.items():
        table.add_row(k, f"{v:.4f}")
    Console(stderr=True).print(table)
    return values


def write_records(records: list[dict], output_dir: str) -> Path:
    """Write per-phrase test records (IoUs and tags) as ``test_phrases.jsonl`` in the run folder."""
    out = Path(output_dir) / "test_phrases.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out

"""A run's folder: the checkpoint a training run resumes from (checked before anything loads), and
the files a run leaves there (``metrics.json``, ``test_phrases.jsonl``, the checkpoint report)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from flmm.errors import ConfigError
from flmm.files import write_text_atomic
from flmm.model.checkpoint import LAST, check_family, read_checkpoint, resumable_last

log = logging.getLogger(__name__)


def checkpoint_folder(cfg: DictConfig) -> Path:
    """Where this run's checkpoints go."""
    callback = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    return Path(callback.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints")


def check_fresh_folder(cfg: DictConfig) -> None:
    """A run that does not resume must not write beside an earlier run's checkpoints: Lightning
    would name its own ``last-v1.ckpt`` and leave the earlier ``last.ckpt`` looking current."""
    folder = checkpoint_folder(cfg)
    earlier = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    if earlier:
        raise ConfigError(
            f"{folder} already holds an earlier run's checkpoints ({', '.join(earlier[:3])}"
            f"{', ...' if len(earlier) > 3 else ''}); pass a new output_dir=, or checkpoint=last "
            "to resume that run"
        )


def resolve_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint ``fit`` resumes from (``cfg.checkpoint``), checked before anything loads.

    ``last`` is this run folder's ``last.ckpt`` if one was written; a fresh run starts from
    scratch, so a requeued job can always pass it. The checkpoint must load and be made for the
    configured LMM family and grid (read from its metadata, before the LMM loads). A run that
    starts from scratch needs a checkpoint folder without earlier checkpoints.
    """
    checkpoint = cfg.get("checkpoint")
    if not checkpoint:
        check_fresh_folder(cfg)
        return None
    if checkpoint == "last":
        folder = checkpoint_folder(cfg)
        last = resumable_last(folder)
        if last is None:
            log.info("checkpoint=last: no %s yet, training from the start", folder / LAST)
            return None
        log.info("resuming from %s", last)
        checkpoint = str(last)
    elif not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"checkpoint={checkpoint} does not exist; pass a .ckpt a training run wrote, or "
            "checkpoint=last with output_dir=<the interrupted run's folder> to resume it"
        )
    lmm = cfg.model.lmm
    check_family(
        read_checkpoint(checkpoint).get("flmm"), lmm.family, lmm.get("grid_size"), checkpoint
    )
    return str(checkpoint)


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
    write_text_atomic(out, json.dumps(values, indent=2))
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

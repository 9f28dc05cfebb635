"""What the Hydra entry points share: the config location, trainer assembly, reports, user errors."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from flmm.data.distributed import LoaderPosition
from flmm.errors import ConfigError, MissingExtraError, exit_on_user_error
from flmm.extras import check_extras
from flmm.files import check_writable, flmm_home, write_text_atomic
from flmm.lmm import get_family, list_lmms
from flmm.model.checkpoint import (
    LAST,
    AtomicCheckpointIO,
    check_family,
    read_checkpoint,
    resumable_last,
)
from flmm.training.stopping import CheckpointOnSigterm
from flmm.training.wandb_files import keep_in_run_folder

log = logging.getLogger(__name__)

CONFIG_PATH = str(Path(__file__).resolve().parent / "conf")
# the primary configs search conf/ of the folder a run starts in (conf/local/default.yaml: a
# user's paths); most folders have none, which is no reason to warn on every run
warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=conf is not")


def register_tiny_configs() -> None:
    """``model=<family>_tiny`` for every family of the registry: the template
    ``model/random_tiny.yaml`` with the family (and its tiny grid) filled in, so a new family
    needs its registry row, its tiny builder and its real-model config, nothing more."""
    store = ConfigStore.instance()
    for family in list_lmms():
        lmm = {"family": family, "grid_size": get_family(family).tiny_grid_size}
        node = {"defaults": ["random_tiny", "_self_"], "lmm": lmm}
        store.store(group="model", name=f"{family}_tiny", node=node)


register_tiny_configs()


def run_name(task_name: str, overrides: str) -> str:
    """A run's name: the task and its command line's overrides, e.g.
    ``train:data=refcoco,model=llava`` (``${flmm.run_name:${task_name},${hydra:job.override_dirname}}``)."""
    return f"{task_name}:{overrides}" if overrides else task_name


OmegaConf.register_new_resolver("flmm.run_name", run_name, replace=True)


OmegaConf.register_new_resolver("flmm.home", lambda: str(flmm_home()), replace=True)

# options spelled as in an earlier version or for another kind of command -> what to write here
RESPELLED = {
    "ckpt_path": "checkpoint=PATH",
    "save_to": "output=PATH",
    "device": "trainer.accelerator=cpu|gpu (or trainer=gpu)",
    "dtype": "model.lmm.dtype=NAME",
}


def check_spellings(config_name: str, overrides: list[str]) -> None:
    """A :class:`ConfigError` naming the spelling to use for an override of an option this
    command does not have but :data:`RESPELLED` knows (Hydra's own message would only say it
    cannot override it)."""
    options = OmegaConf.load(Path(CONFIG_PATH) / f"{config_name}.yaml")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" in override and key in RESPELLED and key not in options:
            raise ConfigError(f"{key}= is not an option of this command: use {RESPELLED[key]}")


def hydra_entry(config_name: str) -> Callable:
    """``@hydra.main`` with the package's config ``config_name``, after
    :func:`check_spellings` and :func:`flmm.extras.check_extras` of the command line."""

    def decorate(task: Callable) -> Callable:
        run = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)

        @functools.wraps(task)
        def main():
            exit_on_user_error(check_spellings, config_name, sys.argv[1:])
            exit_on_user_error(check_extras, sys.argv[1:])
            return run()

        return main

    return decorate


class WritableRunFolder(Callback):
    """Hydra callback (conf/hydra/default.yaml): before Hydra makes the run folder, one line and
    exit code 2 if it cannot be written (a file in its way, a read-only folder), instead of
    Hydra's traceback from deep in its own code."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        exit_on_user_error(check_writable, config.hydra.run.dir, "output_dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        exit_on_user_error(check_writable, config.hydra.sweep.dir, "hydra.sweep.dir")


# config entries whose ``_target_`` needs an optional dependency: (module, extra, what needs it)
EXTRAS = {"WandbLogger": ("wandb", "wandb", "logger=wandb")}


def require_extras(group: DictConfig) -> None:
    """Raise :class:`MissingExtraError` for an entry whose optional dependency is missing."""
    for entry in group.values():
        target = str(entry.get("_target_", "")) if isinstance(entry, DictConfig) else ""
        module, extra, purpose = EXTRAS.get(target.rsplit(".", 1)[-1], (None, None, None))
        if module and importlib.util.find_spec(module) is None:
            raise MissingExtraError(module, extra, purpose)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a callbacks/logger group."""
    if not group:
        return []
    require_extras(group)
    return [
        hydra.utils.instantiate(c)
        for c in group.values()
        if isinstance(c, DictConfig) and "_target_" in c
    ]


def sweep_job() -> tuple[str, int, list[str]] | None:
    """``(sweep folder, job number, overrides)`` of this Hydra multirun job; None outside one."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return str(hc.sweep.dir), int(hc.job.num), list(hc.overrides.task)


def group_sweep_runs(cfg: DictConfig) -> None:
    """In a multirun, W&B runs share a group (task + sweep folder) and carry their overrides as
    tags, so one sweep is one group in the W&B UI, each run labelled by what it changed."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    job = sweep_job()
    if wandb is None or job is None:
        return
    sweep_dir, num, overrides = job
    with open_dict(wandb):
        wandb.group = wandb.get("group") or f"{cfg.task_name}-{Path(sweep_dir).name}"
        wandb.name = f"{cfg.task_name}-{num}"
        # W&B rejects tags longer than 64 characters
        wandb.tags = [str(t)[:64] for t in [*(wandb.get("tags") or []), *overrides]]


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """Instantiate ``cfg.trainer`` with the configured callbacks and loggers."""
    group_sweep_runs(cfg)
    callbacks = [*instantiate_group(cfg.get("callbacks")), LoaderPosition(), CheckpointOnSigterm()]
    if (cfg.get("logger") or {}).get("wandb") is not None:
        keep_in_run_folder(cfg.paths.output_dir)
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # logger=none: a learning-rate monitor has nowhere to write (Lightning raises)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    log_config(loggers, cfg)
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )


def log_config(loggers: list, cfg: DictConfig) -> None:
    """Log the resolved config (less Hydra's own node) as every logger's hyperparameters: the W&B
    run's config, the CSV logger's ``hparams.yaml``."""
    config = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    for logger in loggers:
        logger.log_hyperparams(config)


def finish_loggers(trainer: L.Trainer) -> None:
    """End this run's W&B run, so the next job of a multirun in this process starts its own
    (Lightning's WandbLogger otherwise reuses the run still open)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()


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


def gather_records(records: list) -> list:
    """Every rank's records (rank order) under DDP; ``records`` unchanged in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    parts: list[list | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, records)
    return [r for part in parts for r in part]

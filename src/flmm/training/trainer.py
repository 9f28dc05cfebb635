"""The Lightning trainer of a run, assembled from its config: the configured callbacks and loggers
(each optional dependency checked first), the callbacks every run has, and the multirun's W&B group."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from flmm.data.distributed import LoaderPosition
from flmm.errors import MissingExtraError
from flmm.model.checkpoint import AtomicCheckpointIO
from flmm.training.stopping import CheckpointOnSigterm
from flmm.training.wandb_files import keep_in_run_folder

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

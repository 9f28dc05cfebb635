"""`python -m flmm.train [overrides]`: instantiate data, model, callbacks, loggers and trainer; fit; test.

With no overrides it runs the embedded synthetic world (see conf/train.yaml).
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
from omegaconf import DictConfig

from flmm.config_checks import check_numbers
from flmm.data.distributed import gather_records
from flmm.entry import hydra_entry
from flmm.errors import exit_on_user_error
from flmm.model.pretrained import save_run_head
from flmm.training.run_folder import (
    checkpoint_report,
    resolve_checkpoint,
    write_metrics,
    write_records,
)
from flmm.training.stopping import sigterm_exit_status
from flmm.training.trainer import build_trainer, finish_loggers

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test F-LMM as configured; returns the final metrics."""
    check_numbers(cfg)
    resume = resolve_checkpoint(cfg) if cfg.train else None
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    # the frozen-feature cache (data.cache_dir=...) is one of the model's settings
    model = hydra.utils.instantiate(cfg.model, cache_dir=getattr(datamodule, "cache_dir", None))
    trainer = build_trainer(cfg)
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
        checkpoint_report(trainer, model.model)
    metrics = dict(trainer.callback_metrics)
    records = []
    if cfg.test:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if cfg.train else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update(trainer.callback_metrics)
        records = gather_records(model.test_records)
    finish_loggers(trainer)
    if not trainer.is_global_zero:  # metrics are synced; rank 0 writes the run folder's files
        return {k: float(v) for k, v in metrics.items()}
    if cfg.test:
        write_records(records, cfg.paths.output_dir)
    if cfg.train:
        save_run_head(cfg, trainer, model, metrics)
    return write_metrics(metrics, cfg.paths.output_dir)


@hydra_entry("train")
def main(cfg: DictConfig) -> float | None:
    with sigterm_exit_status(f"checkpoint=last output_dir={cfg.paths.output_dir}"):
        metrics = exit_on_user_error(train, cfg)
    # what a sweeper (hparams_search=...) optimises; NaN if the run logged no such metric
    return metrics.get(cfg.get("optimized_metric") or "val/giou", float("nan"))


if __name__ == "__main__":
    main()

"""`flmm evaluate checkpoint=... [overrides]`: score a trained F-LMM on every split.

Instantiates the data and the frozen LMM + SAM, loads the checkpoint through
:func:`flmm.model.load`, then runs one ``trainer.test`` per (split, protocol) of the
dataset's evaluation sets: ``reference`` (first sentence per object, an image's objects in one
sequence) and ``per_sentence`` (every sentence on its own); PNG has only ``reference`` (a
narrative's segments in one sequence). Coarse (mask head) and refined (SAM) masks are both
scored. Writes ``evaluation.json`` (every figure, the skipped records, the settings) and
``metrics.json`` in the run folder, prints tables shaped like the paper's, and with
``logger=wandb`` logs the tables. ``overlays/`` holds a picture of a few samples per set (and W&B
the same images, masks toggled per phrase). See conf/evaluate.yaml.
``checkpoint`` may name a head folder (``<run>/model``, :mod:`flmm.model.pretrained`): its LMM
and SAM are loaded from its config.json, and the scores are added to its config.json and card.

Nothing finished is lost: each set's scores are written to ``splits/<dataset>__<split>__<protocol>
.json`` as soon as it is done, and a rerun in the same folder (``output_dir=<that folder>``)
with the same checkpoint, data and model skips the sets already scored. Before any model loads, a
pre-flight pass reads every sample of the sets to score (``preflight=false`` turns it off).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from rich.console import Console
from rich.progress import track

from flmm.config_checks import check_numbers
from flmm.data.datamodule import EvalSet
from flmm.entry import hydra_entry
from flmm.errors import USER_ERRORS, ConfigError, DataError, FlmmUserError, exit_on_user_error
from flmm.evaluation_tables import STAGES, flat_figures, png_table, refer_tables
from flmm.files import write_text_atomic
from flmm.lmm.loading import HOW
from flmm.model.checkpoint import check_family, newest_last, read_checkpoint
from flmm.model.loader import WEIGHTS, load_source
from flmm.model.module import FLMM
from flmm.model.pretrained import add_scores
from flmm.overlay import overlay_panel
from flmm.training.callbacks import log_overlays, sample_masks, wandb_logger
from flmm.training.run_folder import write_metrics
from flmm.training.stopping import sigterm_exit_status
from flmm.training.trainer import build_trainer
from flmm.types import GroundingBatch

log = logging.getLogger(__name__)

PROTOCOLS = ("reference", "per_sentence")


def load_model(cfg: DictConfig) -> FLMM:
    """The frozen LMM and SAM of ``cfg.model`` with the trained state of ``cfg.checkpoint``; for
    a head folder, the LMM and SAM its config.json names (:func:`flmm.model.load`)."""
    check_checkpoint(cfg)
    if Path(cfg.checkpoint).is_dir():
        log.info("checkpoint is a head folder: LMM and SAM from its config.json, not model=...")
        # how to load it (quantization, placement; trust_remote_code) from the user's config only
        options = {k: cfg.model.lmm[k] for k in HOW if cfg.model.lmm.get(k) is not None}
        loaded = load_source(cfg.checkpoint, **options)
    else:
        saved = read_checkpoint(cfg.checkpoint).get("flmm")
        check_family(saved, cfg.model.lmm.family, cfg.model.lmm.get("grid_size"), cfg.checkpoint)
        sam = hydra.utils.instantiate(cfg.model.sam)
        lmm = hydra.utils.instantiate(cfg.model.lmm)
        loaded = load_source(str(cfg.checkpoint), lmm=lmm, sam=sam)
    return FLMM(loaded.model, **loaded.hyper_parameters)


def resolve_last(cfg: DictConfig) -> None:
    """``checkpoint=last``: the ``last.ckpt`` written most recently under ``paths.log_dir`` (the
    newest training run's), put in the config so that the results record the file."""
    if cfg.get("checkpoint") == "last":
        with open_dict(cfg):
            cfg.checkpoint = str(newest_last(Path(cfg.paths.log_dir)))
        log.info("checkpoint=last: %s", cfg.checkpoint)


def check_checkpoint(cfg: DictConfig) -> None:
    """A clear error when ``cfg.checkpoint`` is unset or names no file."""
    if not cfg.get("checkpoint"):
        raise FlmmUserError(
            "no checkpoint to evaluate: pass checkpoint=<run>/checkpoints/<name>.ckpt "
            "(written by `flmm train`), or checkpoint=last (the newest run's last.ckpt)"
        )
    if not Path(cfg.checkpoint).exists():
        raise FileNotFoundError(
            f"F-LMM checkpoint not found: {cfg.checkpoint}; pass the .ckpt or the head folder a "
            "training run wrote (checkpoint=logs/train/runs/<time>/checkpoints/last.ckpt or "
            "checkpoint=logs/train/runs/<time>/model)"
        )


def split_metrics(callback_metrics: dict) -> dict[str, dict[str, float]]:
    """One test run's ``test/<metric>`` and ``test/coarse_<metric>`` as ``{stage: {metric: v}}``."""
    scores: dict[str, dict[str, float]] = {stage: {} for stage in STAGES}
    for key, value in callback_metrics.items():
        if not key.startswith("test/") or key == "test/loss":
            continue
        name = key[len("test/") :]
        stage = "coarse" if name.startswith("coarse_") else "refined"
        scores[stage][name.removeprefix("coarse_")] = float(value)
    return scores


class _EvalData(L.LightningDataModule):
    """One evaluation set; its loader is built inside ``trainer.test``, once DDP has started, so
    that each process scores its own shard."""

    def __init__(self, datamodule, eval_set: EvalSet) -> None:
        super().__init__()
        self.source, self.eval_set = datamodule, eval_set

    def test_dataloader(self):
        return self.source.loader(self.eval_set.data)


def evaluate_set(trainer: L.Trainer, model: FLMM, datamodule, eval_set: EvalSet) -> dict:
    """Test ``model`` on one evaluation set; its scores per stage and the phrases scored."""
    log.info("evaluating %s %s (%s)", eval_set.dataset_name, eval_set.split, eval_set.protocol)
    trainer.test(model, datamodule=_EvalData(datamodule, eval_set), verbose=False)
    scores = split_metrics(trainer.callback_metrics)
    phrases = torch.tensor(float(len(model.test_records)), device=model.device)
    scores["phrases"] = int(trainer.strategy.reduce(phrases, reduce_op="sum"))
    scores["samples"] = len(eval_set.data)
    return scores


@torch.no_grad()
def overlay_rows(model: FLMM, eval_set: EvalSet, n: int) -> list[tuple]:
    """:func:`~flmm.training.callbacks.sample_masks` rows (image, phrases, target / coarse /
    refined masks) of the first ``n`` samples of distinct images (``per_sentence`` lists an image
    once per sentence)."""
    samples, seen = [], set()
    for i in range(len(eval_set.data)):
        if len(samples) == n:
            break
        sample = eval_set.data[i]
        image_id = sample.meta.get("image_id", i)
        if image_id not in seen:
            seen.add(image_id)
            samples.append(sample)
    if not samples:
        return []
    batch = GroundingBatch.collate(samples).to(model.device)
    pred = model(batch)
    return [sample_masks(batch, pred, b) for b in range(len(batch))]


def save_overlays(cfg: DictConfig, trainer: L.Trainer, model: FLMM, es: EvalSet) -> None:
    """``overlays/<dataset>/<split>/<protocol>.png`` in the run folder (image | target | coarse |
    refined, as a training run's), and with ``logger=wandb`` the same samples as W&B images."""
    rows = overlay_rows(model, es, cfg.overlays) if cfg.overlays else []
    if not rows:
        return
    out = Path(cfg.paths.output_dir) / "overlays" / f"{set_key(es)}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay_panel(rows)).save(out)
    wandb = wandb_logger(trainer)
    if wandb is not None:
        log_overlays(wandb, f"overlays/{set_key(es)}", rows)


def report(results: dict, skipped: dict, cfg: DictConfig) -> dict[str, float]:
    """Write ``evaluation.json`` and ``metrics.json``; print the tables and the skipped records."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": str(cfg.checkpoint), "protocols": list(cfg.protocols)}
    settings["model"] = OmegaConf.to_container(cfg.model, resolve=True)
    document = {"results": results, "skipped": skipped, "settings": settings}
    write_text_atomic(out / "evaluation.json", json.dumps(document, indent=2))
    figures = write_metrics(flat_figures(results), str(out))
    tables = [refer_tables(results, m) for m in ("ciou", "giou")] if _has_refer(results) else []
    tables += [png_table(results)] if "png" in results else []
    console = Console(width=200)
    for table in tables:
        console.print(table)
    for key, reasons in skipped.items():
        console.print(f"skipped in {key}: " + ", ".join(f"{r} {n}" for r, n in reasons.items()))
    log.info("evaluation written to %s", out / "evaluation.json")
    return figures


def _has_refer(results: dict) -> bool:
    return any(name != "png" for name in results)


def log_to_wandb(wandb: WandbLogger, results: dict) -> None:
    """Every figure as one W&B table (dataset, split, protocol, masks, metric, value)."""
    rows = [key.split("/", 4) + [value] for key, value in flat_figures(results).items()]
    columns = ["dataset", "split", "protocol", "masks", "metric", "value"]
    wandb.log_table(key="evaluation", columns=columns, data=rows)


def select_eval_sets(datamodule, protocols: list[str]) -> list[EvalSet]:
    """The datamodule's evaluation sets under ``protocols``; a clear error for none or a typo."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ConfigError(f"unknown protocols {unknown}: choose from protocols={list(PROTOCOLS)}")
    eval_sets = datamodule.eval_sets(protocols)
    if not eval_sets:
        raise FlmmUserError(
            f"no evaluation set: protocols {protocols} x splits {datamodule.eval_splits} "
            f"(this dataset defines {list(datamodule.eval_protocols)}); set protocols=[...] "
            "and data.eval_splits=[...]"
        )
    return eval_sets


def set_key(es: EvalSet) -> str:
    return f"{es.dataset_name}/{es.split}/{es.protocol}"


def settings_fingerprint(cfg: DictConfig) -> str:
    """What a finished set's scores depend on: the checkpoint file, the data and the model."""
    weights = Path(cfg.checkpoint)
    weights = weights / WEIGHTS if weights.is_dir() else weights  # a folder's card changes
    stat = weights.stat()
    settings = {
        "ckpt": [str(weights.resolve()), stat.st_size, stat.st_mtime_ns],
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class FinishedSets:
    """Each scored set saved as ``<out>/splits/<dataset>__<split>__<protocol>.json`` (atomically),
    and read back on a rerun with the same settings."""

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = out / "splits", fingerprint

    def path(self, es: EvalSet) -> Path:
        return self.folder / (set_key(es).replace("/", "__") + ".json")

    def load(self, es: EvalSet) -> dict | None:
        """``{"scores", "skipped"}`` of a set scored with these settings; None otherwise."""
        try:
            saved = json.loads(self.path(es).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return saved if saved.get("fingerprint") == self.fingerprint else None

    def save(self, es: EvalSet, scores: dict, skipped: dict) -> None:
        saved = {"fingerprint": self.fingerprint, "scores": scores, "skipped": skipped}
        write_text_atomic(self.path(es), json.dumps(saved, indent=2))
        log.info(
            "%s scored; saved to %s (a rerun in this folder skips it)", set_key(es), self.path(es)
        )


def preflight(eval_sets: list[EvalSet]) -> None:
    """Read every sample of each split once (the first protocol's set), before any model loads;
    one :class:`DataError` listing how many are broken and the first of them."""
    broken, total, console = [], 0, Console(stderr=True)
    first_per_split: dict[tuple[str, str], EvalSet] = {}
    for es in eval_sets:
        first_per_split.setdefault((es.dataset_name, es.split), es)
    for es in first_per_split.values():
        for i in track(range(len(es.data)), f"pre-flight {set_key(es)}", console=console):
            total += 1
            try:
                es.data[i]
            except USER_ERRORS as err:
                broken.append(f"{es.dataset_name}/{es.split}: {err}")
    if broken:
        raise DataError(
            f"pre-flight: {len(broken)} of {total} samples cannot be read; first: {broken[0]}; "
            "fix or remove them (or set preflight=false to score up to the first broken one)"
        )
    log.info("pre-flight: all %d samples of %d sets read", total, len(eval_sets))


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score ``cfg.checkpoint`` on every evaluation set of ``cfg.data``; returns the figures."""
    check_numbers(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_eval()
    eval_sets = select_eval_sets(datamodule, list(cfg.protocols))
    resolve_last(cfg)
    check_checkpoint(cfg)
    finished = FinishedSets(Path(cfg.paths.output_dir), settings_fingerprint(cfg))
    done = {set_key(es): finished.load(es) for es in eval_sets}
    todo = [es for es in eval_sets if done[set_key(es)] is None]
    if todo and cfg.get("preflight", True):
        preflight(todo)
    trainer = build_trainer(cfg)
    model = load_model(cfg) if todo else None
    for es in todo:
        done[set_key(es)] = score_set(cfg, trainer, model, datamodule, es, finished)
    results, skipped = nested(eval_sets, done)
    wandb = wandb_logger(trainer)
    if wandb is not None and trainer.is_global_zero:
        log_to_wandb(wandb, results)
    if trainer.is_global_zero and Path(cfg.checkpoint).is_dir():
        add_scores(Path(cfg.checkpoint), folder_scores(results))
    return report(results, skipped, cfg) if trainer.is_global_zero else flat_figures(results)


def folder_scores(results: dict) -> dict[str, dict[str, float]]:
    """``{dataset/split/protocol: {giou, ciou, coarse_giou...}}`` for a head folder's card."""
    return {
        f"{name}/{split}/{protocol}": {
            **scores["refined"],
            **{f"coarse_{k}": v for k, v in scores["coarse"].items()},
        }
        for name, splits in results.items()
        for split, protocols in splits.items()
        for protocol, scores in protocols.items()
    }


def nested(eval_sets: list[EvalSet], done: dict[str, dict]) -> tuple[dict, dict]:
    """``{dataset: {split: {protocol: scores}}}`` and ``{set key: skipped reasons}``."""
    results: dict = {}
    for es in eval_sets:
        by_split = results.setdefault(es.dataset_name, {}).setdefault(es.split, {})
        by_split[es.protocol] = done[set_key(es)]["scores"]
    return results, {key: d["skipped"] for key, d in done.items() if d["skipped"]}


def score_set(cfg, trainer: L.Trainer, model: FLMM, datamodule, es: EvalSet, finished) -> dict:
    """Score one set, save it (rank 0), log its figures (keyed by dataset/split/protocol)."""
    scores = evaluate_set(trainer, model, datamodule, es)
    skipped = dict(es.skipped)
    if not trainer.is_global_zero:
        return {"scores": scores, "skipped": skipped}
    finished.save(es, scores, skipped)
    figures = flat_figures({es.dataset_name: {es.split: {es.protocol: scores}}})
    for logger in trainer.loggers:
        logger.log_metrics(figures)
        logger.save()
    save_overlays(cfg, trainer, model, es)
    return {"scores": scores, "skipped": skipped}


@hydra_entry("evaluate")
def main(cfg: DictConfig) -> None:
    with sigterm_exit_status(f"output_dir={cfg.paths.output_dir} (the sets scored are kept)"):
        exit_on_user_error(evaluate, cfg)


if __name__ == "__main__":
    main()

"""Trained heads as model folders: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

A head folder holds ``model.safetensors`` (the trainable weights only, exactly what a training
checkpoint holds), ``config.json`` (the LMM and SAM it was made for, the head's settings, how it
was trained and its scores) and ``README.md`` (the model card, :mod:`flmm.model.card`). Loading
builds the LMM and SAM the config names (each overridable) and checks them against the recorded
metadata like a checkpoint is checked. Paths inside the flmm package (the shipped tiny LLaVA and
tiny SAM) are recorded as ``flmm:<path in the package>``, so they resolve on any machine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub import ModelCard, ModelHubMixin
from safetensors.torch import save_file
from torch import nn

from flmm.errors import FlmmUserError
from flmm.files import write_atomic, write_text_atomic
from flmm.lmm import FrozenLMM
from flmm.lmm.loading import DTYPES
from flmm.model.card import render_card
from flmm.model.checkpoint import flmm_version, portable, sam_source
from flmm.model.loader import (
    CARD,
    CONFIG,
    FORMAT,
    WEIGHTS,
    load_source,
    portable_metadata,
    restore,
)
from flmm.model.module import FLMM, HYPER_PARAMETERS

log = logging.getLogger(__name__)

TEST_METRICS = ("giou", "ciou", "coarse_giou", "coarse_ciou", "loss")


def head_config(module: FLMM, training: dict | None = None, scores: dict | None = None) -> dict:
    """What ``config.json`` records about ``module`` (the LMM and SAM its model fits, its heads,
    its optimizer's settings)."""
    model = module.model
    lmm, sam = model.lmm, model.refiner.sam
    source = sam_source(sam)
    return {
        "format": FORMAT,
        "flmm_version": flmm_version(),
        "lmm": {
            "id": portable(lmm.model_id),
            # the hub commit it was loaded from (None: a local folder); loading uses it
            "revision": lmm.revision,
            "family": lmm.family.name,
            "dtype": next(k for k, v in DTYPES.items() if v == lmm.model.dtype),
            "grid_size": lmm.grid[0],
            "text_layers": lmm.num_text_layers,
            "merge": lmm.merge,
            "instruction": lmm.instruction,
            # facts for the reader and the loader's message; loading never applies them
            "remote_code": lmm.trust_remote_code,
            "quantization": lmm.quantization,
        },
        "sam": {
            "variant": source["variant"],
            "checkpoint": source["checkpoint"],
            "file_name": source["checkpoint"] and Path(source["checkpoint"]).name,
        },
        "mask_head": {
            "base_channels": model.mask_head.base_channels,
            "target_size": model.mask_head.target_size,
        },
        "hyper_parameters": {k: module.hparams[k] for k in HYPER_PARAMETERS},
        "metadata": portable_metadata(lmm, sam),
        "parameters": model.parameter_counts()["trainable"],
        "training": training,
        "scores": scores or {},
    }


class FLMMHead(
    ModelHubMixin,
    library_name="flmm",
    license="apache-2.0",
    repo_url="https://github.com/wusize/F-LMM",
    paper_url="https://arxiv.org/abs/2406.05821",
    tags=["flmm", "referring-segmentation"],
):
    """A trained F-LMM (``model``: an :class:`~flmm.model.network.FLMMModel`, or the
    :class:`FLMM` training it) and its folder's ``config`` (see :func:`head_config`).

    ``FLMMHead(module, head_config(module)).save_pretrained(dir)`` writes a folder;
    :meth:`from_pretrained` loads one with the LMM and SAM its config names
    (:func:`flmm.model.load`).
    """

    def __init__(self, model, config: dict) -> None:
        self.model, self.config = model, config

    def _save_pretrained(self, save_directory: Path) -> None:
        state = {
            k: v.detach().cpu().contiguous() for k, v in self.model.trainable_state_dict().items()
        }
        # atomically, and readable to colleagues (safetensors alone writes 0600)
        write_atomic(
            save_directory / WEIGHTS,
            lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}),
        )
        write_folder_text(save_directory, self.config)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return ModelCard(render_card(self.config))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        lmm: FrozenLMM | str | None = None,
        sam: nn.Module | str | None = None,
        device: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        lmm_revision: str | None = None,
        **lmm_kwargs,
    ) -> FLMMHead:
        """Load a head folder or hub id with the LMM and SAM its ``config.json`` names.

        Args:
            lmm, sam: replace the recorded LMM (a :class:`FrozenLMM`, a hub id or a folder) and
                SAM (a SAM module or a checkpoint file).
            device: where the head (and an LMM loaded without ``device_map``) goes; None: where
                the LMM was loaded (the CPU unless ``device_map`` or bitsandbytes placed it).
            revision, force_download: select the HEAD's files on the hub.
            cache_dir, local_files_only, token: apply to the head's files and the LMM's alike.
            lmm_revision: the LMM's hub revision; None: the one the folder records (for the LMM
                it records; another ``lmm`` loads its default branch).
            lmm_kwargs: replace recorded LMM settings or add loading options of
                :meth:`FrozenLMM.from_pretrained` (``dtype``, ``device_map``, ``quantization``,
                ``attn_implementation``, ``trust_remote_code``...).
        """
        loaded = load_source(
            pretrained_model_name_or_path,
            lmm=lmm,
            sam=sam,
            device=device,
            revision=revision,
            force_download=force_download,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            lmm_revision=lmm_revision,
            **lmm_kwargs,
        )
        if loaded.config is None:
            raise FlmmUserError(
                f"{pretrained_model_name_or_path} is a training checkpoint, not a head folder; "
                "load it with flmm.model.load"
            )
        return cls(loaded.model, loaded.config)


def write_folder_text(folder: Path, config: dict) -> None:
    """``config.json`` and the model card of ``config``, each written atomically."""
    write_text_atomic(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    write_text_atomic(folder / CARD, render_card(config))


def add_scores(folder: Path, scores: dict[str, dict[str, float]]) -> None:
    """Record ``flmm evaluate`` scores (``{set: {giou, coarse_giou...}}``) in a head folder's
    config.json and card."""
    config = json.loads((folder / CONFIG).read_text())
    config.setdefault("scores", {}).setdefault("evaluation", {}).update(scores)
    write_folder_text(folder, config)


# ------------------------------------------------------------------------ the training run's folder
def save_run_head(cfg, trainer, model: FLMM, metrics: dict) -> Path | None:
    """Write ``<run>/model``: the best checkpoint's weights, the run's settings and test scores."""
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
    if not best:
        log.info("no checkpoint written: no model folder")
        return None
    restore(model.model, best)
    run = Path(cfg.paths.output_dir)
    training = training_record(cfg, trainer, Path(best), run)
    config = head_config(model, training, {"test": split_scores(metrics, "test")})
    out = run / "model"
    FLMMHead(model, config).save_pretrained(out)
    log.info("model folder (weights, config.json, model card) written to %s", out)
    return out


def split_scores(metrics: dict, split: str) -> dict[str, float]:
    """``{giou, ciou, coarse_giou, coarse_ciou, loss}`` of ``split`` among logged metrics."""
    return {k: float(metrics[f"{split}/{k}"]) for k in TEST_METRICS if f"{split}/{k}" in metrics}


def training_record(cfg, trainer, best: Path, run: Path) -> dict:
    """How the head was trained: data, optimizer, schedule, and the frozen-LMM check."""
    datamodule = trainer.datamodule
    target = cfg.data["_target_"]
    check = run / "chat_check.json"
    return {
        "datamodule": target,
        "dataset": getattr(datamodule, "name", target.rsplit(".", 1)[-1]),
        "synthetic": "synthetic" in target.lower(),
        "train_samples": len(datamodule.train_set) if datamodule.train_set is not None else None,
        "batch_size": datamodule.batch_size * trainer.accumulate_grad_batches * trainer.world_size,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "precision": str(cfg.trainer.get("precision")),
        "seed": cfg.seed,
        "checkpoint": best.name,
        "monitor": getattr(trainer.checkpoint_callback, "monitor", None),
        "run": run.name,
        "frozen_lmm_check": frozen_check(check) if check.is_file() else None,
    }


def frozen_check(path: Path) -> dict:
    """The verdict of :class:`~flmm.training.callbacks.FrozenLMMCheck` (``chat_check.json``)."""
    report = json.loads(path.read_text())
    answers = report["before"]["answers"]
    return {
        "unchanged": report["unchanged"],
        "fingerprint": report["before"]["fingerprint"],
        "questions": len(report["questions"]),
        "images": len(answers),
    }

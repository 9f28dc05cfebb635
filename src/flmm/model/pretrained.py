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

from huggingface_hub import ModelCard, ModelHubMixin, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from flmm.errors import CheckpointMismatchError, DataError, FlmmUserError
from flmm.files import write_atomic, write_text_atomic
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.lmm.loading import DTYPES, HUB_ID, placed_dtype
from flmm.model.card import render_card
from flmm.model.checkpoint import (
    check_metadata,
    checkpoint_metadata,
    flmm_version,
    portable,
    read_checkpoint,
    resolve,
    sam_source,
)
from flmm.model.module import FLMM, HYPER_PARAMETERS

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FORMAT = 1  # bump when config.json changes meaning
TEST_METRICS = ("giou", "ciou", "coarse_giou", "coarse_ciou", "loss")
REQUIRED = ("lmm", "sam", "mask_head", "hyper_parameters", "metadata")  # config.json's sections
DAMAGED = "the head folder is damaged: copy it again, or write it anew with save_pretrained"
# the LMM settings a head folder's config.json may pass to FrozenLMM.from_pretrained (its
# "revision" only to the LMM it records)
RECORDED_SETTINGS = (
    "family",
    "dtype",
    "grid_size",
    "text_layers",
    "merge",
    "instruction",
    "revision",
)


def head_config(model: FLMM, training: dict | None = None, scores: dict | None = None) -> dict:
    """What ``config.json`` records about ``model`` (the LMM and SAM it fits, its heads)."""
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
        "hyper_parameters": {k: model.hparams[k] for k in HYPER_PARAMETERS},
        "metadata": portable_metadata(lmm, sam),
        "parameters": model.parameter_counts()["trainable"],
        "training": training,
        "scores": scores or {},
    }


def portable_metadata(lmm: FrozenLMM, sam: nn.Module) -> dict:
    """:func:`checkpoint_metadata` with the LMM id as :func:`portable` records it."""
    metadata = checkpoint_metadata(lmm, sam)
    return metadata | {"lmm_id": portable(metadata["lmm_id"])}


class FLMMHead(
    ModelHubMixin,
    library_name="flmm",
    license="apache-2.0",
    repo_url="https://github.com/wusize/F-LMM",
    paper_url="https://arxiv.org/abs/2406.05821",
    tags=["flmm", "referring-segmentation"],
):
    """A trained F-LMM (``model``) and its folder's ``config`` (see :func:`head_config`).

    ``FLMMHead(model, head_config(model)).save_pretrained(dir)`` writes a folder;
    :meth:`from_pretrained` loads one with the LMM and SAM its config names.
    """

    def __init__(self, model: FLMM, config: dict) -> None:
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
        shared = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
        folder = head_folder(
            str(pretrained_model_name_or_path),
            revision=revision,
            force_download=force_download,
            **shared,
        )
        config = read_config(folder)
        sam = sam if isinstance(sam, nn.Module) else load_sam(config["sam"], sam)
        if not isinstance(lmm, FrozenLMM):
            options = lmm_options(lmm_kwargs, shared, lmm_revision, device)
            lmm = load_lmm(config["lmm"], lmm, **options)
        try:
            check_metadata(config["metadata"], portable_metadata(lmm, sam))
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"head folder {folder}: {err}") from None
        model = FLMM.build(lmm, sam, **config["mask_head"], **config["hyper_parameters"])
        model.load_state_dict(read_weights(folder / WEIGHTS))
        return cls(model.eval().to(head_device(device, lmm)), config)


def lmm_options(options: dict, shared: dict, revision: str | None, device: str | None) -> dict:
    """The LMM's loading ``options`` with the hub options it ``shared`` with the head, its own
    ``revision`` if given, and a ``"auto"`` dtype resolved for ``device``."""
    options = shared | ({"revision": revision} if revision is not None else {}) | options
    if "dtype" in options:
        options["dtype"] = placed_dtype(options["dtype"], options.get("device_map"), device)
    return options


def head_device(device: str | None, lmm: FrozenLMM) -> str:
    """``device``, or (None) where the LMM was loaded: the CPU, or where ``device_map`` or a
    bitsandbytes quantization put it."""
    return device or str(lmm.device)


def head_folder(where: str, **hub) -> Path:
    """The local folder of a head: ``where`` itself, or the hub snapshot of the id ``where``."""
    looks_local = where.startswith(("/", ".", "~")) or not HUB_ID.match(where)
    folder = Path(where).expanduser()
    if folder.is_dir():
        return folder
    if looks_local:
        raise FileNotFoundError(
            f"F-LMM head folder not found: {where}; pass a folder written by training "
            "(<run>/model) or save_pretrained, or a hub id"
        )
    return Path(snapshot_download(where, **hub))


def read_config(folder: Path) -> dict:
    """The folder's ``config.json``, after checking it is an flmm head config of a format we read;
    a damaged file is a one-line :class:`DataError` naming it."""
    path = folder / CONFIG
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise FlmmUserError(
            f"{folder} is not an F-LMM head folder (it needs {CONFIG} and {WEIGHTS}); "
            "training writes one into <run>/model"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); {DAMAGED}") from None
    if not isinstance(config, dict):
        raise DataError(
            f"{path} holds a JSON {type(config).__name__}, not a head config; {DAMAGED}"
        )
    if config.get("format") != FORMAT:
        raise CheckpointMismatchError(
            f"{path} has format {config.get('format')!r}, this flmm reads {FORMAT}; "
            "load it with the flmm version that wrote it"
        )
    missing = [k for k in REQUIRED if not isinstance(config.get(k), dict)]
    if missing or "id" not in config["lmm"]:
        raise DataError(f"{path} lacks {missing or ['lmm.id']}; {DAMAGED}")
    return config


def read_weights(path: Path) -> dict:
    """The head's trainable tensors; a truncated or foreign file is a one-line :class:`DataError`."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise DataError(
            f"{path} is truncated or not a safetensors file ({err}); {DAMAGED}"
        ) from None


def load_sam(recorded: dict, checkpoint: str | None):
    """The recorded SAM variant, from ``checkpoint`` or the recorded checkpoint file."""
    path = checkpoint or (recorded["checkpoint"] and resolve(recorded["checkpoint"]))
    if recorded["variant"] is None or path is None:
        raise FlmmUserError("the head folder does not name its SAM; pass sam=<SAM checkpoint>")
    return build_sam(recorded["variant"], path)


def load_lmm(
    recorded: dict, name_or_path: str | None, trust_remote_code: bool = False, **overrides
) -> FrozenLMM:
    """The recorded LMM (or ``name_or_path``) with the recorded settings, ``overrides`` applied
    (loading options of :meth:`FrozenLMM.from_pretrained` among them).

    Only :data:`RECORDED_SETTINGS` are read from the folder: whether the LMM's own code may run
    comes from the caller's ``trust_remote_code`` alone, never from a downloaded file.
    """
    source = name_or_path or resolve(recorded["id"])
    if recorded.get("remote_code") and not trust_remote_code:
        raise FlmmUserError(
            f"the head folder's LMM {source!r} needs code shipped with its checkpoint, and flmm "
            "runs no code because a downloaded file asks: read that code, then pass "
            "trust_remote_code=True (--trust-remote-code, model.lmm.trust_remote_code=true)"
        )
    settings = {k: v for k, v in recorded.items() if k in RECORDED_SETTINGS}
    if name_or_path and name_or_path != resolve(recorded["id"]):
        settings.pop("revision", None)  # a revision of the recorded LMM's repository only
    settings |= overrides
    return FrozenLMM.from_pretrained(source, trust_remote_code=trust_remote_code, **settings)


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
    model.load_state_dict(read_checkpoint(best)["state_dict"])
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

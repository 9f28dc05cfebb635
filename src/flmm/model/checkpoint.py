"""Checkpoints hold only F-LMM's trainable state, plus metadata saying which LMM it was made for."""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

import flmm
from flmm.errors import CheckpointMismatchError, DataError, FlmmUserError
from flmm.files import flmm_home, load_torch_file, write_atomic
from flmm.heads.sam_build import built_from
from flmm.model.runs import newest_real

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(flmm.__file__).resolve().parent
LAST = "last.ckpt"  # the checkpoint a training run writes last, what ``last`` names

# Metadata fields that must match exactly: a head trained on other attention maps is meaningless.
SHAPE_KEYS = ("family", "channels", "grid", "hidden_size", "num_text_layers", "sam_prompt_dim")
NO_METADATA = (
    "checkpoint has no 'flmm' metadata: it was not written by flmm, so there is no way to "
    "tell which LMM it belongs to. Train it with `python -m flmm.train`."
)


def flmm_version() -> str:
    try:
        return version("flmm")
    except PackageNotFoundError:
        return "unknown"


def checkpoint_metadata(lmm, sam: nn.Module) -> dict:
    """What a checkpoint was made for: the LMM (id, hub commit, quantization and attention
    shapes) and SAM's prompt width."""
    return {
        "lmm_id": lmm.model_id,
        "lmm_revision": getattr(lmm, "revision", None),
        "lmm_quantization": getattr(lmm, "quantization", None),
        "family": lmm.family.name,
        "channels": int(lmm.channels),
        "grid": list(lmm.grid),
        "hidden_size": int(lmm.hidden_size),
        "num_text_layers": int(lmm.num_text_layers),
        "sam_prompt_dim": int(sam.prompt_encoder.embed_dim),
        "flmm_version": flmm_version(),
    }


def sam_source(sam: nn.Module) -> dict:
    """The SAM variant and checkpoint file (:func:`portable`) ``sam`` was built from (``None``
    when not recorded)."""
    source = built_from(sam)
    return source | {"checkpoint": source["checkpoint"] and portable(source["checkpoint"])}


def written_metadata(model) -> dict:
    """The ``flmm`` record a training checkpoint of ``model`` (an
    :class:`~flmm.model.network.FLMMModel`) holds: :func:`checkpoint_metadata`, the SAM it was
    built from and the mask head's settings."""
    sam = model.refiner.sam
    return checkpoint_metadata(model.lmm, sam) | {
        "sam": sam_source(sam),
        "mask_head": {
            "base_channels": model.mask_head.base_channels,
            "target_size": model.mask_head.target_size,
        },
    }


def portable(path: str) -> str:
    """``flmm:<relative path>`` for a file of the flmm package, anything else unchanged."""
    try:
        return f"flmm:{Path(path).resolve().relative_to(PACKAGE_DIR).as_posix()}"
    except ValueError:
        return str(path)


def resolve(ref: str) -> str:
    """A path or hub id from a recorded reference: ``flmm:`` paths in this package; a relative
    path that is not there from the working folder, under ``$FLMM_HOME``; hub ids unchanged."""
    if ref.startswith("flmm:"):
        return str(PACKAGE_DIR / ref.removeprefix("flmm:"))
    home = flmm_home() / ref
    return str(home) if not Path(ref).exists() and home.exists() else ref


def check_metadata(saved: dict | None, current: dict) -> None:
    """Raise :class:`CheckpointMismatchError` when a checkpoint was made for another LMM or SAM."""
    if saved is None:
        raise CheckpointMismatchError(NO_METADATA)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs configured {current[k]!r}"
        for k in SHAPE_KEYS
        if saved.get(k) != current[k]
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint was made for LMM {saved.get('lmm_id')!r} but the configured LMM is "
            f"{current['lmm_id']!r}, and their attention shapes differ ({'; '.join(diffs)}). "
            "Pick the matching model config (model=...) or retrain for this LMM."
        )
    if saved.get("lmm_id") != current["lmm_id"]:
        log.warning(
            "checkpoint was made for LMM %r, configured LMM is %r; their shapes match, so loading goes on",
            saved.get("lmm_id"),
            current["lmm_id"],
        )
    elif "lmm_revision" in saved and saved["lmm_revision"] != current.get("lmm_revision"):
        log.warning(
            "checkpoint was made for revision %r of LMM %r, loaded revision is %r; its attention "
            "may differ (pass lmm_revision / --lmm-revision / model.lmm.revision=%s to match)",
            saved["lmm_revision"],
            current["lmm_id"],
            current.get("lmm_revision"),
            saved["lmm_revision"],
        )


def load_trainable_state(modules: dict[str, nn.Module], state_dict: dict[str, torch.Tensor]):
    """Load ``state_dict`` (keys ``<module>.<param>``) strictly into the trainable ``modules``."""
    unknown = sorted({k.split(".", 1)[0] for k in state_dict} - set(modules))
    if unknown:
        raise CheckpointMismatchError(
            f"checkpoint holds state for unknown modules {unknown}; expected {sorted(modules)}"
        )
    for name, module in modules.items():
        prefix = f"{name}."
        part = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[:4]
            raise CheckpointMismatchError(
                f"checkpoint does not fit module {name!r}: {' '.join(first)}"
            ) from None
    return nn.modules.module._IncompatibleKeys([], [])


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` of an flmm checkpoint; an empty, truncated or foreign
    file is a one-line :class:`DataError` / :class:`CheckpointMismatchError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"F-LMM checkpoint not found: {path}")
    ckpt = load_torch_file(path, "F-LMM checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        kind = type(ckpt).__name__ if not isinstance(ckpt, dict) else "dict without a state_dict"
        raise CheckpointMismatchError(
            f"{path} holds a {kind}, not a checkpoint written by `python -m flmm.train`"
        )
    return ckpt


def check_family(saved: dict | None, family: str, grid_size: int | None, path: str) -> None:
    """Refuse a checkpoint made for another LMM family or attention grid, from its metadata alone
    (before the LMM loads: minutes for a 7B model). ``family="auto"`` is known only once the LMM
    loads: the family is not compared then (the mask head's channels still are, strictly)."""
    if saved is None:
        raise CheckpointMismatchError(NO_METADATA)
    wrong = []
    if family != "auto" and saved.get("family") != family:
        wrong.append(f"family: checkpoint {saved.get('family')!r} vs configured {family!r}")
    if grid_size is not None and saved.get("grid") != [grid_size, grid_size]:
        wrong.append(f"grid: checkpoint {saved.get('grid')} vs configured {grid_size}")
    if wrong:
        raise CheckpointMismatchError(
            f"checkpoint {path} was made for LMM {saved.get('lmm_id')!r} ({'; '.join(wrong)}); "
            "pick the matching model config (model=...) or retrain for this LMM"
        )


def newest_readable(folder: Path, skip: Path) -> Path | None:
    """The newest checkpoint in ``folder`` other than ``skip`` that loads; None if there is none."""
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if path.resolve() == skip.resolve():
            continue
        try:
            read_checkpoint(path)
        except (DataError, CheckpointMismatchError):
            continue
        return path
    return None


def resumable_last(folder: Path, option: str = "checkpoint=") -> Path | None:
    """``folder/last.ckpt``, checked to load; None if no run wrote one there yet. One that does
    not load (a crash while saving) is a :class:`FlmmUserError` naming the newest checkpoint of
    the folder that does, spelled as the command's ``option`` (``checkpoint=``, ``--checkpoint ``)."""
    last = Path(folder) / LAST
    if not last.is_file():
        return None
    try:
        read_checkpoint(last)
    except FlmmUserError as err:
        previous = newest_readable(last.parent, skip=last)
        fix = f"use {option}{previous}" if previous else "no other checkpoint there loads"
        raise FlmmUserError(f"{option}last: {err}; {fix}") from None
    return last


def newest_last(logs: Path, option: str = "checkpoint=") -> Path:
    """What ``last`` names where no run folder is given (``flmm evaluate``, ``flmm ground``...):
    the ``last.ckpt`` written most recently under ``logs`` outside debug runs
    (:func:`flmm.model.runs.newest_real`), checked by :func:`resumable_last`;
    a :class:`FileNotFoundError` when no run there wrote one."""
    newest = newest_real(list(Path(logs).glob(f"**/{LAST}")), Path(logs))
    last = resumable_last(newest.parent, option) if newest else None
    if last is None:
        raise FileNotFoundError(
            f"{option}last: no training run under {Path(logs).resolve()} has written a {LAST}; "
            "train one with `flmm train` in this folder, or name the checkpoint file"
        )
    return last


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own folder, then renames it into place:
    a run killed while saving leaves the previous checkpoint whole, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

        write_atomic(Path(path), write)

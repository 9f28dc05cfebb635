"""Checkpoints hold only F-LMM's trainable state, plus metadata saying which LMM it was made for."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

from flmm.errors import CheckpointMismatchError

log = logging.getLogger(__name__)

# Metadata fields that must match exactly: a head trained on other attention maps is meaningless.
SHAPE_KEYS = ("family", "channels", "grid", "hidden_size", "num_text_layers", "sam_prompt_dim")


def flmm_version() -> str:
    try:
        return version("flmm")
    except PackageNotFoundError:
        return "unknown"


def checkpoint_metadata(lmm, sam: nn.Module) -> dict:
    """What a checkpoint was made for: the LMM (id and attention shapes) and SAM's prompt width."""
    return {
        "lmm_id": lmm.model_id,
        "family": lmm.family.name,
        "channels": int(lmm.channels),
        "grid": list(lmm.grid),
        "hidden_size": int(lmm.hidden_size),
        "num_text_layers": int(lmm.num_text_layers),
        "sam_prompt_dim": int(sam.prompt_encoder.embed_dim),
        "flmm_version": flmm_version(),
    }


def check_metadata(saved: dict | None, current: dict) -> None:
    """Raise :class:`CheckpointMismatchError` when a checkpoint was made for another LMM or SAM."""
    if saved is None:
        raise CheckpointMismatchError(
            "checkpoint has no 'flmm' metadata: it was not written by flmm, so there is no way to "
            "tell which LMM it belongs to. Train it with `python -m flmm.train`."
        )
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

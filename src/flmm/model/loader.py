"""The one way to load a trained F-LMM: :func:`load` (``flmm.model.load``).

A source is a training checkpoint (``.ckpt``: the trainable state and metadata naming the LMM,
its family and the SAM), a head folder (``<run>/model`` or ``save_pretrained``'s: weights and a
``config.json`` naming the same, :mod:`flmm.model.pretrained`) or a head folder's hub id. The
LMM and SAM the source records are built unless given (built objects, or an id / file); loading
options (dtype, device_map, quantization, revision...) come from the caller. Only the settings
:data:`RECORDED_SETTINGS` are read from a file: whether the LMM's own code may run is the
caller's ``trust_remote_code`` alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from flmm.errors import CheckpointMismatchError, DataError, FlmmUserError
from flmm.foundation.cache import shipped_tiny_sam
from flmm.heads import SAM_VARIANTS, build_sam
from flmm.lmm import FrozenLMM
from flmm.lmm.loading import HUB_ID, placed_dtype
from flmm.model.checkpoint import (
    check_family,
    check_metadata,
    checkpoint_metadata,
    portable,
    read_checkpoint,
    resolve,
)
from flmm.model.module import HYPER_PARAMETERS
from flmm.model.network import FLMMModel

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FORMAT = 1  # bump when config.json changes meaning
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
HEAD_HUB = ("revision", "force_download")  # options of the head's own files on the hub
SHARED_HUB = ("cache_dir", "local_files_only", "token")  # of the head's files and the LMM's


@dataclass
class Loaded:
    """What a source holds: the ``model`` (eval mode, on its device), the optimizer's
    ``hyper_parameters`` it was trained with, and a head folder's ``folder`` and ``config``."""

    model: FLMMModel
    hyper_parameters: dict
    folder: Path | None = None
    config: dict | None = None


def load(source: str | Path, **options) -> FLMMModel:
    """The trained F-LMM at ``source`` (a ``.ckpt``, a head folder or its hub id); ``options``
    as :func:`load_source` takes them."""
    return load_source(source, **options).model


def load_source(
    source: str | Path,
    *,
    lmm: FrozenLMM | str | None = None,
    sam: nn.Module | str | None = None,
    sam_variant: str | None = None,
    device: str | None = None,
    lmm_revision: str | None = None,
    **options,
) -> Loaded:
    """Load ``source`` with the LMM and SAM it records, or those given.

    Args:
        lmm, sam: replace the recorded LMM (a :class:`FrozenLMM`, a hub id or a folder) and SAM
            (a SAM module, or a checkpoint file of ``sam_variant``; None: read from its name).
        device: where the heads (and an LMM loaded without ``device_map``) go; None: where the
            LMM was loaded (the CPU unless ``device_map`` or bitsandbytes placed it).
        lmm_revision: the LMM's hub revision; None: the one the source records (for the LMM it
            records; another ``lmm`` loads its default branch).
        options: ``revision`` and ``force_download`` of a hub head's files; ``cache_dir``,
            ``local_files_only``, ``token`` of the head's files and the LMM's; the rest
            replace recorded LMM settings or add loading options of
            :meth:`FrozenLMM.from_pretrained` (``family``, ``dtype``, ``device_map``,
            ``quantization``, ``attn_implementation``, ``trust_remote_code``...). None values
            keep the recorded setting.
    """
    options = {k: v for k, v in options.items() if v is not None}
    hub = {k: options.pop(k) for k in HEAD_HUB if k in options}
    shared = {k: options.pop(k) for k in SHARED_HUB if k in options}
    lmm_kwargs = lmm_options(options | shared, lmm_revision, device)
    source = str(source)
    if is_checkpoint(source):
        return from_checkpoint(source, lmm, sam, sam_variant, device, lmm_kwargs)
    folder = head_folder(source, **hub, **shared)
    return from_head_folder(folder, lmm, sam, sam_variant, device, lmm_kwargs)


def is_checkpoint(source: str) -> bool:
    """Whether ``source`` names a training checkpoint (a ``.ckpt``, or any file), not a head
    folder or hub id."""
    return source.endswith(".ckpt") or Path(source).is_file()


def lmm_options(options: dict, revision: str | None, device: str | None) -> dict:
    """The LMM's loading ``options`` with its own ``revision`` if given, and a ``"auto"`` dtype
    resolved for ``device``."""
    options = ({"revision": revision} if revision is not None else {}) | options
    if "dtype" in options:
        options["dtype"] = placed_dtype(options["dtype"], options.get("device_map"), device)
    return options


def head_device(device: str | None, lmm: FrozenLMM) -> str:
    """``device``, or (None) where the LMM was loaded: the CPU, or where ``device_map`` or a
    bitsandbytes quantization put it."""
    return device or str(lmm.device)


def assemble(lmm: FrozenLMM, sam: nn.Module, head: dict, state: dict, device) -> FLMMModel:
    """The F-LMM of ``lmm``, ``sam`` and the mask ``head`` settings, holding the trained
    ``state`` strictly, in eval mode on ``device`` (:func:`head_device`)."""
    model = FLMMModel.build(lmm, sam, head["base_channels"], head["target_size"])
    model.load_state_dict(state)
    return model.eval().to(head_device(device, lmm))


# ------------------------------------------------------------------------ training checkpoints
def restore(model: FLMMModel, path: str | Path) -> None:
    """Put the trained state of the checkpoint ``path`` (of this very model's run) into
    ``model``, strictly: training's last step before writing ``<run>/model``."""
    model.load_state_dict(read_checkpoint(path)["state_dict"])


def from_checkpoint(
    path: str, lmm, sam, sam_variant: str | None, device: str | None, lmm_kwargs: dict
) -> Loaded:
    """A ``.ckpt`` written by training; its metadata names the LMM, family and SAM."""
    ckpt = read_checkpoint(path)
    saved = ckpt.get("flmm")
    if lmm_kwargs.get("family") and not isinstance(lmm, FrozenLMM):
        check_family(saved, lmm_kwargs["family"], None, path)
    hparams = checkpoint_hyper_parameters(ckpt, path)
    if not isinstance(sam, nn.Module):
        if sam is None:
            sam, sam_variant = recorded_sam(saved or {}, path, sam_variant)
        sam = (sam_variant or sam_variant_of(sam), sam)
    if not isinstance(lmm, FrozenLMM):
        lmm = checkpoint_lmm_model(saved, path, lmm, lmm_kwargs, device)
    if isinstance(sam, tuple):
        sam = build_sam(*sam)
    check_metadata(saved, checkpoint_metadata(lmm, sam))
    model = assemble(lmm, sam, saved["mask_head"], ckpt["state_dict"], device)
    return Loaded(model, hparams)


def checkpoint_hyper_parameters(ckpt: dict, path: str) -> dict:
    """The optimizer settings a checkpoint records; others are from another flmm version."""
    hparams = ckpt.get("hyper_parameters", {})
    unknown = sorted(set(hparams) - set(HYPER_PARAMETERS))
    if unknown:
        raise CheckpointMismatchError(
            f"checkpoint {path} has hyperparameters {unknown} this flmm does not know; "
            "it was written by another flmm version: load it with that version or retrain"
        )
    return dict(hparams)


def checkpoint_lmm_model(
    saved: dict | None, path: str, name: str | None, kw: dict, device: str | None
) -> FrozenLMM:
    """The frozen LMM ``name`` (None: the one the checkpoint records) of the recorded family
    and revision unless ``kw`` (loading options) names others; dtype ``"auto"`` for ``device``."""
    saved = saved or {}
    name = name or checkpoint_lmm(saved, path)
    recorded = saved.get("lmm_revision") if name == saved.get("lmm_id") else None
    kw = {"family": saved.get("family", "llava"), "revision": recorded} | kw
    kw["dtype"] = placed_dtype(kw.get("dtype", "auto"), kw.get("device_map"), device)
    return FrozenLMM.from_pretrained(name, **kw)


def checkpoint_lmm(saved: dict | None, checkpoint) -> str:
    """The LMM (hub id or folder) recorded in the metadata ``saved`` of an F-LMM checkpoint."""
    if "lmm_id" not in (saved or {}):
        raise FlmmUserError(f"{checkpoint} has no LMM id in its metadata; pass --lmm")
    return saved["lmm_id"]


def recorded_sam(saved: dict, checkpoint: str, variant: str | None) -> tuple[str, str | None]:
    """The SAM file and variant a checkpoint's metadata (``saved``) records; the synthetic
    world's tiny SAM for a checkpoint from before SAM was recorded. A recorded file that is not
    there is a :class:`FlmmUserError` naming it and ``--sam``."""
    source = saved.get("sam") or {}
    if not source.get("checkpoint"):
        return shipped_tiny_sam(), variant
    path = resolve(source["checkpoint"])
    if not Path(path).is_file():
        raise FlmmUserError(
            f"{checkpoint} was trained with SAM {source['variant']} from {path}, which is not "
            "there; pass the SAM checkpoint (--sam PATH, --sam-variant VARIANT)"
        )
    return path, variant or source["variant"]


def sam_variant_of(path: str) -> str:
    """SAM variant named in a checkpoint file name (``sam_vit_l_0b3195.pth`` -> ``vit_l``)."""
    name = Path(path).name
    found = [v for v in SAM_VARIANTS if v in name]
    if len(found) != 1:
        raise FlmmUserError(
            f"cannot tell the SAM variant from the file name {name!r}; pass sam_variant= "
            f"(one of {', '.join(SAM_VARIANTS)})"
        )
    return found[0]


# ------------------------------------------------------------------------------- head folders
def from_head_folder(
    folder: Path, lmm, sam, sam_variant: str | None, device: str | None, lmm_kwargs: dict
) -> Loaded:
    """A head folder; its ``config.json`` names the LMM and SAM."""
    config = read_config(folder)
    sam = sam if isinstance(sam, nn.Module) else load_sam(config["sam"], sam, sam_variant)
    if not isinstance(lmm, FrozenLMM):
        lmm = load_lmm(config["lmm"], lmm, **lmm_kwargs)
    try:
        check_metadata(config["metadata"], portable_metadata(lmm, sam))
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"head folder {folder}: {err}") from None
    model = assemble(lmm, sam, config["mask_head"], read_weights(folder / WEIGHTS), device)
    return Loaded(model, dict(config["hyper_parameters"]), folder, config)


def portable_metadata(lmm: FrozenLMM, sam: nn.Module) -> dict:
    """:func:`checkpoint_metadata` with the LMM id as :func:`portable` records it."""
    metadata = checkpoint_metadata(lmm, sam)
    return metadata | {"lmm_id": portable(metadata["lmm_id"])}


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


def load_sam(recorded: dict, checkpoint: str | None, variant: str | None = None):
    """The recorded SAM variant (or ``variant``), from ``checkpoint`` or the recorded file."""
    path = checkpoint or (recorded["checkpoint"] and resolve(recorded["checkpoint"]))
    variant = variant or recorded["variant"]
    if variant is None or path is None:
        raise FlmmUserError("the head folder does not name its SAM; pass sam=<SAM checkpoint>")
    return build_sam(variant, path)


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

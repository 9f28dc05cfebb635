"""Loading a frozen LMM as HF users do: dtype, placement, attention, hub revision, quantization.

:func:`load` runs transformers' ``from_pretrained`` of a family's model and processor (and the
``AutoConfig`` check before them) with the same hub options, so ``revision``, ``cache_dir``,
``local_files_only`` and ``token`` select one consistent set of files. Differences from
transformers' own defaults, each chosen for a frozen feature extractor:

- ``dtype="auto"`` is bfloat16 where the model is placed on CUDA (``device_map``, or a
  bitsandbytes quantization) and float32 elsewhere, not the checkpoint's stored dtype (float16
  for the llava-hf checkpoints);
- ``quantization`` names one of :data:`QUANTIZATIONS` instead of taking a config object:
  ``"int8"`` is torchao's weight-only int8 (CPU and CUDA), ``"8bit"`` / ``"4bit"`` bitsandbytes'
  LLM.int8 and 4-bit NF4 with bfloat16 compute (CUDA only). The LMM only runs forward, frozen,
  which is where weight quantization is safe (docs/real_models.md).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import StrictDataclassError

from flmm.attention.capture import IMPLEMENTATION
from flmm.errors import ConfigError, MissingExtraError, ModelLoadError
from flmm.lmm import derive
from flmm.lmm.families import Family, family_of_model_type, get_family, list_lmms

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# name -> (package, extra that installs it, what it is)
QUANTIZATIONS = {
    "int8": ("torchao", "quant", "torchao weight-only int8"),
    "8bit": ("bitsandbytes", "quant-cuda", "bitsandbytes LLM.int8"),
    "4bit": ("bitsandbytes", "quant-cuda", "bitsandbytes 4-bit NF4"),
}
# options of a ``model.lmm`` config that say how to load an LMM, not which one or its grid
HOW = (
    "device_map",
    "attn_implementation",
    "cache_dir",
    "local_files_only",
    "quantization",
    "trust_remote_code",
)
# device_map strings that let accelerate spread the model over the visible GPUs
SPREAD = ("auto", "balanced", "balanced_low_0", "sequential")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def check_source(name_or_path: str) -> None:
    """Raise a ``FileNotFoundError`` for a local path that does not exist (hub ids pass)."""
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith(("/", ".", "~")) or not HUB_ID.match(name_or_path)
    if looks_local and not path.exists():
        raise FileNotFoundError(
            f"LMM path {str(path)!r} does not exist. Point model.lmm.name_or_path=... at a "
            "directory saved with save_pretrained (or a HF hub id such as "
            "'llava-hf/llava-1.5-7b-hf'); a tiny local one of any family can be built with "
            "flmm.foundation.tiny_models.build_tiny_lmm(out_dir, family)."
        )


def family_for(name_or_path: str, family: str, hub: dict) -> Family:
    """The row ``family`` names; for ``"auto"``, the row of the checkpoint's ``model_type``, else
    a provisional derived one (:func:`flmm.lmm.derive.row_for`)."""
    if family != derive.AUTO:
        return get_family(family)
    check_source(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path, **hub)
    except (OSError, ValueError, KeyError, StrictDataclassError) as err:
        reason = " ".join(str(err).split()).rstrip(".")
        raise ModelLoadError(
            f"model.lmm.family=auto could not load the config of {name_or_path!r}: {reason}. "
            "Check model.lmm.name_or_path=... (code shipped with a checkpoint runs only with "
            "model.lmm.trust_remote_code=true)"
        ) from err
    return derive.row_for(name_or_path, config.model_type)


def check_model_type(name_or_path: str, family: Family, hub: dict) -> None:
    """Raise :class:`ModelLoadError` when the checkpoint is not a model of ``family``; ``hub``:
    the hub options of :func:`load`."""
    config = transformers.AutoConfig.from_pretrained(name_or_path, **hub)
    expected = getattr(transformers, family.model_class).config_class.model_type
    if config.model_type != expected:
        match = family_of_model_type(config.model_type)
        fix = f"model.lmm.family={match}" if match else f"one of: {', '.join(list_lmms())}"
        raise ModelLoadError(
            f"{name_or_path!r} holds a {config.model_type!r} model, but the {family.name!r} family "
            f"loads {expected!r} models; set {fix}"
        )


def on_cuda(device_map) -> bool:
    """Whether ``device_map`` (None, a device, a strategy such as ``"auto"``, or a dict of
    module -> device) places any part of the model on a CUDA device."""
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    for target in targets:
        if target in SPREAD:
            return torch.cuda.is_available()
        if isinstance(target, int) and not isinstance(target, bool):
            return True
        if isinstance(target, (str, torch.device)) and str(target).startswith("cuda"):
            return True
    return False


def resolve_dtype(
    dtype: str | torch.dtype, device_map=None, quantization: str | None = None
) -> torch.dtype:
    """The torch dtype of ``dtype``: one of :data:`DTYPES` (by name or as a torch dtype), or
    ``"auto"`` (bfloat16 where the model is placed on CUDA, by ``device_map`` or a bitsandbytes
    ``quantization``; float32 elsewhere)."""
    dtype = next((k for k, v in DTYPES.items() if v == dtype), dtype)
    if dtype == "auto":
        cuda = on_cuda(device_map) or quantization in ("8bit", "4bit")
        return torch.bfloat16 if cuda else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(
            f"model.lmm.dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}"
        )
    return DTYPES[dtype]


def check_device_map(device_map) -> None:
    """A :class:`ConfigError` for a ``device_map`` naming a CUDA device on a machine without one
    (``"auto"`` and the other spreading strategies fall back to the CPU)."""
    if device_map not in SPREAD and on_cuda(device_map) and not torch.cuda.is_available():
        raise ConfigError(
            f"device_map={device_map!r} (model.lmm.device_map, --device-map) places the LMM on "
            "CUDA, and no CUDA GPU is visible; use device_map='auto' or 'cpu', or none"
        )


def placed_dtype(dtype: str, device_map, device) -> str:
    """``dtype`` for a model loaded with ``device_map``, then moved to ``device``: without a
    ``device_map``, ``"auto"`` is resolved for ``device`` (where the model will run)."""
    if dtype != "auto" or device_map is not None or device is None:
        return dtype
    return "bfloat16" if on_cuda(device) else "float32"


def quantization_config(name: str | None):
    """transformers' quantization config for ``name`` (a key of :data:`QUANTIZATIONS`, or None);
    one-line errors for an unknown name, bitsandbytes without CUDA, or a missing package."""
    if name is None:
        return None
    if name not in QUANTIZATIONS:
        raise ConfigError(
            f"unknown quantization {name!r} (model.lmm.quantization, --quantization): use one "
            f"of {', '.join(QUANTIZATIONS)}, or null for none"
        )
    package, extra, what = QUANTIZATIONS[name]
    if package == "bitsandbytes" and not torch.cuda.is_available():
        raise ConfigError(
            f"quantization {name!r} ({what}) needs a CUDA GPU and none is visible; on a CPU use "
            "quantization 'int8' (model.lmm.quantization=int8, --quantization int8), or none"
        )
    if importlib.util.find_spec(package) is None:
        raise MissingExtraError(package, extra, f"quantization {name!r} ({what})")
    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig())
    if name == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def hub_commit(name_or_path: str, revision: str | None, cache_dir: str | None) -> str | None:
    """The commit a hub id's files were loaded from (its snapshot folder in the HF cache), else
    ``revision`` as given; None for a local folder."""
    if Path(name_or_path).expanduser().exists():
        return None
    found = try_to_load_from_cache(
        name_or_path, "config.json", cache_dir=cache_dir, revision=revision
    )
    parts = Path(found).parts if isinstance(found, str) else ()
    if "snapshots" in parts[:-1]:
        commit = parts[parts.index("snapshots") + 1]
        return commit if COMMIT.match(commit) else revision
    return revision


def load(
    name_or_path: str,
    family: Family,
    *,
    dtype: str,
    device_map,
    attn_implementation,
    quantization: str | None,
    hub: dict,
):
    """``(model, processor)`` of ``family`` from a local folder or hub id; ``hub`` holds the
    options every ``from_pretrained`` gets (``revision``, ``cache_dir``, ``local_files_only``,
    ``token``, ``trust_remote_code``). A failure is one :class:`ModelLoadError`."""
    check_source(name_or_path)
    check_device_map(device_map)
    model_kwargs = {
        "dtype": resolve_dtype(dtype, device_map, quantization),
        "device_map": device_map,
        "attn_implementation": attn_implementation,
        "quantization_config": quantization_config(quantization),
    }
    try:
        check_model_type(name_or_path, family, hub)
        model_class = getattr(transformers, family.model_class)
        model = model_class.from_pretrained(name_or_path, **model_kwargs, **hub)
        processor_class = getattr(transformers, family.processor_class)
        processor = processor_class.from_pretrained(name_or_path, **hub)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, StrictDataclassError) as err:
        # RuntimeError: weights whose shapes do not fit the config (transformers' load report)
        if isinstance(err, (ConfigError, MissingExtraError, ModelLoadError)):
            raise
        raise load_error(name_or_path, family, err) from err
    check_crop_markers(processor, family, name_or_path)
    if attn_implementation is not None:
        log.info(
            "attn_implementation=%r: the vision tower's; the text decoder runs %r (sdpa, plus the "
            "phrase-to-image capture)",
            attn_implementation,
            IMPLEMENTATION,
        )
    return model, processor


def check_crop_markers(processor, family: Family, name_or_path: str) -> None:
    """A :class:`ModelLoadError` when a ``"crops"`` family's tokenizer does not hold the
    ``<row_r_col_c>`` crop markers as tokens: the grid rule reads the crop canvas from them."""
    if family.grid != "crops":
        return
    tokenizer = processor.tokenizer
    missing = [
        t
        for t in ("<row_1_col_1>", "<row_6_col_6>")
        if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
    ]
    if missing:
        raise ModelLoadError(
            f"the tokenizer of {name_or_path!r} has no token {missing[0]}: the {family.name!r} "
            "family reads each image crop's place from the <row_r_col_c> tokens its processor "
            "inserts; use the checkpoint's own tokenizer (with its added tokens)"
        )


def load_error(name_or_path: str, family: Family, err: Exception) -> ModelLoadError:
    """The one-line :class:`ModelLoadError` for a failed ``from_pretrained``."""
    where = "local directory" if Path(name_or_path).exists() else "hub id (no such local path)"
    reason = " ".join(str(err).split()).rstrip(".")
    return ModelLoadError(
        f"could not load a {family.model_class} / {family.processor_class} ({family.name!r} "
        f"family) from {where} {name_or_path!r}: {reason}. Check model.lmm.name_or_path=..., "
        "model.lmm.family=..., model.lmm.revision / attn_implementation / device_map; code "
        "shipped with a checkpoint runs only with model.lmm.trust_remote_code=true"
    )

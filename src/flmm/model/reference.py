"""The released F-LMM heads (public repository wusize/F-LMM) as this project's checkpoints.

The reference trains ``FrozenLlavaSAM``, ``FrozenLlavaNextSAM`` and ``FrozenDeepseekVLSAM``
(``flmm/models/*.py`` there) and publishes one state dict per paper row (its README,
"Checkpoints"). Their trained tensors map one to one onto :meth:`FLMM.trainable_modules
<flmm.model.module.FLMM.trainable_modules>`:

=================================================  ================================
reference key                                      this project's key
=================================================  ================================
``mask_head.*`` (mmseg ``UNet`` + ``conv_seg``)    ``mask_head.*`` (the same tree)
``text_proj.{weight,bias}``                        ``text_prompt.proj.{weight,bias}``
``text_layer_weights``                             ``text_prompt.layer_weights``
``sam.model.prompt_encoder.*``                     ``prompt_encoder.*``
``sam.model.mask_decoder.*``                       ``mask_decoder.*``
=================================================  ================================

Frozen parts a file may also hold (the LMM ``llava.*`` / ``deepseek_vl.*``, SAM's
``sam.model.image_encoder.*``) are dropped; any other key is an error.

Attention channels: the reference concatenates per layer, heads innermost, and for LLaVA-NeXT puts
the whole coarse (base-tile) block before the whole fine block: ``(grid, layer, head)``. This
project orders them ``(layer, grid, head)`` (:func:`flmm.lmm.grids.to_frame`), so the input
channels of the mask head's first conv are reordered (the identity for one-grid families).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import lightning
import torch

from flmm.errors import CheckpointMismatchError, FlmmUserError
from flmm.files import load_torch_file
from flmm.heads import MaskHead, TextPrompt, build_sam
from flmm.heads.sam_build import MAX_KEYS_SHOWN
from flmm.lmm import get_family
from flmm.lmm.grids import PARTS
from flmm.model.checkpoint import flmm_version
from flmm.model.module import HYPER_PARAMETERS

log = logging.getLogger(__name__)

RENAMES = {
    "mask_head.": "mask_head.",
    "text_proj.": "text_prompt.proj.",
    "text_layer_weights": "text_prompt.layer_weights",
    "sam.model.prompt_encoder.": "prompt_encoder.",
    "sam.model.mask_decoder.": "mask_decoder.",
}
FROZEN = {
    "llava.": "the LMM",
    "deepseek_vl.": "the LMM",
    "sam.model.image_encoder.": "SAM's image encoder",
}
# entries tensors are nested in: the reference's ``guess_load_checkpoint`` and mmengine
# (``state_dict``), DeepSpeed (``module``), others (``model``)
WRAPPERS = ("state_dict", "module", "model")
REFERENCE_ORDER = ("grid", "layer", "head")
FLMM_ORDER = ("layer", "grid", "head")
FIRST_CONV = "mask_head.encoder.0.0.convs.0.conv.weight"
# the reference configs: ``UNetHead(upsample_input=64, base_channels=64)``, AdamW 1e-4, 3% warm-up
# (flmm.model.module.HYPER_PARAMETERS)
TARGET_SIZE = 64
RELEASES = "https://github.com/wusize/F-LMM#test (README, 'Checkpoints', Google Drive)"


@dataclass(frozen=True)
class Target:
    """The frozen LMM and SAM a converted checkpoint is for.

    Attributes:
        family: the LMM family (``flmm.lmm.FAMILIES`` key).
        lmm_id: its hub id.
        num_layers: ``L`` decoder layers; the text prompt mixes the hidden states of all of them.
        num_heads: ``H`` attention heads per layer.
        hidden_size: ``D``.
        grid: ``F``, the side of the square attention frame.
        sam_variant: the SAM (``flmm.heads.build_sam`` variant) the refiner was trained with.
    """

    family: str
    lmm_id: str
    num_layers: int
    num_heads: int
    hidden_size: int
    grid: int
    sam_variant: str = "vit_l"

    @property
    def parts(self) -> int:
        """Attention grids per image (2 for any-res families)."""
        return PARTS[get_family(self.family).grid]

    @property
    def channels(self) -> int:
        """``parts * L * H``: the mask head's input channels."""
        return self.parts * self.num_layers * self.num_heads

    @classmethod
    def of(cls, lmm, sam_variant: str) -> Target:
        """The target of a loaded :class:`flmm.lmm.FrozenLMM` (all its layers mixed)."""
        heads = lmm.text_config.num_attention_heads
        return cls(
            lmm.family.name,
            lmm.model_id,
            lmm.num_layers,
            heads,
            lmm.hidden_size,
            lmm.grid[0],
            sam_variant,
        )


@dataclass(frozen=True)
class Released:
    """One released checkpoint: the reference config it was trained with (its file is the config's
    name + ``.pth``, as the reference README's commands load it), this project's experiment and
    ``flmm.evaluate`` overrides, and the target LMM. Shapes are the models' published HF configs."""

    target: Target
    config: str
    experiment: str
    evaluate_args: str

    @property
    def file_name(self) -> str:
        return f"{Path(self.config).stem}.pth"


RELEASED = {
    "llava15_7b": Released(
        Target("llava", "llava-hf/llava-1.5-7b-hf", 32, 32, 4096, 24),
        "configs/llava/frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.py",
        "flmm_llava15_7b",
        "model=llava",
    ),
    "llava_next_vicuna_7b": Released(
        Target("llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf", 32, 32, 4096, 48),
        "configs/llava_next/frozen_llava_next_vicuna_7b_unet_sam_l_refcoco_png.py",
        "flmm_llava16_vicuna_7b",
        "model=llava_next model/lmm=llava_next_vicuna_7b",
    ),
    "llava_next_mistral_7b": Released(
        Target("llava_next", "llava-hf/llava-v1.6-mistral-7b-hf", 32, 32, 4096, 48),
        "configs/llava_next/frozen_llava_next_mistral_7b_unet_sam_l_refcoco_png.py",
        "flmm_llava16_mistral_7b",
        "model=llava_next model/lmm=llava_next_mistral_7b",
    ),
    "deepseek_vl_1_3b": Released(
        Target("deepseek_vl", "deepseek-community/deepseek-vl-1.3b-chat", 24, 16, 2048, 24),
        "configs/deepseek_vl/frozen_deepseek_vl_1_3b_chat_unet_sam_l_refcoco_png.py",
        "flmm_deepseek_vl_1_3b",
        "model=deepseek_vl model/lmm=deepseek_vl_1_3b",
    ),
    "deepseek_vl_7b": Released(
        Target("deepseek_vl_hybrid", "deepseek-community/deepseek-vl-7b-chat", 30, 32, 4096, 24),
        "configs/deepseek_vl/frozen_deepseek_vl_7b_chat_unet_sam_l_refcoco_png.py",
        "flmm_deepseek_vl_7b",
        "model=deepseek_vl model/lmm=deepseek_vl_7b",
    ),
}


# ------------------------------------------------------------------------------ reading a file
def read_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a reference checkpoint, loaded as tensors only (no pickled code runs)."""
    path = Path(path)
    if path.is_dir():
        raise FlmmUserError(
            f"{path} is a folder (a DeepSpeed checkpoint?); turn it into one .pth first with the "
            "reference's scripts/deepspeed2torch_state_dict.py"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"reference checkpoint not found: {path}; download it from {RELEASES}"
        )
    obj = load_torch_file(path, "reference checkpoint")
    return unwrap(obj, path)


def unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: itself, or its ``state_dict``/``module``/``model`` entry."""
    while isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointMismatchError(
                f"{path} holds no state dict of tensors "
                f"(top-level entries: {sorted(map(str, obj))[:8]})"
            )
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointMismatchError(
            f"{path} holds no state dict of tensors ({type(obj).__name__})"
        )
    return obj


# --------------------------------------------------------------------------------- key mapping
def rename(key: str) -> str | None:
    """This project's name for a reference key; None for a key that maps to nothing."""
    for old, new in RENAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def reference_name(key: str) -> str:
    """The reference's name for one of this project's keys (for messages)."""
    for old, new in RENAMES.items():
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def split_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Counter]:
    """Renamed trainable tensors, and how many frozen tensors were dropped per part.

    Raises :class:`CheckpointMismatchError` naming the keys that are neither.
    """
    mapped, dropped, unknown = {}, Counter(), []
    for key, value in state.items():
        frozen = next((part for prefix, part in FROZEN.items() if key.startswith(prefix)), None)
        if frozen:
            dropped[frozen] += 1
        elif (new := rename(key)) is not None:
            mapped[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(
            f"{len(unknown)} keys of the checkpoint are no part of a released F-LMM model "
            f"(first: {', '.join(sorted(unknown)[:MAX_KEYS_SHOWN])}); expected keys starting with "
            f"{', '.join([*RENAMES, *FROZEN])}"
        )
    return mapped, dropped


# ------------------------------------------------------------------------------------ shapes
def expected_state(target: Target, base_channels: int, target_size: int) -> dict[str, torch.Tensor]:
    """Key -> shape-only (meta) tensor of :meth:`FLMM.trainable_modules` for ``target``."""
    with torch.device("meta"):
        sam = build_sam(target.sam_variant)
        modules = {
            "mask_head": MaskHead(target.channels, base_channels, target_size),
            "text_prompt": TextPrompt(
                target.hidden_size, target.num_layers, sam.prompt_encoder.embed_dim
            ),
            "prompt_encoder": sam.prompt_encoder,
            "mask_decoder": sam.mask_decoder,
        }
    return {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}


def check_shapes(mapped: dict, expected: dict, target: Target) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``mapped`` has ``expected``'s keys, shapes."""
    missing = [reference_name(k) for k in expected if k not in mapped]
    unexpected = [reference_name(k) for k in mapped if k not in expected]
    shapes = [
        f"{reference_name(k)} {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in mapped and mapped[k].shape != v.shape
    ]
    named = {"missing": missing, "unexpected": unexpected, "of another shape": shapes}
    problems = [
        f"{len(keys)} keys {what} (first: {', '.join(keys[:MAX_KEYS_SHOWN])})"
        for what, keys in named.items()
        if keys
    ]
    if problems:
        raise CheckpointMismatchError(
            f"the checkpoint does not fit F-LMM on {target.lmm_id} ({target.num_layers} layers x "
            f"{target.num_heads} heads, {target.channels} attention channels, hidden size "
            f"{target.hidden_size}) with SAM {target.sam_variant}: {'; '.join(problems)}. "
            "Pick the --model it was trained for."
        )


def channel_index(target: Target) -> torch.Tensor:
    """For each of this project's input channels ``(layer, grid, head)``, the reference's channel
    ``(grid, layer, head)`` that carries the same attention map."""
    sizes = {"grid": target.parts, "layer": target.num_layers, "head": target.num_heads}
    reference = torch.arange(target.channels).view(*(sizes[a] for a in REFERENCE_ORDER))
    return reference.permute(*(REFERENCE_ORDER.index(a) for a in FLMM_ORDER)).flatten()


# ---------------------------------------------------------------------------------- converting
def convert_state(
    state: dict[str, torch.Tensor], target: Target, target_size: int = TARGET_SIZE
) -> dict[str, torch.Tensor]:
    """This project's trainable state for ``target`` from a reference state dict."""
    mapped, dropped = split_keys(state)
    if dropped:
        parts = ", ".join(f"{part}: {n}" for part, n in sorted(dropped.items()))
        log.info("dropped %d frozen tensors (%s)", sum(dropped.values()), parts)
    base = mapped[FIRST_CONV].shape[0] if FIRST_CONV in mapped else 64
    check_shapes(mapped, expected_state(target, base, target_size), target)
    mapped[FIRST_CONV] = mapped[FIRST_CONV][:, channel_index(target)]
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in mapped.items()}


def metadata(target: Target, state: dict[str, torch.Tensor], target_size: int, source: str) -> dict:
    """The ``flmm`` block :func:`flmm.model.checkpoint.check_metadata` compares, plus the SAM variant
    and the source file."""
    return {
        "lmm_id": target.lmm_id,
        "family": target.family,
        "channels": target.channels,
        "grid": [target.grid, target.grid],
        "hidden_size": target.hidden_size,
        "num_text_layers": target.num_layers,
        "sam_prompt_dim": int(state["text_prompt.proj.weight"].shape[0]),
        "flmm_version": flmm_version(),
        "mask_head": {"base_channels": int(state[FIRST_CONV].shape[0]), "target_size": target_size},
        "sam_variant": target.sam_variant,
        "converted_from": source,
    }


def convert(path: str | Path, target: Target, target_size: int = TARGET_SIZE) -> dict:
    """A checkpoint ``flmm.model.load`` (and ``checkpoint=``) loads strictly, from the reference
    checkpoint file ``path``."""
    state = convert_state(read_reference(path), target, target_size)
    return {
        "state_dict": state,
        "flmm": metadata(target, state, target_size, Path(path).name),
        "hyper_parameters": dict(HYPER_PARAMETERS),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }

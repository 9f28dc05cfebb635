"""Command-line options that pick the models, shared by ``flmm.chat.ground``,
``flmm.chat.predict``, ``flmm.chat.reasonseg`` and ``flmm.chat.web``: an F-LMM checkpoint
(default: the newest run's model folder under ``logs/`` of the current folder), the frozen LMM
it was trained on (default: the one its metadata names), its dtype and device, SAM and the
keyword selector."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flmm.chat.conversation import GroundedChat
from flmm.errors import FlmmUserError
from flmm.heads import SAM_VARIANTS
from flmm.lmm.loading import DTYPES, QUANTIZATIONS
from flmm.model.checkpoint import newest_last
from flmm.model.runs import newest_real


def add_model_args(p: argparse.ArgumentParser, generates: bool = True) -> None:
    """The options that pick the models (shared by the ground, predict, reasonseg and web
    commands), and ``--max-new-tokens`` for those that generate (``generates``)."""
    p.add_argument(
        "--checkpoint",
        help="F-LMM .ckpt, or a head folder (<run>/model, save_pretrained) or its hub id, or "
        "'last': the last.ckpt written most recently under ./logs/ (default: the newest run's "
        "model folder, or .ckpt, under ./logs/)",
    )
    p.add_argument("--lmm", help="frozen LMM id or folder (default: the checkpoint's)")
    p.add_argument(
        "--lmm-revision",
        help="the LMM's hub revision (branch, tag or commit; default: the recorded one)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        help="the frozen LMM's dtype (default: a head folder's recorded one, else auto: "
        "bfloat16 on CUDA, float32 on the CPU)",
    )
    p.add_argument(
        "--quantization",
        choices=tuple(QUANTIZATIONS),
        help="load the frozen LMM quantized: int8 (torchao, CPU or CUDA), 8bit or 4bit "
        "(bitsandbytes, CUDA)",
    )
    p.add_argument(
        "--device-map",
        help="place the frozen LMM as transformers does (auto, cuda:0, cpu); default: --device",
    )
    p.add_argument(
        "--attn-implementation",
        help="the LMM vision tower's attention (sdpa, eager, flash_attention_2); the text "
        "decoder always runs flmm's capture",
    )
    p.add_argument("--family", help="LMM family (default: the one the checkpoint records)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the LMM's checkpoint run the Python code it ships (read it first); never "
        "implied by a checkpoint or head folder",
    )
    p.add_argument("--sam", help="SAM checkpoint (default: the one the checkpoint records)")
    p.add_argument("--sam-variant", choices=SAM_VARIANTS)
    p.add_argument(
        "--selector",
        help="keyword selector (default: selector.pt beside the ckpt or in the folder)",
    )
    if generates:
        p.add_argument("--max-new-tokens", type=int, default=32, help="answer length cap")
        p.add_argument(
            "--repetition-penalty",
            type=float,
            help="HF generate's repetition_penalty for answers, e.g. 1.2 (default: the LMM's own "
            "decoding); the visual chain of thought keeps the LMM's own",
        )
    p.add_argument(
        "--device",
        help="cpu, cuda, cuda:1, ... (default: where --device-map puts the LMM, else cpu)",
    )


def load_chat(args: argparse.Namespace) -> GroundedChat:
    """The :class:`GroundedChat` the command-line arguments describe (:func:`flmm.model.load`
    reads the checkpoint, head folder or hub id)."""
    penalty = getattr(args, "repetition_penalty", None)
    if penalty is not None and not penalty > 0:
        raise FlmmUserError(
            f"--repetition-penalty must be positive (1.0: none, above 1: fewer repeats), "
            f"got {penalty}"
        )
    checkpoint = chosen_checkpoint(args.checkpoint)
    print(f"F-LMM checkpoint: {checkpoint}", file=sys.stderr)
    return GroundedChat.from_pretrained(
        str(checkpoint),
        args.lmm,
        args.sam,
        selector=args.selector,
        decoding={"repetition_penalty": penalty} if penalty is not None else None,
        family=getattr(args, "family", None),
        sam_variant=getattr(args, "sam_variant", None),
        **lmm_options(args),
    )


def chosen_checkpoint(given: str | None) -> Path:
    """The checkpoint ``--checkpoint`` names: ``last`` means the newest run's ``last.ckpt``
    under ``logs/`` (as ``checkpoint=last`` does for ``flmm evaluate``), never a hub id; none
    given, :func:`default_checkpoint`."""
    if given == "last":
        return newest_last(Path("logs"), option="--checkpoint ")
    return Path(given) if given else default_checkpoint()


def lmm_options(args: argparse.Namespace) -> dict:
    """The device and the frozen LMM's loading options the command line gives (options left out
    keep their defaults: a head folder's recorded dtype and revision)."""
    given = {
        "dtype": getattr(args, "dtype", None),
        "quantization": getattr(args, "quantization", None),
        "device_map": getattr(args, "device_map", None),
        "attn_implementation": getattr(args, "attn_implementation", None),
        "lmm_revision": getattr(args, "lmm_revision", None),
    }
    options = {k: v for k, v in given.items() if v is not None}
    return options | {"device": args.device, "trust_remote_code": args.trust_remote_code}


def default_checkpoint() -> Path:
    """The newest trained F-LMM under ``logs/`` of the current folder (where ``flmm train``
    writes its runs), debug runs skipped (:func:`flmm.model.runs.newest_real`): a run's model folder (``<run>/model``, which names its LMM, family and SAM),
    or the checkpoint of a run that has none yet (still training, or killed); a clear error if
    there is neither."""
    logs = Path("logs")
    found = [*logs.glob("**/model/config.json"), *logs.glob("**/checkpoints/*.ckpt")]
    if not found:
        raise FileNotFoundError(
            f"no F-LMM checkpoint under {logs.resolve()}; train one on the synthetic world "
            "with `flmm train` (`make run`) in this folder, or pass --checkpoint PATH"
        )
    newest = newest_real(found, logs)
    return newest.parent if newest.name == "config.json" else newest

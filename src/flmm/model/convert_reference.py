"""`flmm convert-reference CKPT --model ROW [--output PATH]`: a released F-LMM head as an
flmm checkpoint.

CKPT is one of the reference implementation's trained checkpoints (wusize/F-LMM, README
"Checkpoints"); ROW names the paper row it belongs to (a ``conf/model/lmm`` name). The result loads
strictly with ``flmm evaluate ... checkpoint=PATH``. See docs/convert_reference.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from flmm.errors import exit_on_user_error
from flmm.model.reference import RELEASED, convert


def parser() -> argparse.ArgumentParser:
    rows = ", ".join(f"{name} ({r.file_name})" for name, r in RELEASED.items())
    about = " ".join(__doc__.split("\n\n")[0].split())
    p = argparse.ArgumentParser(
        prog="flmm convert-reference", description=about, allow_abbrev=False
    )
    p.add_argument("ckpt", help="the reference's .pth file")
    p.add_argument("--model", required=True, choices=list(RELEASED), help=f"paper row: {rows}")
    p.add_argument("--output", help="checkpoint to write (default: CKPT with the suffix .ckpt)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    row = RELEASED[args.model]
    out = Path(args.output or Path(args.ckpt).with_suffix(".ckpt"))

    def go() -> None:
        ckpt = convert(args.ckpt, row.target)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, out)
        print(f"wrote {out}: {len(ckpt['state_dict'])} tensors for {row.target.lmm_id}")
        print(f"evaluate: flmm evaluate {row.evaluate_args} data=mix checkpoint={out}")

    exit_on_user_error(go)


if __name__ == "__main__":
    main()

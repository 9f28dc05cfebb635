"""``flmm COMMAND [ARGS]``: one command for every entry point.

Each command is also ``python -m flmm.<module>``; ``flmm COMMAND --help`` prints its own help
(Hydra's for the config-driven commands, argparse's for the others).
"""

from __future__ import annotations

import importlib
import sys

# command -> (module whose main() runs it, one line of help)
COMMANDS = {
    "train": ("flmm.train", "train F-LMM (Hydra overrides: model=llava data=refcoco ...)"),
    "evaluate": ("flmm.evaluate", "score a checkpoint on every split (checkpoint=...)"),
    "ground": ("flmm.chat.ground", "ground phrases of a text or an answer on one image"),
    "predict": (
        "flmm.chat.predict",
        "ground phrases on a folder or JSONL of images: JSON with COCO RLE masks, overlays",
    ),
    "web": ("flmm.chat.web", "the grounded-chat web page (127.0.0.1 by default)"),
    "pope": (
        "flmm.chat.evaluate_pope",
        "POPE hallucination: plain answers vs visual chain of thought",
    ),
    "reasonseg": (
        "flmm.chat.reasonseg",
        "ReasonSeg-style evaluation: answer, then ground the answer",
    ),
    "train-selector": ("flmm.chat.train_selector", "train the keyword selector"),
    "convert-reference": (
        "flmm.model.convert_reference",
        "turn a released reference F-LMM head into an flmm checkpoint",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: flmm COMMAND [ARGS]   (flmm COMMAND --help for its options)\n\n" + "\n".join(
        ["commands:", *lines]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"flmm: error: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv = [f"flmm {argv[0]}", *argv[1:]]
    module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m flmm.chat.ground IMAGE "question or phrase" [--phrases ...]`: grounded answers on the CLI.

Modes: ``chat`` answers the question and grounds phrases of the answer (``--phrases``, else the
keyword selector's, or the answer's noun phrases where no selector is loaded); ``ground`` grounds ``--phrases`` of the given text (the whole text without
them); ``cot`` runs the visual chain of thought; ``reason`` answers, then segments what the answer
names (ReasonSeg style); ``auto`` (default) is ``chat`` for a question (ending in "?"), else
``ground``. Prints the answer with the grounded phrases marked and writes an overlay PNG (one
colour per phrase, with a legend). Defaults load the synthetic world's models and the newest F-LMM
checkpoint under ``logs/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from flmm.chat.conversation import NOUN_RULE, ChatResult, GroundedChat, VisualCoT, object_span
from flmm.chat.images import load_image
from flmm.chat.options import add_model_args, load_chat
from flmm.chat.reasonseg import reason
from flmm.errors import FlmmUserError, exit_on_user_error
from flmm.model.predictor import phrase_spans
from flmm.overlay import phrase_colour, render_overlay

MODES = ("auto", "chat", "ground", "cot", "reason")


def marked(result: ChatResult) -> str:
    """The answer with each grounded phrase wrapped as ``[phrase]{k}`` (k = legend number)."""
    out, last = "", 0
    for k, (start, end) in enumerate(result.spans, 1):
        out += f"{result.answer[last:start]}[{result.answer[start:end]}]{{{k}}}"
        last = end
    return out + result.answer[last:]


def transcript(result: ChatResult, out: Path | None) -> str:
    """What the CLI prints: question, marked answer, one line per phrase, the overlay's path."""
    lines = [f"question: {result.question}"] if result.question else []
    lines.append(f"{'answer' if result.question else 'text'}:   {marked(result)}")
    for k, (phrase, span, mask) in enumerate(zip(result.phrases, result.spans, result.masks), 1):
        rgb = ",".join(str(int(c)) for c in phrase_colour(k - 1))
        box = mask_extent(mask)
        lines.append(
            f"  {k}. {phrase!r} chars {span[0]}-{span[1]}: {int(mask.sum())} px {box} rgb({rgb})"
        )
    lines += [f"  not in the answer, not grounded: {p!r}" for p in result.missing]
    if result.phrases_from == NOUN_RULE:
        lines.append(
            f"phrases: the answer's noun phrases ({NOUN_RULE}; no keyword selector loaded)"
        )
    if out is not None:
        lines.append(f"overlay: {out}")
    return "\n".join(lines)


def mask_extent(mask: np.ndarray) -> str:
    """``box x0,y0-x1,y1`` of a mask, or ``empty``."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return "empty"
    return f"box {xs.min()},{ys.min()}-{xs.max() + 1},{ys.max() + 1}"


def run(
    chat: GroundedChat,
    image: np.ndarray,
    text: str,
    phrases: list[str] | None = None,
    mode: str = "auto",
    max_new_tokens: int = 32,
    sample: bool = False,
    seed: int | None = None,
) -> ChatResult:
    """Run ``mode`` (see the module docstring) on ``image`` and ``text``; what to print and draw.

    In ``cot`` mode the answer is the object sentence followed by the final answer, and the
    grounded phrase is the object.
    """
    mode = resolve_mode(mode, text)
    check_text(text, phrases, mode)
    if mode == "chat":
        gen = {"do_sample": sample, "seed": seed}
        return chat.chat(image, text, phrases, max_new_tokens, **gen)
    if mode == "reason":
        return reason(chat, image, text, max_new_tokens).result
    if mode == "cot":
        return cot_result(chat.visual_cot(image, text, max_new_tokens), image)
    out = chat.ground(image, text, phrases or [text.strip()])
    return ChatResult("", text, out.phrases, out.spans, out.masks.numpy())


def resolve_mode(mode: str, text: str) -> str:
    """``mode``, with ``auto`` resolved: ``chat`` for a question (ending in "?"), else ``ground``."""
    if mode not in MODES:
        raise FlmmUserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        return "chat" if text.rstrip().endswith("?") else "ground"
    return mode


def check_text(text: str, phrases: list[str] | None, mode: str) -> None:
    """One-line errors for an empty text and, when grounding the given text (``mode`` resolved),
    for a phrase that is not in it (in order)."""
    if not text.strip():
        raise FlmmUserError("the text is empty: pass a question or the text to ground")
    if phrases and mode == "ground":
        try:
            phrase_spans(text, phrases)
        except ValueError as err:
            raise FlmmUserError(str(err)) from None


def cot_result(cot: VisualCoT, image: np.ndarray) -> ChatResult:
    """A visual chain of thought as a :class:`ChatResult` grounding its object phrase."""
    answer = f"{cot.object_text} Answer (whole image + crop {cot.box}): {cot.answer}"
    if cot.mask is None:
        return ChatResult(cot.question, answer, [], [], np.zeros((0, *image.shape[:2]), bool))
    phrase, span = object_span(cot.object_text)
    return ChatResult(cot.question, answer, [phrase], [span], cot.mask[None])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flmm ground", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("text", help="a question (answered, then grounded) or a phrase to ground")
    p.add_argument("--phrases", nargs="+", help="phrases to ground, exactly as in the text/answer")
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--output", default="overlay.png", help="overlay PNG to write")
    add_model_args(p)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, help="seed for --sample")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    def go() -> None:
        image = load_image(args.image)
        result = run(
            load_chat(args),
            image,
            args.text,
            args.phrases,
            args.mode,
            args.max_new_tokens,
            args.sample,
            args.seed,
        )
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_overlay(image, result.masks, result.phrases)).save(out)
        print(transcript(result, out))

    exit_on_user_error(go)


if __name__ == "__main__":
    main()

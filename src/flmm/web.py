"""`python -m flmm.web`: a small Gradio page to ask about an image and see the answer grounded.

Upload an image, ask a question (or give a phrase), and the page shows the answer with each
grounded phrase coloured like its mask, and the overlay. It binds to 127.0.0.1 unless told
otherwise, rejects uploads over ``--max-file-mb`` or ``--max-pixels`` and non-images with a
clear message, queues requests (one at a time, ``--max-queue`` waiting) and caps the question
length and answer tokens. Model options as in `python -m flmm.ground` (defaults: the synthetic
world's models and the newest F-LMM checkpoint under ``logs/``).
"""

from __future__ import annotations

import argparse
import html
from dataclasses import dataclass

import numpy as np

from flmm.chat import ChatResult, GroundedChat
from flmm.errors import FlmmUserError, MissingExtraError
from flmm.ground import MODES, load_image, phrase_colour, render_overlay, run
from flmm.model_options import add_model_args, load_chat
from flmm.runtime import exit_on_user_error

try:
    import gradio as gr
except ModuleNotFoundError:  # the `web` extra is not installed; main() says how to get it
    gr = None


@dataclass(frozen=True)
class Limits:
    """Request limits of the web page."""

    max_file_mb: int = 10
    max_pixels: int = 2048 * 2048
    max_question_chars: int = 500
    max_new_tokens: int = 64
    max_queue: int = 16


def answer_html(result: ChatResult) -> str:
    """The answer as HTML, each grounded phrase on the background colour of its mask."""
    parts, last = [], 0
    for k, (start, end) in enumerate(result.spans):
        rgb = ",".join(str(int(c)) for c in phrase_colour(k))
        parts.append(html.escape(result.answer[last:start]))
        phrase = html.escape(result.answer[start:end])
        parts.append(
            f'<span class="flmm-phrase" data-k="{k}" style="background-color: rgb({rgb}); '
            f'color: white; padding: 0 2px; border-radius: 3px">{phrase}</span>'
        )
        last = end
    parts.append(html.escape(result.answer[last:]))
    note = "".join(f"<br><i>not in the answer: {html.escape(p)}</i>" for p in result.missing)
    return f'<div id="flmm-answer">{"".join(parts)}{note}</div>'


def respond(
    chat: GroundedChat, limits: Limits, path: str | None, question: str, phrases: str, mode: str
) -> tuple[str, np.ndarray]:
    """One request: the answer HTML and the overlay (``H' x W' x 3`` uint8)."""
    try:
        image = check_request(limits, path, question)
        wanted = [p.strip() for p in phrases.split(";") if p.strip()] or None
        result = run(chat, image, question.strip(), wanted, mode, limits.max_new_tokens)
    except (FlmmUserError, FileNotFoundError) as err:
        raise gr.Error(str(err)) from err
    return answer_html(result), render_overlay(image, result.masks, result.phrases)


def check_request(limits: Limits, path: str | None, question: str) -> np.ndarray:
    """The uploaded image, or a :class:`FlmmUserError` saying what is wrong with the request."""
    if not path:
        raise FlmmUserError("upload an image first (PNG or JPEG)")
    if not question.strip():
        raise FlmmUserError("type a question (ending in '?') or a phrase to ground")
    if len(question) > limits.max_question_chars:
        raise FlmmUserError(
            f"the question has {len(question)} characters; the limit is {limits.max_question_chars}"
        )
    return load_image(path, limits.max_pixels)


def build_app(chat: GroundedChat, limits: Limits = Limits()) -> gr.Blocks:
    """The Gradio page around ``chat``."""
    with gr.Blocks(title="flmm: grounded conversation") as app:
        gr.Markdown("## flmm: ask about an image, see where the answer's phrases are")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image (PNG, JPEG)", type="filepath", elem_id="flmm-upload")
                question = gr.Textbox(label="question or phrase", elem_id="flmm-question")
                phrases = gr.Textbox(
                    label="phrases to ground (optional, separated by ';')", elem_id="flmm-phrases"
                )
                mode = gr.Radio(list(MODES), value="auto", label="mode", elem_id="flmm-mode")
                ask = gr.Button("Ask", variant="primary", elem_id="flmm-ask")
            with gr.Column():
                answer = gr.HTML(elem_id="flmm-answer-box")
                overlay = gr.Image(
                    label="overlay", type="numpy", format="png", elem_id="flmm-overlay"
                )
        ask.click(
            lambda *a: respond(chat, limits, *a),
            inputs=[upload, question, phrases, mode],
            outputs=[answer, overlay],
        )
    return app.queue(default_concurrency_limit=1, max_size=limits.max_queue)


def launch(
    app: gr.Blocks, limits: Limits, host: str = "127.0.0.1", port: int = 7860, block: bool = True
):
    """Serve ``app`` on ``host:port`` with the upload size limit."""
    return app.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{limits.max_file_mb}mb",
        prevent_thread_lock=not block,
        show_error=True,
        quiet=True,
    )


def require_gradio() -> None:
    if gr is None:
        raise MissingExtraError("gradio", "web", "the web page")


def main(argv: list[str] | None = None) -> None:
    exit_on_user_error(require_gradio)
    p = argparse.ArgumentParser(prog="python -m flmm.web", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-file-mb", type=int, default=Limits.max_file_mb)
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels)
    p.add_argument("--max-queue", type=int, default=Limits.max_queue)
    add_model_args(p)
    args = p.parse_args(argv)
    limits = Limits(
        max_file_mb=args.max_file_mb,
        max_pixels=args.max_pixels,
        max_new_tokens=args.max_new_tokens,
        max_queue=args.max_queue,
    )
    chat = exit_on_user_error(load_chat, args)
    print(f"flmm web page on http://{args.host}:{args.port}")
    launch(build_app(chat, limits), limits, args.host, args.port)


if __name__ == "__main__":
    main()

"""`python -m flmm.chat.web`: a small Gradio page to ask about an image and see the answer grounded.

Upload an image, ask a question (or give a phrase), and the page shows the answer with each
grounded phrase coloured like its mask, and the overlay. It binds to 127.0.0.1 unless told
otherwise, rejects uploads over ``--max-file-mb`` or ``--max-pixels`` and non-images with a
clear message, queues requests (one at a time, ``--max-queue`` waiting) and caps the length of
every text field and the answer tokens. Model options as in `python -m flmm.chat.ground` (defaults:
the synthetic world's models and the newest F-LMM checkpoint under ``logs/``).

Serving beyond this machine (``--host`` other than a loopback address) needs ``--allow-remote``
and a login, read from ``$FLMM_WEB_AUTH`` (``user:password``) or ``--auth-file`` (one
``user:password`` a line), never from the command line. Clients see only the one-line message
of a bad request, with file names but no server paths; anything else is logged on the server
and the client told "internal error". Uploads and overlays are deleted ``--keep-files-s`` after
they were written.
"""

from __future__ import annotations

import argparse
import html
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flmm.chat.conversation import ChatResult, GroundedChat
from flmm.chat.ground import MODES, load_image, run
from flmm.chat.options import add_model_args, load_chat
from flmm.errors import USER_ERRORS, FlmmUserError, MissingExtraError, exit_on_user_error
from flmm.overlay import phrase_colour, render_overlay

log = logging.getLogger(__name__)
AUTH_ENV = "FLMM_WEB_AUTH"

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
    max_phrases_chars: int = 500
    max_new_tokens: int = 64
    max_queue: int = 16
    keep_files_s: int = 900


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
        image = check_request(limits, path, question, phrases)
        wanted = [p.strip() for p in phrases.split(";") if p.strip()] or None
        result = run(chat, image, question.strip(), wanted, mode, limits.max_new_tokens)
    except USER_ERRORS as err:
        raise gr.Error(public_message(err, path)) from err
    except Exception as err:
        log.exception("request failed (upload %s)", path)
        raise gr.Error("internal error while answering; the server log has the details") from err
    return answer_html(result), render_overlay(image, result.masks, result.phrases)


def public_message(err: Exception, path: str | None) -> str:
    """What a client may read of a user error: the upload named by its file name, no folders."""
    message = str(err)
    if path:
        message = message.replace(str(path), Path(path).name)
    return message


def check_request(limits: Limits, path: str | None, question: str, phrases: str = "") -> np.ndarray:
    """The uploaded image, or a :class:`FlmmUserError` saying what is wrong with the request."""
    if not path:
        raise FlmmUserError("upload an image first (PNG or JPEG)")
    if not question.strip():
        raise FlmmUserError("type a question (ending in '?') or a phrase to ground")
    for name, text, limit in (
        ("question", question, limits.max_question_chars),
        ("phrases field", phrases, limits.max_phrases_chars),
    ):
        if len(text) > limit:
            raise FlmmUserError(f"the {name} has {len(text)} characters; the limit is {limit}")
    return load_image(path, limits.max_pixels)


def build_app(chat: GroundedChat, limits: Limits = Limits()) -> gr.Blocks:
    """The Gradio page around ``chat``."""
    keep = (limits.keep_files_s, limits.keep_files_s)  # every keep_files_s, delete files that old
    with gr.Blocks(title="flmm: grounded conversation", delete_cache=keep) as app:
        gr.Markdown("## flmm: ask about an image, see where the answer's phrases are")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image (PNG, JPEG)", type="filepath", elem_id="flmm-upload")
                question = gr.Textbox(
                    label="question or phrase",
                    elem_id="flmm-question",
                    max_length=limits.max_question_chars,
                )
                phrases = gr.Textbox(
                    label="phrases to ground (optional, separated by ';')",
                    elem_id="flmm-phrases",
                    max_length=limits.max_phrases_chars,
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
    app: gr.Blocks,
    limits: Limits,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    auth: list[tuple[str, str]] | None = None,
):
    """Serve ``app`` on ``host:port`` with the upload size limit (and a login if ``auth``)."""
    return app.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{limits.max_file_mb}mb",
        prevent_thread_lock=not block,
        show_error=False,
        auth=auth,
        quiet=True,
    )


def require_gradio() -> None:
    if gr is None:
        raise MissingExtraError("gradio", "web", "the web page")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_credentials(auth_file: str | None) -> list[tuple[str, str]]:
    """``(user, password)`` pairs from ``auth_file`` (one ``user:password`` a line) or else from
    ``$FLMM_WEB_AUTH``; empty if neither is given."""
    if auth_file:
        if not Path(auth_file).is_file():
            raise FileNotFoundError(f"--auth-file {auth_file} does not exist")
        lines = Path(auth_file).read_text().splitlines()
    else:
        lines = [os.environ.get(AUTH_ENV, "")]
    pairs = [tuple(line.strip().split(":", 1)) for line in lines if line.strip()]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise FlmmUserError(f"credentials must be user:password (from --auth-file or ${AUTH_ENV})")
    return pairs


def serving_auth(host: str, allow_remote: bool, auth_file: str | None) -> list | None:
    """The login to require; a :class:`FlmmUserError` for a non-loopback ``host`` without
    ``allow_remote`` or without credentials."""
    pairs = read_credentials(auth_file)
    if is_loopback(host):
        return pairs or None
    if not allow_remote:
        raise FlmmUserError(
            f"--host {host} makes the page reachable from other machines; bind to 127.0.0.1, or "
            f"pass --allow-remote with a login in ${AUTH_ENV} (user:password) or --auth-file"
        )
    if not pairs:
        raise FlmmUserError(
            f"--allow-remote needs a login: set ${AUTH_ENV}=user:password or pass --auth-file "
            "FILE (one user:password a line); never put passwords on the command line"
        )
    return pairs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="flmm web", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-file-mb", type=int, default=Limits.max_file_mb)
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels)
    p.add_argument("--max-queue", type=int, default=Limits.max_queue)
    p.add_argument("--keep-files-s", type=int, default=Limits.keep_files_s)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--auth-file", help=f"user:password lines (else ${AUTH_ENV})")
    add_model_args(p)
    args = p.parse_args(argv)
    exit_on_user_error(require_gradio)
    limits = Limits(
        max_file_mb=args.max_file_mb,
        max_pixels=args.max_pixels,
        max_new_tokens=args.max_new_tokens,
        max_queue=args.max_queue,
        keep_files_s=args.keep_files_s,
    )
    auth = exit_on_user_error(serving_auth, args.host, args.allow_remote, args.auth_file)
    chat = exit_on_user_error(load_chat, args)
    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}, reachable from other machines; login required")
    print(f"flmm web page on http://{args.host}:{args.port}")
    launch(build_app(chat, limits), limits, args.host, args.port, auth=auth)


if __name__ == "__main__":
    main()

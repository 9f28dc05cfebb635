"""`python -m flmm.chat.web`: a small Gradio page to ask about an image and see the answer grounded.

Upload an image (or click one of the synthetic world's examples), ask a question (or give a
phrase): the answer streams in as it is generated, then each grounded phrase is coloured like its
mask, the masks are drawn over the image with a legend (hover or click a phrase to show its mask
alone), and a button downloads the masks as COCO-RLE JSON. It binds to 127.0.0.1 unless told
otherwise, rejects uploads over ``--max-file-mb`` or ``--max-pixels`` and non-images with a
clear message, queues requests (one at a time, ``--max-queue`` waiting) and caps the length of
every text field and the answer tokens. Model options as in `python -m flmm.chat.ground` (defaults:
the synthetic world's models and the newest F-LMM checkpoint under ``logs/``).

Serving beyond this machine (``--host`` other than a loopback address) needs ``--allow-remote``
and a login, and should be HTTPS (``--ssl-certfile``, ``--ssl-keyfile``): see
:mod:`flmm.chat.web_access`. Clients see only the one-line message
of a bad request, with file names but no server paths; anything else is logged on the server
and the client told "internal error". Uploads and mask files are deleted ``--keep-files-s`` after
they were written.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from flmm.chat.conversation import ChatResult, GroundedChat
from flmm.chat.ground import MODES, load_image, resolve_mode, run
from flmm.chat.options import add_model_args, load_chat
from flmm.chat.web_access import (
    AUTH_ENV,
    is_loopback,
    serving_auth,
    serving_tls,
    warn_plain_http,
)
from flmm.data.masks import phrase_record
from flmm.errors import USER_ERRORS, FlmmUserError, MissingExtraError, exit_on_user_error
from flmm.overlay import phrase_colour

log = logging.getLogger(__name__)
EXAMPLES_DIR = Path(__file__).with_name("examples")
DESCRIBE = "please give me a description of the image."
# test-split scenes of the synthetic world (seed 0), shipped so that they exist before the world
EXAMPLES = [
    ("synthetic_000910.png", DESCRIBE, "blue cross; green cross", "chat"),
    ("synthetic_000912.png", DESCRIBE, "purple object; orange object", "chat"),
    ("synthetic_000902.png", "the red circle", "", "ground"),
    ("synthetic_000908.png", "the yellow circle above the triangle", "", "ground"),
]
MASK_ALPHA = 0.75
CSS = """
#flmm-upload img, #flmm-masks img { image-rendering: pixelated; }
#flmm-upload img { width: 100%; height: 100%; object-fit: contain; }
"""

try:
    import gradio as gr
    from gradio.utils import get_upload_folder
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
) -> Iterator[tuple]:
    """One request, as the page's updates ``(answer HTML, masks, download)``: the answer while it
    is generated (chat mode), then with its grounded phrases, their masks and the RLE JSON."""
    try:
        image = check_request(limits, path, question, phrases)
        wanted = [p.strip() for p in phrases.split(";") if p.strip()] or None
        if resolve_mode(mode, question) == "chat":
            result = yield from streamed(chat, image, question.strip(), wanted, limits)
        else:
            result = run(chat, image, question.strip(), wanted, mode, limits.max_new_tokens)
        saved = save_masks(result, path)
    except USER_ERRORS as err:
        raise gr.Error(public_message(err, path)) from err
    except Exception as err:
        log.exception("request failed (upload %s)", path)
        raise gr.Error("internal error while answering; the server log has the details") from err
    yield (
        answer_html(result),
        annotated(image, result),
        gr.DownloadButton(value=saved, visible=True),
    )


def streamed(
    chat: GroundedChat, image: np.ndarray, question: str, wanted: list[str] | None, limits: Limits
) -> Iterator[tuple]:
    """Yield the page's updates while the answer is generated; return the grounded answer."""
    answer, none = "", np.zeros((0, *image.shape[:2]), dtype=bool)
    hidden = gr.DownloadButton(visible=False)
    for piece in chat.stream(image, question, limits.max_new_tokens):
        answer += piece
        yield answer_html(ChatResult(question, answer, [], [], none)), None, hidden
    return chat.grounded(image, question, answer, *chat.pick(image, question, answer, wanted))


def labels(phrases: list[str]) -> list[str]:
    """Legend labels: the phrases, numbered where one occurs twice (labels key the colours)."""
    return [p if phrases.count(p) == 1 else f"{p} ({k + 1})" for k, p in enumerate(phrases)]


def annotated(image: np.ndarray, result: ChatResult):
    """The masks over the image, each in its phrase's colour, with a legend of the phrases."""
    names = labels(result.phrases)
    colours = {n: "#" + phrase_colour(k).tobytes().hex() for k, n in enumerate(names)}
    masks = [(m * MASK_ALPHA, n) for m, n in zip(result.masks.astype(float), names)]
    return gr.AnnotatedImage((image, masks), color_map=colours)


def masks_json(result: ChatResult) -> dict:
    """The request's answer and its grounded phrases with their masks as COCO RLE."""
    return {
        "question": result.question,
        "answer": result.answer,
        "size": list(result.masks.shape[1:]),
        "phrases": [phrase_record(*g) for g in zip(result.phrases, result.spans, result.masks)],
        "missing": result.missing,
    }


def save_masks(result: ChatResult, upload: str) -> str:
    """Write :func:`masks_json` into Gradio's upload folder (deleted on the uploads' schedule)."""
    os.makedirs(get_upload_folder(), exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="flmm-masks-", dir=get_upload_folder()))
    path = folder / f"{Path(upload).stem}_masks.json"
    path.write_text(json.dumps(masks_json(result)))
    return str(path)


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


def image_input(**kwargs) -> gr.Image:
    """An image input with a preview whose handler gets the uploaded file's path unopened, so that
    :func:`check_request` alone reads it (size, pixel and decompression-bomb limits, one clear
    message for a non-image). Not a subclass: Gradio writes a ``.pyi`` stub beside the module of
    every component subclass."""
    image = gr.Image(type="filepath", **kwargs)

    def unopened(payload) -> str | None:
        return None if payload is None else payload.path

    image.preprocess = unopened
    return image


def build_app(chat: GroundedChat, limits: Limits = Limits()) -> gr.Blocks:
    """The Gradio page around ``chat``."""
    keep = (limits.keep_files_s, limits.keep_files_s)  # every keep_files_s, delete files that old
    with gr.Blocks(title="flmm: grounded conversation", delete_cache=keep) as app:
        gr.Markdown("## flmm: ask about an image, see where the answer's phrases are")
        with gr.Row():
            with gr.Column():
                upload = image_input(
                    label="image (PNG, JPEG)",
                    sources=["upload", "clipboard"],
                    height=240,
                    elem_id="flmm-upload",
                )
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
                answer = gr.HTML(label="answer", elem_id="flmm-answer-box")
                masks = gr.AnnotatedImage(
                    label="masks (hover or click a phrase to see its mask alone)",
                    height=360,
                    format="png",
                    elem_id="flmm-masks",
                )
                download = gr.DownloadButton(
                    "masks as COCO-RLE JSON", visible=False, elem_id="flmm-download"
                )
        gr.Examples(
            [[str(EXAMPLES_DIR / name), *rest] for name, *rest in EXAMPLES],
            inputs=[upload, question, phrases, mode],
            label="examples: the synthetic world's test scenes",
            elem_id="flmm-examples",
        )
        ask.click(
            partial(respond, chat, limits),
            inputs=[upload, question, phrases, mode],
            outputs=[answer, masks, download],
        )
    return app.queue(default_concurrency_limit=1, max_size=limits.max_queue)


def launch(
    app: gr.Blocks,
    limits: Limits,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    auth: list[tuple[str, str]] | None = None,
    tls: dict | None = None,
):
    """Serve ``app`` on ``host:port`` with the upload size limit (and a login if ``auth``, HTTPS
    with ``tls``: :func:`~flmm.chat.web_access.serving_tls`)."""
    return app.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{limits.max_file_mb}mb",
        prevent_thread_lock=not block,
        show_error=False,
        auth=auth,
        quiet=True,
        css=CSS,
        **(tls or {}),
    )


def require_gradio() -> None:
    if gr is None:
        raise MissingExtraError("gradio", "web", "the web page")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="flmm web", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-file-mb", type=int, default=Limits.max_file_mb)
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels)
    p.add_argument("--max-queue", type=int, default=Limits.max_queue)
    p.add_argument("--keep-files-s", type=int, default=Limits.keep_files_s)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--auth-file", help=f"user:password lines (else ${AUTH_ENV})")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
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
    tls = exit_on_user_error(serving_tls, args.ssl_certfile, args.ssl_keyfile)
    warn_plain_http(args.host, auth, tls)
    chat = exit_on_user_error(load_chat, args)
    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}, reachable from other machines; login required")
    print(f"flmm web page on {'https' if tls else 'http'}://{args.host}:{args.port}")
    launch(build_app(chat, limits), limits, args.host, args.port, auth=auth, tls=tls)


if __name__ == "__main__":
    main()

"""The web page end to end in headless Chromium (Debian's chromium + chromium-driver, selenium):
upload with preview, an example, the streamed answer, the masks and their RLE download."""

from __future__ import annotations

import html
import itertools
import json
import os
import re
import shutil
import socket
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from flmm.chat.conversation import GroundedChat
from flmm.chat.web import (
    EXAMPLES,
    Limits,
    annotated,
    answer_html,
    build_app,
    check_request,
    labels,
    launch,
    respond,
)
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.model.network import FLMMModel
from flmm.overlay import phrase_colour

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]
TEXT, PHRASES = "a red circle and a blue square", "red circle; blue square"
# .ci/run installs the browser and sets FLMM_REQUIRE_BROWSER=1, so in CI a missing one fails
browser = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists())
    and not os.environ.get("FLMM_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def chat(tiny_llava_dir) -> GroundedChat:
    torch.manual_seed(0)
    lmm = FrozenLMM.from_pretrained(tiny_llava_dir)
    return GroundedChat(FLMMModel.build(lmm, build_sam("tiny"), base_channels=8))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("web") / "scene.png"
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def app(chat) -> gr.Blocks:
    return build_app(chat, Limits(max_file_mb=1))


@pytest.fixture(scope="module")
def server(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, Limits(max_file_mb=1), port=port, block=False)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(tmp_path_factory, downloads):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    drv = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield drv
    drv.quit()


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def preview_src(driver) -> str:
    """The ``src`` of the upload's preview once the image is shown."""
    images = wait_for(driver, lambda d: [i for i in css(d, "#flmm-upload img") if i.is_displayed()])
    return images[0].get_attribute("src")


def ask(driver, server: str, upload: Path, text: str, phrases: str = "") -> None:
    driver.get(server)
    wait_for(driver, lambda d: css(d, "#flmm-upload input[type=file]"))
    css(driver, "#flmm-upload input[type=file]")[0].send_keys(str(upload))
    assert preview_src(driver)
    css(driver, "#flmm-question textarea")[0].send_keys(text)
    css(driver, "#flmm-phrases textarea")[0].send_keys(phrases)
    css(driver, "#flmm-ask")[0].click()


def downloaded_masks(driver, downloads: Path) -> dict:
    """Click the download button; the JSON file the browser saved."""
    button = wait_for(driver, lambda d: [b for b in css(d, "#flmm-download") if b.is_displayed()])
    button[0].click()
    files = wait_for(driver, lambda d: list(downloads.glob("*_masks.json")))
    return json.loads(files[0].read_text())


def decoded(record: dict) -> np.ndarray:
    return np.stack([mask_utils.decode(p["mask"]).astype(bool) for p in record["phrases"]])


@browser
def test_upload_preview_ask_and_download_the_masks(
    driver, server, app, chat, image_file, downloads
):
    ask(driver, server, image_file, TEXT, PHRASES)
    wait_for(driver, lambda d: len(css(d, "#flmm-masks .legend-item")) == 2, 120)
    spans, legend = css(driver, "span.flmm-phrase"), css(driver, "#flmm-masks .legend-item")
    assert [s.text for s in spans] == [x.text for x in legend] == ["red circle", "blue square"]
    for k, (span, item) in enumerate(zip(spans, legend)):
        rgb = ", ".join(str(int(c)) for c in phrase_colour(k))
        assert span.value_of_css_property("background-color") in (f"rgb({rgb})", f"rgba({rgb}, 1)")
        assert item.value_of_css_property("background-color").startswith(f"rgba({rgb}, 0.5")
    assert len(css(driver, "#flmm-masks img.mask")) == 2
    record = downloaded_masks(driver, downloads)
    image = np.array(Image.open(image_file).convert("RGB"))
    grounding = chat.ground(image, TEXT, ["red circle", "blue square"])
    assert [(p["text"], p["span"]) for p in record["phrases"]] == [
        ("red circle", [2, 12]),
        ("blue square", [19, 30]),
    ]
    np.testing.assert_array_equal(decoded(record), grounding.masks.numpy())
    from gradio.route_utils import delete_files_created_by_app  # what delete_cache runs

    served = [f for files in app.temp_file_sets for f in files if f.endswith("_masks.json")]
    assert served and all(Path(f).is_file() for f in served)
    assert all(Path(f).parent.name.startswith("flmm-masks-") for f in served)  # not a copy
    delete_files_created_by_app(app, 0)
    assert not any(Path(f).exists() for f in served)


@browser
def test_an_example_fills_the_form_and_its_answer_streams(driver, server):
    driver.get(server)
    wait_for(driver, lambda d: css(d, '#flmm-examples td[data-testid="dataset-cell-0-1"]'))[
        0
    ].click()
    name, question = EXAMPLES[0][0], EXAMPLES[0][1]
    assert wait_for(driver, lambda d: name in preview_src(d))
    assert css(driver, "#flmm-question textarea")[0].get_attribute("value") == question
    driver.execute_script(RECORD_ANSWERS)
    css(driver, "#flmm-ask")[0].click()
    wait_for(
        driver,
        lambda d: css(d, "#flmm-download") and css(d, "#flmm-download")[0].is_displayed(),
        120,
    )
    seen = [t for t in driver.execute_script("return window.flmmAnswers") if t]
    seen = [t for k, t in enumerate(seen) if not k or t != seen[k - 1]]
    assert len(set(seen)) >= 3, seen  # at least two partial answers before the final one
    assert all(b.startswith(a) for a, b in itertools.pairwise(seen)), seen


RECORD_ANSWERS = """
window.flmmAnswers = [];
const box = document.querySelector('#flmm-answer-box');
const answer = () => document.querySelector('#flmm-answer')?.innerText.trim();
new MutationObserver(() => window.flmmAnswers.push(answer()))
    .observe(box, {childList: true, subtree: true, characterData: true});
"""


@browser
def test_a_bad_upload_gets_a_clear_message(driver, server, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    ask(driver, server, bad, "what is this?")
    wait_for(driver, lambda d: "cannot read" in d.page_source)
    assert "pass a PNG, JPEG" in driver.page_source


def final(updates) -> tuple:
    """The last update of a request (the generator handler runs to its end)."""
    return list(updates)[-1]


def test_requests_are_checked(chat, image_file):
    limits = Limits(max_pixels=100, max_question_chars=10)
    with pytest.raises(gr.Error, match="upload an image"):
        final(respond(chat, limits, None, "what?", "", "auto"))
    with pytest.raises(gr.Error, match="limit is 10"):
        final(respond(chat, limits, str(image_file), "x" * 11, "", "auto"))
    with pytest.raises(gr.Error, match="more than the limit of 100"):
        final(respond(chat, limits, str(image_file), "what?", "", "auto"))
    image = check_request(Limits(), str(image_file), "what?")
    assert image.shape == (40, 56, 3) and image.dtype == np.uint8


def test_the_answer_streams_then_is_grounded_like_a_chat(chat, image_file):
    image = np.array(Image.open(image_file).convert("RGB"))
    answer = chat.answer(image, "what is here?", 64)
    phrases = answer.split()[1:3]  # two words of the answer the random model gives
    updates = list(
        respond(chat, Limits(), str(image_file), "what is here?", "; ".join(phrases), "auto")
    )
    texts = [html.unescape(re.sub("<[^>]+>", "", u[0])) for u in updates]
    assert len(updates) >= 3 and texts[-1] == texts[-2] == answer
    assert all(b.startswith(a) and b != a for a, b in itertools.pairwise(texts[:-1]))
    assert all(u[1] is None for u in updates[:-1])
    expected = chat.chat(image, "what is here?", phrases, 64)
    _, masks, download = updates[-1]
    assert [a["label"] for a in masks.value["annotations"]] == labels(expected.phrases)
    record = json.loads(Path(download.value["path"]).read_text())
    assert record["answer"] == answer and record["size"] == [40, 56]
    assert [p["text"] for p in record["phrases"]] == expected.phrases
    assert [tuple(p["span"]) for p in record["phrases"]] == expected.spans
    np.testing.assert_array_equal(decoded(record), expected.masks)


def test_answer_html_colours_and_escapes(chat, image_file):
    page, _, _ = final(
        respond(chat, Limits(), str(image_file), "a <b> & red circle", "red circle", "auto")
    )
    assert "&lt;b&gt; &amp; " in page and "rgb(230,25,75)" in page and "red circle</span>" in page
    from flmm.chat.conversation import ChatResult

    result = ChatResult("q", "a <x>", [], [], np.zeros((0, 2, 2), bool), missing=["dog"])
    assert (
        answer_html(result)
        == '<div id="flmm-answer">a &lt;x&gt;<br><i>not in the answer: dog</i></div>'
    )


def test_masks_carry_the_phrase_colours_and_repeated_phrases_get_numbers():
    from flmm.chat.conversation import ChatResult

    masks = np.zeros((3, 4, 5), bool)
    masks[0, :2], masks[1, 2:], masks[2, :, :1] = True, True, True
    result = ChatResult("q", "a dog, a dog, a cat", ["a dog", "a dog", "a cat"], [], masks)
    shown = annotated(np.zeros((4, 5, 3), np.uint8), result)
    assert labels(result.phrases) == ["a dog (1)", "a dog (2)", "a cat"]
    assert shown.color_map == {"a dog (1)": "#e6194b", "a dog (2)": "#3cb44b", "a cat": "#0082c8"}

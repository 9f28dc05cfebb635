"""The web page end to end in headless Chromium (Debian's chromium + chromium-driver, selenium)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from flmm.chat.conversation import GroundedChat
from flmm.chat.web import Limits, answer_html, build_app, check_request, launch, respond
from flmm.heads import build_sam
from flmm.lmm import FrozenLMM
from flmm.model.module import FLMM
from flmm.overlay import phrase_colour, render_overlay

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
    return GroundedChat(FLMM.build(lmm, build_sam("tiny"), base_channels=8))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("web") / "scene.png"
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def server(chat):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(chat, Limits(max_file_mb=1))
    launch(app, Limits(max_file_mb=1), port=port, block=False)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield drv
    drv.quit()


def ask(driver, server: str, upload: Path, text: str, phrases: str = "") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server)
    wait = WebDriverWait(driver, 60)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#flmm-upload input[type=file]")))
    driver.find_element(By.CSS_SELECTOR, "#flmm-upload input[type=file]").send_keys(str(upload))
    uploaded = (By.CSS_SELECTOR, f'#flmm-upload td.filename[aria-label="{upload.name}"]')
    wait.until(ec.presence_of_element_located(uploaded))
    driver.find_element(By.CSS_SELECTOR, "#flmm-question textarea").send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "#flmm-phrases textarea").send_keys(phrases)
    driver.find_element(By.CSS_SELECTOR, "#flmm-ask").click()


@browser
def test_upload_ask_and_see_the_overlay(driver, server, chat, image_file, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ask(driver, server, image_file, TEXT, PHRASES)
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "span.flmm-phrase")) == 2)
    spans = driver.find_elements(By.CSS_SELECTOR, "span.flmm-phrase")
    assert [s.text for s in spans] == ["red circle", "blue square"]
    for k, span in enumerate(spans):
        rgb = ", ".join(str(int(c)) for c in phrase_colour(k))
        assert span.value_of_css_property("background-color") in (f"rgb({rgb})", f"rgba({rgb}, 1)")
    img = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#flmm-overlay img"))[0]
    with urllib.request.urlopen(img.get_attribute("src")) as response:
        shown = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    image = np.array(Image.open(image_file).convert("RGB"))
    grounding = chat.ground(image, TEXT, ["red circle", "blue square"])
    expected = render_overlay(image, grounding.masks.numpy(), grounding.phrases)
    np.testing.assert_array_equal(shown, expected)
    driver.save_screenshot(str(tmp_path / "web.png"))


@browser
def test_a_bad_upload_gets_a_clear_message(driver, server, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    ask(driver, server, bad, "what is this?")
    WebDriverWait(driver, 60).until(lambda d: "cannot read" in d.page_source)
    assert "pass a PNG, JPEG" in driver.page_source


def test_requests_are_checked(chat, image_file):
    limits = Limits(max_pixels=100, max_question_chars=10)
    with pytest.raises(gr.Error, match="upload an image"):
        respond(chat, limits, None, "what?", "", "auto")
    with pytest.raises(gr.Error, match="limit is 10"):
        respond(chat, limits, str(image_file), "x" * 11, "", "auto")
    with pytest.raises(gr.Error, match="more than the limit of 100"):
        respond(chat, limits, str(image_file), "what?", "", "auto")
    image = check_request(Limits(), str(image_file), "what?")
    assert image.shape == (40, 56, 3) and image.dtype == np.uint8


def test_answer_html_colours_and_escapes(chat, image_file):
    page, overlay = respond(
        chat, Limits(), str(image_file), "a <b> & red circle", "red circle", "auto"
    )
    assert "&lt;b&gt; &amp; " in page and "rgb(230,25,75)" in page and "red circle</span>" in page
    assert overlay.shape[2] == 3 and overlay.shape[1] >= 384
    from flmm.chat.conversation import ChatResult

    result = ChatResult("q", "a <x>", [], [], np.zeros((0, 2, 2), bool), missing=["dog"])
    assert (
        answer_html(result)
        == '<div id="flmm-answer">a &lt;x&gt;<br><i>not in the answer: dog</i></div>'
    )

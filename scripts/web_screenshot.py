"""`docs/web_demo.png`: the web page after one of its examples was asked, in headless Chromium.

    python scripts/web_screenshot.py --checkpoint logs/.../checkpoints/last.ckpt [--example 0]

Starts the page on a free loopback port (model options as in `flmm web`), clicks the example,
asks, waits until the answer is grounded and saves a 1200 x 900 screenshot of the top of the page.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from flmm.chat.options import add_model_args, load_chat
from flmm.chat.web import Limits, build_app, launch

SIZE = {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False}


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='flmm-chromium-')}")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", SIZE)
    return driver


def screenshot(url: str, example: int, out: Path) -> None:
    driver = browser()
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        cell = f'#flmm-examples td[data-testid="dataset-cell-{example}-1"]'
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, cell))[0].click()
        question = "#flmm-question textarea"
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, question).get_attribute("value"))
        driver.find_element(By.CSS_SELECTOR, "#flmm-ask").click()
        # the download button shows once the request is done, with masks or with none (an
        # answer that holds none of the phrases has no legend to wait for)
        wait.until(
            lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, DONE) if b.is_displayed()]
        )
        wait.until(lambda d: d.execute_script(IMAGES_LOADED))
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


DONE = "#flmm-download"
IMAGES_LOADED = "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--example", type=int, default=0, help="row of the examples table")
    p.add_argument("--output", type=Path, default=Path("docs/web_demo.png"))
    add_model_args(p)
    args = p.parse_args()
    app = build_app(load_chat(args), Limits())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, Limits(), port=port, block=False)
    try:
        screenshot(f"http://127.0.0.1:{port}", args.example, args.output)
    finally:
        app.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

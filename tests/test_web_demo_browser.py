"""tools/web_demo.py in a real browser: the app on 127.0.0.1 (tiny random models, no trained
output), headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium: upload
an image, type a vocabulary, submit, wait for the result; the picture's legend holds a swatch of
each name found and the table every typed name. Nothing is downloaded. Skipped, with the reason,
where no browser is installed; under CI (``CI`` set; ``.ci/run`` installs the browser) that fails
instead.
"""

import io
import os
import shutil
import socket
import urllib.request

import numpy as np
import pytest
from helpers import load_tool, tiny_demo_method
from PIL import Image

from ov_seg.engine.demo_service import DemoService
from ov_seg.utils.visualize import name_colors

VOCABULARY = ["Red Star", "grass", "sky", "blue circle"]
TIMEOUT_S = 60


def _browser():
    """(chromium, chromedriver) paths, or skip (fail under CI) naming what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [
        name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path
    ]
    for module in ("selenium", "gradio"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"python package {module}")
    if missing:
        reason = (
            f"no browser for the web demo test: {', '.join(missing)} missing (apt-get install "
            "chromium chromium-driver; pip install -r requirements.txt -r requirements-dev.txt)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_paths():
    return _browser()


@pytest.fixture(scope="module")
def app_url(browser_paths, toyworld_root):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    web_demo = load_tool("web_demo")
    service = DemoService(
        {
            "two-stage": tiny_demo_method("configs/toyworld/two_stage_R18.yaml"),
            "PACL": tiny_demo_method("configs/toyworld/pacl.yaml"),
        }
    )
    examples = [str(p) for p in sorted((toyworld_root / "val" / "images").iterdir())[:2]]
    app = web_demo.build_app(service, examples)
    port = _free_port()
    web_demo.launch(app, "127.0.0.1", port, [str(toyworld_root)], block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture
def browser(browser_paths, app_url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1100")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(TIMEOUT_S)
    yield driver
    driver.quit()


def _find(driver, css):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT_S).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def _message(driver) -> str:
    box = _find(driver, "#message textarea, #message input")
    return box.get_attribute("value") or ""


def _wait_for_message(driver, previous: str = "") -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, TIMEOUT_S).until(lambda d: _message(d) not in ("", previous))
    return _message(driver)


def _type_vocabulary(driver, text: str) -> None:
    box = _find(driver, "#vocabulary textarea")
    box.clear()
    box.send_keys(text)


@pytest.mark.slow
def test_upload_type_submit_and_read_the_result(app_url, browser, toyworld_root, tmp_path):
    from selenium.webdriver.common.by import By

    image = sorted((toyworld_root / "val" / "images").iterdir())[0]
    browser.get(app_url)
    _find(browser, "#image input[type=file]").send_keys(str(image))
    _find(browser, "#image img")  # the upload is shown
    _type_vocabulary(browser, ", ".join(VOCABULARY))
    _find(browser, "#submit").click()
    message = _wait_for_message(browser)
    assert message.startswith("two-stage (exact, "), message
    assert "of 4 names" in message or "NOTHING FOUND" in message

    table = _find(browser, "#shares").text
    for name in VOCABULARY:  # every typed name, as typed, with its share
        assert name in table, (name, table)
    rows = {}
    for row in _find(browser, "#shares").find_elements(By.CSS_SELECTOR, "[role=row]"):
        cells = [c.text.strip() for c in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")]
        if len(cells) >= 2 and cells[0] in VOCABULARY:
            rows[cells[0]] = cells[1]
    assert set(rows) == set(VOCABULARY), table
    found = [name for name, share in rows.items() if share != "0%"]
    assert found, rows  # the random model labels every pixel with some name

    src = _find(browser, "#result img").get_attribute("src")
    assert src.startswith(app_url.rstrip("/")), src  # served by the app itself
    with urllib.request.urlopen(src, timeout=TIMEOUT_S) as response:
        picture = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    assert picture.shape[1] == 64 * 7 and picture.shape[0] > 64 * 7  # enlarged, legend below
    legend = picture[64 * 7 :]
    colors = name_colors(len(VOCABULARY), [VOCABULARY.index(n) for n in found])
    for name in found:  # the legend's swatch of each name found
        swatch = (legend == np.asarray(colors[VOCABULARY.index(name)], np.uint8)).all(-1)
        assert swatch.sum() >= 36, name
    browser.save_screenshot(str(tmp_path / "web_demo.png"))
    assert (tmp_path / "web_demo.png").stat().st_size > 10_000

    _type_vocabulary(browser, " , ")  # an empty vocabulary: a message, no crash
    _find(browser, "#submit").click()
    assert "vocabulary is empty" in _wait_for_message(browser, message)

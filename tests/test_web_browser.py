"""The web app in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven by Selenium):
type a query, see explained result tiles, open an explanation, search by an uploaded image."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

# Selenium must not try to fetch a driver: the Debian chromium-driver is given explicitly.
os.environ.setdefault("SE_OFFLINE", "true")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("headless browser test needs Debian's chromium and chromium-driver packages "
                "(apt-get install -y chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lexvla.index import SparseIndex, build_index  # noqa: E402
from lexvla.web import SearchService, create_app  # noqa: E402

SHAPES = [("red-circle", (220, 30, 30), "ellipse"), ("blue-square", (30, 30, 210), "rectangle"),
          ("green-circle", (30, 180, 40), "ellipse"), ("yellow-square", (230, 210, 30), "rectangle")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    import uvicorn

    root = tmp_path_factory.mktemp("browser")
    (root / "images").mkdir()
    for name, color, shape in SHAPES:
        img = Image.new("RGB", (96, 72), (245, 245, 245))
        getattr(ImageDraw.Draw(img), shape)((16, 10, 70, 62), fill=color)
        img.save(root / "images" / f"{name}.png")
    build_index(tiny_model, root / "images", out=root / "idx", progress=False)
    index = SparseIndex.open(root / "idx")
    app = create_app(SearchService(tiny_model, index))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    srv.should_exit = True
    thread.join(10)
    index.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _loaded(driver, element_id: str) -> bool:
    return bool(driver.execute_script(
        "const i = document.getElementById(arguments[0]); return i.complete && i.naturalWidth > 0;", element_id))


def test_search_results_and_explanation_in_a_real_browser(server, browser):
    url, root = server
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(EC.text_to_be_present_in_element((By.ID, "info"), "4 images"))
    box = browser.find_element(By.ID, "q")
    box.send_keys("a red circle", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .tile")) == 4)
    tiles = browser.find_elements(By.CSS_SELECTOR, "#results .tile")
    for tile in tiles:
        assert tile.find_elements(By.CSS_SELECTOR, ".words li .w"), "every tile lists its matching words"
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results .tile img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert "a red circle" in browser.find_element(By.ID, "status").text
    shot = Path(os.environ.get("LEXVLA_SCREENSHOT_DIR", root))
    browser.save_screenshot(str(shot / "web-results.png"))

    tiles[0].click()
    wait.until(EC.visibility_of_element_located((By.ID, "detail")))
    wait.until(lambda d: all(_loaded(d, i) for i in ("detail-image", "detail-wordcloud", "detail-patches",
                                                      "detail-heatmap")))
    assert "active words" in browser.find_element(By.ID, "detail-summary").text
    assert "a red circle" in browser.find_element(By.ID, "heatmap-caption").text
    assert browser.find_elements(By.CSS_SELECTOR, "#shared-words tbody tr")
    browser.save_screenshot(str(shot / "web-explanation.png"))
    browser.find_element(By.ID, "close").click()
    wait.until(EC.invisibility_of_element_located((By.ID, "detail")))

    # search by image: the upload goes through the same validation as the API
    browser.find_element(By.ID, "upload").send_keys(str(root / "images" / "blue-square.png"))
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "4 of 4 images for image blue-square.png"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .tile")) == 4

    # a rejected upload shows the server's message instead of results
    bad = root / "not-an-image.png"
    bad.write_bytes(b"plain text pretending to be a picture")
    browser.find_element(By.ID, "upload").send_keys(str(bad))
    status = browser.find_element(By.ID, "status")
    try:
        wait.until(lambda d: "415" in status.text)
    except TimeoutException:
        pytest.fail(f"no 415 in the status line: {status.text!r}")
    assert "not an accepted image" in status.text  # the server's 415 message, shown as is

"""The operator page in a real browser (headless Chromium): a slider moved there steers the engine."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from engine.control.transport import build_message
from tests.fakes import wait_until
from tests.test_operator import Show

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no Chromium and chromedriver here (apt-get install -y chromium chromium-driver; "
    "scripts/install-test-tools.sh does it where apt-get exists)",
)


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations show there
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_moving_a_slider_changes_the_engine_and_osc_changes_the_page(bundle, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with Show(bundle, tmp_path) as show:
        browser.get(show.url("/"))
        assert wait_until(lambda: browser.find_elements(By.ID, "param-guidance_scale"), 15), "controls built"
        slider = browser.find_element(By.ID, "param-guidance_scale")
        assert slider.get_attribute("type") == "range"
        assert float(slider.get_attribute("max")) == 20.0
        slider.click()
        slider.send_keys(Keys.END)  # the keyboard moves a range input like a drag does
        assert wait_until(lambda: show.pipeline.state["guidance_scale"] == pytest.approx(20.0), 15)
        assert wait_until(
            lambda: show.feedback.seen("/guidance_scale", lambda a: a[0] == pytest.approx(20.0)), 5
        )
        # two-way: a change over OSC reaches the page's control
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.sendto(build_message("/similarity_filter/threshold", [0.5]), ("127.0.0.1", show.service.port))
        sender.close()
        threshold = browser.find_element(By.ID, "param-similarity_filter_threshold")
        assert wait_until(lambda: abs(float(threshold.get_attribute("value")) - 0.5) < 1e-3, 15)
        for element in ("input", "output", "plot", "status", "scene-save", "scene-load"):
            assert browser.find_elements(By.ID, element), element
        assert wait_until(lambda: "fps" in browser.find_element(By.ID, "status").text.lower(), 10)
        for video in ("input", "output"):  # both MJPEG streams play under the page's CSP
            script = f"return document.getElementById('{video}').naturalWidth"
            assert wait_until(lambda script=script: browser.execute_script(script) > 0, 10), video
        severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not severe, severe  # no script error, no refused inline code, no failed request
        path = os.environ.get("LATENTSTAGE_SCREENSHOT")  # docs/operator-page.png is made this way
        if path:
            browser.save_screenshot(path)

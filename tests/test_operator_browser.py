"""The operator page in a real browser (headless Chromium): a slider moved there steers the engine."""

from __future__ import annotations

import json
import os
import re
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


def test_the_tempo_box_taps_resyncs_and_shows_the_beat(bundle, tmp_path, browser):
    """TAP (a click, the space bar) and RESYNC reach the engine's clock and the BPM shown follows;
    the beat dots run on the page's own clock between the status samples, in step with the
    engine's; the space bar still types in text fields and presses no focused button."""
    import math
    import time

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with Show(bundle, tmp_path, music=True) as show:
        music = show.engine.music
        calls: dict[str, list[float]] = {"tap": [], "resync": []}
        stamps: list[float] = []  # the tap times the engine is told (a browser's clicks jitter)
        real_tap, real_resync = music.tap, music.resync

        def tap(at: float) -> float | None:
            calls["tap"].append(at)
            return real_tap(stamps.pop(0) if stamps else at)

        def resync(at: float) -> None:
            calls["resync"].append(at)
            real_resync(at)

        music.tap, music.resync = tap, resync  # type: ignore[method-assign]
        browser.get(show.url("/"))
        shown = browser.find_element(By.ID, "tempo-bpm")
        assert wait_until(lambda: shown.text == "120.0", 15), shown.text
        dots = browser.find_elements(By.CSS_SELECTOR, "#beats i")
        assert len(dots) == 4 and "down" in dots[0].get_attribute("class").split()

        # no status for two seconds: the dots go on, with the engine's beat (0.5 s each)
        show.operator._notify = lambda: None  # type: ignore[method-assign]
        time.sleep(0.2)  # what was on its way has arrived
        lit = "return Array.from(document.querySelectorAll('#beats i.on'), d => d.title)"
        seen, compared = set(), 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            before = music.status().beat_at(time.monotonic())
            now_lit = browser.execute_script(lit)
            after = music.status().beat_at(time.monotonic())
            assert len(now_lit) == 1, now_lit
            seen.add(now_lit[0])
            if math.floor(before - 0.1) == math.floor(after + 0.1):  # not near a beat's edge
                assert now_lit[0] == f"beat {math.floor(before) % 4 + 1}", (now_lit, before, after)
                compared += 1
            time.sleep(0.03)
        assert len(seen) == 4 and compared >= 10, (seen, compared)
        del show.operator._notify

        def taps(interval: float, press) -> None:  # type: ignore[no-untyped-def]
            start = time.monotonic()
            stamps[:] = [start + interval * i for i in range(4)]
            for i in range(4):
                time.sleep(max(0.0, start + interval * i - time.monotonic()))
                press()

        taps(0.4, browser.find_element(By.ID, "tempo-tap").click)
        assert wait_until(lambda: len(calls["tap"]) == 4, 5), calls
        assert wait_until(lambda: shown.text == "150.0", 10), shown.text
        time.sleep(2.2)  # a pause longer than the tap tempo's gap starts a new series
        browser.find_element(By.CSS_SELECTOR, "#bar h1").click()  # focus on the page, not a field
        taps(0.6, lambda: ActionChains(browser).send_keys(Keys.SPACE).perform())
        assert wait_until(lambda: len(calls["tap"]) == 8, 5), calls
        assert wait_until(lambda: shown.text == "100.0", 10), shown.text
        field = browser.find_element(By.ID, "scene-name")
        field.send_keys("my scene")
        assert field.get_attribute("value") == "my scene"
        save = browser.find_element(By.ID, "scene-save")
        browser.execute_script("arguments[0].focus()", save)
        ActionChains(browser).send_keys(Keys.SPACE).perform()  # taps; the focused button stays unpressed
        assert wait_until(lambda: len(calls["tap"]) == 9, 5), calls
        browser.find_element(By.ID, "tempo-resync").click()
        assert wait_until(lambda: len(calls["resync"]) == 1, 5), calls
        time.sleep(0.3)
        assert "my scene" not in show.service.scenes.names()
        assert browser.find_element(By.ID, "error").text == ""
        step = browser.find_element(By.ID, "tempo-step")
        assert step.text == "" and not step.is_displayed()  # no sequence runs
        sequence = json.dumps({"steps": ["a", "b", "c"], "every": "1beat", "autostart": True})
        assert show.post({"name": "sequence", "value": sequence})[0] == 200
        assert wait_until(lambda: re.fullmatch(r"sequence step [0-2]", step.text), 10), step.text
        severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not severe, severe

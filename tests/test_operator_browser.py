"""The operator page in a real browser (headless Chromium): a slider moved there steers the engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time

import pytest

from engine.control.transport import build_message
from tests.fakes import FakeMidi, wait_until
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
        assert "replicas" not in browser.find_element(By.ID, "status").text  # one: the engine itself
        show.engine.stats.replicas_configured, show.engine.stats.replicas = 2, 1  # one of two is out
        assert wait_until(lambda: "replicas 1/2" in browser.find_element(By.ID, "status").text, 10)
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


def test_the_midi_box_lists_learns_and_forgets(bundle, tmp_path, browser):
    """The MIDI box: MIDI off says how to turn it on; on, it lists the controllers and their
    bindings. LEARN marks what a controller can play; a click on a parameter's name (a scene,
    TAP) sends midi_learn and leaves the control alone; the target is lit while the learn waits,
    cancel (and Escape) stop it; a learn done shows in the list; forget sends the binding's
    target and argument; refusals show in the error box."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webelement import WebElement

    def press(element: WebElement) -> None:
        """A click in the middle of the window (at its top, the sticky bar would take it)."""
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def classes(element: WebElement) -> list[str]:
        return (element.get_attribute("class") or "").split()

    def label(name: str) -> WebElement:
        return browser.find_element(By.CSS_SELECTOR, f'#controls .row[data-name="{name}"] > label')

    def row(name: str) -> WebElement:
        return browser.find_element(By.CSS_SELECTOR, f'#controls .row[data-name="{name}"]')

    listed = (
        "return Array.from(document.querySelectorAll('#midi-controllers li.midi-binding'), li => "
        "[li.querySelector('.midi-source').textContent, li.querySelector('.midi-to').textContent, "
        "li.querySelector('.midi-mode').textContent])"
    )

    with Show(bundle, tmp_path) as show:
        assert show.post({"name": "preset_save", "value": "intro"})[0] == 200  # a scene to learn a load of
        browser.get(show.url("/"))
        status = browser.find_element(By.ID, "midi-status")
        learn = browser.find_element(By.ID, "midi-learn")
        assert wait_until(lambda: status.text == "MIDI off: set midi.mappings in config.yaml", 15)
        assert not learn.is_displayed()

        midi = FakeMidi()
        show.service.attach_midi(midi)
        show.operator.changed({})
        assert wait_until(lambda: status.text.startswith("pad: connected to 'Pad 20:0'"), 10), status.text
        heads = [head.text for head in browser.find_elements(By.CSS_SELECTOR, ".midi-head")]
        assert "pad" in heads[0] and "connected: Pad 20:0" in heads[0], heads
        assert "spare" in heads[1] and "waiting for X-TOUCH" in heads[1], heads
        assert browser.execute_script(listed) == [
            ["cc 48 ch 1", "\u2192 guidance_scale", "absolute"],
            ["note 40", "\u2192 preset_load intro", "trigger"],
        ]

        # LEARN: the learnable names are marked, a click learns one
        assert wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#scenes button.scene"), 10)
        assert "learnable" in classes(row("guidance_scale")) and "learnable" not in classes(row("prompt"))
        press(learn)
        assert learn.get_attribute("aria-pressed") == "true"
        assert "midi-learn" in classes(browser.find_element(By.TAG_NAME, "body"))
        press(label("guidance_scale"))
        assert wait_until(lambda: ("learn", "guidance_scale", None) in midi.calls, 5), midi.calls
        assert wait_until(lambda: "learning" in classes(row("guidance_scale")), 10)
        waiting = browser.find_element(By.ID, "midi-learning")
        assert waiting.text == "move a control to bind guidance_scale"
        cancel = browser.find_element(By.ID, "midi-cancel")
        assert cancel.is_displayed()
        press(cancel)
        assert wait_until(lambda: ("cancel",) in midi.calls, 5), midi.calls
        assert wait_until(lambda: "learning" not in classes(row("guidance_scale")), 10)
        assert not cancel.is_displayed()

        # a switch's name learns it; the switch stays as it was
        switch = browser.find_element(By.ID, "param-bypass")
        assert not switch.is_selected()
        press(label("bypass"))
        assert wait_until(lambda: ("learn", "bypass", None) in midi.calls, 5), midi.calls
        assert wait_until(lambda: "learning" in classes(row("bypass")), 10)
        assert not switch.is_selected()
        # the control is moved on the controller: the list shows the new binding, lit a moment
        midi.learnt("note 36 ch 1", "toggle")
        show.operator.changed({})
        assert wait_until(lambda: len(browser.execute_script(listed)) == 3, 10)
        assert browser.execute_script(listed)[2] == ["note 36 ch 1", "\u2192 bypass", "toggle"]
        fresh = browser.find_elements(By.CSS_SELECTOR, "li.midi-binding.fresh")
        assert [item.get_attribute("data-target") for item in fresh] == ["bypass"]
        assert wait_until(lambda: "learning" not in classes(row("bypass")), 10)

        # a scene's load (with its argument), TAP; Escape stops the learn, then leaves LEARN
        scene = browser.find_element(By.CSS_SELECTOR, "#scenes button.scene")
        press(scene)
        assert wait_until(lambda: ("learn", "preset_load", "intro") in midi.calls, 5), midi.calls
        assert wait_until(lambda: "learning" in classes(scene), 10)
        assert browser.find_element(By.ID, "scene-name").get_attribute("value") == ""  # not picked
        tap = browser.find_element(By.ID, "tempo-tap")
        press(tap)
        assert wait_until(lambda: ("learn", "tempo_tap", None) in midi.calls, 5), midi.calls
        assert wait_until(lambda: "learning" in classes(tap), 10)
        assert "learning" not in classes(scene)
        cancels = midi.calls.count(("cancel",))
        press(tap)  # the target waited for, again: stop
        assert wait_until(lambda: midi.calls.count(("cancel",)) == cancels + 1, 5), midi.calls
        assert wait_until(lambda: "learning" not in classes(tap), 10)
        # save (or load) with a scene name typed learns that scene's save; nothing is saved
        browser.find_element(By.ID, "scene-name").send_keys("verse")
        save = browser.find_element(By.ID, "scene-save")
        press(save)
        assert wait_until(lambda: ("learn", "preset_save", "verse") in midi.calls, 5), midi.calls
        assert wait_until(lambda: "learning" in classes(save), 10)
        assert "verse" not in show.service.scenes.names()
        cancels = midi.calls.count(("cancel",))
        browser.find_element(By.CSS_SELECTOR, "#bar h1").click()  # focus on the page, not a field
        ActionChains(browser).send_keys(Keys.ESCAPE).perform()
        assert wait_until(lambda: midi.calls.count(("cancel",)) == cancels + 1, 5), midi.calls
        assert wait_until(lambda: not cancel.is_displayed(), 10)
        ActionChains(browser).send_keys(Keys.ESCAPE).perform()
        assert wait_until(lambda: learn.get_attribute("aria-pressed") == "false", 5)
        assert "midi-learn" not in classes(browser.find_element(By.TAG_NAME, "body"))

        # refused: the error box says why; LEARN off while a learn waits stops it
        midi.refuse = "guidance_scale is busy"
        press(learn)
        press(label("guidance_scale"))
        error = browser.find_element(By.ID, "error")
        assert wait_until(lambda: "guidance_scale is busy" in error.text, 5), error.text
        midi.refuse = None
        press(label("guidance_scale"))
        assert wait_until(lambda: "learning" in classes(row("guidance_scale")), 10)
        assert error.text == ""
        cancels = midi.calls.count(("cancel",))
        press(learn)
        assert wait_until(lambda: midi.calls.count(("cancel",)) == cancels + 1, 5), midi.calls
        press(label("seed"))  # LEARN is off: a name is a name again
        time.sleep(0.3)
        assert not any(call[:2] == ("learn", "seed") for call in midi.calls)

        # forget: this one binding, by its mapping and its place in the file
        forgets = browser.find_elements(
            By.CSS_SELECTOR, '#midi-controllers li[data-target="preset_load"] .midi-forget'
        )
        press(forgets[0])
        assert wait_until(lambda: ("unbind", "pad", 1) in midi.calls, 5), midi.calls
        assert wait_until(lambda: len(browser.execute_script(listed)) == 2, 10)
        press(
            browser.find_element(By.CSS_SELECTOR, '#midi-controllers li[data-target="guidance_scale"] button')
        )
        assert wait_until(lambda: ("unbind", "pad", 0) in midi.calls, 5), midi.calls
        assert wait_until(lambda: [b[1] for b in browser.execute_script(listed)] == ["\u2192 bypass"], 10)

        # MIDI gone: the box says so
        show.service.midi = None
        show.operator.changed({})
        assert wait_until(lambda: status.text == "MIDI off: set midi.mappings in config.yaml", 10)
        assert not learn.is_displayed() and browser.execute_script(listed) == []
        severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        refused = "/api/param - Failed to load resource: the server responded with a status of 400"
        assert [refused in message for message in severe] == [True], severe  # the refused learn only


class FakeCatalog:
    """A source catalogue as the control service owns it (``SourceCatalog``): its last look as
    ``snapshot()`` gives it, ``refresh()`` counted."""

    def __init__(self) -> None:
        self.refreshes = 0
        self.age_s: float | None = 1.5
        self.sources = [
            {"name": "pattern", "kind": "pattern", "label": "test pattern", "detail": "built in"},
            {"name": "shm:cam", "kind": "shm", "label": "cam", "detail": "64x64 RGBA8, 30 frames a second"},
            {"name": "file:clip.mp4", "kind": "file", "label": "clip.mp4", "detail": "media/clip.mp4"},
        ]

    def snapshot(self) -> dict:
        return {
            "sources": [dict(s) for s in self.sources],
            "unavailable": {"ndi": "needs cyndilib (pip install latentstage[ndi])"},
            "age_s": self.age_s,
        }

    def names(self) -> list[str]:
        return [s["name"] for s in self.sources]

    def refresh(self) -> None:
        self.refreshes += 1
        self.age_s = 0.0

    def close(self) -> None:
        pass


def test_the_sources_box_lists_plays_refreshes_and_shows_thumbnails(bundle, tmp_path, browser):
    """The Sources box: the catalogue's sources with label, name and detail, the kinds not
    available here; play posts input_source through the dispatcher and shows the switch until
    the engine echoes it (then that source is marked playing) or refuses it (then it says why);
    refresh makes the catalogue look again; thumbnails fetch each source's picture every ~2 s."""
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webelement import WebElement

    def press(element: WebElement) -> None:
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def item(name: str) -> WebElement:
        return browser.find_element(By.CSS_SELECTOR, f'#sources li.source[data-name="{name}"]')

    def classes(element: WebElement) -> list[str]:
        return (element.get_attribute("class") or "").split()

    listed = (
        "return Array.from(document.querySelectorAll('#sources li.source'), li => [li.dataset.name, "
        "li.querySelector('.source-label').textContent, li.querySelector('.source-name').textContent, "
        "li.querySelector('.source-detail').textContent])"
    )
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 16, 3), (20, 180, 60), np.uint8)).save(buffer, format="JPEG")
    tiny = buffer.getvalue()
    asked: list[str] = []

    def thumbnails(name: str) -> bytes | None:
        asked.append(name)
        return tiny if name == "shm:cam" else None

    with Show(bundle, tmp_path) as show:
        browser.get(show.url("/"))
        playing = browser.find_element(By.ID, "source-playing")
        assert wait_until(lambda: playing.text == "playing pattern", 15), playing.text
        assert browser.find_element(By.ID, "sources").text == "this engine lists no sources"
        assert not browser.find_element(By.ID, "source-refresh").is_displayed()

        catalog = FakeCatalog()
        service = show.service
        service.catalog = catalog  # as media_dir makes it: the state's sources, /input/sources
        service.dispatcher.sources = service._source_names
        service.thumbnails = thumbnails
        show.operator.changed({})
        assert wait_until(lambda: len(browser.execute_script(listed)) == 3, 10)
        assert browser.execute_script(listed) == [
            ["pattern", "test pattern", "pattern", "built in"],
            ["shm:cam", "cam", "shm:cam", "64x64 RGBA8, 30 frames a second"],
            ["file:clip.mp4", "clip.mp4", "file:clip.mp4", "media/clip.mp4"],
        ]
        assert playing.text == "playing pattern test pattern"
        assert "playing" in classes(item("pattern")) and "playing" not in classes(item("shm:cam"))
        button = item("pattern").find_element(By.CSS_SELECTOR, "button.source-play")
        assert button.text == "playing" and not button.is_enabled()
        unavailable = browser.find_element(By.ID, "source-unavailable").text
        assert unavailable == "ndi needs cyndilib (pip install latentstage[ndi])"
        assert browser.find_element(By.ID, "source-age").text == "looked 2 s ago"
        assert browser.find_element(By.ID, "source-fade").text == "switches cut"
        assert asked == []  # no thumbnails before they are asked for

        # play: input_source reaches the dispatcher; the switch shows until the engine echoes it
        requests: list[tuple[str, list]] = []
        real_request = service.dispatcher.handle_request

        def handle_request(address, args, sender):  # type: ignore[no-untyped-def]
            requests.append((address, list(args)))
            if address == "/input/select" and args == ["shm:cam"]:
                return [], None  # accepted; the engine's switch is this test's to finish
            return real_request(address, args, sender)

        service.dispatcher.handle_request = handle_request  # type: ignore[method-assign]
        press(item("shm:cam").find_element(By.CSS_SELECTOR, "button.source-play"))
        assert wait_until(lambda: ("/input/select", ["shm:cam"]) in requests, 5), requests
        assert playing.text == "switching to shm:cam\u2026"
        assert "switching" in classes(item("shm:cam"))
        assert item("shm:cam").find_element(By.CSS_SELECTOR, "button").text == "opening\u2026"
        show.operator.changed({})  # a push without the echo: still switching
        time.sleep(0.3)
        assert playing.text == "switching to shm:cam\u2026"
        show.engine.control.mark_applied({"input_source": "shm:cam"})  # the engine's echo
        show.operator.changed({})
        assert wait_until(lambda: playing.text == "playing shm:cam cam", 10), playing.text
        assert "playing" in classes(item("shm:cam")) and "switching" not in classes(item("shm:cam"))
        assert "playing" not in classes(item("pattern"))
        assert item("pattern").find_element(By.CSS_SELECTOR, "button").text == "play"

        # a switch the engine refuses (this engine's sources are fixed): the box says why
        press(item("file:clip.mp4").find_element(By.CSS_SELECTOR, "button.source-play"))
        assert wait_until(lambda: ("/input/select", ["file:clip.mp4"]) in requests, 5), requests
        assert wait_until(
            lambda: playing.text.startswith("input_source: this engine's sources are fixed"), 10
        ), playing.text
        assert "bad" in classes(playing) and "playing" in classes(item("shm:cam"))
        assert show.engine.stats.last_error.startswith("input_source:")

        # refresh: the catalogue looks again
        press(browser.find_element(By.ID, "source-refresh"))
        assert wait_until(lambda: catalog.refreshes == 1, 5), catalog.refreshes
        assert ("/input/sources", []) in requests
        assert wait_until(lambda: browser.find_element(By.ID, "source-age").text == "looked 0 s ago", 10)

        # thumbnails: each listed source asked for, a picture shown, again every ~2 s; off stops
        toggle = browser.find_element(By.ID, "source-thumbs")
        press(toggle)
        assert toggle.get_attribute("aria-pressed") == "true"
        picture = item("shm:cam").find_element(By.CSS_SELECTOR, "img.source-thumb")
        assert wait_until(
            lambda: browser.execute_script("return arguments[0].naturalWidth", picture) == 16, 10
        )
        assert picture.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert picture.is_displayed()
        note = item("pattern").find_element(By.CSS_SELECTOR, ".source-thumb-note")
        assert wait_until(lambda: note.text == "no frame", 5), note.text
        assert set(asked) == {"pattern", "shm:cam", "file:clip.mp4"}
        assert wait_until(lambda: asked.count("shm:cam") >= 2, 6), asked  # the next round
        press(toggle)
        assert toggle.get_attribute("aria-pressed") == "false"
        assert not picture.is_displayed()
        time.sleep(0.5)  # a request on its way may still arrive
        count = len(asked)
        time.sleep(2.5)
        assert len(asked) == count, asked
        severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not severe, severe

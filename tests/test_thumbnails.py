"""Source thumbnails for the operator page: a real shared-memory source opened for a moment, the
playing source from the engine's newest frame, bad names, sources that never answer, and the
HTTP endpoint's checks."""

from __future__ import annotations

import http.client
import io
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bridges.base import Frame, FrameSource
from bridges.preview import PreviewSink
from engine.runtime.inputs import SourceNames
from engine.runtime.thumbnails import ENCODE_MARGIN_S, Thumbnails, scaled_jpeg
from tests.test_input_switch import FLAT, Writer
from tests.test_preview import FakeOperator

TIMEOUT = 10


def picture(jpeg: bytes | None) -> Image.Image:
    assert jpeg is not None and jpeg[:2] == b"\xff\xd8"
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG"
    return image.convert("RGB")


def colour(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0).round())


def close_to(got: tuple[int, ...], want: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(got, want))


class Spy(SourceNames):
    """``SourceNames`` whose openers are counted, and replaced by ``fake`` when given."""

    def __init__(self, media: Path, fake: Callable[[str], FrameSource] | None = None) -> None:
        super().__init__(media)
        self.fake = fake
        self.opens: list[str] = []
        self.lock = threading.Lock()

    def opener(self, name: str) -> Callable[[], FrameSource]:
        real = super().opener(name)  # the name is checked as ever

        def open_it() -> FrameSource:
            with self.lock:
                self.opens.append(name)
            return self.fake(name) if self.fake is not None else real()

        return open_it


GAUGE_LOCK = threading.Lock()


class Slow:
    """A source that takes ``open_s`` to open and then sends ``frame`` (``None``: never sends);
    ``gauge`` counts the sources open now and the most open at once."""

    def __init__(self, open_s: float, frame: Frame | None, gauge: dict[str, int]) -> None:
        self.frame = frame
        self.gauge = gauge
        with GAUGE_LOCK:
            gauge["now"] += 1
            gauge["most"] = max(gauge["most"], gauge["now"])
        time.sleep(open_s)

    def recv(self, timeout: float) -> Frame | None:
        if self.frame is None:
            time.sleep(timeout)
        return self.frame

    def close(self) -> None:
        with GAUGE_LOCK:
            self.gauge["now"] -= 1


def test_a_shared_memory_source_is_opened_for_one_frame_scaled_and_closed(tmp_path: Path) -> None:
    name = f"ls_thumb_{secrets.token_hex(3)}"
    writer = Writer(name)
    try:
        names = Spy(tmp_path)
        thumbnails = Thumbnails(names, lambda: "pattern", lambda: None)
        started = time.monotonic()
        image = picture(thumbnails.jpeg(f"shm:{name}"))
        assert time.monotonic() - started < 1.5
        assert image.size == (160, 160)  # the 64x64 writer, 160 px wide
        assert close_to(colour(image), FLAT[:3]), colour(image)
        assert names.opens == [f"shm:{name}"] and thumbnails.opened == 1
        # asked again within two seconds: the same picture, nothing opened again
        assert picture(thumbnails.jpeg(f"shm:{name}")).size == (160, 160)
        assert names.opens == [f"shm:{name}"]
    finally:
        writer.close()


def test_the_playing_source_is_the_engines_newest_frame_and_nothing_is_opened(tmp_path: Path) -> None:
    pixels = np.zeros((32, 64, 4), np.uint8)
    pixels[:] = (220, 30, 40, 255)
    names = Spy(tmp_path)
    live = {"name": "shm:camera", "frame": Frame(pixels)}
    thumbnails = Thumbnails(names, lambda: live["name"], lambda: live["frame"], width=120)
    image = picture(thumbnails.jpeg("shm:camera"))
    assert image.size == (120, 60) and close_to(colour(image), (220, 30, 40)), colour(image)
    assert names.opens == [] and thumbnails.opened == 0
    # before the engine's first frame: no picture, still nothing opened
    live.update(name="shm:other", frame=None)
    assert Thumbnails(names, lambda: "shm:other", lambda: None).jpeg("shm:other") is None
    assert names.opens == []


def test_a_bad_name_is_a_value_error_naming_what_is_allowed(tmp_path: Path) -> None:
    names = Spy(tmp_path)
    thumbnails = Thumbnails(names, lambda: "pattern", lambda: None)
    for bad in ("bogus", "shm:a b", "ndi:", "file:../secret.mp4"):
        with pytest.raises(ValueError, match="allowed:"):
            thumbnails.jpeg(bad)
    with pytest.raises(ValueError, match="no such video file"):
        thumbnails.jpeg("file:missing.mp4")
    assert names.opens == []


def test_a_source_that_does_not_open_or_send_is_none_within_the_timeout(tmp_path: Path) -> None:
    # no such segment: the open fails at once
    thumbnails = Thumbnails(Spy(tmp_path), lambda: "pattern", lambda: None, timeout_s=0.5)
    started = time.monotonic()
    assert thumbnails.jpeg(f"shm:ls_none_{secrets.token_hex(3)}") is None
    assert time.monotonic() - started < 0.5 + ENCODE_MARGIN_S

    # an open that hangs, a source that never sends: the caller waits no longer than the timeout
    gauge = {"now": 0, "most": 0}
    names = Spy(tmp_path, lambda name: Slow(5.0 if name == "shm:hangs" else 0.0, None, gauge))
    thumbnails = Thumbnails(names, lambda: "pattern", lambda: None, timeout_s=0.5)
    for name in ("shm:hangs", "shm:silent"):
        started = time.monotonic()
        assert thumbnails.jpeg(name) is None
        assert time.monotonic() - started < 0.5 + ENCODE_MARGIN_S + 0.2, name
    # the hanging one is still opening: asking again opens it no second time
    assert thumbnails.jpeg("shm:hangs") is None
    assert names.opens.count("shm:hangs") == 1


def test_one_open_per_name_and_at_most_max_opens_at_once(tmp_path: Path) -> None:
    gauge = {"now": 0, "most": 0}
    frame = Frame(np.full((8, 8, 4), 128, np.uint8))
    names = Spy(tmp_path, lambda name: Slow(0.3, frame, gauge))
    thumbnails = Thumbnails(names, lambda: "pattern", lambda: None, timeout_s=2.0, max_opens=2)
    results: list[bytes | None] = []
    asks = [f"shm:cam{i % 3}" for i in range(9)]  # three names, each asked three times at once
    threads = [threading.Thread(target=lambda n=n: results.append(thumbnails.jpeg(n))) for n in asks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert len(results) == 9 and all(result is not None for result in results)
    assert sorted(names.opens) == ["shm:cam0", "shm:cam1", "shm:cam2"]  # one open per name
    assert gauge["most"] <= 2  # the third waited for a free turn


def test_scaled_jpeg_keeps_the_aspect() -> None:
    image = picture(scaled_jpeg(np.zeros((90, 320, 3), np.uint8), 160))
    assert image.size == (160, 45)


# -- the HTTP endpoint ---------------------------------------------------------------------------


class ThumbOperator(FakeOperator):
    """The preview's fake operator with thumbnails: ``pictures`` by name, else a ValueError."""

    def __init__(self, pictures: dict[str, bytes | None]) -> None:
        super().__init__()
        self.pictures = pictures
        self.asked: list[str] = []

    def thumbnail(self, name: str) -> bytes | None:
        self.asked.append(name)
        if name not in self.pictures:
            raise ValueError(f"source name {name!r}: no kind prefix; allowed: pattern, shm:<segment name>")
        return self.pictures[name]


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def test_the_endpoint_answers_a_jpeg_204_or_400_and_refuses_other_sites() -> None:
    jpeg = scaled_jpeg(np.full((8, 8, 4), 200, np.uint8), 16)
    operator = ThumbOperator({"shm:cam": jpeg, "ndi:quiet": None})
    with PreviewSink(port=0, operator=operator) as preview:
        port = preview.port
        status, kind, body = get(port, "/api/source-thumbnail?name=shm%3Acam")
        assert (status, kind, body) == (200, "image/jpeg", jpeg)
        status, _, body = get(port, "/api/source-thumbnail?name=ndi%3Aquiet")
        assert status == 204 and body == b""
        status, kind, body = get(port, "/api/source-thumbnail?name=bogus")
        assert status == 400 and kind == "application/json" and b"allowed:" in body
        for query in ("", "?name=", "?name=a&name=b", "?name=" + "x" * 1001):
            status, _, body = get(port, "/api/source-thumbnail" + query)
            assert status == 400 and b"allowed: one ?name=SOURCE" in body, query
        # the page itself may ask; another site's page may not (a script, or an <img>)
        same = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
        assert get(port, "/api/source-thumbnail?name=shm%3Acam", same)[0] == 200
        asked = len(operator.asked)
        for foreign in (
            {"Origin": "http://evil.example"},
            {"Origin": f"http://localhost:{port}"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
        ):
            status, _, body = get(port, "/api/source-thumbnail?name=shm%3Acam", foreign)
            assert status == 403 and b"refused" in body, foreign
        assert get(port, "/api/source-thumbnail?name=shm%3Acam", {"Host": "evil.example"})[0] == 403
        assert len(operator.asked) == asked  # nothing was opened for them


def test_the_operator_hands_the_services_thumbnails_through(bundle: Any, tmp_path: Path) -> None:
    from tests.test_operator import Show

    with Show(bundle, tmp_path) as show:
        port = show.preview.port
        status, _, body = get(port, "/api/source-thumbnail?name=pattern")
        assert status == 404 and b"no source thumbnails" in body  # this engine makes none
        jpeg = scaled_jpeg(np.zeros((4, 4, 4), np.uint8), 8)

        def thumbnails(name: str) -> bytes | None:
            if name != "pattern":
                raise ValueError(f"{name!r}: allowed: pattern")
            return jpeg

        show.service.thumbnails = thumbnails
        assert get(port, "/api/source-thumbnail?name=pattern")[:3:2] == (200, jpeg)
        status, _, body = get(port, "/api/source-thumbnail?name=shm%3Ax")
        assert status == 400 and b"allowed: pattern" in body


def test_an_engine_thumbnail_of_its_playing_input(bundle: Any, tmp_path: Path) -> None:
    """Wired as ``latentstage run`` wires it: the engine's own last input frame."""
    from tests.test_input_switch import Show

    with Show(bundle, tmp_path) as show:
        engine = show.engine
        assert engine.source_names is not None
        assert engine.last_input_frame() is not None
        names = Spy(tmp_path)
        thumbnails = Thumbnails(
            names, lambda: str(engine.runtime_state["input_source"]), engine.last_input_frame
        )
        image = picture(thumbnails.jpeg("pattern"))
        assert image.size[0] == 160 and names.opens == []


def test_latentstage_run_gives_the_control_service_thumbnails_of_its_engine(
    bundle: Any, tmp_path: Path
) -> None:
    """``_start_control`` (as ``latentstage run`` calls it) wires the engine's source names, its
    playing source's name and its newest input frame into the service's ``thumbnails``."""
    from engine.cli import _start_control
    from engine.config import load_config
    from scripts.osc_peer import free_port
    from tests.test_input_switch import Show

    config = load_config(None, overrides=[f"osc.port={free_port()}", "osc.oscquery_port=null"])
    with Show(bundle, tmp_path) as show:
        service = _start_control(config, str(tmp_path / "config.yaml"), show.engine)
        try:
            assert service.thumbnails is not None
            assert picture(service.thumbnails("pattern")).size[0] == 160  # the playing one
            with pytest.raises(ValueError, match="allowed:"):
                service.thumbnails("bogus")
            assert service.thumbnails(f"shm:ls_none_{secrets.token_hex(3)}") is None
        finally:
            service.close()

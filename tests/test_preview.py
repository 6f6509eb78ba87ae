"""Tests of bridges.preview: the page, JPEG and MJPEG endpoints, stats, dropped clients, close."""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bridges import base
from bridges import preview as preview_module
from bridges.base import BridgeError, Frame, FrameSink
from bridges.preview import PreviewSink, is_loopback, unavailable_reason
from engine.control.web.page import operator_page

TIMEOUT = 5.0


def solid(rgb: tuple[int, int, int], width: int = 64, height: int = 48) -> Frame:
    pixels = np.empty((height, width, 4), dtype=np.uint8)
    pixels[..., :3] = rgb
    pixels[..., 3] = 255
    return Frame(pixels)


def get(sink: PreviewSink, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "JPEG"
    return image.convert("RGB")


def assert_colour(data: bytes, rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> None:
    image = decode(data)
    assert image.size == size
    pixel = image.getpixel((size[0] // 2, size[1] // 2))
    assert isinstance(pixel, tuple)
    assert all(abs(int(a) - b) <= 8 for a, b in zip(pixel, rgb)), (pixel, rgb)


class Stream:
    """A raw MJPEG client that parses the multipart parts one by one."""

    def __init__(self, sink: PreviewSink) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=TIMEOUT)
        self.conn.request("GET", "/stream.mjpg")
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        content_type = self.resp.getheader("Content-Type", "")
        assert content_type.startswith("multipart/x-mixed-replace")
        self.boundary = b"--" + content_type.split("boundary=", 1)[1].encode()

    def part(self) -> bytes:
        line = self.resp.readline()
        while line in (b"\r\n", b"\n"):
            line = self.resp.readline()
        assert line.rstrip(b"\r\n") == self.boundary, line
        headers: dict[str, str] = {}
        while True:
            line = self.resp.readline().rstrip(b"\r\n")
            if not line:
                break
            key, value = line.decode().split(":", 1)
            headers[key.strip().lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        data = self.resp.read(int(headers["content-length"]))
        assert len(data) == int(headers["content-length"])
        return data

    def close(self) -> None:
        self.resp.close()  # the response holds the socket open until it is closed too
        self.conn.close()


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


STATS: dict[str, Any] = {"fps": 29.5, "latency_ms": 41.25, "skip_rate": 0.1, "state": "running",
                         "dropped_frames": 3}


@pytest.fixture()
def sink() -> Iterator[PreviewSink]:
    with PreviewSink(port=0, stats=lambda: STATS) as s:
        yield s


def test_is_a_frame_sink_and_available(sink: PreviewSink) -> None:
    assert isinstance(sink, FrameSink)
    assert unavailable_reason() is None
    assert base.unavailable_reason("preview") is None
    assert sink.port > 0
    assert sink.url == f"http://127.0.0.1:{sink.port}/"


def test_open_sink_through_registry() -> None:
    opened = base.open_sink("preview", port=0)
    try:
        assert isinstance(opened, PreviewSink)
    finally:
        opened.close()


def test_page(sink: PreviewSink) -> None:
    status, headers, body = get(sink, "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "<title>latentstage preview</title>" in page
    assert '<img id="out" src="/stream.mjpg"' in page
    assert "/stats.json" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_frame_jpg_before_and_after_a_frame(sink: PreviewSink) -> None:
    status, headers, body = get(sink, "/frame.jpg")
    assert status == 503
    assert body

    sink.send(solid((255, 0, 0)))
    status, headers, body = get(sink, "/frame.jpg")
    assert status == 200
    assert headers["content-type"] == "image/jpeg"
    assert int(headers["content-length"]) == len(body)
    assert_colour(body, (255, 0, 0))


def test_encoding_is_lazy_and_once_per_frame(
    sink: PreviewSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    real = preview_module.encode_jpeg

    def counting(pixels: np.ndarray, quality: int) -> bytes:
        calls.append(pixels.shape)
        return real(pixels, quality)

    monkeypatch.setattr(preview_module, "encode_jpeg", counting)
    for _ in range(5):
        sink.send(solid((0, 255, 0)))
    assert calls == []  # nobody asked: nothing encoded
    assert get(sink, "/frame.jpg")[0] == 200
    assert get(sink, "/frame.jpg")[0] == 200
    assert len(calls) == 1
    sink.send(solid((0, 0, 255)))
    assert_colour(get(sink, "/frame.jpg")[2], (0, 0, 255))
    assert len(calls) == 2


def test_stream_delivers_newest_frames(sink: PreviewSink) -> None:
    sink.send(solid((255, 0, 0)))
    stream = Stream(sink)
    try:
        assert_colour(stream.part(), (255, 0, 0))
        sink.send(solid((0, 0, 255), 32, 16))
        assert_colour(stream.part(), (0, 0, 255), (32, 16))
        sink.send(solid((0, 255, 0)))
        assert_colour(stream.part(), (0, 255, 0))
    finally:
        stream.close()


def test_stream_waits_for_the_first_frame(sink: PreviewSink) -> None:
    stream = Stream(sink)
    try:
        wait_until(lambda: json.loads(get(sink, "/stats.json")[2])["clients"] == 1)
        sink.send(solid((255, 255, 255)))
        assert_colour(stream.part(), (255, 255, 255))
    finally:
        stream.close()


def test_stream_is_capped_at_max_fps() -> None:
    with PreviewSink(port=0, max_fps=10.0) as capped:
        capped.send(solid((10, 10, 10)))
        stream = Stream(capped)
        stop = threading.Event()

        def feed() -> None:
            while not stop.is_set():
                capped.send(solid((200, 10, 10)))
                time.sleep(0.002)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            start = time.monotonic()
            parts = 0
            while time.monotonic() - start < 0.5:
                stream.part()
                parts += 1
            assert parts <= 8  # 10 fps for 0.5 s is about 5 parts (+1 for the first)
        finally:
            stop.set()
            feeder.join()
            stream.close()


def test_stats_json(sink: PreviewSink) -> None:
    sink.send(solid((1, 2, 3)))
    status, headers, body = get(sink, "/stats.json")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {**STATS, "frames_sent": 1, "clients": 0}


def test_stats_json_without_callable_and_with_odd_values() -> None:
    with PreviewSink(port=0) as plain:
        assert json.loads(get(plain, "/stats.json")[2]) == {"frames_sent": 0, "clients": 0}
    odd = {"fps": float("nan"), "gpu": np.float32(0.5), "size": (512, 512)}
    with PreviewSink(port=0, stats=lambda: odd) as weird:
        assert json.loads(get(weird, "/stats.json")[2]) == {
            "fps": None, "gpu": 0.5, "size": [512, 512], "frames_sent": 0, "clients": 0,
        }


def test_unknown_path_is_404(sink: PreviewSink) -> None:
    assert get(sink, "/nope")[0] == 404
    assert get(sink, "/stream.mjpg/../etc/passwd")[0] == 404


def test_page_paths_ignore_query_strings(sink: PreviewSink) -> None:
    assert get(sink, "/?x=1")[0] == 200
    assert get(sink, "/stats.json?t=123")[0] == 200


def test_client_dropping_mid_stream_does_not_break_the_sink(sink: PreviewSink) -> None:
    sink.send(solid((255, 0, 0)))
    stream = Stream(sink)
    stream.part()
    stream.close()  # the browser tab is closed
    for i in range(10):  # writes to the dead socket fail in the server thread
        sink.send(solid((i * 20, 0, 0)))
        time.sleep(0.05)
    wait_until(lambda: json.loads(get(sink, "/stats.json")[2])["clients"] == 0)

    sink.send(solid((0, 255, 0)))
    again = Stream(sink)
    try:
        assert_colour(again.part(), (0, 255, 0))
        sink.send(solid((0, 0, 255)))
        assert_colour(again.part(), (0, 0, 255))
    finally:
        again.close()


def test_close_twice_releases_the_port_and_ends_streams() -> None:
    sink = PreviewSink(port=0)
    port = sink.port
    sink.send(solid((255, 0, 0)))
    stream = Stream(sink)
    stream.part()
    start = time.monotonic()
    sink.close()
    sink.close()
    assert time.monotonic() - start < 3.0
    assert sink.closed
    assert stream.resp.read().strip() in (b"", b"--frame--")  # the stream ended
    stream.close()
    sink.send(solid((0, 0, 0)))  # documented: a no-op after close

    again = PreviewSink(port=port)  # the port is free again
    try:
        assert again.port == port
        assert get(again, "/")[0] == 200
    finally:
        again.close()


def test_port_in_use_is_a_bridge_error(sink: PreviewSink) -> None:
    with pytest.raises(BridgeError, match=rf"127\.0\.0\.1:{sink.port}.*port"):
        PreviewSink(port=sink.port)


def test_port_held_by_another_program_is_a_bridge_error() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(BridgeError, match=rf"{port}.*type: preview, port:"):
            PreviewSink(port=port)
    finally:
        holder.close()


def test_bad_options_are_value_errors() -> None:
    with pytest.raises(ValueError, match="max_fps"):
        PreviewSink(port=0, max_fps=0)
    with pytest.raises(ValueError, match="jpeg_quality"):
        PreviewSink(port=0, jpeg_quality=0)
    with pytest.raises(ValueError, match="port"):
        PreviewSink(port=70000)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("::")
    assert not is_loopback("192.168.1.20")


# -- hostile input: the answer is 400 or 500, never a silent drop, never a traceback per request --


class FakeOperator:
    """An ``OperatorApi`` that accepts everything, or raises ``fail`` from every call."""

    page = operator_page()

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.applied: list[tuple[Any, Any]] = []

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    def spec(self) -> dict[str, Any]:
        self._check()
        return {"params": []}

    def state(self) -> dict[str, Any]:
        self._check()
        return {"values": {}}

    def history(self, since: float | None = None) -> dict[str, Any]:
        self._check()
        return {"samples": []}

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        return lambda: None

    def apply(self, name: Any, value: Any, client: str) -> tuple[bool, dict[str, Any]]:
        self._check()
        self.applied.append((name, value))
        return True, {"ok": True, "accepted": {name: value}}


def post(sink: PreviewSink, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST ``body`` to ``/api/param`` as the page does: ``(status, JSON body or None)``."""
    conn = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/api/param", body, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        is_json = resp.getheader("Content-Type") == "application/json"
        return resp.status, json.loads(data) if is_json else None
    finally:
        conn.close()


def try_post(sink: PreviewSink, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """``post``, with ``(0, None)`` for a request that got no HTTP answer at all."""
    try:
        return post(sink, body, headers)
    except (http.client.HTTPException, OSError):
        return 0, None


def try_get(sink: PreviewSink, path: str) -> int:
    """``get``'s status, 0 for a request that got no HTTP answer at all."""
    try:
        return get(sink, path)[0]
    except (http.client.HTTPException, OSError):
        return 0


def logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The records at INFO and above (DEBUG may say more, e.g. one traceback)."""
    return [record for record in caplog.records if record.levelno >= logging.INFO]


DEEP_BODIES = [
    b"[" * 60000,
    b'{"name": "prompt", "value": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"name": "prompt", "value": ' + b"{" * 20000,
]


@pytest.fixture()
def operated() -> Iterator[PreviewSink]:
    with PreviewSink(port=0, operator=FakeOperator()) as s:
        yield s


def test_deeply_nested_json_gets_400_naming_the_depth(operated: PreviewSink) -> None:
    for body in DEEP_BODIES:
        status, reply = try_post(operated, body)
        assert status == 400, body[:40]
        assert reply["ok"] is False
        limit = preview_module.MAX_JSON_DEPTH
        assert "nested" in reply["error"] and f"allowed: at most {limit} levels" in reply["error"]
    assert "60000 deep" in post(operated, DEEP_BODIES[0])[1]["error"]
    assert "5001 deep" in post(operated, DEEP_BODIES[1])[1]["error"]
    # the server is still there, and still takes a real change
    valid = {"name": "prompt_blend", "value": [["a sunset", 0.7], ["a forest", 0.3]]}
    assert post(operated, json.dumps(valid).encode()) == (
        200, {"ok": True, "accepted": {"prompt_blend": [["a sunset", 0.7], ["a forest", 0.3]]}}
    )


def test_a_flood_of_deep_json_writes_no_traceback_and_few_lines(
    operated: PreviewSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    statuses = [try_post(operated, DEEP_BODIES[i % 2])[0] for i in range(300)]
    elapsed = time.monotonic() - start
    records = logged(caplog)
    assert all(record.exc_info is None for record in records), records[0].getMessage()
    assert len(records) <= elapsed + 1, f"{len(records)} lines for 300 requests"
    assert statuses == [400] * 300
    assert get(operated, "/api/spec")[0] == 200


def test_an_unexpected_error_in_the_operator_is_a_500_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    operator = FakeOperator(fail=KeyError("boom"))
    with PreviewSink(port=0, operator=operator) as failing:
        caplog.clear()  # "preview at ..."
        start = time.monotonic()
        replies = [try_post(failing, b'{"name": "seed", "value": 5}') for _ in range(50)]
        replies += [(try_get(failing, "/api/state"), None) for _ in range(50)]
        elapsed = time.monotonic() - start
        records = logged(caplog)
        assert all(record.exc_info is None for record in records), records[0].getMessage()
        assert 1 <= len(records) <= 2 * (elapsed + 1), f"{len(records)} lines for 100 requests"
        assert "KeyError" in records[0].getMessage()
        status, reply = replies[0]
        assert status == 500 and reply["ok"] is False and "KeyError" in reply["error"]
        assert [status for status, _ in replies] == [500] * 100
        operator.fail = None  # the server kept serving
        assert post(failing, b'{"name": "seed", "value": 5}')[0] == 200
        assert get(failing, "/api/spec")[0] == 200


def test_a_failure_after_the_headers_closes_the_stream_quietly(
    sink: PreviewSink, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def broken(source: bool = False) -> tuple[int, bytes] | None:
        raise ValueError("encoder broke")

    monkeypatch.setattr(sink, "_latest_jpeg", broken)
    sink.send(solid((255, 0, 0)))
    start = time.monotonic()
    for _ in range(20):
        conn = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/stream.mjpg")
            resp = conn.getresponse()
            assert resp.status == 200  # the headers went out before the failure
            assert b"image/jpeg" not in resp.read()  # then the connection was closed
        finally:
            conn.close()
    assert try_get(sink, "/frame.jpg") == 500  # nothing sent yet: a proper answer
    elapsed = time.monotonic() - start
    records = logged(caplog)
    assert all(record.exc_info is None for record in records), records[0].getMessage()
    assert 1 <= len(records) <= 2 * (elapsed + 1)
    assert get(sink, "/stats.json")[0] == 200


def test_refused_requests_are_answered_but_logged_rate_limited(
    operated: PreviewSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    statuses = [try_post(operated, b"{}", {"Host": "evil.example"})[0] for _ in range(100)]
    elapsed = time.monotonic() - start
    assert statuses == [403] * 100
    records = logged(caplog)
    assert 1 <= len(records) <= elapsed + 1, f"{len(records)} lines for 100 refusals"
    assert "evil.example" in records[0].getMessage()


def test_json_depth_ignores_brackets_in_strings() -> None:
    depth = preview_module.json_depth
    assert depth("") == 0 and depth("5") == 0 and depth('"x"') == 0
    assert depth("[]") == 1 and depth("[[], {}]") == 2 and depth('{"a": [{"b": []}]}') == 4
    assert depth(r'"[\"["') == 0  # an escaped quote does not end the string
    assert depth(r'["[\"[", "]]]"]') == 1
    assert depth(r'["a\\", ["b"]]') == 2  # an escaped backslash does: the quote after it ends it
    assert depth('"[[[[ never closed') == 0
    assert depth("]]]]" + "[" * 3) == 3  # stray closers do not hide openers
    assert depth("[" * 60000) == 60000


def test_json_depth_error_passes_the_api_bodies_and_names_the_limit() -> None:
    limit = preview_module.MAX_JSON_DEPTH
    error = preview_module.json_depth_error
    for value in ("a sunset", 1.5, True, None, [20, 40], [512, 512], [["a", 0.5], ["b", 0.5]], [[1, 1.0]]):
        assert error(json.dumps({"name": "x", "value": value})) is None, value
    assert error("[" * limit + "]" * limit) is None
    message = error("[" * (limit + 1))
    assert message is not None
    assert f"nested {limit + 1} deep" in message and f"allowed: at most {limit} levels" in message
    assert limit >= 8  # well above the API's 3 levels


def test_parse_json_body_reads_what_json_reads_and_refuses_depth() -> None:
    parse = preview_module.parse_json_body
    body = {"name": "prompt_blend", "value": [["ä sunset", 1.0]]}
    for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-32"):
        assert parse(json.dumps(body, ensure_ascii=False).encode(encoding)) == body, encoding
    with pytest.raises(preview_module.JsonTooDeep, match="nested 60000 deep"):
        parse(b"[" * 60000)
    # in UTF-16 a non-ASCII character can contain the byte of a quote: depth is counted on text
    hidden = ('["\u2200", ' + "[" * 3000).encode("utf-16-le")
    with pytest.raises(preview_module.JsonTooDeep):
        parse(hidden)
    with pytest.raises(ValueError):
        parse(b"{not json")
    with pytest.raises(ValueError):
        parse(b"\xff\xfe\xfd")

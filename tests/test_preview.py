"""Tests of bridges.preview: the page, JPEG and MJPEG endpoints, stats, dropped clients, close."""

from __future__ import annotations

import http.client
import io
import json
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

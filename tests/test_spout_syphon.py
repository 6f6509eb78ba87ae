"""Tests of bridges.spout/syphon: pure logic, flows against stand-in SDKs, real loopbacks (sdk)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridges import spout, syphon
from bridges.base import BridgeError, BridgeUnavailable, Frame, PixelFormat

REPO = Path(__file__).resolve().parents[1]


def _frame(width: int, height: int, seed: int = 0) -> Frame:
    rng = np.random.default_rng(seed)
    return Frame(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))


# --- import hygiene and missing SDKs ---------------------------------------------------------


def test_importing_the_modules_imports_no_sdk_engine_or_torch() -> None:
    code = ("import sys, bridges.spout, bridges.syphon; print([m for m in "
            "('SpoutGL', 'syphon', 'objc', 'Metal', 'OpenGL', 'glfw', 'engine', 'torch') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


BRIDGE_IDS = ["spout", "syphon"]
#: module, the wrong platform, the reason given, the classes that refuse to open
PLATFORMS = [
    (spout, "linux", "Spout needs Windows", (spout.SpoutSource, spout.SpoutSink)),
    (syphon, "win32", "Syphon needs macOS", (syphon.SyphonSource, syphon.SyphonSink)),
]
#: module, its platform, the SDK module that is missing, the reason given, a class to open
MISSING_SDKS = [
    (spout, "win32", "SpoutGL", "SpoutGL is not installed", spout.SpoutSource),
    (syphon, "darwin", "syphon", "syphon-python is not installed", syphon.SyphonSink),
]


@pytest.mark.parametrize(("module", "platform", "reason", "classes"), PLATFORMS, ids=BRIDGE_IDS)
def test_wrong_platform_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: Any, platform: str, reason: str, classes: Any
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    assert module.unavailable_reason() == reason
    for make in classes:
        with pytest.raises(BridgeUnavailable) as err:
            make()
        assert f"pip install latentstage[{module.EXTRA}]" in str(err.value)
        assert reason in str(err.value)


@pytest.mark.parametrize(("module", "platform", "sdk", "reason", "make"), MISSING_SDKS, ids=BRIDGE_IDS)
def test_missing_sdk_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: Any, platform: str, sdk: str, reason: str, make: Any
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setitem(sys.modules, sdk, None)
    assert module.unavailable_reason() == reason
    with pytest.raises(BridgeUnavailable, match=rf"latentstage\[{module.EXTRA}\]") as err:
        make()
    assert reason in str(err.value)


# --- Spout pure logic ------------------------------------------------------------------------


def test_spout_gl_formats() -> None:
    assert spout.gl_format(PixelFormat.RGBA) == 0x1908
    assert spout.gl_format(PixelFormat.BGRA) == 0x80E1
    assert spout.gl_format(PixelFormat.RGB) == 0x1907
    assert spout.gl_format(PixelFormat.BGR) == 0x80E0


def test_spout_names() -> None:
    assert spout.check_name("  TDSyphonSpoutOut ", allow_empty=False) == "TDSyphonSpoutOut"
    assert spout.check_name("", allow_empty=True) == ""  # the active sender
    with pytest.raises(ValueError):
        spout.check_name(" ", allow_empty=False)
    with pytest.raises(ValueError):
        spout.check_name("x" * 256, allow_empty=False)
    with pytest.raises(ValueError):
        spout.check_name("é" * 128, allow_empty=False)  # 256 bytes in UTF-8
    assert spout.check_name("x" * 255, allow_empty=False) == "x" * 255


def test_spout_receive_buffer_sizes_and_handoff() -> None:
    buffer = spout.ReceiveBuffer()
    assert buffer.size is None
    with pytest.raises(ValueError):
        buffer.take()
    assert buffer.resize(640, 360) is True
    assert buffer.size == (640, 360)
    assert buffer.array is not None and buffer.array.shape == (360, 640, 4)
    first = buffer.array
    assert buffer.resize(640, 360) is False and buffer.array is first  # same size: kept
    taken = buffer.take()
    assert taken is first and buffer.array is not first and buffer.array.shape == first.shape
    assert buffer.resize(1280, 720) is True and buffer.size == (1280, 720)
    assert buffer.resize(0, 0) is True and buffer.size is None


# --- Syphon pure logic -----------------------------------------------------------------------

SERVERS = [("TDSyphonSpoutOut", "TouchDesigner"), ("Composition", "Arena"),
           ("", "Millumin"), ("Output 2", "TouchDesigner")]


def test_syphon_labels() -> None:
    assert syphon.server_label("Composition", "Arena") == "Arena - Composition"
    assert syphon.server_label("", "Millumin") == "Millumin"
    assert syphon.server_label("solo", "") == "solo"


def test_syphon_match_exact_then_case_then_substring() -> None:
    assert syphon.match_server("TDSyphonSpoutOut", SERVERS) == 0
    assert syphon.match_server("Arena - Composition", SERVERS) == 1
    assert syphon.match_server("Millumin", SERVERS) == 2  # app name, server unnamed
    assert syphon.match_server("arena", SERVERS) == 1  # app name ignoring case
    assert syphon.match_server("output", SERVERS) == 3  # unique part of the label
    assert syphon.match_server("Resolume", SERVERS) is None


def test_syphon_match_ambiguous_lists_candidates() -> None:
    with pytest.raises(BridgeError) as err:
        syphon.match_server("TouchDesigner", SERVERS)  # the app of two servers
    assert "TouchDesigner - TDSyphonSpoutOut" in str(err.value)
    assert "TouchDesigner - Output 2" in str(err.value)


def test_syphon_empty_query_takes_first_server_not_our_own() -> None:
    servers = [("latentstage", "Python"), ("Composition", "Arena")]
    assert syphon.match_server("", servers) == 0
    assert syphon.match_server("", servers, exclude={"latentstage"}) == 1
    assert syphon.match_server("", servers[:1], exclude={"latentstage"}) is None
    assert syphon.match_server("latentstage", servers, exclude={"latentstage"}) == 0  # by name
    assert syphon.match_server("", []) is None


def test_syphon_texture_formats_and_flips() -> None:
    assert syphon.texture_format(80) is PixelFormat.BGRA
    assert syphon.texture_format(81) is PixelFormat.BGRA
    assert syphon.texture_format(70) is PixelFormat.RGBA
    with pytest.raises(ValueError, match="115"):
        syphon.texture_format(115)  # RGBA16Float
    bgra = np.array([[[1, 2, 3, 4]], [[5, 6, 7, 8]]], np.uint8)  # 1 wide, 2 high
    assert syphon.texture_to_rgba(bgra, 80, flip=False).tolist() == [[[3, 2, 1, 4]],
                                                                    [[7, 6, 5, 8]]]
    assert syphon.texture_to_rgba(bgra, 80, flip=True).tolist() == [[[7, 6, 5, 8]],
                                                                   [[3, 2, 1, 4]]]
    readonly = np.frombuffer(bgra.tobytes(), np.uint8).reshape(2, 1, 4)
    rgba = syphon.texture_to_rgba(readonly, 70, flip=False)
    assert rgba.flags.writeable and not np.shares_memory(rgba, readonly)
    up = syphon.upload_pixels(np.array([[[3, 2, 1, 4]], [[7, 6, 5, 8]]], np.uint8), flip=True)
    assert up.tolist() == [[[5, 6, 7, 8]], [[1, 2, 3, 4]]] and up.flags.c_contiguous
    assert syphon.UPLOAD_FORMAT == (PixelFormat.BGRA, syphon.MTL_BGRA8_UNORM)


# --- Spout flow against a stand-in SpoutGL ---------------------------------------------------
# The stand-in follows SpoutGL 0.1 / Spout 2.007 as read from their sources: receiveImage
# returns True and sets isUpdated() when a sender appears or changes size (the caller then
# re-allocates), False when there is no sender; sendImage resizes the sender itself.


class _SpoutWorld:
    def __init__(self) -> None:
        self.senders: dict[str, dict[str, Any]] = {}
        self.contexts: list[tuple[int, str]] = []
        self.counting = True  # SpoutSettings "frame counting"


class _FakeSpoutBase:
    """Method names are SpoutGL's (camelCase)."""

    world: _SpoutWorld

    def createOpenGL(self) -> bool:
        self.world.contexts.append((threading.get_ident(), "create"))
        return True

    def closeOpenGL(self) -> bool:
        self.world.contexts.append((threading.get_ident(), "close"))
        return True


class _FakeSpoutSender(_FakeSpoutBase):
    def setSenderName(self, name: str) -> None:
        self.name = name

    def sendImage(self, pixels: np.ndarray, width: int, height: int, gl: int, invert: bool,
                  fbo: int) -> bool:
        assert gl == spout.GL_RGBA and fbo == 0 and pixels.flags.c_contiguous
        image = pixels.reshape(height, width, 4)
        state = self.world.senders.setdefault(self.name, {"frame": 0})
        state["image"] = (image[::-1] if invert else image).copy()
        state["frame"] += 1
        return True

    def setFrameSync(self, name: str) -> None:
        assert name == self.name

    def releaseSender(self) -> None:
        self.world.senders.pop(self.name, None)


class _FakeSpoutReceiver(_FakeSpoutBase):
    def __init__(self) -> None:
        self.size = (0, 0)
        self.updated = False
        self.seen = -1
        self.new = False

    def setReceiverName(self, name: str) -> None:
        self.name = name

    def receiveImage(self, buffer: np.ndarray | None, gl: int, invert: bool,
                     fbo: int) -> bool:
        assert gl == spout.GL_RGBA
        state = self.world.senders.get(self.name)
        self.updated = self.new = False
        if state is None:
            self.size = (0, 0)
            return False
        height, width = state["image"].shape[:2]
        if (width, height) != self.size:
            self.size, self.updated = (width, height), True
            return True
        if buffer is None or buffer.size == 0:
            return False
        if buffer.size < width * height * 4:
            raise BufferError("Buffer not large enough")
        image = state["image"]
        buffer.reshape(height, width, 4)[...] = image[::-1] if invert else image
        self.new, self.seen = state["frame"] != self.seen, state["frame"]
        return True

    def isUpdated(self) -> bool:
        return self.updated

    def isFrameNew(self) -> bool:
        return self.new or not self.world.counting

    def isFrameCountEnabled(self) -> bool:
        return self.world.counting

    def getSenderWidth(self) -> int:
        return self.size[0]

    def getSenderHeight(self) -> int:
        return self.size[1]

    def releaseReceiver(self) -> None:
        pass


@pytest.fixture()
def fake_spout(monkeypatch: pytest.MonkeyPatch) -> _SpoutWorld:
    world = _SpoutWorld()
    module = types.ModuleType("SpoutGL")
    module.SpoutSender = type("SpoutSender", (_FakeSpoutSender,), {"world": world})  # type: ignore[attr-defined]
    module.SpoutReceiver = type("SpoutReceiver", (_FakeSpoutReceiver,), {"world": world})  # type: ignore[attr-defined]
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "SpoutGL", module)
    monkeypatch.setattr(spout, "CONTEXTS", spout.GLContexts())
    return world


def test_spout_flow_with_stand_in(fake_spout: _SpoutWorld) -> None:
    assert spout.unavailable_reason() is None
    with spout.SpoutSink("out") as sink, spout.SpoutSource("out", find_timeout=1.0) as source:
        first = _frame(64, 32, seed=1)
        sink.send(first)
        got = source.recv(0.5)
        assert got is not None and got.sequence == 1
        assert np.array_equal(got.pixels, first.pixels)
        assert source.recv(0.05) is None  # no new frame: nothing
        second = _frame(64, 32, seed=2)
        sink.send(second)
        again = source.recv(0.5)
        assert again is not None and np.array_equal(again.pixels, second.pixels)
        assert not np.shares_memory(again.pixels, got.pixels)
        assert np.array_equal(got.pixels, first.pixels)  # earlier frames stay intact
        bigger = _frame(128, 72, seed=3)
        sink.send(bigger)  # the sender changes size: the buffer follows
        resized = source.recv(0.5)
        assert resized is not None and resized.pixels.shape == (72, 128, 4)
        assert np.array_equal(resized.pixels, bigger.pixels)
        # One thread used both objects: one context, created once, closed by the last.
        assert [event for _, event in fake_spout.contexts] == ["create"]
    assert [event for _, event in fake_spout.contexts] == ["create", "close"]
    sink.close()
    source.close()  # twice is fine
    with pytest.raises(BridgeError, match="closed"):
        source.recv(0.01)


def test_spout_flip_and_sender_gone(fake_spout: _SpoutWorld) -> None:
    sink = spout.SpoutSink("out", flip=True)
    source = spout.SpoutSource("out", flip=True, find_timeout=1.0)
    frame = _frame(8, 4, seed=4)
    sink.send(frame)
    got = source.recv(0.5)
    assert got is not None and np.array_equal(got.pixels, frame.pixels)  # flipped twice
    assert np.array_equal(fake_spout.senders["out"]["image"], frame.pixels[::-1])
    sink.close()  # the sender goes away
    with pytest.raises(BridgeError, match="closed"):
        source.recv(0.5)
    source.close()


def test_spout_without_frame_counting_paces_reads(fake_spout: _SpoutWorld) -> None:
    fake_spout.counting = False  # every read looks new
    with spout.SpoutSink("out") as sink, \
            spout.SpoutSource("out", fallback_fps=20, find_timeout=1.0) as source:
        sink.send(_frame(8, 8))
        frames = 0
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            frames += source.recv(0.05) is not None
        assert 5 <= frames <= 12  # ~20 fps, not the 500 Hz poll rate


def test_spout_pacer() -> None:
    pacer = spout.Pacer(10)
    assert pacer.due(0.0) and not pacer.due(0.05) and pacer.due(0.1) and not pacer.due(0.15)
    assert pacer.due(5.0)  # after a pause: at once
    with pytest.raises(ValueError):
        spout.Pacer(0)


def test_spout_sender_not_found(fake_spout: _SpoutWorld) -> None:
    with spout.SpoutSource("nobody", find_timeout=0.2) as source:
        assert source.recv(0.05) is None  # still looking
        with pytest.raises(BridgeError, match="'nobody' not found"):
            source.recv(1.0)


def test_spout_objects_are_bound_to_their_thread(fake_spout: _SpoutWorld) -> None:
    sink = spout.SpoutSink("out")
    sink.send(_frame(8, 8))
    errors: list[BaseException] = []

    def other() -> None:
        try:
            sink.send(_frame(8, 8))
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors and "two threads" in str(errors[0])
    sink.close()


def test_spout_contexts_per_thread(fake_spout: _SpoutWorld) -> None:
    sink = spout.SpoutSink("out")
    source = spout.SpoutSource("out", find_timeout=1.0)

    def send_some() -> None:
        sink.send(_frame(16, 16))
        sink.close()

    thread = threading.Thread(target=send_some)
    thread.start()
    thread.join()
    assert source.recv(0.05) is None  # binds the source to this thread; the sender is gone
    source.close()
    creates = {ident for ident, event in fake_spout.contexts if event == "create"}
    closes = {ident for ident, event in fake_spout.contexts if event == "close"}
    assert len(creates) == 2 and creates == closes  # each thread made and closed its own


# --- Syphon flow against a stand-in syphon-python --------------------------------------------
# The stand-in follows syphon-python 0.1's documented API: SyphonServerDirectory().servers,
# SyphonMetalServer(name).publish_frame_texture / .device / .stop, SyphonMetalClient(desc)
# .is_valid / .has_new_frame / .new_frame_image / .stop, syphon.utils.raw.create_mtl_texture
# and syphon.utils.numpy.copy_image_to_mtl_texture / copy_mtl_texture_to_image.


class _Texture:
    def __init__(self, width: int, height: int, pixel_format: int) -> None:
        self.data = np.zeros((height, width, 4), np.uint8)
        self.format = pixel_format

    def width(self) -> int:
        return int(self.data.shape[1])

    def height(self) -> int:
        return int(self.data.shape[0])

    def pixelFormat(self) -> int:
        return self.format


def _fake_syphon_modules() -> dict[str, types.ModuleType]:
    published: dict[str, dict[str, Any]] = {}

    class Description:
        def __init__(self, name: str, app_name: str) -> None:
            self.name, self.app_name, self.uuid, self.raw = name, app_name, name, None

    class Directory:
        run_loop_interval = 1.0

        @property
        def servers(self) -> list[Description]:
            time.sleep(self.run_loop_interval / 10)
            return [Description(n, "Python") for n in published]

    class Server:
        def __init__(self, name: str) -> None:
            self.name, self.device = name, object()
            published[name] = {"frame": 0, "texture": None}

        def publish_frame_texture(self, texture: _Texture, is_flipped: bool = False) -> None:
            assert not is_flipped
            state = published[self.name]
            copy = _Texture(texture.width(), texture.height(), texture.format)
            copy.data[...] = texture.data
            state["texture"], state["frame"] = copy, state["frame"] + 1

        def stop(self) -> None:
            published.pop(self.name, None)

    class Client:
        def __init__(self, description: Description) -> None:
            self.name, self.seen = description.name, 0

        @property
        def is_valid(self) -> bool:
            return self.name in published

        @property
        def has_new_frame(self) -> bool:
            return published[self.name]["frame"] != self.seen

        @property
        def new_frame_image(self) -> _Texture:
            state = published[self.name]
            self.seen = state["frame"]
            return state["texture"]

        def stop(self) -> None:
            pass

    def create_mtl_texture(device: Any, width: int, height: int, pixel_format: int) -> _Texture:
        return _Texture(width, height, pixel_format)

    def copy_image_to_mtl_texture(image: np.ndarray, texture: _Texture) -> None:
        texture.data[...] = image

    def copy_mtl_texture_to_image(texture: _Texture) -> np.ndarray:
        return np.frombuffer(texture.data.tobytes(), np.uint8).reshape(texture.data.shape)

    package = types.ModuleType("syphon")
    package.SyphonServerDirectory = Directory  # type: ignore[attr-defined]
    package.SyphonMetalServer = Server  # type: ignore[attr-defined]
    package.SyphonMetalClient = Client  # type: ignore[attr-defined]
    utils = types.ModuleType("syphon.utils")
    raw = types.ModuleType("syphon.utils.raw")
    raw.create_mtl_texture = create_mtl_texture  # type: ignore[attr-defined]
    images = types.ModuleType("syphon.utils.numpy")
    images.copy_image_to_mtl_texture = copy_image_to_mtl_texture  # type: ignore[attr-defined]
    images.copy_mtl_texture_to_image = copy_mtl_texture_to_image  # type: ignore[attr-defined]
    utils.raw, utils.numpy = raw, images  # type: ignore[attr-defined]
    package.utils = utils  # type: ignore[attr-defined]
    objc = types.ModuleType("objc")
    objc.error = type("error", (Exception,), {})  # type: ignore[attr-defined]
    return {"syphon": package, "syphon.utils": utils, "syphon.utils.raw": raw,
            "syphon.utils.numpy": images, "objc": objc}


@pytest.fixture()
def fake_syphon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    for name, module in _fake_syphon_modules().items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.usefixtures("fake_syphon")
def test_syphon_flow_with_stand_in() -> None:
    assert syphon.unavailable_reason() is None
    with syphon.SyphonSink("out") as sink:
        sink.send(_frame(32, 16, seed=1))
        # Our own server is skipped by an empty query but found by name.
        with pytest.raises(BridgeError, match=r"not found .* servers seen: 'Python - out'"):
            syphon.SyphonSource("", find_timeout=0.1)
        with syphon.SyphonSource("out", find_timeout=1.0) as source:
            assert source.server == "Python - out"
            got = source.recv(0.5)
            assert got is not None and np.array_equal(got.pixels, _frame(32, 16, 1).pixels)
            assert got.pixels.flags.writeable
            assert source.recv(0.02) is None
            sink.send(_frame(64, 48, seed=2))  # new size: new texture
            bigger = source.recv(0.5)
            assert bigger is not None and np.array_equal(bigger.pixels, _frame(64, 48, 2).pixels)
            sink.close()  # the server goes away
            with pytest.raises(BridgeError, match="went away"):
                source.recv(0.5)
        source.close()  # twice is fine
    with pytest.raises(BridgeError, match="closed"):
        sink.send(_frame(8, 8))


@pytest.mark.usefixtures("fake_syphon")
def test_syphon_flip_round_trip() -> None:
    with syphon.SyphonSink("flipped", flip=True) as sink, \
            syphon.SyphonSource("flipped", flip=True, find_timeout=1.0) as source:
        frame = _frame(8, 6, seed=5)
        sink.send(frame)
        got = source.recv(0.5)
        assert got is not None and np.array_equal(got.pixels, frame.pixels)


# --- real SDKs (Windows / macOS) -------------------------------------------------------------


def needs_sdk(module: Any, package: str) -> pytest.MarkDecorator:
    """Skip unless ``module``'s SDK (the ``package``) can run here."""
    reason = module.unavailable_reason()
    return pytest.mark.skipif(reason is not None, reason=f"needs {package}: {reason}")


@pytest.mark.sdk
@needs_sdk(spout, "SpoutGL")
def test_spout_real_loopback() -> None:
    name = f"latentstage-test-{os.getpid()}"
    frame = _frame(256, 128, seed=7)
    stop = threading.Event()

    def send() -> None:  # its own thread: its own OpenGL context
        with spout.SpoutSink(name) as sink:
            while not stop.is_set():
                sink.send(frame)
                time.sleep(1 / 60)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        with spout.SpoutSource(name, find_timeout=5.0) as source:
            deadline = time.monotonic() + 5.0
            got = None
            while got is None and time.monotonic() < deadline:
                got = source.recv(0.5)
            assert got is not None, "no frame from the Spout sender"
            assert got.pixels.shape == (128, 256, 4)
            # Spout shares 8-bit textures losslessly; row 0 must stay on top.
            assert np.array_equal(got.pixels[..., :3], frame.pixels[..., :3])
    finally:
        stop.set()
        sender.join(5)


@pytest.mark.sdk
@needs_sdk(syphon, "syphon-python")
def test_syphon_real_loopback() -> None:
    name = f"latentstage-test-{os.getpid()}"
    frame = _frame(256, 128, seed=8)
    with syphon.SyphonSink(name) as sink:
        sink.send(frame)
        with syphon.SyphonSource(name, find_timeout=5.0) as source:
            got = None
            deadline = time.monotonic() + 5.0
            while got is None and time.monotonic() < deadline:
                sink.send(frame)
                got = source.recv(0.2)
            assert got is not None, "no frame from the Syphon server"
            assert got.pixels.shape == (128, 256, 4)
            assert np.array_equal(got.pixels, frame.pixels)  # lossless, row 0 on top

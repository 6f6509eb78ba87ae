"""Live input switching on a running engine: the pattern to a shared-memory writer and back.

The engine runs in bypass (the output is the input frame itself), so every output frame says which
source it came from: the shm writer sends one flat colour, the pattern never does.
"""

from __future__ import annotations

import itertools
import secrets
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridges.shm import ShmPixelFormat, ShmWriter
from engine.config.schema import PatternInput
from engine.control.dispatch import OscDispatcher
from engine.control.state import ControlState
from engine.pipeline import StreamPipeline
from engine.runtime.engine import Engine, EngineOptions
from engine.runtime.inputs import SourceNames
from engine.runtime.switching import Crossfade
from tests.fakes import SIZE, RecordingSink, pipeline_settings, wait_until

FLAT = (10, 200, 30, 255)


class Writer:
    """A shared-memory writer sending one flat colour at ``fps`` until closed."""

    def __init__(self, name: str, fps: float = 30.0, colour: tuple[int, ...] = FLAT) -> None:
        self.writer = ShmWriter(name, SIZE, SIZE, ShmPixelFormat.RGBA8)
        self.pixels = np.empty((SIZE, SIZE, 4), np.uint8)
        self.pixels[:] = colour
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(1.0 / fps,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.writer.write(self.pixels)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.writer.close()


def flat(pixels: np.ndarray) -> bool:
    return bool((pixels[..., :3] == np.array(FLAT[:3], np.uint8)).all())


class Show:
    """An engine in bypass on the pattern with source names, its echoes and errors recorded."""

    def __init__(self, bundle: Any, media: Path) -> None:
        pattern = PatternInput(fps=30.0, width=SIZE, height=SIZE)
        self.names = SourceNames(media, pattern)
        self.sink = RecordingSink()
        self.echoes: list[tuple[float, dict[str, Any]]] = []
        self.errors: list[str] = []
        options = EngineOptions(runtime_values={"bypass": True, "input_source": "pattern"})
        self.engine = Engine(
            StreamPipeline(bundle, pipeline_settings()),
            self.names.opener("pattern"),
            [("rec", lambda: self.sink)],
            options,
            control=ControlState(),
            source_names=self.names,
        )
        self.engine.on_applied = lambda accepted: self.echoes.append((time.monotonic(), dict(accepted)))
        self.engine.on_error = self.errors.append
        self.dispatcher = OscDispatcher(self.engine.control, self.engine.control.applied)
        self.thread = threading.Thread(target=self.engine.run, daemon=True)

    def __enter__(self) -> Show:
        self.thread.start()
        assert wait_until(lambda: len(self.sink.frames) >= 5, 20)
        return self

    def select(self, name: str) -> list[str]:
        """``/input/select s NAME`` through the dispatcher; the errors it was answered with."""
        _replies, error = self.dispatcher.handle_request("/input/select", [name], ("127.0.0.1", 1))
        return [] if error is None else [error]

    def switched_at(self, name: str) -> float | None:
        return next((t for t, values in self.echoes if values.get("input_source") == name), None)

    def __exit__(self, *exc: object) -> None:
        self.engine.stop()
        self.thread.join(10)
        self.engine.close()


def test_switching_to_a_shm_writer_and_back_never_stops_the_output(bundle, tmp_path):
    name = f"ls_switch_{secrets.token_hex(3)}"
    writer = Writer(name)
    try:
        with Show(bundle, tmp_path) as show:
            time.sleep(0.5)
            assert show.select(f"shm:{name}") == []
            assert wait_until(lambda: show.switched_at(f"shm:{name}") is not None, 10), show.errors
            to_shm = show.switched_at(f"shm:{name}")
            time.sleep(1.0)
            assert show.select("pattern") == []
            assert wait_until(lambda: show.switched_at("pattern") is not None, 10), show.errors
            back = show.switched_at("pattern")
            time.sleep(1.0)
            frames = list(zip(show.sink.times, show.sink.frames, strict=True))
    finally:
        writer.close()
    assert to_shm is not None and back is not None
    # no frame of the old source after a switch: each frame is sent after the echo of its source
    # (a frame sent right at the echo may still be on its way through the post thread: 100 ms)
    after_shm = [f for t, f in frames if to_shm + 0.1 < t < back]
    after_back = [f for t, f in frames if t > back + 0.1]
    assert after_shm and all(flat(f.pixels) for f in after_shm)
    assert after_back and not any(flat(f.pixels) for f in after_back)
    # the output never stops: the longest gap around a switch is within two frame intervals, or
    # no longer than the longest gap the run has anyway (a busy machine stalls any thread)
    times = [t for t, _f in frames]
    pairs = list(itertools.pairwise(times))
    gaps = [b - a for a, b in pairs]
    interval = statistics.median(gaps)
    near = [b - a for a, b in pairs if any(abs(a - s) < 0.5 for s in (to_shm, back))]
    elsewhere = [b - a for a, b in pairs if all(abs(a - s) >= 0.5 for s in (to_shm, back))]
    print(f"output gaps: median {interval * 1000:.1f} ms, longest near a switch {max(near) * 1000:.1f} ms")
    assert max(near) <= max(2 * interval, max(elsewhere)) + 1e-3


def test_a_source_that_cannot_open_is_refused_and_the_old_one_keeps_playing(bundle, tmp_path):
    with Show(bundle, tmp_path) as show:
        assert show.select("shm:no_such_segment_here") == []  # valid name: opened off the loop
        assert wait_until(lambda: any("cannot be played" in e for e in show.errors), 10)
        (error,) = [e for e in show.errors if "cannot be played" in e]
        assert error.startswith("input_source: shm:no_such_segment_here cannot be played (")
        assert error.endswith("; pattern stays")
        before = len(show.sink.frames)
        assert wait_until(lambda: len(show.sink.frames) > before + 5, 10)
        assert show.engine.runtime_state["input_source"] == "pattern"
        assert show.engine.control.applied()["input_source"] == "pattern"
        # a file that is not in the media folder is refused at once
        show.errors.clear()
        assert show.select("file:absent.mp4") == []
        assert wait_until(lambda: bool(show.errors), 5)
        assert "no such video file in the media folder" in show.errors[0]


def test_bad_source_names_are_refused_naming_what_is_allowed(tmp_path):
    state = ControlState()
    dispatcher = OscDispatcher(state, state.applied)
    for bad in ("bogus", "file:../secret.mp4", "file:sub/clip.mp4", "ndi:", "shm:a b"):
        _replies, error = dispatcher.handle_request("/input/select", [bad], ("127.0.0.1", 1))
        assert error is not None and "allowed: a source name as /input/sources lists it" in error, bad
    assert state.take_pending() is None
    names = SourceNames(tmp_path)
    with pytest.raises(ValueError, match="allowed:"):
        names.opener("file:.hidden.mp4")


def test_names_open_what_they_say(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    names = SourceNames(tmp_path, PatternInput(fps=24.0, width=64, height=48))
    assert names.section("pattern").fps == 24.0 and names.section("pattern").width == 64
    assert names.section("file:clip.mp4").path == str(tmp_path / "clip.mp4")
    assert names.section("shm:cam_1").name == "cam_1"
    assert names.section("ndi:HOST (TD)").source == "HOST (TD)"
    assert names.name_of(names.section("ndi:HOST (TD)")) == "ndi:HOST (TD)"
    assert names.name_of(names.section("file:clip.mp4")) == "file:clip.mp4"


def test_a_crossfade_blends_the_old_frame_out_over_n_frames():
    import torch

    old, new = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    fade = Crossfade(old, 3)
    weights = []
    while not fade.finished:
        weights.append(float(fade.blend(new).mean()))
    assert weights == pytest.approx([0.25, 0.5, 0.75])
    fade = Crossfade(old, 3)
    assert fade.blend(torch.ones(1, 3, 8, 8)).shape == (1, 3, 8, 8) and fade.finished  # a new size ends it


def test_a_controlnets_own_source_switches_live_and_others_are_refused(bundle, tmp_path):
    """``/controlnet/0/source`` moves ControlNet 0 from one shm writer to another (its control
    frame follows); a ControlNet without a source of its own and the IP-Adapter without one are
    refused naming what is allowed."""
    from bridges.base import open_source
    from engine.pipeline import ControlNetSettings
    from tests.test_controlnet import StillSource, settings, with_controlnets

    white, black = f"ls_cn_w_{secrets.token_hex(3)}", f"ls_cn_b_{secrets.token_hex(3)}"
    writers = [Writer(white, colour=(255, 255, 255, 255)), Writer(black, colour=(0, 0, 0, 255))]
    controlled = with_controlnets(bundle, 2)
    pipe = StreamPipeline(
        controlled,
        settings(ControlNetSettings(from_input=False), ControlNetSettings(), t_index_list=[30]),
    )
    from engine.runtime.control_sources import ControlSource

    source = ControlSource(0, lambda: open_source("shm", name=white), f"shm:{white}")
    errors: list[str] = []
    echoes: list[dict[str, Any]] = []
    engine = Engine(
        pipe,
        lambda: StillSource(),
        [("rec", RecordingSink)],
        EngineOptions(runtime_values={"controlnet_source_0": f"shm:{white}"}),
        control_sources=[source],
        source_names=SourceNames(tmp_path),
    )
    engine.on_error = errors.append
    engine.on_applied = echoes.append
    dispatcher = OscDispatcher(engine.control, engine.control.applied)
    thread = threading.Thread(target=engine.run, kwargs={"duration": 60.0}, daemon=True)
    controls = pipe.extensions["controlnet"]
    try:
        with engine:
            thread.start()
            assert wait_until(lambda: controls.control_frames[0] is not None, 20)
            assert wait_until(lambda: float(controls.control_frames[0].mean()) > 0.9, 20)
            _r, error = dispatcher.handle_request("/controlnet/0/source", [f"shm:{black}"], ("127.0.0.1", 1))
            assert error is None
            assert wait_until(lambda: {"controlnet_source_0": f"shm:{black}"} in echoes, 20), errors
            assert wait_until(lambda: float(controls.control_frames[0].mean()) < -0.9, 20)
            dispatcher.handle_request("/controlnet/1/source", [f"shm:{white}"], ("127.0.0.1", 1))
            dispatcher.handle_request("/ip_adapter/source", [f"shm:{white}"], ("127.0.0.1", 1))
            assert wait_until(lambda: len(errors) >= 2, 10)
            assert any(
                e.startswith("controlnet_source_1: ControlNet 1 has no source of its own")
                and "allowed: 0" in e
                for e in errors
            ), errors
            assert any(
                e.startswith("ip_adapter_source: the IP-Adapter has no source of its own") for e in errors
            )
            engine.stop()
            thread.join(10)
    finally:
        for writer in writers:
            writer.close()
    assert engine.runtime_state["controlnet_source_0"] == f"shm:{black}"


def test_input_sources_answers_from_the_catalogue_and_oscquery_offers_them(tmp_path):
    """``/input/sources`` lists a shm writer, a media file and the pattern without waiting for
    discovery (it runs on the catalogue's thread); OSCQuery gives the names as the switching
    addresses' RANGE VALS (a menu in TouchDesigner); the operator page's state carries the look."""
    from pythonosc.osc_message_builder import OscMessageBuilder

    from engine.control.oscquery import build_namespace, find_node
    from engine.control.service import ControlService, ControlSettings

    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "clip.mp4").write_bytes(b"")
    name = f"ls_cat_{secrets.token_hex(3)}"
    writer = Writer(name)
    state = ControlState()
    settings = ControlSettings(
        port=0, feedback=[], oscquery_port=None, scenes_dir=str(tmp_path), media_dir=str(tmp_path / "media")
    )
    service = ControlService(settings, state, print, dict)
    try:
        with service:
            assert service.catalog is not None
            assert wait_until(lambda: service.catalog is not None and service.catalog.looks >= 1, 15)
            builder = OscMessageBuilder("/input/sources")
            started = time.monotonic()
            (reply,) = service.dispatcher.handle_datagram(builder.build().dgram, ("127.0.0.1", 1))
            answered_s = time.monotonic() - started
            assert reply.address == "/input/sources" and reply.to_sender and not reply.to_feedback
            assert {"pattern", f"shm:{name}", "file:clip.mp4"} <= set(reply.args), reply.args
            print(f"/input/sources answered in {answered_s * 1000:.2f} ms")
            root = build_namespace(state.applied(), {}, "127.0.0.1", 9000, reply.args)
            node = find_node(root, "/input/select")
            assert node is not None and node["RANGE"] == [{"VALS": list(reply.args)}]
            assert find_node(root, "/controlnet/0/source")["RANGE"] == [{"VALS": list(reply.args)}]
            snapshot = service.catalog.snapshot()
            assert any(
                s["name"] == f"shm:{name}" and "our shm writer" in s["detail"] for s in snapshot["sources"]
            )
    finally:
        writer.close()


def test_scenes_leave_the_input_out_unless_the_file_names_one(tmp_path):
    from engine.control.scenes import SceneError, SceneStore

    store = SceneStore(tmp_path)
    store.save("look", {"guidance_scale": 1.5, "input_source": "shm:cam"})
    assert (
        "input" not in (tmp_path / "look.yaml").read_text()
        and "shm:cam" not in (tmp_path / "look.yaml").read_text()
    )
    assert "input_source" not in store.load_scene("look").values
    text = (tmp_path / "look.yaml").read_text()
    (tmp_path / "stage.yaml").write_text(text + "input: ndi:STAGE (Cam)\n")
    assert store.load_scene("stage").values["input_source"] == "ndi:STAGE (Cam)"
    (tmp_path / "bad.yaml").write_text(text + "input: /etc/passwd\n")
    with pytest.raises(
        SceneError, match="scene 'bad': input: '/etc/passwd' is not allowed; allowed: a source name"
    ):
        store.load_scene("bad")

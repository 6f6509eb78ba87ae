"""The operator page's HTTP side: the same validation as OSC, echoes, two-way state, security."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import pytest
from pythonosc.osc_message import OscMessage

from bridges.base import Frame
from bridges.preview import PreviewSink
from engine.control.operator import Operator
from engine.control.oscquery import OscQueryServer
from engine.control.service import ControlService, ControlSettings
from engine.control.state import ControlState
from engine.control.transport import build_message
from engine.pipeline import StreamPipeline
from engine.runtime.engine import Engine
from scripts.osc_peer import free_port
from tests.fakes import FakeMidi, FakeSource, pipeline_settings, wait_until


class Listener:
    """A UDP socket collecting OSC messages (the feedback port, or an OSC sender's own port)."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.messages: list[tuple[str, list]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(65536)
            except OSError:
                continue
            message = OscMessage(data)
            self.messages.append((message.address, list(message.params)))

    def seen(self, address: str, predicate=lambda args: True) -> bool:
        return any(a == address and predicate(args) for a, args in list(self.messages))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.socket.close()


class Show:
    """An engine whose output is a preview with an operator page, its control service, feedback;
    ``music``: wired as ``latentstage run`` does, with the engine's musical time (status, taps)."""

    def __init__(self, bundle, tmp_path, music: bool = False) -> None:
        self.operator = Operator()
        self.preview = PreviewSink(port=0, operator=self.operator)
        self.pipeline = StreamPipeline(bundle, pipeline_settings(prompt="start", negative_prompt=""))
        self.engine = Engine(self.pipeline, lambda: FakeSource(fps=30), [("preview", lambda: self.preview)])
        self.feedback = Listener()
        settings = ControlSettings(
            port=0, feedback=[f"127.0.0.1:{self.feedback.port}"], status_hz=20, scenes_dir=str(tmp_path)
        )
        if music:
            self.service = ControlService(
                settings,
                self.engine.control,
                self.engine.submit,
                self.engine.status,
                self.operator,
                self.engine.music,
            )
        else:
            self.service = ControlService(
                settings, self.engine.control, self.engine.submit, self.engine.stats.snapshot, self.operator
            )
        self.engine.on_applied = self.service.echo
        self.thread = threading.Thread(target=self.engine.run, daemon=True)

    def __enter__(self) -> Show:
        self.service.start()
        self.thread.start()
        assert wait_until(lambda: self.preview._frames_sent >= 2, 20)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.stop()
        self.thread.join(10)
        self.engine.close()
        self.service.close()
        self.feedback.close()
        self.preview.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.preview.port}{path}"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url(path), timeout=5) as reply:
            return json.loads(reply.read())

    def post(self, body: object, headers: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url("/api/param"),
            data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            return err.code, json.loads(body) if err.headers.get("Content-Type") == "application/json" else {}

    def osc_error(self, address: str, args: list) -> str:
        """The ``/engine/error`` text an OSC sender gets back for ``address args``."""
        sender = Listener()
        try:
            sender.socket.sendto(build_message(address, args), ("127.0.0.1", self.service.port))
            assert wait_until(lambda: sender.seen("/engine/error"), 5)
            return next(args for a, args in sender.messages if a == "/engine/error")[0]
        finally:
            sender.close()


BAD = [
    ("guidance_scale", "high", "/guidance_scale", ["high"]),
    ("guidance_scale", 99.0, "/guidance_scale", [99.0]),
    ("t_index_list", [45, 32], "/t_index_list", [45, 32]),
    ("resolution", [65, 64], "/resolution", [65, 64]),
    ("cfg_type", "sometimes", "/cfg_type", ["sometimes"]),
    ("prompt_blend", [["a", -1.0]], "/prompt_blend", ["a", -1.0]),
    ("preset_load", "../etc/passwd", "/preset/load", ["../etc/passwd"]),
]


def test_bad_values_get_exactly_the_error_text_osc_gets(bundle, tmp_path):
    with Show(bundle, tmp_path) as show:
        before = show.get("/api/state")["values"]
        for name, value, address, args in BAD:
            status, body = show.post({"name": name, "value": value})
            assert status == 400 and body["ok"] is False, name
            assert body["error"] == show.osc_error(address, args), name
        status, body = show.post({"name": "no_such_thing", "value": 1})
        assert status == 400 and "'no_such_thing' is not a parameter; allowed: prompt" in body["error"]
        time.sleep(0.3)
        assert show.get("/api/state")["values"] == before, "nothing changed"


def test_a_change_on_the_page_is_applied_echoed_and_the_page_follows_osc(bundle, tmp_path):
    with Show(bundle, tmp_path) as show:
        assert show.post({"name": "guidance_scale", "value": 1.7}) == (
            200,
            {"ok": True, "accepted": {"guidance_scale": 1.7}},
        )
        assert wait_until(lambda: show.pipeline.state["guidance_scale"] == pytest.approx(1.7), 10)
        assert wait_until(
            lambda: show.feedback.seen("/guidance_scale", lambda a: a[0] == pytest.approx(1.7)), 5
        )
        assert show.post({"name": "t_index_list", "value": [20, 40]})[0] == 200
        assert wait_until(lambda: show.feedback.seen("/t_index_list", lambda a: a == [20, 40]), 10)
        # and the other way: a change over OSC shows in the page's state
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.sendto(build_message("/seed", [77]), ("127.0.0.1", show.service.port))
        sender.close()
        assert wait_until(lambda: show.get("/api/state")["values"]["seed"] == 77, 10)
        state = show.get("/api/state")
        assert state["status"]["state"] in ("running", "warming") and "scenes" in state
        assert show.post({"name": "preset_save", "value": "intro"})[0] == 200
        assert "intro" in show.get("/api/state")["scenes"]
        # the echo is a UDP datagram: the listener's thread may see it a moment after the answer
        assert wait_until(lambda: show.feedback.seen("/preset/save", lambda a: a == ["intro"]), 5)


TEMPO_STATUS = ("bpm", "beat_position", "beat_time", "beats_per_bar", "sequence_step")


def test_the_musical_time_and_the_servers_clock_reach_the_page(bundle, tmp_path):
    """The page extrapolates the beat: it needs the status' musical time and the server's clock
    (``time``, the clock ``beat_time`` is on) in every state, read and pushed."""
    with Show(bundle, tmp_path, music=True) as show:
        before = time.monotonic()
        state = show.get("/api/state")
        status = state["status"]
        assert set(TEMPO_STATUS) <= set(status)
        assert status["bpm"] == pytest.approx(120.0) and status["beats_per_bar"] == 4
        assert status["sequence_step"] == -1
        assert before <= state["time"] <= time.monotonic()
        assert 0.0 <= state["time"] - status["beat_time"] < 1.0  # the frame loop's latest look

        async def pushed() -> dict:
            url = show.url("/api/ws")
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                while True:
                    body = json.loads((await ws.receive(10)).data)
                    if body["type"] == "state":
                        return body

        body = asyncio.run(pushed())
        assert set(TEMPO_STATUS) <= set(body["status"]) and isinstance(body["time"], float)
        # a running sequence's step shows (the frame loop counts it)
        sequence = json.dumps({"steps": ["a", "b", "c"], "every": "1beat", "autostart": True})
        assert show.post({"name": "sequence", "value": sequence})[0] == 200
        assert wait_until(lambda: show.get("/api/state")["status"]["sequence_step"] >= 0, 10)


def test_tap_and_resync_are_sent_without_a_value_from_the_page(bundle, tmp_path):
    with Show(bundle, tmp_path, music=True) as show:
        music = show.engine.music
        resyncs: list[float] = []
        resync = music.resync

        def spy(at: float) -> None:
            resyncs.append(at)
            resync(at)

        music.resync = spy  # type: ignore[method-assign]
        start = time.monotonic()
        for tap in range(4):  # 150 BPM
            time.sleep(max(0.0, start + 0.4 * tap - time.monotonic()))
            assert show.post({"name": "tempo_tap", "value": None}) == (
                200,
                {"ok": True, "accepted": {"tempo_tap": None}},
            )
        tempo = music.clock.bpm
        assert abs(tempo - 150.0) < 6.0
        # the status rounds to 3 decimals; the value is the tap's estimate itself
        status_bpm = lambda: show.get("/api/state")["status"]["bpm"]  # noqa: E731
        value_bpm = lambda: show.get("/api/state")["values"]["bpm"]  # noqa: E731
        assert wait_until(lambda: status_bpm() == pytest.approx(tempo, abs=1e-3), 10)
        assert wait_until(lambda: value_bpm() == pytest.approx(tempo, abs=1e-9), 10)
        before = time.monotonic()
        assert show.post({"name": "tempo_resync", "value": None})[0] == 200
        assert len(resyncs) == 1 and before <= resyncs[0] <= time.monotonic()
        bar = music.clock.beat(resyncs[0]) % 4
        assert min(bar, 4 - bar) < 1e-6  # that moment is a downbeat
        status, body = show.post({"name": "tempo_tap", "value": "now"})
        assert status == 400 and body["error"] == show.osc_error("/tempo/tap", ["now"])


def test_the_state_has_the_midi_panel_only_with_midi(tmp_path):
    """The operator page's MIDI box reads ``midi``: None without a MIDI service, else its panel."""
    operator = Operator()
    settings = ControlSettings(port=0, feedback=[], scenes_dir=str(tmp_path))
    service = ControlService(settings, ControlState(), lambda *args: None, dict, operator)
    try:
        assert operator.state()["midi"] is None
        midi = FakeMidi()
        service.attach_midi(midi)
        state = operator.state()
        assert state["midi"] == midi.panel()
        assert json.loads(json.dumps(state, allow_nan=False))["midi"] == midi.panel()  # as pushed
    finally:
        service.close()
    assert ("close",) in midi.calls


def test_the_pages_midi_writes_learn_cancel_and_forget_on_the_midi_service(bundle, tmp_path):
    """What the page's MIDI box posts (midi_learn [target] or [target, argument], midi_cancel
    null, midi_unbind [mapping, index]) and midi_forget [target] or [target, argument] reach a real
    MidiService (the in-memory backend); the state shows the learn waiting, then the binding saved,
    and refusals are the page's errors."""
    pytest.importorskip("mido", reason="mido is not installed (pip install -e '.[midi]')")
    from mido import Message

    from engine.midi import loopback
    from engine.midi.service import MidiService, MidiSettings

    folder = tmp_path / "midi"
    folder.mkdir()
    (folder / "pad.yaml").write_text('input: "Pad"\nbindings: []\n', encoding="utf-8")
    settings = MidiSettings(("pad",), folder, poll_s=0.05, backend="engine.midi.loopback")
    loopback.reset()
    loopback.plug("Pad 20:0")
    try:
        with Show(bundle, tmp_path) as show:
            state = show.engine.control
            midi = MidiService(
                settings, show.service.dispatcher, state.latest, state.applied, show.service.announce
            )
            show.service.attach_midi(midi)
            midi.start()

            def panel() -> dict:
                return show.get("/api/state")["midi"]

            def bindings() -> list[dict]:
                return panel()["controllers"][0]["bindings"]

            assert wait_until(lambda: panel()["controllers"][0]["connected"], 5)
            assert show.post({"name": "midi_learn", "value": ["guidance_scale"]})[0] == 200
            assert panel()["learning"] == {"target": "guidance_scale", "argument": None}
            loopback.play("Pad 20:0", Message("control_change", channel=0, control=7, value=64))
            assert wait_until(lambda: panel()["learning"] is None, 5)
            cc7 = {"source": "cc 7 ch 1", "to": "guidance_scale", "argument": None, "mode": "absolute"}
            assert bindings() == [cc7]
            assert show.post({"name": "midi_learn", "value": ["preset_load", "intro"]})[0] == 200
            assert panel()["learning"] == {"target": "preset_load", "argument": "intro"}
            loopback.play("Pad 20:0", Message("note_on", channel=0, note=36, velocity=100))
            assert wait_until(lambda: len(bindings()) == 2, 5)
            assert bindings()[1] == {
                "source": "note 36 ch 1",
                "to": "preset_load",
                "argument": "intro",
                "mode": "trigger",
            }
            assert show.post({"name": "midi_learn", "value": ["bypass"]})[0] == 200
            assert show.post({"name": "midi_cancel", "value": None})[0] == 200
            assert panel()["learning"] is None
            status, body = show.post({"name": "midi_unbind", "value": ["pad", 5]})
            assert status == 400 and "pad has no binding 5; allowed: 0..1" in body["error"]
            assert show.post({"name": "midi_unbind", "value": ["pad", 1]})[0] == 200  # the page's forget
            assert bindings() == [cc7]
            assert show.post({"name": "midi_forget", "value": ["guidance_scale"]})[0] == 200
            assert bindings() == [] and "guidance_scale" not in (folder / "pad.yaml").read_text()
            status, body = show.post({"name": "midi_forget", "value": ["guidance_scale"]})
            assert status == 400 and "no MIDI binding drives guidance_scale" in body["error"]
            status, body = show.post({"name": "midi_learn", "value": ["prompt"]})
            assert status == 400 and "'prompt' cannot be learnt" in body["error"]
    finally:
        loopback.reset()


def test_writes_from_another_origin_or_without_json_are_refused(bundle, tmp_path):
    with Show(bundle, tmp_path) as show:
        status, body = show.post({"name": "seed", "value": 5}, {"Origin": "http://evil.example"})
        assert status == 403 and "cross-origin" in body["error"]
        request = urllib.request.Request(
            show.url("/api/param"),
            data=b"name=seed&value=5",
            method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5)
        assert caught.value.code == 415
        assert show.post(b"{not json")[0] == 400
        same_origin = {"Origin": f"http://127.0.0.1:{show.preview.port}"}
        assert show.post({"name": "seed", "value": 5}, same_origin)[0] == 200
        time.sleep(0.3)
        assert wait_until(lambda: show.pipeline.state["seed"] == 5, 10)


def test_the_page_spec_history_and_both_streams(bundle, tmp_path):
    with Show(bundle, tmp_path) as show:
        with urllib.request.urlopen(show.url("/"), timeout=5) as reply:
            page = reply.read().decode()
        assert "/api/spec" in page and "/input.mjpg" in page and "/stream.mjpg" in page
        names = [entry["name"] for entry in show.get("/api/spec")["params"]]
        from engine import params

        assert names == list(params.REGISTRY)
        assert wait_until(lambda: len(show.get("/api/history")["samples"]) >= 3, 5)
        sample = show.get("/api/history")["samples"][-1]
        assert set(sample) == {"t", "fps", "latency_ms", "skip_rate"}
        for stream in ("/input.mjpg", "/stream.mjpg"):
            with urllib.request.urlopen(show.url(stream), timeout=5) as reply:
                head = reply.read(4096)
            assert b"Content-Type: image/jpeg" in head and b"\xff\xd8" in head, stream


def test_before_the_control_service_runs_the_api_says_so():
    operator = Operator()
    with PreviewSink(port=0, operator=operator) as preview:
        preview.send_input(Frame(np.zeros((8, 8, 4), dtype=np.uint8)))
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{preview.port}/api/state", timeout=5)
        assert caught.value.code == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{preview.port}/api/spec", timeout=5) as reply:
            assert json.loads(reply.read())["params"]


def test_binding_wider_needs_an_allow_list():
    with pytest.raises(ValueError, match=r"osc\.allow"):
        PreviewSink(host="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="allowed: IP addresses or networks"):
        PreviewSink(host="0.0.0.0", port=0, allow=["not-a-network"])
    with PreviewSink(host="0.0.0.0", port=free_port(), allow=["192.168.1.0/24"]) as preview:
        assert preview._client_allowed("127.0.0.1") and preview._client_allowed("192.168.1.44")
        assert preview._client_allowed("::ffff:192.168.1.7")
        assert not preview._client_allowed("10.0.0.5") and not preview._client_allowed("bogus")


def test_a_request_for_a_foreign_host_name_is_refused(bundle, tmp_path):
    """DNS rebinding: evil.example resolving to 127.0.0.1 would make its page "same origin"."""
    with Show(bundle, tmp_path) as show:
        foreign = {
            "Host": f"evil.example:{show.preview.port}",
            "Origin": f"http://evil.example:{show.preview.port}",
        }
        status, _ = show.post({"name": "seed", "value": 9}, foreign)
        assert status == 403
        request = urllib.request.Request(show.url("/api/state"), headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5)
        assert caught.value.code == 403
        assert show.get("/api/state")["values"]["seed"] != 9


def test_oscquery_answers_500_for_an_unexpected_failure_and_logs_one_line(caplog, capsys):
    """OSCQuery is the other HTTP server: a failure while answering costs that request a 500,
    and a flood of them a line a second, never a traceback per request (socketserver's default
    prints one to stderr)."""

    def values():
        raise KeyError("state")

    caplog.set_level(logging.DEBUG)
    server = OscQueryServer(values, lambda: {}, "127.0.0.1", 9000, port=0)
    server.start()
    caplog.clear()
    base = f"http://127.0.0.1:{server.port}"
    try:
        start = time.monotonic()
        statuses, errors = [], []
        for _ in range(100):
            try:
                with urllib.request.urlopen(base + "/prompt", timeout=5) as reply:
                    statuses.append(reply.status)
            except urllib.error.HTTPError as err:
                statuses.append(err.code)
                errors.append(json.loads(err.read())["error"])
            except (http.client.HTTPException, OSError):
                statuses.append(0)  # no HTTP answer at all
        elapsed = time.monotonic() - start
        assert "Traceback" not in capsys.readouterr().err
        records = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert all(r.exc_info is None for r in records), records[0].getMessage()
        assert 1 <= len(records) <= elapsed + 1, f"{len(records)} lines for 100 failures"
        assert "KeyError" in records[0].getMessage()
        assert statuses == [500] * 100 and "KeyError" in errors[0]
        with urllib.request.urlopen(base + "/?HOST_INFO", timeout=5) as reply:
            assert reply.status == 200  # and it still serves
    finally:
        server.close()

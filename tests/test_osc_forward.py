"""`osc.forward`: one engine relays every accepted change to other engines (several machines, one
show). Two engines in this process on loopback: A is `latentstage run`, B an engine with its control
service; what A is sent, B applies."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main
from engine.config import ConfigError, load_config
from engine.control.service import ControlService, ControlSettings
from engine.control.state import ControlState
from engine.control.transport import build_message
from engine.pipeline import StreamPipeline
from engine.runtime.engine import Engine
from scripts.osc_peer import FeedbackListener, free_port
from tests.fakes import FakeSource, RecordingSink, pipeline_settings, wait_until


def _listener() -> FeedbackListener:
    listener = FeedbackListener()
    listener.start()
    return listener


def _addresses(listener: FeedbackListener) -> set[str]:
    return {address for _, address, _ in list(listener.messages)}


# --------------------------------------------------------------------------- the control service alone


def test_echo_goes_to_the_forward_targets_too_and_the_status_does_not(tmp_path: Path, caplog) -> None:
    feedback, forward = _listener(), _listener()
    settings = ControlSettings(
        port=0,
        feedback=[f"127.0.0.1:{feedback.port}"],
        forward=[f"127.0.0.1:{forward.port}"],
        status_hz=20,
        oscquery_port=None,
        scenes_dir=str(tmp_path / "scenes"),
    )
    service = ControlService(settings, ControlState(), lambda *a: None, lambda: {"state": "running"})
    try:
        with caplog.at_level(logging.INFO, logger="engine.control.service"):
            service.start()
        assert f"forwarding every accepted change to 127.0.0.1:{forward.port}" in caplog.text
        service.echo(
            {"guidance_scale": 3.5, "prompt": "blue stripes", "t_index_list": [20, 40], "strength": None}
        )
        service.error("something went wrong")
        service.announce("/engine/midi", ["connected"])
        assert wait_until(lambda: len(forward.values("/t_index_list")) == 1, 10), forward.messages
        assert forward.values("/guidance_scale") == [[3.5]]
        assert forward.values("/prompt") == [["blue stripes"]]
        assert forward.values("/t_index_list") == [[20, 40]]
        # the echo goes out on the same addresses with the same arguments to the feedback targets
        assert wait_until(lambda: len(feedback.values("/t_index_list")) == 1, 10)
        assert feedback.values("/guidance_scale") == forward.values("/guidance_scale")
        assert feedback.values("/prompt") == forward.values("/prompt")
        # the status, errors and announcements are for the feedback targets only
        assert wait_until(lambda: feedback.values("/engine/state"), 10), feedback.messages
        assert feedback.values("/engine/error") == [["something went wrong"]]
        assert not [a for a in _addresses(forward) if a.startswith("/engine/")], forward.messages
        assert _addresses(forward) == {"/guidance_scale", "/prompt", "/t_index_list"}
    finally:
        service.close()
        service.close()  # safe twice
        feedback.close()
        forward.close()
    assert service.forward is not None
    service.forward.send("/guidance_scale", [1.0])  # closed: nothing is sent, nothing raises


def test_without_forward_targets_there_is_no_forward_sender(tmp_path: Path) -> None:
    settings = ControlSettings(port=0, feedback=[], scenes_dir=str(tmp_path / "scenes"), oscquery_port=None)
    service = ControlService(settings, ControlState(), lambda *a: None, dict)
    try:
        assert service.forward is None
        service.echo({"guidance_scale": 2.0})
    finally:
        service.close()


# --------------------------------------------------------------------------- the config


def test_forward_is_read_from_the_config_and_carried_by_the_control_settings(tmp_path: Path) -> None:
    config = load_config(overrides=["osc.forward=['192.168.1.21:9000', '127.0.0.1:9010', 'localhost:9001']"])
    assert config.osc.forward == ["192.168.1.21:9000", "127.0.0.1:9010", "localhost:9001"]
    assert load_config().osc.forward == []
    settings = ControlSettings.from_config(config.osc, tmp_path)
    assert settings.forward == ["192.168.1.21:9000", "127.0.0.1:9010", "localhost:9001"]
    # osc off: nothing listens, so nothing could feed itself
    load_config(overrides=["osc.enabled=false", "osc.forward=['127.0.0.1:9000']"])


@pytest.mark.parametrize(
    ("overrides", "key", "target"),
    [
        (["osc.forward=['127.0.0.1:9000']"], "osc.forward[0]", "'127.0.0.1:9000'"),
        (["osc.forward=['192.168.1.21:9000', 'localhost:9000']"], "osc.forward[1]", "'localhost:9000'"),
        (["osc.port=9100", "osc.forward=['127.0.0.2:9100']"], "osc.forward[0]", "'127.0.0.2:9100'"),
        (["osc.host=0.0.0.0", "osc.allow=[192.168.1.20]", "osc.forward=['127.0.0.1:9000']"],
         "osc.forward[0]", "'127.0.0.1:9000'"),
        (["osc.host=192.168.1.20", "osc.allow=[192.168.1.0/24]", "osc.forward=['192.168.1.20:9000']"],
         "osc.forward[0]", "'192.168.1.20:9000'"),
    ],
)  # fmt: skip
def test_a_forward_target_that_is_the_engines_own_address_is_refused(
    overrides: list[str], key: str, target: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    message = str(info.value)
    assert f"{key}: {target} is this engine's own OSC address" in message, message
    assert "it would feed every change back to itself" in message
    assert "allowed: host:port of another engine" in message


def test_a_malformed_forward_target_is_refused_as_a_feedback_target_is() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["osc.forward=[localhost]"])
    assert "osc.forward[0]: 'localhost' is not a host:port target" in str(info.value)


# --------------------------------------------------------------------------- two engines


class Follower:
    """Engine B: the tiny model on a fake source, its control service on a free loopback port."""

    def __init__(self, bundle: Any, tmp_path: Path) -> None:
        self.sink = RecordingSink()
        pipeline = StreamPipeline(bundle, pipeline_settings(prompt="start", negative_prompt=""))
        self.engine = Engine(pipeline, lambda: FakeSource(fps=30), [("rec", lambda: self.sink)])
        self.feedback = _listener()
        settings = ControlSettings(
            port=0,
            feedback=[f"127.0.0.1:{self.feedback.port}"],
            oscquery_port=None,
            scenes_dir=str(tmp_path / "b-scenes"),  # none: scene loads arrive as their values
        )
        self.service = ControlService(
            settings, self.engine.control, self.engine.submit, self.engine.stats.snapshot
        )
        self.engine.on_applied = self.service.echo
        self.engine.on_error = self.service.error
        self.thread = threading.Thread(target=self.engine.run, daemon=True)

    def start(self) -> None:
        self.service.start()
        self.thread.start()

    def applied(self, name: str) -> Any:
        return self.engine.control.applied().get(name)

    def close(self) -> None:
        self.engine.stop()
        self.thread.join(20)
        self.engine.close()
        self.service.close()
        self.feedback.close()


@pytest.mark.slow
def test_engine_a_forwards_what_it_accepts_and_engine_b_applies_it(bundle, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    (tmp_path / "presets" / "scenes").mkdir(parents=True)
    (tmp_path / "presets" / "scenes" / "look.yaml").write_text(
        "values: {seed: 7, delta: 0.5}\ncrossfade_seconds: 0\n"
    )
    b = Follower(bundle, tmp_path)
    b.start()
    a_port, a_feedback = free_port(), _listener()
    seen: dict[str, Any] = {}

    def send(address: str, args: list[Any]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(build_message(address, args), ("127.0.0.1", a_port))

    def echoes(listener: FeedbackListener, value: float) -> int:
        return sum(1 for args in listener.values("/guidance_scale") if abs(args[0] - value) < 1e-6)

    def play() -> None:
        try:
            seen["a_running"] = wait_until(lambda: ["running"] in a_feedback.values("/engine/state"), 120)
            seen["b_running"] = wait_until(lambda: len(b.sink.frames) >= 2, 60)
            send("/guidance_scale", [3.5])
            seen["guidance"] = wait_until(lambda: abs((b.applied("guidance_scale") or 0) - 3.5) < 1e-6, 30)
            send("/prompt", ["blue stripes"])
            seen["prompt"] = wait_until(lambda: b.applied("prompt") == "blue stripes", 30)
            send("/preset/load", ["look"])
            seen["scene"] = wait_until(lambda: b.applied("seed") == 7 and b.applied("delta") == 0.5, 30)
            # the same value again: A accepts it again, echoes and forwards it, and B echoes it again
            # (so two engines forwarding to each other would never stop: one direction only)
            seen["echoed_once"] = wait_until(
                lambda: echoes(a_feedback, 3.5) == echoes(b.feedback, 3.5) == 1, 30
            )
            send("/guidance_scale", [3.5])
            seen["unchanged_echoed"] = wait_until(
                lambda: echoes(a_feedback, 3.5) == echoes(b.feedback, 3.5) == 2, 30
            )
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # stops the run as Ctrl-C does

    player = threading.Thread(target=play, daemon=True)
    player.start()
    try:
        code = main(
            [
                "run",
                "--config", str(config),
                "--preset", "demo",
                "--set", "stream.width=64",
                "--set", "stream.height=64",
                "--set", "input.width=64",
                "--set", "input.height=64",
                "--set", f"outputs=[{{type: record, path: '{tmp_path / 'a.mp4'}', fps: 30}}]",
                "--set", f"osc.port={a_port}",
                "--set", f"osc.feedback=['127.0.0.1:{a_feedback.port}']",
                "--set", f"osc.forward=['127.0.0.1:{b.service.port}']",
                "--set", "osc.oscquery_port=null",
                "--set", "osc.status_hz=10",
                "--duration", "120",
                "--quiet",
            ]
        )  # fmt: skip
    finally:
        player.join(30)
        a_feedback.close()
        b.close()
    assert code == 0
    assert seen.get("a_running") and seen.get("b_running"), seen
    assert seen.get("guidance"), ("B did not apply A's /guidance_scale 3.5", b.feedback.messages[-10:])
    assert seen.get("prompt"), ("B did not apply A's /prompt", b.applied("prompt"))
    assert seen.get("scene"), ("B did not get the scene's values", b.applied("seed"), b.applied("delta"))
    assert seen.get("echoed_once"), (
        a_feedback.values("/guidance_scale"),
        b.feedback.values("/guidance_scale"),
    )
    assert seen.get("unchanged_echoed"), (
        "an unchanged value was not echoed again",
        a_feedback.values("/guidance_scale"),
        b.feedback.values("/guidance_scale"),
    )
    assert b.feedback.values("/engine/error") == [], b.feedback.values("/engine/error")
    assert a_feedback.values("/engine/error") == [], a_feedback.values("/engine/error")

"""The demo run with a MIDI mapping: `latentstage run --preset demo` in this process, a controller on
the in-memory backend, the OSC feedback watched as TouchDesigner would."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import mido
import pytest
from pythonosc.osc_message import OscMessage

from engine.cli import main
from engine.midi import loopback
from scripts.osc_peer import free_port

PORT = "Loopback knob 20:0"
pytestmark = pytest.mark.slow


class Feedback:
    """Every OSC message sent to ``port``, with the time it came."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str, list[Any]]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            message = OscMessage(data)
            self.messages.append((time.monotonic(), message.address, list(message.params)))

    def values(self, address: str, since: float = 0.0) -> list[Any]:
        return [args[0] for t, a, args in list(self.messages) if a == address and t >= since and args]

    def wait(self, address: str, predicate: Any, timeout: float, since: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(v) for v in self.values(address, since)):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def test_a_mapping_binding_cc_1_to_guidance_moves_the_demo_and_a_flood_keeps_frames_flowing(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    (tmp_path / "presets" / "midi").mkdir(parents=True)
    (tmp_path / "presets" / "midi" / "knob.yaml").write_text(
        'input: "Loopback knob"\nbindings:\n  - {cc: 1, to: guidance_scale, range: [0, 5], takeover: jump}\n'
    )
    osc_port, feedback_port = free_port(), free_port()
    feedback = Feedback(feedback_port)
    loopback.reset()
    loopback.plug(PORT)
    seen: dict[str, Any] = {}

    def play() -> None:
        try:
            seen["connected"] = feedback.wait("/engine/midi", lambda v: "connected" in v, 120)
            seen["running"] = feedback.wait("/engine/state", lambda v: v == "running", 120)
            loopback.play(PORT, mido.Message("control_change", control=1, value=127))
            seen["moved"] = feedback.wait("/guidance_scale", lambda v: abs(v - 5.0) < 1e-6, 20)
            started = time.monotonic()
            for i in range(10_000):  # a flood: about 10,000 in a second
                loopback.play(PORT, mido.Message("control_change", control=1, value=i % 128))
                if i % 1000 == 999:
                    time.sleep(0.1)
            loopback.play(PORT, mido.Message("control_change", control=1, value=51))
            flood_end = time.monotonic()
            seen["flood_s"] = flood_end - started
            seen["newest"] = feedback.wait(
                "/guidance_scale", lambda v: abs(v - 51 / 127 * 5) < 1e-6, 20, started
            )
            seen["fps_after"] = feedback.wait("/engine/fps", lambda v: v > 0, 20, flood_end + 1.0)
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
                "--set", f"outputs=[{{type: record, path: {tmp_path / 'demo.mp4'}}}]",
                "--set", f"osc.port={osc_port}",
                "--set", f"osc.feedback=[127.0.0.1:{feedback_port}]",
                "--set", "osc.oscquery_port=null",
                "--set", "osc.status_hz=10",
                "--set", "midi.mappings=[knob]",
                "--set", "midi.backend=engine.midi.loopback",
                "--duration", "240",
                "--quiet",
            ]
        )  # fmt: skip
    finally:
        player.join(30)
        feedback.close()
        loopback.reset()
    assert code == 0
    assert seen.get("connected") and seen.get("running"), seen
    assert seen.get("moved"), (
        "CC 1 at 127 did not set guidance_scale 5.0",
        feedback.values("/guidance_scale"),
    )
    assert seen.get("newest"), feedback.values("/guidance_scale")[-5:]
    assert seen.get("fps_after"), "frames flow after the flood"
    errors = feedback.values("/engine/error")
    assert errors == [], errors

"""Talking OSC to a running engine from outside: ports, flags, a feedback listener, hostile datagrams.

Shared by ``scripts/soak.py`` (run as a script: ``from osc_peer import ...``) and the tests
(``from scripts.osc_peer import ...``); it needs only the installed ``engine`` and python-osc.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

from engine.control.transport import build_message


def free_port(kind: socket.SocketKind = socket.SOCK_DGRAM) -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def osc_flags(port: int, feedback_port: int, status_hz: float) -> list[str]:
    """``--set`` flags for ``latentstage run``: OSC on ``port`` without OSCQuery, feedback sent
    to ``127.0.0.1:feedback_port`` with a status ``status_hz`` times a second."""
    return [
        "--set",
        f"osc.port={port}",
        "--set",
        "osc.oscquery_port=null",
        "--set",
        f"osc.feedback=['127.0.0.1:{feedback_port}']",
        "--set",
        f"osc.status_hz={status_hz}",
    ]


class FeedbackListener(threading.Thread):
    """Collects every OSC message sent to a loopback UDP port: (time, address, args)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port = int(self.socket.getsockname()[1])
        self.messages: list[tuple[float, str, list]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from pythonosc.osc_packet import OscPacket, ParseError

        while not self.stop.is_set():
            try:
                data, _ = self.socket.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            try:
                packet = OscPacket(data)
            except ParseError:  # not OSC: nothing to record
                continue
            now = time.monotonic()
            for timed in packet.messages:
                self.received(now, timed.message.address, list(timed.message.params))

    def received(self, at: float, address: str, args: list) -> None:
        """One message (at ``time.monotonic()`` ``at``); kept in ``messages``."""
        self.messages.append((at, address, args))

    def values(self, address: str, since: float = 0.0) -> list[list]:
        return [args for t, a, args in list(self.messages) if a == address and t >= since]

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.socket.close()


def _deep_bundle(rng: random.Random) -> bytes:
    data = build_message("/seed", [1])
    for _ in range(50):
        data = b"#bundle\x00" + struct.pack(">Qi", 1, len(data)) + data
    return data


def _corrupted(rng: random.Random) -> bytes:
    good = bytearray(build_message("/t_index_list", [1, 2]))
    good[rng.randrange(len(good))] = rng.randrange(256)
    return bytes(good)


#: Datagram kinds an engine must survive without a state change: name -> maker(rng).
HOSTILE: dict[str, Callable[[random.Random], bytes]] = {
    "random_bytes": lambda rng: os.urandom(rng.randint(0, 300)),
    "nan_guidance": lambda rng: build_message("/guidance_scale", [float("nan")]),
    "huge_prompt": lambda rng: build_message("/prompt", ["x" * 20_000]),
    "unknown_address": lambda rng: build_message("/no/such/thing", [1, 2, 3]),
    "bad_seed": lambda rng: build_message("/seed", ["not a number"]),
    "deep_bundle": _deep_bundle,
    "long_blend": lambda rng: build_message("/prompt_blend", ["a", 1.0] * 50),
    "corrupted": _corrupted,
}
HOSTILE_KINDS = tuple(HOSTILE)


def hostile_datagrams(count: int, kinds: Sequence[str] = HOSTILE_KINDS, seed: int = 0) -> list[bytes]:
    """``count`` datagrams cycling through ``kinds`` (names of ``HOSTILE``), seeded."""
    rng = random.Random(seed)
    makers = [HOSTILE[kind] for kind in kinds]
    return [makers[i % len(makers)](rng) for i in range(count)]

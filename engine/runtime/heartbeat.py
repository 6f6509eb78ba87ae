"""The link between a supervised engine and its supervisor: heartbeats out, stop requests in.

Heartbeats are small JSON datagrams over loopback UDP (never blocking the engine); the stop
request travels on the engine's standard input, whose end (EOF) also means the supervisor
is gone. Both work the same on Windows, macOS and Linux.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

logger = logging.getLogger(__name__)

BEAT_INTERVAL_S = 0.5
STOP_LINE = b"stop"


class Phase:
    """What the engine is doing, as the heartbeat says it."""

    STARTING = "starting"  # loading the model, building engines: no frame loop yet
    RUNNING = "running"  # the frame loop runs; its counters must keep moving


@dataclass(frozen=True)
class Beat:
    """One heartbeat: who sent it and how far its frame loop got."""

    pid: int
    phase: str
    loop: int
    frames: int
    state: str

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Beat | None:
        """The beat in ``data``, or ``None`` when it is not one (never raises)."""
        try:
            raw = json.loads(data)
            return cls(
                int(raw["pid"]), str(raw["phase"]), int(raw["loop"]), int(raw["frames"]), str(raw["state"])
            )
        except (ValueError, TypeError, KeyError):
            return None


class _Engine(Protocol):
    loop_iterations: int
    frames_emitted: int

    def stop(self) -> None: ...


class SupervisorLink:
    """The supervised engine's end: a heartbeat thread and a thread reading stop requests.

    Before ``attach`` the beats say ``starting``; after it they carry the engine's loop and
    frame counters, which a stuck frame loop stops advancing (the supervisor's hang test).
    A ``stop`` line or the end of ``commands`` (the supervisor died) stops the engine, or,
    before there is one, sets ``stop_requested`` for the start-up to honour.

    Args:
        port: the supervisor's heartbeat port on 127.0.0.1.
        commands: where stop requests arrive (the process's standard input).
        state: the engine state text for the beat (``stats.state.value``).
    """

    def __init__(
        self,
        port: int,
        commands: BinaryIO | None,
        state: Callable[[], str] = lambda: "loading",
        interval_s: float = BEAT_INTERVAL_S,
    ) -> None:
        self.stop_requested = threading.Event()
        self._target = ("127.0.0.1", port)
        self._state = state
        self._interval = interval_s
        self._engine: _Engine | None = None
        self._closed = threading.Event()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._beats = threading.Thread(target=self._beat_loop, name="latentstage-heartbeat", daemon=True)
        self._beats.start()
        if commands is not None:
            threading.Thread(
                target=self._read_commands, args=(commands,), name="latentstage-supervisor-link", daemon=True
            ).start()

    def attach(self, engine: _Engine, state: Callable[[], str]) -> None:
        """From now on the beats report ``engine``'s counters; a stop already asked stops it."""
        self._state = state
        self._engine = engine
        if self.stop_requested.is_set():
            engine.stop()

    def beat(self) -> None:
        """Send one heartbeat now (the thread sends one every ``interval_s``)."""
        engine = self._engine
        beat = Beat(
            os.getpid(),
            Phase.STARTING if engine is None else Phase.RUNNING,
            0 if engine is None else engine.loop_iterations,
            0 if engine is None else engine.frames_emitted,
            self._state(),
        )
        try:
            self._socket.sendto(beat.encode(), self._target)
        except OSError as err:  # a supervisor restarting its socket: the next beat tries again
            logger.debug("heartbeat not sent: %s", err)

    def close(self) -> None:
        """Stop beating; safe twice (the command reader ends with the process)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._beats.join(2 * self._interval)
        self._socket.close()

    def _beat_loop(self) -> None:
        while not self._closed.is_set():
            self.beat()
            self._closed.wait(self._interval)

    def _read_commands(self, commands: BinaryIO) -> None:
        for line in iter(commands.readline, b""):
            if line.strip() == STOP_LINE:
                logger.info("the supervisor asks to stop")
                break
        else:
            logger.warning("the supervisor is gone; stopping")
        self.stop_requested.set()
        engine = self._engine
        if engine is not None:
            engine.stop()


class HeartbeatReceiver:
    """The supervisor's end: a loopback UDP socket that collects beats; ``close()`` safe twice."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self._closed = False

    def receive(self, timeout: float) -> Beat | None:
        """The next beat within ``timeout`` seconds, else ``None``."""
        self._socket.settimeout(max(timeout, 1e-3))
        try:
            data, _ = self._socket.recvfrom(4096)
        except (TimeoutError, OSError):
            return None
        return Beat.decode(data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._socket.close()

    def __enter__(self) -> HeartbeatReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

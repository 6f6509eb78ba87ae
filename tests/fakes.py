"""In-process stand-ins for frame bridges, for runtime and control tests."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bridges.base import BridgeError, Frame

if TYPE_CHECKING:
    from engine.pipeline import PipelineSettings

SIZE = 64


def pipeline_settings(size: int = SIZE, **overrides: Any) -> PipelineSettings:
    """``PipelineSettings`` of a ``size`` x ``size`` stream, one step (``t_index_list=[32]``), no
    CFG, ``prompt="x"``; ``overrides`` replace any of these or set more."""
    from engine.pipeline import PipelineSettings
    from engine.stream.modes import CfgType

    values: dict[str, Any] = {
        "width": size,
        "height": size,
        "t_index_list": [32],
        "cfg_type": CfgType.NONE,
        "prompt": "x",
    }
    return PipelineSettings(**{**values, **overrides})


class FakeSource:
    """Frames at ``fps`` with a value per frame; ``fail_after`` frames then raises BridgeError."""

    def __init__(
        self, fps: float = 60.0, fail_after: int | None = None, value: int = 0, on_fail=None
    ) -> None:
        self.on_fail = on_fail
        self.interval = 1.0 / fps
        self.fail_after = fail_after
        self.sequence = 0
        self.value = value
        self.next_at = time.monotonic()
        self.closed = 0

    def recv(self, timeout: float) -> Frame | None:
        if self.fail_after is not None and self.sequence >= self.fail_after:
            if self.on_fail is not None:
                self.on_fail()
            raise BridgeError("fake source unplugged")
        wait = self.next_at - time.monotonic()
        if wait > timeout:
            time.sleep(timeout)
            return None
        time.sleep(max(0.0, wait))
        self.next_at = max(self.next_at + self.interval, time.monotonic())
        self.sequence += 1
        pixels = np.full((SIZE, SIZE, 4), (self.value + 7 * self.sequence) % 256, dtype=np.uint8)
        return Frame(pixels, time.monotonic(), self.sequence)

    def close(self) -> None:
        self.closed += 1


class SourcePlug:
    """Opens FakeSources; the first one fails after ``fail_after`` frames and unplugs the
    cable, so reopening fails until ``plugged`` is set again."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.plugged = threading.Event()
        self.plugged.set()
        self.fail_after = fail_after
        self.opened = 0

    def __call__(self) -> FakeSource:
        if not self.plugged.is_set():
            raise BridgeError("no such source")
        self.opened += 1
        fail = self.fail_after if self.opened == 1 else None
        return FakeSource(fail_after=fail, value=100 * self.opened, on_fail=self.plugged.clear)


class RecordingSink:
    def __init__(self, delay: float = 0.0, fail_every: int | None = None) -> None:
        self.frames: list[Frame] = []
        self.times: list[float] = []
        self.delay = delay
        self.fail_every = fail_every
        self.calls = 0
        self.closed = 0

    def send(self, frame: Frame) -> None:
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("sink exploded")
        time.sleep(self.delay)
        self.frames.append(frame)
        self.times.append(time.monotonic())

    def close(self) -> None:
        self.closed += 1


class FakeMidi:
    """A MIDI service as the control service owns it (``engine.control.service.MidiControl``): a
    ``panel()`` shaped as ``MidiService.panel``'s, the calls it got in ``calls``; ``learnt``
    completes a learn as a moved control would, ``refuse`` makes ``learn`` raise its text."""

    PORT = "Pad 20:0"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse: str | None = None
        self._lock = threading.Lock()
        self._learning: tuple[str, str | int | None] | None = None
        self._bindings: list[dict[str, Any]] = [
            {"source": "cc 48 ch 1", "to": "guidance_scale", "argument": None, "mode": "absolute"},
            {"source": "note 40", "to": "preset_load", "argument": "intro", "mode": "trigger"},
        ]

    def panel(self) -> dict[str, Any]:
        from engine.midi.mapping import bindable

        with self._lock:
            learning = self._learning
            bindings = [dict(b) for b in self._bindings]
        return {
            "status": f"pad: connected to {self.PORT!r}; spare: waiting for 'X-TOUCH'",
            "learning": None if learning is None else {"target": learning[0], "argument": learning[1]},
            "controllers": [
                {
                    "mapping": "pad",
                    "input": "Pad",
                    "port": self.PORT,
                    "connected": True,
                    "profile": "generic (127 on, 0 off)",
                    "bindings": bindings,
                },
                {
                    "mapping": "spare",
                    "input": "X-TOUCH",
                    "port": None,
                    "connected": False,
                    "profile": "xtouch_mini",
                    "bindings": [],
                },
            ],
            "bindable": bindable(),
        }

    def learn(self, target: str, argument: str | int | None = None) -> None:
        self.calls.append(("learn", target, argument))
        if self.refuse is not None:
            raise ValueError(self.refuse)
        with self._lock:
            self._learning = (target, argument)

    def forget(self, target: str, argument: str | int | None = None) -> int:
        self.calls.append(("forget", target, argument))
        with self._lock:
            kept = [
                b for b in self._bindings if not (b["to"] == target and argument in (None, b["argument"]))
            ]
            removed = len(self._bindings) - len(kept)
            self._bindings = kept
        if not removed:
            raise ValueError(f"no MIDI binding drives {target}")
        return removed

    def unbind(self, mapping: str, index: int) -> None:
        self.calls.append(("unbind", mapping, index))
        with self._lock:
            if mapping != "pad" or not 0 <= index < len(self._bindings):
                raise ValueError(f"{mapping} has no binding {index}")
            del self._bindings[index]

    def cancel(self) -> None:
        self.calls.append(("cancel",))
        with self._lock:
            self._learning = None

    def learnt(self, source: str, mode: str = "absolute") -> None:
        """The learn waiting is done: ``source`` is bound to its target."""
        with self._lock:
            assert self._learning is not None, "no learn waits"
            target, argument = self._learning
            self._bindings.append({"source": source, "to": target, "argument": argument, "mode": mode})
            self._learning = None

    def start(self) -> None:
        self.calls.append(("start",))

    def close(self) -> None:
        self.calls.append(("close",))

    def scene_loaded(self, name: str) -> None:
        self.calls.append(("scene_loaded", name))

    def status_text(self) -> str:
        return str(self.panel()["status"])


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` every 20 ms until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def playing(pipe, seconds: float, errors: list[str] | None = None, backend: Any = None) -> Iterator[Any]:
    """An engine on a 20 fps fake source, running on a thread, after its first 3 frames.

    Yields ``(engine, sink, thread)``; on exit it stops, joins the thread and closes.
    """
    from engine.runtime.engine import Engine

    sink = RecordingSink()
    engine = Engine(pipe, lambda: FakeSource(fps=20), [("rec", lambda: sink)], backend=backend)
    if errors is not None:
        engine.on_error = errors.append
    thread = threading.Thread(target=engine.run, kwargs={"duration": seconds}, daemon=True)
    with engine:
        thread.start()
        assert wait_until(lambda: len(sink.frames) >= 3)
        try:
            yield engine, sink, thread
        finally:
            engine.stop()
            thread.join(10)


def record_durability(monkeypatch: Any) -> list[tuple[str, str]]:
    """Record, in order, each ``os.fsync`` as ``("fsync", "file" | "folder")`` and each
    ``os.replace`` as ``("replace", target name)``; both still do their work."""
    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: Any) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        calls.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(number).st_mode) else "file"))
        fsync(fd)

    def recording_replace(src: Any, dst: Any, **kwargs: Any) -> None:
        calls.append(("replace", Path(dst).name))
        replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return calls

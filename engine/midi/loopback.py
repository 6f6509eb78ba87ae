"""An in-memory mido backend: virtual controllers that can be plugged, played, watched and unplugged.

Use it where no sound device exists (tests, CI, a demo): ``MIDO_BACKEND=engine.midi.loopback`` or
``midi.backend: engine.midi.loopback`` in config.yaml, or ``mido.Backend("engine.midi.loopback")``.
A test plays the controller's side::

    loopback.plug("APC mini 20:0")                     # the device appears (input and output)
    loopback.play("APC mini 20:0", mido.Message("control_change", control=1, value=64))
    loopback.sent("APC mini 20:0")                      # what the engine sent it (LED feedback)
    loopback.unplug("APC mini 20:0")                    # gone: its ports vanish from the lists

``play`` delivers to every open input of that name, to its callback (on the caller's thread, as
rtmidi calls from its own) or to its queue. An unplugged device's open ports stay open but hear
nothing and their sends are lost, as with a real device pulled out; opening a name that is not
plugged raises ``OSError`` like rtmidi's "unknown port". State is per process; ``reset()`` clears it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from mido.messages import Message
from mido.ports import BaseInput, BaseOutput

_lock = threading.RLock()


@dataclass
class _Device:
    name: str
    is_input: bool = True
    is_output: bool = True
    inputs: list[Input] = field(default_factory=list)
    sent: list[Message] = field(default_factory=list)


_devices: dict[str, _Device] = {}
_gone: dict[str, _Device] = {}  # unplugged: what was sent to them stays readable


def plug(name: str, input: bool = True, output: bool = True) -> None:
    """Make the device ``name`` appear with an input (messages to the engine) and/or an output."""
    with _lock:
        _devices[name] = _Device(name, input, output)


def unplug(name: str) -> None:
    """The device ``name`` disappears; its open ports go quiet (its sent messages are kept)."""
    with _lock:
        device = _devices.pop(name, None)
        if device is not None:
            for port in device.inputs:
                port.unplugged = True
            _gone[name] = device


def reset() -> None:
    """Forget every device (between tests)."""
    with _lock:
        _devices.clear()
        _gone.clear()


def play(name: str, message: Message) -> int:
    """The device ``name`` sends ``message``: it reaches every open input of that name; how many."""
    with _lock:
        device = _devices.get(name)
        ports = [] if device is None else [port for port in device.inputs if not port.closed]
    for port in ports:
        port.deliver(message)
    return len(ports)


def sent(name: str) -> list[Message]:
    """What the engine sent to the device ``name`` (also after it was unplugged), oldest first."""
    with _lock:
        device = _devices.get(name) or _gone.get(name)
        return [] if device is None else list(device.sent)


def clear_sent(name: str) -> None:
    """Forget what was sent to ``name`` (to watch what comes next)."""
    with _lock:
        device = _devices.get(name) or _gone.get(name)
        if device is not None:
            device.sent.clear()


def get_devices(**_kwargs: Any) -> list[dict[str, Any]]:
    """mido's backend hook: the plugged devices."""
    with _lock:
        return [{"name": d.name, "is_input": d.is_input, "is_output": d.is_output} for d in _devices.values()]


def _plugged(name: str | None, want_input: bool) -> _Device:
    with _lock:
        device = _devices.get(name or "")
    if device is None or not (device.is_input if want_input else device.is_output):
        kind = "input" if want_input else "output"
        raise OSError(f"unknown port {name!r}: no loopback {kind} of that name is plugged")
    return device


class Input(BaseInput):
    """An input port: what the device plays arrives here."""

    def _open(self, callback: Any = None, **_kwargs: Any) -> None:
        self.callback = callback
        self.unplugged = False
        self._device = _plugged(self.name, want_input=True)
        with _lock:
            self._device.inputs.append(self)

    def deliver(self, message: Message) -> None:
        if self.unplugged or self.closed:
            return
        if self.callback is not None:
            self.callback(message)
        else:
            with self._lock:
                self._messages.append(message)

    def _receive(self, block: bool = True) -> Message | None:
        with self._lock:
            return self._messages.popleft() if self._messages else None

    def _close(self) -> None:
        with _lock:
            if self in self._device.inputs:
                self._device.inputs.remove(self)


class Output(BaseOutput):
    """An output port: what the engine sends is kept for ``sent``."""

    def _open(self, **_kwargs: Any) -> None:
        self._device = _plugged(self.name, want_input=False)

    def _send(self, message: Message) -> None:
        with _lock:
            if _devices.get(self._device.name) is self._device:
                self._device.sent.append(message)

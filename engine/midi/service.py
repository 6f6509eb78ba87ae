"""MidiService: controllers by mapping file, hotplugged by port name prefix, through the OSC dispatcher.

One service owns every MIDI resource: the ports (opened through mido, extra ``midi``), one worker
thread and the learn state. Per mapping in ``midi.mappings`` there is one ``Controller``: its
mapping and device profile, its ``Surface`` (messages → commands, values → LEDs) and its ports.

Threads: mido delivers messages on its own thread to ``_on_message``, which only appends them to
the inbox. The worker (``latentstage-midi``) does the rest, in this order each turn:

1. take every message waiting (a burst of 10,000 CCs is one turn) and turn each into commands
   (or a learned binding);
2. coalesce: one command per key, the newest (a fast fader), buttons and taps in order;
3. write them through the dispatcher (``handle_message``: the OSC validation, ControlState,
   echo and autosave; the frame loop applies them at its next frame boundary);
4. every ``poll_s``: look for ports that came or went (hotplug, by name prefix: ALSA's client
   numbers change every session), open or close them, announce it on ``/engine/midi``;
5. every ``1 / feedback_hz``: the LEDs whose value changed go out (all of them after a connect
   or a scene load), at most ``MAX_LEDS_PER_TURN`` a turn.

Nothing here is fatal: a missing device waits, a port that fails to open is retried, a refused
value is answered on ``/engine/error`` as OSC would be.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import yaml

from bridges.ratelimit import RateLimitedLog
from engine import params
from engine.atomicfile import atomic_write_bytes
from engine.midi.mapping import (
    ACTION_ARGUMENTS,
    HOOK_LIMITS,
    Binding,
    MidiMapping,
    Role,
    Source,
    bindable,
    check_binding,
    check_mapping,
    load_mapping,
    role_of,
)
from engine.midi.profile import DEFAULT_PROFILE, DeviceProfile, MidiYamlLoader, load_profile
from engine.midi.surface import Command, Surface, describe
from engine.modulation.modulator import modulator_index
from engine.tempo import midi_port
from engine.tempo.extras import TempoSourceUnavailable, missing_extra

logger = logging.getLogger(__name__)

EXTRA = "midi"
MAX_LEDS_PER_TURN = 256
MAX_INBOX = 100_000
LEARN_TIMEOUT_S = 120.0
SENDER = ("midi", 0)


class Dispatcher(Protocol):
    """What the service writes through (``engine.control.dispatch.OscDispatcher``)."""

    def handle_message(self, address: str, args: Sequence[Any], sender: tuple[str, int]) -> list[Any]: ...


@dataclass(frozen=True)
class MidiSettings:
    """The ``midi`` config section: mapping files by name, in ``folder`` (``presets/midi``)."""

    mappings: tuple[str, ...] = ()
    folder: Path = Path("presets/midi")
    poll_s: float = 1.5
    feedback_hz: float = 30.0
    backend: str | None = None

    @classmethod
    def from_config(cls, midi: Any, folder: str | Path) -> MidiSettings:
        return cls(tuple(midi.mappings), Path(folder), midi.poll_s, midi.feedback_hz, midi.backend)


def import_mido() -> ModuleType:
    """The ``mido`` module, or the one-line error naming the extra (``engine.tempo.midi_port``'s)."""
    return midi_port.import_mido("MIDI")


def open_backend(name: str | None) -> Any:
    """mido's backend ``name`` (a module, e.g. ``engine.midi.loopback``; ``None``: ``MIDO_BACKEND``,
    else rtmidi), loaded: the one-line error naming the extra when it cannot be."""
    mido = import_mido()
    backend = mido.Backend(name) if name else mido.Backend()
    try:
        backend.load()
    except ImportError as exc:
        if name and not name.startswith("mido.backends."):
            raise TempoSourceUnavailable(
                f"the MIDI backend {name!r} cannot load ({exc}); allowed for midi.backend: a mido backend "
                "module, e.g. mido.backends.rtmidi, or engine.midi.loopback (in memory), or null"
            ) from None
        raise missing_extra(EXTRA, "MIDI", f"the MIDI backend {backend.name!r} cannot load ({exc})") from None
    return backend


def port_names(backend: Any) -> tuple[list[str], list[str]]:
    """The inputs and outputs ``backend`` sees now."""
    return list(backend.get_input_names()), list(backend.get_output_names())


def by_prefix(prefix: str, names: Sequence[str]) -> str | None:
    """The first of ``names`` that starts with ``prefix`` (case-insensitive, spaces trimmed)."""
    wanted = prefix.strip().casefold()
    return next((name for name in names if name.strip().casefold().startswith(wanted)), None)


@dataclass
class Controller:
    """One mapping file's live side: its surface, profile and (while connected) ports."""

    name: str
    surface: Surface
    profile: DeviceProfile
    input: Any = None
    output: Any = None
    port: str | None = None
    leds: dict[tuple[str, int, int], int] = field(default_factory=dict)  # what the LEDs show

    @property
    def mapping(self) -> MidiMapping:
        return self.surface.mapping

    @property
    def connected(self) -> bool:
        return self.input is not None


@dataclass(frozen=True)
class Learning:
    """What the next MIDI message binds: a target, its action argument, until ``until``."""

    target: str
    argument: str | int | None
    until: float


class MidiService:
    """Owns the MIDI controllers (see the module docstring); ``start()`` / ``close()`` (twice ok).

    Args:
        settings: the mappings and timings.
        dispatcher: the OSC dispatcher every change goes through.
        lookup: a parameter's newest value (``ControlState.latest``).
        applied: the values the engine runs with (``ControlState.applied``), for the LEDs.
        announce: sends a feedback message (``FeedbackSender.send``): ``/engine/midi``, errors.
        status: the engine's status (``sequence_step`` lights a sequence's step buttons).
        backend: a mido backend (default: ``open_backend(settings.backend)``).
    """

    def __init__(
        self,
        settings: MidiSettings,
        dispatcher: Dispatcher,
        lookup: Callable[[str], Any],
        applied: Callable[[], Mapping[str, Any]],
        announce: Callable[[str, Sequence[Any]], None],
        status: Callable[[], Mapping[str, Any]] = dict,
        backend: Any = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self._lookup = lookup
        self._applied = applied
        self._announce = announce
        self._status = status
        self._now = now
        self.backend = open_backend(settings.backend) if backend is None else backend
        self.controllers = [self._controller(name) for name in settings.mappings]
        self._inbox: collections.deque[tuple[Controller, Any]] = collections.deque()
        self._dropped = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the learn state, the controllers' ports and mappings
        self._learning: Learning | None = None
        self._scene: str | None = None
        self._status_text = ""
        self._log = RateLimitedLog(logger, 5.0)
        self._thread = threading.Thread(target=self._run, name="latentstage-midi", daemon=True)
        self._closed = False
        self.commands_written = 0
        self.turns = 0

    def _controller(self, name: str) -> Controller:
        mapping = load_mapping(self.settings.folder, name)
        profile = (
            DEFAULT_PROFILE
            if mapping.profile is None
            else load_profile(self.settings.folder, mapping.profile)
        )
        check_colors(mapping, profile, name)
        return Controller(name, Surface(mapping, self._lookup, self._now), profile)

    # ------------------------------------------------------------------ lifetime
    def start(self) -> None:
        self._poll()
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        for controller in self.controllers:
            self._disconnect(controller, "closing")

    def __enter__(self) -> MidiService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the control service's calls
    def learn(self, target: str, argument: str | int | None = None) -> None:
        """Bind the next MIDI message (a cc, a note on, pitch bend, a program change) to ``target``;
        a ValueError naming the bad value and what is allowed."""
        self._learn_item(target, argument, None)  # checks what can be checked before the message
        if not self.controllers:
            raise ValueError(
                "no MIDI controller is configured; allowed: after midi.mappings names a mapping file"
            )
        with self._lock:
            self._learning = Learning(target, argument, self._now() + LEARN_TIMEOUT_S)
        self._update_status()

    def cancel(self) -> None:
        with self._lock:
            self._learning = None
        self._update_status()

    def forget(self, target: str, argument: str | int | None = None) -> int:
        """Remove every binding of ``target`` (with ``argument``: only that one's) from the
        mappings, in their files; how many; a ValueError when none drives it."""
        removed = 0
        with self._lock:
            for controller in self.controllers:
                kept = [b for b in controller.mapping.bindings if not _drives(b, target, argument)]
                if len(kept) == len(controller.mapping.bindings):
                    continue
                removed += len(controller.mapping.bindings) - len(kept)
                self._save(controller, functools.partial(_without, target=target, argument=argument))
        if not removed:
            bound = sorted({b.target for c in self.controllers for b in c.mapping.bindings})
            shown = target if argument is None else f"{target} {argument}"
            raise ValueError(f"no MIDI binding drives {shown}; bound: {', '.join(bound) or 'none'}")
        self._update_status(f"forgot {removed} binding(s) of {target}")
        return removed

    def unbind(self, mapping: str, index: int) -> None:
        """Remove binding ``index`` of mapping ``mapping`` (as ``panel`` lists them) from its file."""
        with self._lock:
            controller = next((c for c in self.controllers if c.name == mapping), None)
            if controller is None:
                names = ", ".join(c.name for c in self.controllers) or "none"
                raise ValueError(f"{mapping!r:.60} is not a loaded mapping; allowed: {names}")
            count = len(controller.mapping.bindings)
            if not 0 <= index < count:
                allowed = f"0..{count - 1}" if count else "none: it has no bindings"
                raise ValueError(f"{mapping} has no binding {index}; allowed: {allowed}")
            gone = controller.mapping.bindings[index]
            self._save(controller, functools.partial(_without_index, index=index))
        self._update_status(f"forgot {describe(gone)} -> {gone.target}")

    def scene_loaded(self, name: str) -> None:
        """A scene was loaded: every LED is sent again (and a scene button lights)."""
        with self._lock:
            self._scene = name
            for controller in self.controllers:
                controller.leds.clear()
        self._wake.set()

    @property
    def learning(self) -> Learning | None:
        return self._learning

    def status_text(self) -> str:
        return self._status_text

    def panel(self) -> dict[str, Any]:
        """What the operator page shows: the controllers, their bindings, what is being learnt."""
        with self._lock:
            learning = self._learning
            return {
                "status": self._status_text,
                "learning": None
                if learning is None
                else {"target": learning.target, "argument": learning.argument},
                "controllers": [
                    {
                        "mapping": c.name,
                        "input": c.mapping.input,
                        "port": c.port,
                        "connected": c.connected,
                        "profile": c.profile.name,
                        "bindings": [
                            {
                                "source": describe(b),
                                "to": b.target,
                                "argument": list(b.argument) if isinstance(b.argument, tuple) else b.argument,
                                "mode": b.mode.value,
                            }
                            for b in c.mapping.bindings
                        ],
                    }
                    for c in self.controllers
                ],
                "bindable": bindable(),
            }

    # ------------------------------------------------------------------ mido's thread
    def _on_message(self, controller: Controller, message: Any) -> None:
        if len(self._inbox) >= MAX_INBOX:
            self._dropped += 1
            return
        self._inbox.append((controller, message))
        self._wake.set()

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        feedback_every = 1.0 / self.settings.feedback_hz
        next_poll = self._now() + self.settings.poll_s
        next_leds = self._now()
        while not self._stop.is_set():
            self._wake.wait(max(0.0, min(next_poll, next_leds) - self._now()))
            self._wake.clear()
            if self._stop.is_set():
                break
            self.turns += 1
            # 1.-3. messages → commands → coalesced → written
            self._write(self._take())
            now = self._now()
            # 4. hotplug
            if now >= next_poll:
                self._poll()
                self._expire_learning(now)
                next_poll = now + self.settings.poll_s
            # 5. LEDs
            if now >= next_leds:
                self._send_leds()
                next_leds = now + feedback_every

    def _take(self) -> list[Command]:
        commands: list[Command] = []
        while self._inbox:
            controller, message = self._inbox.popleft()
            if self._learning is not None and self._learn_from(controller, message):
                continue
            try:
                commands.extend(controller.surface.receive(message))
            except (ValueError, AttributeError, TypeError) as err:  # a malformed message from a device
                self._log(logging.WARNING, "midi-message", "MIDI message %r ignored: %s", message, err)
        return coalesce(commands)

    def _write(self, commands: list[Command]) -> None:
        for command in commands:
            replies = self.dispatcher.handle_message(command.address, list(command.args), SENDER)
            for reply in replies:
                if getattr(reply, "to_feedback", False):
                    self._announce(reply.address, reply.args)
                if reply.address == "/engine/error":
                    self._log(
                        logging.WARNING,
                        f"midi-{command.target}",
                        "MIDI %s refused: %s",
                        command.target,
                        reply.args[0],
                    )
            self.commands_written += 1
        for controller in self.controllers:
            controller.surface.settled()

    # ------------------------------------------------------------------ hotplug
    def _poll(self) -> None:
        try:
            inputs, outputs = port_names(self.backend)
        except (OSError, RuntimeError) as err:
            self._log(logging.WARNING, "midi-ports", "MIDI ports cannot be listed: %s", err)
            return
        changed = False
        for controller in self.controllers:
            if controller.connected and controller.port not in inputs:
                self._disconnect(controller, "unplugged")
                changed = True
            if not controller.connected:
                changed |= self._connect(controller, inputs, outputs)
        if changed or not self._status_text:
            self._update_status()

    def _connect(self, controller: Controller, inputs: list[str], outputs: list[str]) -> bool:
        name = by_prefix(controller.mapping.input, inputs)
        if name is None:
            return False
        try:
            port = self.backend.open_input(name, callback=lambda m, c=controller: self._on_message(c, m))
        except (OSError, RuntimeError) as err:
            self._log(
                logging.WARNING,
                f"midi-open-{controller.name}",
                "MIDI input %r cannot be opened: %s",
                name,
                err,
            )
            return False
        out_name = by_prefix(controller.mapping.output, outputs)
        output = None
        if out_name is not None:
            try:
                output = self.backend.open_output(out_name)
            except (OSError, RuntimeError) as err:
                logger.warning("MIDI output %r cannot be opened (no LED feedback): %s", out_name, err)
        with self._lock:
            controller.input, controller.output, controller.port = port, output, name
            controller.leds.clear()  # everything is sent again
        logger.info(
            "MIDI %s connected: %s%s",
            controller.name,
            name,
            f", feedback to {out_name}" if output is not None else " (no output port: no LED feedback)",
        )
        if output is not None:
            self._send_init(controller)
        return True

    def _send_init(self, controller: Controller) -> None:
        mido = import_mido()
        for data in controller.profile.init:
            self._send(controller, mido.Message("sysex", data=data))

    def _disconnect(self, controller: Controller, why: str) -> None:
        with self._lock:
            ports = (controller.input, controller.output)
            was = controller.port
            controller.input = controller.output = controller.port = None
        for port in ports:
            if port is not None:
                try:
                    port.close()
                except (OSError, RuntimeError) as err:
                    logger.debug("closing MIDI port %r: %s", was, err)
        if was is not None:
            logger.info("MIDI %s disconnected (%s): %s", controller.name, why, was)

    def _update_status(self, event: str | None = None) -> None:
        parts = []
        for c in self.controllers:
            where = f"connected to {c.port!r}" if c.connected else f"waiting for {c.mapping.input!r}"
            parts.append(f"{c.name}: {where}")
        learning = self._learning
        if learning is not None:
            shown = learning.target if learning.argument is None else f"{learning.target} {learning.argument}"
            parts.append(f"learning {shown}: move a control")
        if event:
            parts.append(event)
        text = "; ".join(parts) or "no MIDI controller configured"
        if text != self._status_text:
            self._status_text = text
            self._announce("/engine/midi", [text])

    # ------------------------------------------------------------------ LEDs
    def _send_leds(self) -> None:
        connected = [c for c in self.controllers if c.output is not None]
        if not connected:
            return
        values = self._applied()
        steps = any(b.target == "sequence_jump" for c in connected for b in c.mapping.bindings)
        step = self._status().get("sequence_step") if steps else None
        extra = {"sequence_step": step, "scene": self._scene}
        mido = import_mido()
        for controller in connected:
            wanted = controller.surface.leds(values, controller.profile, extra)
            sent = 0
            for key, value in wanted.items():
                if controller.leds.get(key) == value:
                    continue
                if sent >= MAX_LEDS_PER_TURN:
                    break  # the rest next turn
                kind, channel, number = key
                if kind == "control_change":
                    message = mido.Message(kind, channel=channel, control=number, value=value)
                elif kind == "note_on":
                    message = mido.Message(kind, channel=channel, note=number, velocity=value)
                else:
                    message = mido.Message(kind, channel=channel, pitch=value)
                if not self._send(controller, message):
                    break
                controller.leds[key] = value
                sent += 1

    def _send(self, controller: Controller, message: Any) -> bool:
        output = controller.output
        if output is None:
            return False
        try:
            output.send(message)
            return True
        except (OSError, RuntimeError, ValueError) as err:  # pulled out between two polls
            self._log(
                logging.WARNING,
                f"midi-send-{controller.name}",
                "MIDI feedback to %s failed: %s",
                controller.port,
                err,
            )
            return False

    # ------------------------------------------------------------------ learn
    def _expire_learning(self, now: float) -> None:
        learning = self._learning
        if learning is not None and now > learning.until:
            self.cancel()
            self._update_status(f"learn of {learning.target} timed out")

    def _learn_item(self, target: str, argument: Any, source: dict[str, Any] | None) -> dict[str, Any]:
        """The mapping item a learnt ``source`` makes for ``target``; checked (a ValueError)."""
        spec = params.REGISTRY.get(target)
        if spec is None or role_of(spec) is None:
            raise ValueError(f"{target!r:.60} cannot be learnt; allowed: {', '.join(bindable())}")
        placeholder = {"note": 0} if role_of(spec) in (Role.SWITCH, Role.ACTION) else {"cc": 0}
        item: dict[str, Any] = dict(placeholder if source is None else source)
        item["to"] = target
        wanted = ACTION_ARGUMENTS.get(target, (None, Role.ACTION))[0]
        if "program" in item and target == "preset_load":
            raise ValueError(
                "a program change loads scenes[n] from a list; allowed: a cc or a note, "
                "or write 'scenes:' in the mapping file"
            )
        if "program" in item and target == "sequence_jump":
            wanted = None
        if wanted is not None:
            if argument is None:
                raise ValueError(f"{target} needs its {wanted}; allowed: /midi/learn s {target} <{wanted}>")
            item[wanted] = argument
        elif argument is not None:
            raise ValueError(f"{target} takes no argument; allowed: /midi/learn s {target}")
        if target in HOOK_LIMITS:
            item["range"] = self._hook_range(target, argument)
        check_binding(item, "learn")
        return item

    def _hook_range(self, target: str, argument: Any) -> list[float]:
        if target == "mod_rate":
            return [0.05, 8.0]  # Hz
        items = self._lookup("modulators") or []
        try:
            modulated = params.REGISTRY[items[modulator_index(items, argument)]["target"].split("[")[0]]
        except (ValueError, KeyError):
            return [0.0, 1.0]
        if modulated.minimum is None or modulated.maximum is None:
            return [0.0, 1.0]
        return [0.0, float(modulated.maximum - modulated.minimum)]

    def _learn_from(self, controller: Controller, message: Any) -> bool:
        """Bind ``message`` to what is being learnt; whether it was used for learning."""
        learning = self._learning
        assert learning is not None
        source = learnt_source(message)
        if source is None:
            return False  # a note off, a clock tick: not a control being moved
        try:
            item = self._learn_item(learning.target, learning.argument, source)
        except ValueError as err:
            self._update_status(f"learn: {err}")
            return True
        with self._lock:
            self._learning = None
        try:
            with self._lock:
                self._save(controller, lambda data: _with(data, item))
        except (OSError, ValueError) as err:
            self._update_status(f"learn: cannot save {controller.name}: {err}")
            return True
        binding = check_binding(item, "learn")
        logger.info("MIDI learn: %s -> %s (saved in %s)", describe(binding), learning.target, controller.name)
        self._update_status(f"learned {describe(binding)} -> {learning.target}")
        return True

    def _save(self, controller: Controller, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Change the mapping file's data, check it whole, write it atomically and play it."""
        path = self.settings.folder / f"{controller.name}.yaml"
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=MidiYamlLoader) if path.is_file() else None
        data = change(dict(data or {"input": controller.mapping.input}))
        mapping = check_mapping(data)
        text = f"# MIDI mapping {controller.name}: edited by MIDI learn / forget\n" + yaml.safe_dump(
            data, sort_keys=False, default_flow_style=None, allow_unicode=True
        )
        atomic_write_bytes(path, text.encode("utf-8"))
        controller.surface.replace(mapping)
        controller.leds.clear()


def learnt_source(message: Any) -> dict[str, Any] | None:
    """The source part of a mapping item for a message being learnt (``None``: not a control)."""
    channel = getattr(message, "channel", 0) + 1
    kind = message.type
    if kind == "control_change":
        return {"cc": message.control, "channel": channel}
    if kind == "note_on" and message.velocity > 0:
        return {"note": message.note, "channel": channel}
    if kind == "pitchwheel":
        return {"pitchbend": True, "channel": channel}
    if kind == "program_change":
        return {"program": True, "channel": channel}
    return None


def coalesce(commands: list[Command]) -> list[Command]:
    """The newest command per key, at the place of its key's first; keyless ones all, in order."""
    newest: dict[str, int] = {}
    for index, command in enumerate(commands):
        if command.key is not None:
            newest[command.key] = index
    out: list[Command] = []
    placed: set[str] = set()
    for command in commands:
        if command.key is None:
            out.append(command)
        elif command.key not in placed:
            placed.add(command.key)
            out.append(commands[newest[command.key]])
    return out


def check_colors(mapping: MidiMapping, profile: DeviceProfile, name: str) -> None:
    """Every binding's ``color`` is one of the profile's (a ValueError naming it)."""
    for index, binding in enumerate(mapping.bindings):
        if binding.color is not None:
            try:
                profile.color(binding.color)
            except ValueError as err:
                raise ValueError(f"midi mapping {name!r}: bindings[{index}].{err}") from None


def _drives(binding: Binding, target: str, argument: Any) -> bool:
    return binding.target == target and (argument is None or binding.argument == argument)


def _argument_of(item: Mapping[str, Any]) -> Any:
    return next((item[key] for key in ("scene", "modulator", "step") if key in item), None)


def _without(data: dict[str, Any], target: str, argument: Any) -> dict[str, Any]:
    items = data.get("bindings") or []
    data["bindings"] = [
        item
        for item in items
        if not (
            isinstance(item, Mapping)
            and item.get("to") == target
            and (argument is None or _argument_of(item) == argument)
        )
    ]
    return data


def _without_index(data: dict[str, Any], index: int) -> dict[str, Any]:
    data["bindings"] = [item for i, item in enumerate(data.get("bindings") or []) if i != index]
    return data


def _same_source(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    for key in (s.value for s in Source):
        if key in a and key in b:
            numbers = {a[key]} if not isinstance(a[key], list) else set(a[key])
            other = {b[key]} if not isinstance(b[key], list) else set(b[key])
            channels = a.get("channel"), b.get("channel")
            return bool(numbers & other) and (None in channels or channels[0] == channels[1])
    return False


def _with(data: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``item`` bound: what played that control or drove that target before goes."""
    target, argument = item["to"], _argument_of(item)
    kept = [
        old
        for old in (data.get("bindings") or [])
        if not (
            isinstance(old, Mapping)
            and (_same_source(old, item) or (old.get("to") == target and _argument_of(old) == argument))
        )
    ]
    data["bindings"] = [*kept, item]
    return data

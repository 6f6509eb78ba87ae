"""OSC dispatch: a datagram becomes validated changes in ControlState, or a named error."""

from __future__ import annotations

import heapq
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pythonosc import osc_packet

from bridges.ratelimit import RateLimitedLog
from engine import params
from engine.control.oscwire import truncation_error
from engine.control.scenes import NAME_RULE, is_scene_name
from engine.control.state import ControlState
from engine.modulation.modulator import edit_modulator, envelope_key, modulator_index
from engine.params import QUANTA, ParamError, ParamKind, ParamSpec
from engine.tempo.kinds import MusicStatus

logger = logging.getLogger(__name__)

MAX_BUNDLE_DEPTH = 8
MAX_ERRORS_PER_S = 10
MAX_CROSSFADE_S = 60.0
_PARSE_ERRORS = (
    osc_packet.ParseError,
    ValueError,  # includes UnicodeDecodeError on bad strings
    struct.error,
    IndexError,
    OverflowError,
    RecursionError,
    TypeError,
)


@dataclass
class Reply:
    """Something the transport must send back: to the sender and/or the feedback targets."""

    address: str
    args: list[Any]
    to_sender: bool = False
    to_feedback: bool = True


class MidiLearner(Protocol):
    """What ``/midi/learn``, ``/midi/forget``, ``/midi/unbind`` and ``/midi/cancel`` call
    (``engine.midi.service.MidiService``; a ValueError names a bad target or argument)."""

    def learn(self, target: str, argument: str | int | None = None) -> None: ...

    def forget(self, target: str, argument: str | int | None = None) -> int: ...

    def unbind(self, mapping: str, index: int) -> None: ...

    def cancel(self) -> None: ...


class Musical(Protocol):
    """What the dispatcher asks of the engine's musical time (``engine.runtime.music.Music``)."""

    def check(self, name: str) -> None:
        """Raise ``ParamError`` when the tempo source owns ``name`` (a MIDI clock, Link)."""

    def tap(self, at: float) -> float | None:
        """A tap at ``at`` (``time.monotonic()``); the new BPM from the second tap on."""

    def resync(self, at: float) -> None:
        """``at`` is the downbeat."""

    def resolume_bpm(self, fader: float) -> float:
        """Resolume's tempo fader (0..1) as BPM."""

    def due(self, quantum: str | None, at: float) -> float | None:
        """When to commit a change that arrived at ``at`` so it is seen on the next ``quantum``
        boundary (``None`` quantum: the global one); ``None``: at once."""

    def queue(self, kind: str, key: int | str | None, at: float) -> None:
        """An envelope trigger / release or a sequence start / stop / jump for the frame loop."""

    def status(self) -> MusicStatus:
        """The tempo, beat and modulated values as the latest frame saw them."""


QUANTISED_PREFIX = "/q/"
"""``/q/<address>`` lands on the global ``/quantize``; ``/q/<quantum>/<address>`` on that quantum."""

SceneHandler = Callable[[str, str, float | None], str | None]
"""``(action, scene name, due)``: the problem, or ``None`` when done (``due``: when to commit a load)."""

Effect = Callable[[], list[Reply]]
"""What a validated message does when it applies: writes ControlState (or runs an action)
and returns the replies. Validation happens before; an effect only fails for a reason that
needs the moment it applies (a scene file that is gone)."""


@dataclass(order=True)
class _Timed:
    """A validated message of a bundle stamped in the future, waiting for its time."""

    due: float  # time.monotonic() at which it applies
    order: int  # arrival order among messages due at the same time
    address: str = field(compare=False)
    effect: Effect = field(compare=False)
    sender: tuple[str, int] = field(compare=False)


@dataclass
class DispatchCounters:
    """What the dispatcher saw (for tests, the status line and /engine/*)."""

    messages: int = 0
    accepted: int = 0
    rejected: int = 0
    malformed: int = 0
    disallowed: int = 0
    timed: int = 0  # messages of future-stamped bundles held until their time
    by_error: dict[str, int] = field(default_factory=dict)


class _QuietPythonOsc(logging.Filter):
    """python-osc logs every unparseable datagram on the root logger; we count them instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pythonosc" not in record.pathname


_QUIET = _QuietPythonOsc()


class OscDispatcher:
    """Turns OSC datagrams into ControlState writes; tiny handlers, no I/O of its own.

    ``handle_datagram`` returns the replies the transport must send (errors, ``/status``),
    so handlers are tested by feeding datagrams. Scene actions call ``scene_handler``.

    Bundles are honoured by their time tag: "immediately" and past times apply at once; a
    message of a bundle stamped in the future is validated when it arrives (a bad one is
    answered at once) and held until its time, at most ``params.MAX_BUNDLE_AHEAD_S`` ahead
    and ``params.MAX_TIMED_WAITING`` at once. The transport calls ``run_due`` when
    ``seconds_to_next_due`` says one is due; the change then lands in ControlState and the
    frame loop applies it at the first frame boundary after that.
    """

    def __init__(
        self,
        state: ControlState,
        status_values: Callable[[], dict[str, Any]],
        scene_handler: SceneHandler | None = None,
        max_string: int = params.MAX_PROMPT_CHARS,
        music: Musical | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.music = music
        self.midi: MidiLearner | None = None  # the control service attaches the MIDI service
        self.sources: Callable[[], list[str]] | None = None  # the source catalogue's names
        self._now = now  # taps, resyncs and quantised changes are stamped with it when they apply
        self.status_values = status_values
        self.scene_handler = scene_handler
        self.max_string = max_string
        self.counters = DispatchCounters()
        self._log = RateLimitedLog(logger, 1.0)
        self._answers: dict[str, tuple[float, int]] = {}
        self._timed: list[_Timed] = []  # a heap by due time
        self._timed_lock = threading.Lock()
        self._timed_order = 0
        root = logging.getLogger()
        if _QUIET not in root.filters:
            root.addFilter(_QUIET)

    # ------------------------------------------------------------------ entry point
    def handle_datagram(self, data: bytes, sender: tuple[str, int]) -> list[Reply]:
        """Parse one UDP datagram (message or bundle) and handle every message in it.

        Messages of a bundle stamped in the future are validated now and held (``run_due``).
        """
        if data.count(b"#bundle\x00") > MAX_BUNDLE_DEPTH:
            return self._malformed(sender, f"bundle nested deeper than {MAX_BUNDLE_DEPTH}")
        # a string longer than any allowed value is refused before the (slow) parser sees it
        if max(map(len, data.split(b"\x00"))) > 4 * self.max_string:
            return self._malformed(sender, f"a string longer than {self.max_string} characters")
        # the parser pads a float cut short with zeros: an invented value must be refused first
        short = truncation_error(data)
        if short is not None:
            return self._malformed(sender, short)
        try:
            packet = osc_packet.OscPacket(data)
            messages = [
                (timed.time, timed.message.address, list(timed.message.params)) for timed in packet.messages
            ]
        except _PARSE_ERRORS as err:
            return self._malformed(sender, f"not an OSC packet ({type(err).__name__})")
        # python-osc stamps "immediately" and past times with its own time.time() before ours
        wall, now = time.time(), time.monotonic()
        replies: list[Reply] = []
        for when, address, args in messages:
            ahead = when - wall
            if ahead > 0:
                replies.extend(self._hold(address, args, sender, ahead, now))
            else:
                replies.extend(self.handle_message(address, args, sender))
        return replies

    def handle_message(self, address: str, args: Sequence[Any], sender: tuple[str, int]) -> list[Reply]:
        """Handle one message; a refused one changes nothing and answers ``/engine/error``."""
        replies, error = self.handle_request(address, args, sender)
        if error is None:
            return replies
        return self._error_replies(address, error)

    def handle_request(
        self, address: str, args: Sequence[Any], sender: tuple[str, int]
    ) -> tuple[list[Reply], str | None]:
        """``handle_message`` for a caller that answers itself (the operator page's HTTP endpoint):
        the replies, or the error text an OSC sender would get (``None``: accepted)."""
        effect, error = self._validate(address, args, sender)
        if effect is None:
            return [], error
        return self._apply(address, effect)

    # ------------------------------------------------------------------ timed bundles
    def seconds_to_next_due(self, now: float | None = None) -> float | None:
        """Seconds until the next held message is due (0 when one is due), None when none waits."""
        now = time.monotonic() if now is None else now
        with self._timed_lock:
            return max(0.0, self._timed[0].due - now) if self._timed else None

    def run_due(self, now: float | None = None) -> list[tuple[Reply, tuple[str, int]]]:
        """Apply every held message whose time has come, in time order; the replies and whom
        they answer (the sender of each message)."""
        now = time.monotonic() if now is None else now
        with self._timed_lock:
            due = []
            while self._timed and self._timed[0].due <= now:
                due.append(heapq.heappop(self._timed))
        answers: list[tuple[Reply, tuple[str, int]]] = []
        for timed in due:
            replies, error = self._apply(timed.address, timed.effect)
            if error is not None:
                replies = self._error_replies(timed.address, error)
            answers.extend((reply, timed.sender) for reply in replies)
        return answers

    def _hold(
        self, address: str, args: list[Any], sender: tuple[str, int], ahead: float, now: float
    ) -> list[Reply]:
        """Validate a message stamped ``ahead`` seconds in the future and hold it until then."""
        with self._timed_lock:
            waiting = len(self._timed)
        if ahead > params.MAX_BUNDLE_AHEAD_S or waiting >= params.MAX_TIMED_WAITING:
            self.counters.messages += 1
            if ahead > params.MAX_BUNDLE_AHEAD_S:
                error = (f"{address[:80]}: bundle time {ahead:.1f} s ahead; allowed: at most "
                         f"{params.MAX_BUNDLE_AHEAD_S:g} s ahead (or immediately)")
            else:
                error = (f"{address[:80]}: {waiting} timed messages already waiting; allowed: at "
                         f"most {params.MAX_TIMED_WAITING} at once")
            self._count_rejection(address, error)
            return self._error_replies(address, error)
        effect, invalid = self._validate(address, args, sender)
        if effect is None:
            assert invalid is not None
            return self._error_replies(address, invalid)
        with self._timed_lock:
            self._timed_order += 1
            heapq.heappush(self._timed, _Timed(now + ahead, self._timed_order, address, effect, sender))
        self.counters.timed += 1
        return []

    # ------------------------------------------------------------------ validate, then apply
    def _validate(
        self, address: str, args: Sequence[Any], sender: tuple[str, int]
    ) -> tuple[Effect | None, str | None]:
        """The effect of a valid message, or the error text (counted and logged)."""
        self.counters.messages += 1
        quantum, inner = _split_quantised(address)
        spec = params.BY_ADDRESS.get(inner)
        try:
            if spec is None:
                raise ParamError(
                    address,
                    f"unknown address; see {len(params.BY_ADDRESS)} addresses in docs/osc.md",
                )
            if quantum is not None:
                return self._quantised(spec, quantum, list(args), sender), None
            return self._handle(spec, list(args), sender), None
        except ParamError as err:
            message = str(err)[:500]
            self._count_rejection(address, message)
            return None, message

    def _apply(self, address: str, effect: Effect) -> tuple[list[Reply], str | None]:
        try:
            replies = effect()
        except ParamError as err:  # only what needs the moment: a scene that cannot be loaded
            message = str(err)[:500]
            self._count_rejection(address, message)
            return [], message
        self.counters.accepted += 1
        return replies, None

    def _error_replies(self, address: str, error: str) -> list[Reply]:
        if not self._may_answer(address if address in params.BY_ADDRESS else "<unknown address>"):
            return []
        return [Reply("/engine/error", [error], to_sender=True, to_feedback=True)]

    # ------------------------------------------------------------------ handlers
    def _quantised(self, spec: ParamSpec, quantum: str, args: list[Any], sender: tuple[str, int]) -> Effect:
        """``/q/...``: a parameter change or a scene load that lands on the next ``quantum``
        boundary (``""``: the global ``/quantize``), seen on it."""
        if spec.kind is ParamKind.ACTION and spec.name != "preset_load":
            raise ParamError(spec.name, f"{QUANTISED_PREFIX} does not apply to {spec.osc_address}; allowed: "
                             "parameters and /preset/load")
        if self.music is None:
            raise ParamError(spec.name, "this engine has no tempo clock; allowed: the plain address")
        return self._handle(spec, args, sender, quantum or None)

    def _due(self, quantum: str | None) -> float | None:
        """When a change arriving now must commit (``quantum``: ``None`` for the global one)."""
        if self.music is None:
            return None
        return self.music.due(quantum, self._now())

    def _handle(
        self, spec: ParamSpec, args: list[Any], sender: tuple[str, int], quantum: str | None = ""
    ) -> Effect:
        """Validate ``args`` for ``spec``; raise ParamError, or return what applying it does.

        ``quantum``: ``""`` applies at once (scene loads: on the global ``/quantize``), ``None``
        on the global ``/quantize``, else on that quantum."""
        for arg in args:
            if isinstance(arg, str) and len(arg) > self.max_string:
                raise ParamError(
                    spec.name,
                    f"string of {len(arg)} characters; allowed: at most {self.max_string}",
                )
            if isinstance(arg, float) and not math.isfinite(arg):
                raise ParamError(spec.name, f"{arg!r} is not finite; allowed: {spec.allowed_text()}")
        if self.music is not None:
            self.music.check(spec.name)
        if spec.kind is ParamKind.ACTION:
            return self._action(spec, args, sender, quantum)
        if spec.name == "prompt":
            return self._prompt(spec, args, quantum)
        if spec.kind in (
            ParamKind.INT_LIST,
            ParamKind.FLOAT_LIST,
            ParamKind.PROMPT_BLEND,
            ParamKind.SEED_BLEND,
            ParamKind.SIZE,
        ):
            value = spec.coerce(args)
        else:
            if len(args) != 1:
                raise ParamError(spec.name, f"{len(args)} arguments; allowed: one ({spec.osc_args})")
            value = spec.coerce(args[0])
        return self._writes({spec.name: value}, quantum=quantum)

    def _writes(self, changes: dict[str, Any], crossfade_s: float = 0.0, quantum: str | None = "") -> Effect:
        def write() -> list[Reply]:
            due = None if quantum == "" else self._due(quantum)
            self.state.write(changes, crossfade_s=crossfade_s, due=due)
            return []

        return write

    def _prompt(self, spec: ParamSpec, args: list[Any], quantum: str | None = "") -> Effect:
        if not 1 <= len(args) <= 2:
            raise ParamError(spec.name, f"{len(args)} arguments; allowed: s [f] (prompt, crossfade seconds)")
        text = spec.coerce(args[0])
        crossfade = 0.0
        if len(args) == 2:
            seconds = args[1]
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise ParamError(
                    spec.name,
                    f"crossfade {seconds!r} is not a number; allowed: 0..{MAX_CROSSFADE_S:g} s",
                )
            if not 0.0 <= float(seconds) <= MAX_CROSSFADE_S:
                raise ParamError(
                    spec.name,
                    f"crossfade {seconds!r} is out of range; allowed: 0..{MAX_CROSSFADE_S:g} s",
                )
            crossfade = float(seconds)
        return self._writes({spec.name: text}, crossfade, quantum)

    def _action(
        self, spec: ParamSpec, args: list[Any], sender: tuple[str, int], quantum: str | None
    ) -> Effect:
        if spec.name == "status":
            if args:
                raise ParamError(spec.name, f"{len(args)} arguments; allowed: none")
            return self._status_replies
        if spec.group == "scene":
            return self._scene(spec, args, quantum)
        by_group = {
            "tempo": self._tempo,
            "modulation": self._modulator,
            "sequence": self._sequence,
            "midi": self._midi,
            "input": self._sources,
        }
        return by_group[spec.group](spec, args)

    def _scene(self, spec: ParamSpec, args: list[Any], quantum: str | None) -> Effect:
        if len(args) != 1 or not is_scene_name(args[0]):
            shown = args[0] if len(args) == 1 else args
            raise ParamError(spec.name, f"{shown!r} is not a scene name; allowed: {NAME_RULE} (no paths)")
        scene_handler = self.scene_handler
        if scene_handler is None:
            raise ParamError(spec.name, "scenes are not available in this engine")
        name = args[0]

        def scene_action() -> list[Reply]:
            # a scene load lands on the global /quantize unless /q/ named a quantum
            due = self._due(quantum or None) if spec.name == "preset_load" else None
            problem = scene_handler(spec.name, name, due)
            if problem is not None:
                raise ParamError(spec.name, problem)
            return [Reply(spec.osc_address, [name])]

        return scene_action

    def _musical(self, spec: ParamSpec) -> Musical:
        if self.music is None:
            raise ParamError(spec.name, "this engine has no tempo clock")
        return self.music

    def _tempo(self, spec: ParamSpec, args: list[Any]) -> Effect:
        """Tap, resync (stamped when they apply: on arrival) and Resolume's tempo fader."""
        music = self._musical(spec)
        if spec.name == "resolume_tempo":
            if len(args) != 1:
                raise ParamError(spec.name, f"{len(args)} arguments; allowed: {spec.allowed_text()}")
            fader = params.REGISTRY["bpm"].coerce(music.resolume_bpm(params.check_number(spec, args[0])))
            return self._writes({"bpm": fader})
        if len(args) > 1:
            raise ParamError(spec.name, f"{len(args)} arguments; allowed: {spec.allowed_text()}")
        if args and params.check_number(spec, args[0]) == 0:
            return lambda: []  # a button's release
        tap = spec.name in ("tempo_tap", "resolume_tap")

        def tempo() -> list[Reply]:
            if tap:
                music.tap(self._now())
            else:
                music.resync(self._now())
            return []

        return tempo

    def _modulator(self, spec: ParamSpec, args: list[Any]) -> Effect:
        """Edits of one modulator (checked against the newest list when they apply), triggers."""
        music = self._musical(spec)
        arity = {"mod_depth": 2, "mod_rate": 2, "mod_enabled": 2, "mod_add": 1}.get(spec.name, 1)
        if len(args) != arity:
            allowed = f"{spec.allowed_text()} ({spec.osc_args})"
            raise ParamError(spec.name, f"{len(args)} arguments; allowed: {allowed}")
        if spec.name == "mod_add":
            text = args[0]
            return self._edit_modulators(spec, lambda current: [*current, _struct_item(spec, text)])
        key = args[0]
        if spec.name in ("mod_trigger", "mod_release"):

            def fire() -> list[Reply]:
                try:
                    index = envelope_key(self.state.latest("modulators") or [], key)
                except ValueError as err:
                    raise ParamError(spec.name, str(err)) from None
                music.queue(spec.name.removeprefix("mod_"), index, self._now())
                return []

            return fire
        if spec.name == "mod_remove":

            def remove(current: list[dict[str, Any]]) -> list[dict[str, Any]]:
                index = modulator_index(current, key)
                return [item for i, item in enumerate(current) if i != index]

            return self._edit_modulators(spec, remove)
        field_name = spec.name.removeprefix("mod_")
        value = args[1]
        if field_name == "enabled":
            value = params.REGISTRY["bypass"].coerce(value)  # a switch, as every switch is read
        fields = {field_name: value}
        return self._edit_modulators(spec, lambda current: edit_modulator(current, key, **fields))

    def _edit_modulators(self, spec: ParamSpec, change: Callable[[list[dict[str, Any]]], Any]) -> Effect:
        def edit() -> list[Reply]:
            try:
                check = params.REGISTRY["modulators"].coerce
                self.state.edit("modulators", lambda current: check(change(list(current or []))))
            except ParamError as err:
                raise ParamError(spec.name, str(err).removeprefix("modulators: ")) from None
            except ValueError as err:
                raise ParamError(spec.name, str(err)) from None
            return []

        return edit

    def _sequence(self, spec: ParamSpec, args: list[Any]) -> Effect:
        """Start, stop or jump the prompt sequence (the step checked against the newest sequence)."""
        music = self._musical(spec)
        if spec.name == "sequence_stop":
            if args:
                raise ParamError(spec.name, f"{len(args)} arguments; allowed: none")
        elif len(args) > 1 or (spec.name == "sequence_jump" and len(args) != 1):
            raise ParamError(spec.name, f"{len(args)} arguments; allowed: {spec.allowed_text()}")
        step = int(params.check_number(spec, args[0])) if args else 0

        def move() -> list[Reply]:
            if spec.name != "sequence_stop":
                sequence = self.state.latest("sequence")
                if sequence is None:
                    raise ParamError(spec.name, "no sequence is set; allowed: after /sequence")
                count = len(sequence["steps"])
                if not 0 <= step < count:
                    allowed = f"0..{count - 1}"
                    raise ParamError(spec.name, f"step {step} is not in the sequence; allowed: {allowed}")
            music.queue(spec.name.removeprefix("sequence_"), step, self._now())
            return []

        return move

    def _sources(self, spec: ParamSpec, args: list[Any]) -> Effect:
        """``/input/sources``: the names ``/input/select`` takes, to the sender (from the control
        service's catalogue, refreshed off this thread: the answer never waits for discovery)."""
        if args:
            raise ParamError(spec.name, f"{len(args)} arguments; allowed: none")
        catalogue = self.sources
        if catalogue is None:
            raise ParamError(spec.name, "this engine lists no sources; allowed: none")

        def answer() -> list[Reply]:
            return [Reply(spec.osc_address, list(catalogue()), to_sender=True, to_feedback=False)]

        return answer

    def _midi(self, spec: ParamSpec, args: list[Any]) -> Effect:
        """MIDI learn, forget, unbind and cancel (the MIDI service checks names and arguments)."""
        midi = self.midi
        if midi is None:
            raise ParamError(
                spec.name,
                "MIDI is off in this engine; allowed: after midi.mappings in config.yaml names a mapping",
            )
        if spec.name == "midi_cancel":
            if args:
                raise ParamError(spec.name, f"{len(args)} arguments; allowed: none")

            def cancel() -> list[Reply]:
                midi.cancel()
                return []

            return cancel
        if spec.name == "midi_unbind":
            if len(args) != 2 or not isinstance(args[0], str) or isinstance(args[1], bool) or not isinstance(
                args[1], int
            ):
                raise ParamError(spec.name, f"{args!r:.80}; allowed: {spec.allowed_text()} ({spec.osc_args})")
            mapping, index = args

            def unbind() -> list[Reply]:
                try:
                    midi.unbind(mapping, index)
                except ValueError as err:
                    raise ParamError(spec.name, str(err)) from None
                return []

            return unbind
        if not 1 <= len(args) <= 2 or not isinstance(args[0], str):
            raise ParamError(spec.name, f"{args!r:.80}; allowed: {spec.allowed_text()} ({spec.osc_args})")
        target, argument = args[0], (args[1] if len(args) == 2 else None)
        act = midi.learn if spec.name == "midi_learn" else midi.forget

        def run() -> list[Reply]:
            try:
                act(target, argument)
            except ValueError as err:
                raise ParamError(spec.name, str(err)) from None
            return []

        return run

    def _status_replies(self) -> list[Reply]:
        """Every current value, to the sender only."""
        return [
                Reply(
                    params.REGISTRY[name].osc_address,
                    osc_args(params.REGISTRY[name], value),
                    to_sender=True,
                    to_feedback=False,
                )
            for name, value in self.status_values().items()
            if name in params.REGISTRY and value is not None
        ]

    # ------------------------------------------------------------------ errors
    def _count_rejection(self, address: str, message: str) -> None:
        self.counters.rejected += 1
        key = address if address in params.BY_ADDRESS else "<unknown address>"
        self.counters.by_error[key] = self.counters.by_error.get(key, 0) + 1
        self._log(logging.WARNING, key, "%s refused: %s", address[:80], message)

    def _malformed(self, sender: tuple[str, int], why: str) -> list[Reply]:
        self.counters.malformed += 1
        key = f"malformed {sender[0]}"
        self._log(logging.WARNING, key, "datagram from %s refused: %s", sender[0], why)
        if not self._may_answer(key):
            return []
        # never to the sender: a forged source address must not turn us into a reflector
        reply = Reply("/engine/error", [f"datagram from {sender[0]}: {why}"], to_sender=False)
        return [reply]

    def _may_answer(self, key: str) -> bool:
        """At most ``MAX_ERRORS_PER_S`` error answers per key and second (a flood stays cheap)."""
        now = time.monotonic()
        start, count = self._answers.get(key, (now, 0))
        if now - start >= 1.0:
            start, count = now, 0
        self._answers[key] = (start, count + 1)
        return count < MAX_ERRORS_PER_S


def _split_quantised(address: str) -> tuple[str | None, str]:
    """``(quantum, address)`` of a ``/q/`` address (``""``: the global quantum); ``(None, address)``
    for any other."""
    if not address.startswith(QUANTISED_PREFIX):
        return None, address
    rest = address[len(QUANTISED_PREFIX) - 1 :]
    first, _, tail = rest[1:].partition("/")
    if first in QUANTA and tail:
        return first, "/" + tail
    return "", rest


def _struct_item(spec: ParamSpec, text: Any) -> Any:
    """One item of a STRUCT list sent as YAML / JSON text."""
    if not isinstance(text, str):
        raise ParamError(spec.name, f"{text!r:.40} is not text; allowed: {spec.allowed_text()}")
    return params.read_struct_text(spec, text)


def json_args(spec: ParamSpec, value: Any) -> list[Any]:
    """A value as JSON sends it (lists, pairs, scalars) as the OSC arguments of ``spec``'s address,
    unchecked: the dispatcher validates them exactly as it validates OSC."""
    if spec.kind is ParamKind.STRUCT:  # the data itself (or its YAML text): one argument
        return [value]
    if spec.kind in (params.ParamKind.PROMPT_BLEND, params.ParamKind.SEED_BLEND) and isinstance(value, list):
        return [item for pair in value for item in (pair if isinstance(pair, list) else [pair])]
    if isinstance(value, list):
        return list(value)
    if spec.kind is ParamKind.ACTION and value is None:
        return []
    return [value]


def osc_args(spec: ParamSpec, value: Any) -> list[Any]:
    """A parameter value as the OSC arguments of its address (for echoes and /status)."""
    if spec.kind in (ParamKind.PROMPT_BLEND, ParamKind.SEED_BLEND):
        return [item for pair in value for item in pair]
    if spec.kind in (ParamKind.INT_LIST, ParamKind.SIZE):
        return [int(v) for v in value]
    if spec.kind is ParamKind.FLOAT_LIST:
        return [float(v) for v in value]
    if spec.kind is ParamKind.BOOL:
        return [1 if value else 0]
    if spec.kind is ParamKind.INT:
        return [int(value)]
    if spec.kind is ParamKind.FLOAT:
        return [float(value)]
    if spec.kind is ParamKind.STRUCT:
        return [params.struct_text(value)]
    return [value]

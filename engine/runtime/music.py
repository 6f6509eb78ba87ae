"""Musical time of one engine: the tempo clock and its source, quantised timing, modulators, sequences."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bridges.base import BridgeError, SourceClosed
from bridges.ratelimit import RateLimitedLog
from engine.control.state import ControlState
from engine.modulation.audio import AudioSource
from engine.modulation.follower import AudioFollower
from engine.modulation.modulator import Modulation, ModulatorSpec
from engine.modulation.sequence import Sequencer, SequenceSpec, Step
from engine.params import ParamError
from engine.tempo.clock import Quantum, TempoClock
from engine.tempo.kinds import MusicStatus, TempoSource
from engine.tempo.tap import TapTempo

logger = logging.getLogger(__name__)

SEQUENCE_TAG = "sequence"
SEQUENCE_LEAD_S = 0.5
"""A sequence step is written this long before it is due, so its prompt is encoded in time."""
AUDIO_POLL_S = 0.01


@dataclass
class MusicSettings:
    """The ``tempo`` and ``audio`` config sections, as the runtime uses them."""

    source: TempoSource = TempoSource.INTERNAL
    bpm: float = 120.0
    beats_per_bar: int = 4
    midi_port: str | None = None
    resolume_bpm_range: tuple[float, float] = (20.0, 500.0)
    audio_file: str | None = None
    audio_device: str | None = None
    audio_ndi: str | None = None
    audio_loop: bool = True
    audio_gain: float = 1.0

    @classmethod
    def from_config(cls, config: Any) -> MusicSettings:
        tempo, audio = config.tempo, config.audio
        return cls(
            source=TempoSource(tempo.source),
            bpm=tempo.bpm,
            beats_per_bar=tempo.beats_per_bar,
            midi_port=tempo.midi_port,
            resolume_bpm_range=(tempo.resolume_bpm_range[0], tempo.resolume_bpm_range[1]),
            audio_file=audio.file,
            audio_device=audio.device,
            audio_ndi=audio.ndi,
            audio_loop=audio.loop,
            audio_gain=audio.gain,
        )


@dataclass
class _Event:
    """Something the OSC thread asks of the frame loop: fire or release an envelope, move the sequence."""

    kind: str  # trigger | release | start | stop | jump
    key: int | str | None
    at: float


@dataclass
class _Scheduled:
    step: Step
    due: float


class AudioFeed(threading.Thread):
    """Reads an audio source every 10 ms and feeds the follower that audio modulators read.

    A source that ends or is lost (``BridgeError``: an NDI sender gone) leaves the follower at
    silence; a lost one is read on, so its audio is followed again when it comes back.
    """

    def __init__(self, source: AudioSource, follower: AudioFollower, stop: threading.Event) -> None:
        super().__init__(name="latentstage-audio", daemon=True)
        self.source = source
        self.follower = follower
        self._stop_event = stop

    def run(self) -> None:
        block = max(256, self.source.sample_rate // 10)
        lost = False
        while not self._stop_event.wait(AUDIO_POLL_S):
            try:
                samples = self.source.read(block)
            except SourceClosed:
                logger.warning("audio input %r ended; audio modulators hold 0", self.source)
                self._silence()
                return
            except BridgeError as err:
                if not lost:
                    logger.warning("audio input lost: %s; audio modulators hold 0 until it is back", err)
                    self._silence()
                    lost = True
                continue
            if len(samples):
                if lost:
                    logger.info("audio input %r is back", self.source)
                    lost = False
                self.follower.process(samples)

    def _silence(self) -> None:
        """Enough silence that the last analysis sees a window of it only: every level reads 0."""
        self.follower.process(np.zeros(self.follower.window + self.follower.hop, dtype=np.float32))


class Music:
    """The engine's musical time: one ``TempoClock`` fed by its source, quantised due times,
    modulators evaluated once per frame, the prompt sequence.

    Threads: the OSC thread calls ``tap``, ``resync``, ``due``, ``check`` and ``queue``; the frame
    loop calls ``apply`` (committed runtime values), ``frame`` (once per frame) and reads
    ``targets``; the feedback thread reads ``status``. The clock's reads are lock-free; events from
    the OSC thread go through a deque the frame loop drains.

    Args:
        settings: the tempo and audio config.
        control: the state held changes (sequence steps) are written to.
        lead_s: seconds from a commit to the frame carrying it leaving the outputs (the measured
            change latency; the manual offset is added here).
        now: the clock (``time.monotonic``; tests pass a fake one).
    """

    def __init__(
        self,
        settings: MusicSettings,
        control: ControlState,
        lead_s: Callable[[], float],
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.control = control
        self._latency_s = lead_s
        self._now = now
        self.clock = TempoClock(settings.bpm, settings.beats_per_bar, now=now)
        self.taps = TapTempo(now=now)
        self.offset_s = 0.0
        self.quantize = Quantum.OFF
        self.follower: AudioFollower | None = None
        self.modulation = Modulation()
        self.targets: frozenset[str] = frozenset()
        self._sequence: SequenceSpec | None = None
        self._sequencer: Sequencer | None = None
        self._scheduled: _Scheduled | None = None
        self._events: collections.deque[_Event] = collections.deque(maxlen=256)
        self._stop = threading.Event()
        self._closers: list[Callable[[], None]] = []
        self._feed: AudioFeed | None = None
        self._external: Callable[[float], None] | None = None
        self._log = RateLimitedLog(logger, 5.0)
        self._status = MusicStatus(self.clock.bpm, 0.0, self.clock.beats_per_bar, now())

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the tempo source and the audio input; a missing device is one line, not a stop."""
        if self.settings.source is TempoSource.MIDI_CLOCK:
            self._open_midi_clock()
        elif self.settings.source is TempoSource.LINK:
            self._open_link()
        audio = self._open_audio()
        if audio is not None:
            self.follower = AudioFollower(audio.sample_rate, gain=self.settings.audio_gain)
            feed = AudioFeed(audio, self.follower, self._stop)
            feed.start()
            self._feed = feed
            self._closers.append(audio.close)
            self.modulation = Modulation(self.modulation.specs, self.follower)

    def close(self) -> None:
        """Stop the audio thread and close the tempo source and audio input; safe twice."""
        self._stop.set()
        if self._feed is not None:  # its read finishes before the source closes
            self._feed.join(timeout=1.0)
        closers, self._closers = self._closers, []
        for close in closers:
            close()

    def _open_midi_clock(self) -> None:
        from engine.tempo.midi_clock import MidiClockFollower
        from engine.tempo.midi_port import MidiClockPort, import_mido

        follower = MidiClockFollower(now=self._now)
        mido = import_mido()  # a missing extra stops the start with one line (TempoSourceUnavailable)
        name = _by_prefix(self.settings.midi_port, mido.get_input_names())
        try:
            port = MidiClockPort(follower, name, now=self._now, mido=mido)
        except ValueError as err:
            logger.warning("%s; the clock runs at tempo.bpm %g until restarted", err, self.settings.bpm)
            return
        self._closers.append(port.close)

        def follow(t: float) -> None:
            state = follower.state(t)
            if state.bpm is not None:
                self.clock.set_beat(state.beat, state.time, state.bpm)

        self._external = follow

    def _open_link(self) -> None:
        from engine.tempo.link import LinkSession

        session = LinkSession(float(self.settings.beats_per_bar), now=self._now)
        self._closers.append(session.close)

        def follow(t: float) -> None:
            session.apply_to(self.clock, t)

        self._external = follow

    def _open_audio(self) -> AudioSource | None:
        settings = self.settings
        if settings.audio_file is not None:
            from engine.modulation.audio import open_audio_file

            return open_audio_file(Path(settings.audio_file), loop=settings.audio_loop, clock=self._now)
        if settings.audio_device is not None:
            from engine.modulation.audio import DeviceSource

            device: int | str = (
                int(settings.audio_device) if settings.audio_device.isdigit() else settings.audio_device
            )
            return DeviceSource(device)
        if settings.audio_ndi is not None:
            from bridges.ndi import NdiAudioSource

            try:
                return NdiAudioSource(settings.audio_ndi)
            except BridgeError as err:  # not found: a sender started later is not waited for
                logger.warning("%s; audio modulators hold 0 until restarted", err)
        return None

    # ------------------------------------------------------------------ the OSC thread
    def check(self, name: str) -> None:
        """Refuse a tempo change the source owns (``ParamError`` naming it and what is allowed)."""
        source = self.settings.source
        if source.external and name in ("bpm", "tempo_tap", "tempo_resync", "beats_per_bar"):
            raise ParamError(
                name,
                f"the tempo follows tempo.source {source.value}; allowed: with tempo.source internal | osc",
            )
        if name.startswith("resolume_") and source is not TempoSource.OSC:
            raise ParamError(
                name,
                f"Resolume's tempo is followed with tempo.source osc (it is {source.value}); allowed: set "
                "tempo.source: osc",
            )

    def tap(self, at: float) -> float | None:
        """A tap at ``at`` (seconds, stamped on arrival): the tempo and beat follow from the second
        tap on; returns the new BPM (``None`` for the first tap of a series)."""
        estimate = self.taps.tap(at)
        if estimate is None:
            return None
        self.clock.set_bpm(estimate.bpm, estimate.beat_time, on_beat=True)
        self.control.write({"bpm": estimate.bpm})
        return estimate.bpm

    def resync(self, at: float) -> None:
        """``at`` is the downbeat (beat 0 of a bar); the tempo stays."""
        self.clock.resync(at)

    def resolume_bpm(self, fader: float) -> float:
        """Resolume's normalised tempo fader (0..1) as BPM over ``tempo.resolume_bpm_range``."""
        low, high = self.settings.resolume_bpm_range
        if not 0.0 <= fader <= 1.0:
            raise ParamError("resolume_tempo", f"{fader!r} is out of range; allowed: a number in [0, 1]")
        return low + fader * (high - low)

    def lead(self, offset_s: float | None = None) -> float:
        """Seconds a change is committed before it should be seen: the measured latency + offset."""
        return max(0.0, self._latency_s() + (self.offset_s if offset_s is None else offset_s))

    def due(self, quantum: str | None, at: float) -> float | None:
        """When to commit a change that arrived at ``at`` so it is *seen* on the next boundary of
        ``quantum`` (``None``: the global ``/quantize``); ``None`` when it is off (commit at once).

        The global quantum and the offset are read as the next frame will have them, so
        ``/quantize s bar`` followed at once by ``/preset/load`` lands on the bar."""
        chosen = Quantum(self.control.latest("quantize", self.quantize) if quantum is None else quantum)
        if chosen is Quantum.OFF:
            return None
        lead = self.lead(float(self.control.latest("quantize_offset_ms", self.offset_s * 1000.0)) / 1000.0)
        return self.clock.next_boundary(at + lead, chosen) - lead

    def queue(self, kind: str, key: int | str | None, at: float) -> None:
        """Ask the frame loop to ``trigger`` / ``release`` an envelope or to ``start`` / ``stop`` /
        ``jump`` the sequence; the key was checked by the caller against the latest values."""
        self._events.append(_Event(kind, key, at))

    # ------------------------------------------------------------------ the frame loop
    def apply(self, changes: Mapping[str, Any], now: float) -> None:
        """Committed runtime values (already validated by the registry) at a frame boundary."""
        if "beats_per_bar" in changes and not self.settings.source.external:
            self.clock.set_beats_per_bar(int(changes["beats_per_bar"]), now)
        if "bpm" in changes and not self.settings.source.external:
            bpm = float(changes["bpm"])
            if abs(bpm - self.clock.bpm) > 1e-9:  # a tap already set the clock (and its phase)
                self.clock.set_bpm(bpm, now)
        if "quantize" in changes:
            self.quantize = Quantum(changes["quantize"])
        if "quantize_offset_ms" in changes:
            self.offset_s = float(changes["quantize_offset_ms"]) / 1000.0
        if "modulators" in changes:
            specs = [ModulatorSpec.model_validate(item) for item in changes["modulators"] or []]
            if tuple(specs) != self.modulation.specs:  # a scene with the same list keeps their state
                self.modulation = Modulation(specs, self.follower)
                self.targets = self.modulation.targets
        if "sequence" in changes:
            value = changes["sequence"]
            spec = None if value is None else SequenceSpec.model_validate(value)
            if spec != self._sequence:  # the same sequence (a scene recalled) keeps running
                self._set_sequence(spec, now)

    def frame(self, now: float, base: Mapping[str, Any]) -> dict[str, Any]:
        """Once per frame: follow the tempo source, run queued events and the sequence; returns the
        modulated values of ``base``'s targeted parameters, evaluated for the moment this frame is
        seen (``now`` + lead), so an LFO of one bar peaks on the bar on screen."""
        if self._external is not None:
            self._external(now)
        seen = now + self.lead()
        beats = self.clock.beat(seen)
        beats_per_bar = self.clock.beats_per_bar
        while self._events:
            self._run(self._events.popleft(), beats)
        self._step_sequence(now)
        values = self.modulation.values(base, seen, beats, beats_per_bar) if self.targets else {}
        step = -1 if self._sequencer is None else self._sequencer.playing if self._sequencer.running else -1
        self._status = MusicStatus(self.clock.bpm, self.clock.beat(now), beats_per_bar, now, step, values)
        return values

    def status(self) -> MusicStatus:
        """The latest frame's view (immutable swap; any thread)."""
        return self._status

    def _run(self, event: _Event, beats: float) -> None:
        try:
            if event.kind in ("trigger", "release"):
                assert event.key is not None
                fire = self.modulation.trigger if event.kind == "trigger" else self.modulation.release
                fire(event.key, event.at, self.clock.beat(event.at))
            elif event.kind == "stop":
                self._stop_sequence()
            else:
                self._start_sequence(int(event.key or 0), event.at, restart=event.kind == "start")
        except ValueError as err:  # the modulators or the sequence changed since it was checked
            self._log(logging.WARNING, event.kind, "%s refused: %s", event.kind, err)

    # ------------------------------------------------------------------ the sequence
    def _set_sequence(self, spec: SequenceSpec | None, now: float) -> None:
        self._stop_sequence()
        self._sequence = spec
        if self._sequence is not None and self._sequence.autostart:
            self._start_sequence(0, now, restart=True)

    def _start_sequence(self, step: int, at: float, restart: bool) -> None:
        if self._sequence is None:
            raise ValueError("no sequence is set; allowed: after /sequence")
        self.control.cancel(SEQUENCE_TAG)  # a step already written for its beat gives way
        self._scheduled = None
        if restart or self._sequencer is None:
            self._sequencer = Sequencer(self._sequence, self.clock.beats_per_bar)
        due = self.due(None, at)
        beat = self.clock.beat((at if due is None else due) + self.lead())
        self._sequencer.start(step, beat)

    def _stop_sequence(self) -> None:
        self.control.cancel(SEQUENCE_TAG)
        self._scheduled = None
        if self._sequencer is not None:
            self._sequencer.stop()

    def _step_sequence(self, now: float) -> None:
        """Write the next step as a held change, committed ``lead`` before its beat; when its time
        has come, the step after it is next."""
        sequencer, sequence = self._sequencer, self._sequence
        if sequencer is None or sequence is None:
            return
        if self._scheduled is not None and now >= self._scheduled.due:
            self._scheduled = None
            sequencer.reached()
        upcoming = sequencer.upcoming()
        if upcoming is None or self._scheduled is not None:
            return
        lead = self.lead()
        due = max(now, self.clock.state().time_at(upcoming.beat) - lead)
        if due - now > SEQUENCE_LEAD_S:
            return
        crossfade_s = sequence.crossfade * self.clock.seconds_per_beat
        self.control.write(sequence.change(upcoming.index), crossfade_s, due=due, tag=SEQUENCE_TAG)
        self._scheduled = _Scheduled(upcoming, due)


def _by_prefix(prefix: str | None, names: list[str]) -> str | None:
    """The first port whose name starts with ``prefix`` (ALSA adds client:port numbers that change
    every session); ``None``: mido's default input."""
    if prefix is None:
        return None
    for name in names:
        if name.startswith(prefix):
            return name
    return prefix  # not there: the port's own error lists the ports

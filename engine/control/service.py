"""The control service: OSC server, feedback echoes, status messages, scenes and OSCQuery."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine import params
from engine.control.changes import ChangeFeed
from engine.control.dispatch import MidiLearner, Musical, OscDispatcher, osc_args
from engine.control.operator import Operator
from engine.control.oscquery import OscQueryServer
from engine.control.scenes import SceneError, SceneStore
from engine.control.sources import SourceCatalog
from engine.control.state import ControlState
from engine.control.transport import FeedbackSender, OscUdpServer, parse_target

logger = logging.getLogger(__name__)

MAX_BEATS_PER_S = 20.0


class MidiControl(MidiLearner, Protocol):
    """The MIDI service as the control service owns it (``engine.midi.service.MidiService``)."""

    def start(self) -> None: ...

    def close(self) -> None: ...

    def scene_loaded(self, name: str) -> None: ...

    def panel(self) -> dict[str, Any]: ...

    def status_text(self) -> str: ...


@dataclass
class ControlSettings:
    """Where to listen and whom to tell (the ``osc`` config section)."""

    host: str = "127.0.0.1"
    port: int = 9000
    feedback: list[str] = field(default_factory=lambda: ["127.0.0.1:9001"])
    forward: list[str] = field(default_factory=list)  # other engines: every accepted change, no status
    allow: list[str] = field(default_factory=list)
    status_hz: float = 4.0
    modulation_hz: float = 20.0
    oscquery_port: int | None = None
    max_datagram_bytes: int = 65507
    scenes_dir: str = "presets/scenes"
    media_dir: str | None = None  # set: a source catalogue answers /input/sources (discovery thread)

    @classmethod
    def from_config(
        cls, osc: Any, scenes_dir: str | Path, media_dir: str | Path | None = None
    ) -> ControlSettings:
        return cls(
            host=osc.host,
            port=osc.port,
            feedback=list(osc.feedback),
            forward=list(osc.forward),
            allow=list(osc.allow),
            status_hz=osc.status_hz,
            modulation_hz=osc.modulation_hz,
            oscquery_port=osc.oscquery_port,
            max_datagram_bytes=osc.max_datagram_bytes,
            scenes_dir=str(scenes_dir),
            media_dir=None if media_dir is None else str(media_dir),
        )


class ControlService:
    """Owns every control resource; ``start()`` opens them, ``close()`` releases them (twice ok).

    Args:
        control: the ControlState the engine reads at frame boundaries.
        submit: queues validated changes into the engine (``Engine.submit``).
        engine_status: a snapshot of the runtime stats (state, fps, latency_ms, skip_rate, error).
        operator: the preview's operator page (``engine.control.operator``): attached here,
            sampled for its plot by the status loop and told of changes by the change feed.

    The change feed (``engine.control.changes``) follows the applied values off the frame loop
    and hands changes to OSCQuery's ``LISTEN`` clients and the operator page's websocket.
    """

    def __init__(
        self,
        settings: ControlSettings,
        control: ControlState,
        submit: Callable[[Mapping[str, Any], float, float | None], Any],
        engine_status: Callable[[], Mapping[str, Any]],
        operator: Operator | None = None,
        music: Musical | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.control = control
        self._submit = submit
        self.engine_status = engine_status
        self.operator = operator
        self.scenes = SceneStore(settings.scenes_dir)
        self.scenes.remove_stale_temporaries()  # what saves killed mid-write left behind
        self.feedback = FeedbackSender([parse_target(t) for t in settings.feedback])
        self.forward = (
            FeedbackSender([parse_target(t) for t in settings.forward]) if settings.forward else None
        )
        """Other engines (``osc.forward``): every accepted change, as echoed; never the status."""
        self.music = music
        self._now = now
        self.dispatcher = OscDispatcher(control, control.applied, self._scene, music=music, now=now)
        self.catalog = None if settings.media_dir is None else SourceCatalog(settings.media_dir)
        if self.catalog is not None:
            self.dispatcher.sources = self._source_names
        self.server = OscUdpServer(
            self.dispatcher,
            self.feedback,
            settings.host,
            settings.port,
            settings.allow,
            settings.max_datagram_bytes,
        )
        self.oscquery: OscQueryServer | None = None
        if settings.oscquery_port is not None:
            try:
                self.oscquery = OscQueryServer(
                    control.applied,
                    self.engine_status,
                    self.server.host,
                    self.server.port,
                    host=settings.host,
                    port=settings.oscquery_port,
                    allow=settings.allow,
                    sources=self._source_names if self.catalog is not None else list,
                )
            except OSError as err:  # discovery is a convenience: the show goes on without it
                logger.warning("%s; running without OSCQuery", err)
        self.changes = ChangeFeed(control)
        if self.oscquery is not None:
            self.changes.subscribe(self.oscquery.changed)
        if operator is not None:
            self.changes.subscribe(operator.changed)
        self._stop = threading.Event()
        self._status_thread = threading.Thread(
            target=self._status_loop, name="latentstage-status", daemon=True
        )
        self._music_thread = threading.Thread(target=self._music_loop, name="latentstage-beat", daemon=True)
        self._closed = False
        self.midi: MidiControl | None = None
        self.thumbnails: Callable[[str], bytes | None] | None = None
        """A small JPEG of a source by name for the operator page (``engine.runtime.thumbnails``;
        ``None``: no thumbnails). ValueError for a name that cannot be a source."""
        if operator is not None:
            operator.attach(self)

    def attach_midi(self, midi: MidiControl) -> None:
        """Own the MIDI service (``engine.midi.service.MidiService``): ``/midi/*`` reach it, a scene
        load re-sends its LEDs, ``start()`` / ``close()`` start and close it."""
        self.midi = midi
        self.dispatcher.midi = midi

    def _source_names(self) -> list[str]:
        """The catalogue's names, and a new look for the next asker (sources come and go)."""
        assert self.catalog is not None
        self.catalog.refresh()
        return self.catalog.names()

    def announce(self, address: str, args: Sequence[Any]) -> None:
        """Send a feedback message (``/engine/midi``, an error) and let the operator page follow."""
        self.feedback.send(address, args)
        if self.operator is not None:
            self.operator.changed({})

    @property
    def port(self) -> int:
        return int(self.server.port)

    def start(self) -> None:
        if self.forward is not None:
            logger.info("forwarding every accepted change to %s", ", ".join(self.settings.forward))
        self.server.start()
        if self.oscquery is not None:
            self.oscquery.start()
        self.changes.start()
        if self.catalog is not None:
            self.catalog.start()
        self._status_thread.start()
        if self.music is not None:
            self._music_thread.start()
        if self.midi is not None:
            self.midi.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self.midi is not None:
            self.midi.close()
        self.server.close()
        self.changes.close()
        if self.catalog is not None:
            self.catalog.close()
        if self.oscquery is not None:
            self.oscquery.close()
        for thread in (self._status_thread, self._music_thread):
            if thread.is_alive():
                thread.join(1.0)
        self.feedback.close()
        if self.forward is not None:
            self.forward.close()

    def __enter__(self) -> ControlService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ engine callbacks
    def echo(self, accepted: Mapping[str, Any]) -> None:
        """Every accepted change goes out on its own address (two-way surfaces follow), to the
        feedback targets and to the engines of ``osc.forward``, which apply it as if it were sent
        to them. A value accepted again unchanged is echoed again: forward in one direction only."""
        for name, value in accepted.items():
            spec = params.REGISTRY.get(name)
            if spec is None or value is None:
                continue
            address, args = spec.osc_address, osc_args(spec, value)
            self.feedback.send(address, args)
            if self.forward is not None:
                self.forward.send(address, args)

    def error(self, message: str) -> None:
        self.feedback.send("/engine/error", [message[:500]])

    # ------------------------------------------------------------------ internals
    def _scene(self, action: str, name: str, due: float | None = None) -> str | None:
        """Save or load scene ``name``; a load commits at ``due`` (the global or /q/ quantum), or
        on the scene's own ``quantize:`` when the file has one."""
        try:
            if action == "preset_save":
                self.scenes.save(name, self.control.applied())
                return None
            scene = self.scenes.load_scene(name)
        except SceneError as err:
            return str(err)
        if scene.quantize is not None and self.music is not None:
            due = self.music.due(scene.quantize, self._now())
        self._submit(scene.values, scene.crossfade_s, due)
        if self.midi is not None:
            self.midi.scene_loaded(name)
        return None

    def _status_loop(self) -> None:
        interval = 1.0 / self.settings.status_hz
        while not self._stop.wait(interval):
            status = {"state": "unknown", **self.engine_status()}
            if self.operator is not None:
                self.operator.sample(status)
            for spec in params.STATUS:
                if spec.periodic:
                    self.feedback.send(spec.address, [spec.osc_value(status.get(spec.name))])

    def _music_loop(self) -> None:
        """``/engine/beat`` on each beat (at most ``MAX_BEATS_PER_S``) and the modulated values on
        ``/engine/mod/<name>`` when they moved, at most ``modulation_hz`` times a second."""
        assert self.music is not None
        interval = 1.0 / self.settings.modulation_hz
        beat_spec = next(spec for spec in params.STATUS if spec.name == "beat")
        last_beat: int | None = None
        last_beat_sent = 0.0
        sent: dict[str, Any] = {}
        wait = interval
        while not self._stop.wait(wait):
            now = time.monotonic()
            status = self.music.status()
            beat = math.floor(status.beat_at(now) + 1e-6)
            if beat != last_beat and now - last_beat_sent >= 1.0 / MAX_BEATS_PER_S:
                if last_beat is not None:
                    self.feedback.send(beat_spec.address, [beat % status.beats_per_bar + 1])
                    last_beat_sent = now
                last_beat = beat
            for name, value in status.modulated.items():
                if sent.get(name) != value:
                    self.feedback.send(params.modulated_address(name), osc_args(params.REGISTRY[name], value))
            sent = status.modulated
            wait = max(0.001, min(interval, status.next_beat(now) - time.monotonic() + 0.0005))

"""The operator page's side of the control service: the registry, the state, changes and history."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from engine import params
from engine.control.dispatch import OscDispatcher, json_args
from engine.control.scenes import SceneStore
from engine.control.state import ControlState
from engine.control.web.page import operator_page

HISTORY_SECONDS = 600.0


class Feedback(Protocol):
    """Where announcements go (``engine.control.transport.FeedbackSender``)."""

    def send(self, address: str, args: Sequence[Any]) -> None: ...


class Steered(Protocol):
    """What the operator reads and writes through (``engine.control.service.ControlService``,
    which attaches itself): it depends on this, never on the service's module."""

    @property
    def control(self) -> ControlState: ...

    @property
    def scenes(self) -> SceneStore: ...

    @property
    def dispatcher(self) -> OscDispatcher: ...

    @property
    def feedback(self) -> Feedback: ...

    def engine_status(self) -> Mapping[str, Any]: ...


class Operator:
    """What the preview's operator page reads and writes (``bridges.preview.OperatorApi``).

    Changes go through the OSC dispatcher (``handle_request``): the same validation, the same
    ControlState, the same error text as an OSC sender gets; accepted changes are echoed on OSC
    feedback by the engine like any other. ``attach`` connects the control service once it
    exists (the preview may start first: until then the API answers 503). ``sample`` keeps
    fps, latency and skip rate for the last ``HISTORY_SECONDS``. ``subscribe`` tells the page's
    websocket when to push: after every status sample and every change of the applied values
    (``changed``, from the control service's change feed). ``page`` holds the page's files.
    """

    def __init__(self, history_seconds: float = HISTORY_SECONDS) -> None:
        self.history_seconds = float(history_seconds)
        self.page = operator_page()
        self._service: Steered | None = None
        self._lock = threading.Lock()
        self._samples: collections.deque[dict[str, float]] = collections.deque()
        self._listeners: list[Callable[[], None]] = []
        self._started = time.monotonic()

    def attach(self, service: Steered) -> None:
        self._service = service
        self._notify()

    @property
    def ready(self) -> bool:
        return self._service is not None

    # ------------------------------------------------------------------ reads
    def spec(self) -> dict[str, Any]:
        return {"params": params.as_json()}

    def state(self) -> dict[str, Any]:
        """The applied values, the engine's status (with the musical time: ``bpm``,
        ``beat_position`` at ``beat_time``, ``beats_per_bar``, ``sequence_step``) and the scenes;
        ``time`` is the server's ``time.monotonic()`` as read, the clock ``beat_time`` is on, so
        the page can tell the beat at the moment the state arrives. ``midi``: the MIDI
        controllers, their bindings and a learn going on (``MidiService.panel``), or ``None``."""
        service = self._require()
        values = {name: params.to_plain(value) for name, value in service.control.applied().items()}
        status = dict(service.engine_status())  # read before the time: beat_time <= time
        scenes = service.scenes.names()
        midi = getattr(service, "midi", None)
        catalog = getattr(service, "catalog", None)
        return {
            "values": values,
            "status": status,
            "scenes": scenes,
            "midi": None if midi is None else midi.panel(),
            "sources": None if catalog is None else catalog.snapshot(),
            "time": time.monotonic(),
        }

    def thumbnail(self, name: str) -> bytes | None:
        """A small JPEG of the source ``name`` (the service's ``thumbnails``: the playing one's
        newest frame, another opened for a moment), ``None`` when it sent no frame in time.
        ``ValueError`` naming what is allowed for a name that cannot be a source; ``LookupError``
        when this engine makes no thumbnails. Blocks up to about a second: not for the event loop."""
        service = self._require()
        thumbnails = getattr(service, "thumbnails", None)
        if thumbnails is None:
            raise LookupError("this engine makes no source thumbnails")
        result: bytes | None = thumbnails(name)
        return result

    def history(self, since: float | None = None) -> dict[str, Any]:
        """The plot's samples (only those after ``since`` when given)."""
        with self._lock:
            samples = [s for s in self._samples if since is None or s["t"] > since]
        return {"seconds": self.history_seconds, "samples": samples}

    def sample(self, status: Mapping[str, Any]) -> None:
        """One point of the plot (the control service's status loop calls this)."""
        now = time.monotonic() - self._started
        point = {"t": round(now, 3)}
        for key in ("fps", "latency_ms", "skip_rate"):
            value = status.get(key)
            point[key] = float(value) if isinstance(value, (int, float)) else 0.0
        with self._lock:
            self._samples.append(point)
            while self._samples and now - self._samples[0]["t"] > self.history_seconds:
                self._samples.popleft()
        self._notify()

    # ------------------------------------------------------------------ pushes
    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` (from the control service's threads) whenever the state or the
        status changed; returns the function that unsubscribes. It must not block."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def changed(self, values: Mapping[str, Any]) -> None:
        """Applied values changed (the change feed calls this): the pages follow."""
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    # ------------------------------------------------------------------ writes
    def apply(self, name: Any, value: Any, client: str) -> tuple[bool, dict[str, Any]]:
        """Validate and queue one change as ``/<address>`` from OSC would be; ``(ok, body)``."""
        service = self._require()
        spec = params.REGISTRY.get(name) if isinstance(name, str) else None
        if spec is None:
            known = ", ".join(params.REGISTRY)
            return False, {"ok": False, "error": f"{name!r} is not a parameter; allowed: {known}"}
        replies, error = service.dispatcher.handle_request(
            spec.osc_address, json_args(spec, value), (client, 0)
        )
        if error is not None:
            return False, {"ok": False, "error": error}
        for reply in replies:
            if reply.to_feedback:  # a scene saved or loaded is announced as over OSC
                service.feedback.send(reply.address, reply.args)
        self._notify()  # a scene saved shows in the list at once
        return True, {"ok": True, "accepted": {spec.name: params.to_plain(value)}}

    def _require(self) -> Steered:
        if self._service is None:
            raise RuntimeError("the control service is not running yet")
        return self._service

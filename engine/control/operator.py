"""The operator page's side of the control service: the registry, the state, changes and history."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine import params
from engine.control.dispatch import json_args

if TYPE_CHECKING:
    from engine.control.service import ControlService

HISTORY_SECONDS = 600.0


class Operator:
    """What the preview's operator page reads and writes (``bridges.preview.OperatorApi``).

    Changes go through the OSC dispatcher (``handle_request``): the same validation, the same
    ControlState, the same error text as an OSC sender gets; accepted changes are echoed on OSC
    feedback by the engine like any other. ``attach`` connects the control service once it
    exists (the preview may start first: until then the API answers 503). ``sample`` keeps
    fps, latency and skip rate for the last ``HISTORY_SECONDS``.
    """

    def __init__(self, history_seconds: float = HISTORY_SECONDS) -> None:
        self.history_seconds = float(history_seconds)
        self._service: ControlService | None = None
        self._lock = threading.Lock()
        self._samples: collections.deque[dict[str, float]] = collections.deque()
        self._started = time.monotonic()

    def attach(self, service: ControlService) -> None:
        self._service = service

    @property
    def ready(self) -> bool:
        return self._service is not None

    # ------------------------------------------------------------------ reads
    def spec(self) -> dict[str, Any]:
        return {"params": params.as_json()}

    def state(self) -> dict[str, Any]:
        service = self._require()
        values = {name: params.to_plain(value) for name, value in service.control.applied().items()}
        return {"values": values, "status": dict(service.engine_status()), "scenes": service.scenes.names()}

    def history(self) -> dict[str, Any]:
        with self._lock:
            return {"seconds": self.history_seconds, "samples": list(self._samples)}

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
        return True, {"ok": True, "accepted": {spec.name: params.to_plain(value)}}

    def _require(self) -> ControlService:
        if self._service is None:
            raise RuntimeError("the control service is not running yet")
        return self._service

"""The live state, autosaved atomically on every accepted change, for a restart to restore."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine import params
from engine.atomicfile import STALE_AFTER_S, atomic_write_text, remove_stale_temporaries
from engine.params import ParamError

logger = logging.getLogger(__name__)

FORMAT = 1
MAX_STATE_BYTES = 1024 * 1024
MIN_INTERVAL_S = 0.2
"""A fader moving at 60 Hz is written at most five times a second (the last value always)."""


class LiveStateFile:
    """``values`` of every restorable live parameter as JSON at ``path``.

    ``write`` replaces the file atomically (``engine.atomicfile``: a temporary file fsynced, renamed
    over it, the folder fsynced): a reader sees the previous state or the whole new one, a crash or
    power cut mid-write leaves the previous state, never half a file, and once ``write`` returns
    the new state survives a power cut (POSIX).
    ``read`` never raises: a missing, unreadable or corrupt file gives ``{}`` (the config
    values then apply), and a value the registry refuses (an older version, a hand edit) is
    dropped with a warning while the others are kept.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def write(self, values: Mapping[str, Any]) -> None:
        """Replace the saved state with the restorable parameters in ``values`` (``OSError`` on failure)."""
        data = {
            "latentstage_live_state": FORMAT,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "values": {
                name: params.to_plain(values[name]) for name in params.live_state_params() if name in values
            },
        }
        atomic_write_text(self.path, json.dumps(data, indent=1, ensure_ascii=False))

    def remove_stale_temporaries(self, older_than_s: float = STALE_AFTER_S) -> int:
        """Delete the temporary files interrupted writes of this file left (call it at start).

        Only ``.{name}.XXXXXXXX.tmp`` of this file's own name, older than ``older_than_s``: the
        folder may be a user's, and a younger one may be another engine's write in progress.
        """
        return remove_stale_temporaries(self.path.parent, [self.path.name], older_than_s)

    def read(self) -> dict[str, Any]:
        """The saved values, each validated against the registry (``{}`` when there are none)."""
        try:
            if self.path.stat().st_size > MAX_STATE_BYTES:
                logger.warning("live state %s is larger than %d bytes; ignored", self.path, MAX_STATE_BYTES)
                return {}
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            logger.warning("live state %s cannot be read (%s); starting from the config", self.path, err)
            return {}
        values = data.get("values") if isinstance(data, dict) else None
        if not isinstance(values, dict):
            logger.warning("live state %s has no 'values'; starting from the config", self.path)
            return {}
        restorable = set(params.live_state_params())
        accepted: dict[str, Any] = {}
        for name, value in values.items():
            if name not in restorable:
                logger.warning("live state: %r is not a restorable parameter; skipped", name)
                continue
            try:
                accepted.update(params.validate_changes({name: value}))
            except ParamError as err:
                logger.warning("live state: %s; skipped", err)
        return accepted


class Autosaver:
    """Writes the latest requested state on its own thread (the frame loop never waits on disk).

    ``request`` only replaces the value waiting to be written; a burst of changes becomes one
    write (at most one per ``min_interval_s``, the newest always). A failing disk is logged
    (rate-limited by the interval) and retried with the next change. ``close()`` writes what
    is still waiting, then stops; safe twice.
    """

    def __init__(self, file: LiveStateFile, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.file = file
        self._interval = min_interval_s
        self._cond = threading.Condition()
        self._waiting: dict[str, Any] | None = None
        self._closed = False
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="latentstage-autosave", daemon=True)
        self._thread.start()

    def request(self, values: Mapping[str, Any]) -> None:
        with self._cond:
            self._waiting = dict(values)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5.0)

    def __enter__(self) -> Autosaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closed:
                    self._cond.wait()
                values, self._waiting = self._waiting, None
                closed = self._closed
            if values is not None:
                self._write(values)
            if closed:
                return
            with self._cond:  # coalesce what arrives meanwhile
                self._cond.wait_for(lambda: self._closed, timeout=self._interval)

    def _write(self, values: dict[str, Any]) -> None:
        try:
            self.file.write(values)
        except OSError as err:
            logger.warning("live state could not be saved to %s: %s", self.file.path, err)
            return
        self.writes += 1

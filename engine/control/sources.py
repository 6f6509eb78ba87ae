"""SourceCatalog: what ``/input/select`` can switch to, discovered on its own thread and cached.

Discovery (``bridges.discovery.discover``: NDI's finder waits up to a second) never runs on the
OSC thread or the frame loop: ``names()`` and ``snapshot()`` answer at once from the last look,
``refresh()`` asks for a new look now. The thread looks again every ``every_s`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridges.discovery import Discovery, SourceInfo, SourceKind, discover

logger = logging.getLogger(__name__)

REFRESH_S = 10.0


class SourceCatalog:
    """The sources found by the last look (see the module docstring); ``start`` / ``close`` (twice ok)."""

    def __init__(
        self,
        media_dir: str | Path,
        every_s: float = REFRESH_S,
        timeout_s: float = 1.0,
        find: Callable[..., Discovery] = discover,
    ) -> None:
        self.media_dir = Path(media_dir)
        self.every_s = every_s
        self.timeout_s = timeout_s
        self._find = find
        self._lock = threading.Lock()
        self._last = Discovery([SourceInfo("pattern", SourceKind.PATTERN, "test pattern", "built in")], {})
        self._looked_at: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.looks = 0
        self._thread = threading.Thread(target=self._run, name="latentstage-sources", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s + 3.0)

    def __enter__(self) -> SourceCatalog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Look again now (the answer comes with the next ``names()`` after the look)."""
        self._wake.set()

    def names(self) -> list[str]:
        """The selectable names found by the last look (the pattern before the first)."""
        with self._lock:
            return self._last.names()

    def snapshot(self) -> dict[str, Any]:
        """The last look as JSON data (sources with labels and details, kinds not available here,
        how many seconds ago it was)."""
        with self._lock:
            data = self._last.as_json()
            looked = self._looked_at
        data["age_s"] = None if looked is None else round(time.monotonic() - looked, 1)
        return data

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                found = self._find(media_dir=self.media_dir, timeout=self.timeout_s)
            except (OSError, ValueError, RuntimeError) as err:  # discovery reports kinds itself
                logger.warning("source discovery failed: %s", err)
            else:
                with self._lock:
                    self._last = found
                    self._looked_at = time.monotonic()
                self.looks += 1
            self._wake.wait(self.every_s)
            self._wake.clear()

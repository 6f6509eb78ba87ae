"""Background builds of the runners a live change needs; the change waits here, as a dict."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from engine.accel.backends import Backend
from engine.accel.tensorrt_backend import BuildCancelledError
from engine.params import merge_changes
from engine.pipeline import BuildTarget

logger = logging.getLogger(__name__)


class Builds:
    """Builds runners off the frame loop while the current configuration keeps playing.

    One change at a time waits (``wait``): a dict of shape changes and the target it needs.
    Later shape changes ``join`` it (newer values win), and the engine asks the pipeline again
    what the joined change needs. When the build it waits for is done, ``take_ready`` hands the
    change back to be planned and committed; a build nobody waits for any more is cancelled.
    ``wait``, ``join``, ``take_ready`` and ``settle`` belong to the frame-loop thread; the build
    threads only report.

    Args:
        backend: prepares the runners (``prepare_vae`` / ``prepare_unet``) and cancels builds.
        wake: called when a build ends (wakes the frame loop).
        report_error: called with the message of a failed build.
    """

    def __init__(
        self, backend: Backend, wake: Callable[[], None], report_error: Callable[[str], None]
    ) -> None:
        self.backend = backend
        self._wake = wake
        self._report_error = report_error
        self._lock = threading.Lock()
        self._running: dict[BuildTarget, int] = {}  # guarded by _lock, as is _finished
        self._finished: list[tuple[int, bool]] = []  # (build id, succeeded)
        self._ids = 0
        self._threads: list[threading.Thread] = []
        self._waiting: dict[str, Any] = {}
        self._awaited: tuple[int, BuildTarget] | None = None

    # ------------------------------------------------------------------ frame-loop thread
    @property
    def waiting(self) -> dict[str, Any]:
        """The change waiting for its runners (empty: none)."""
        return dict(self._waiting)

    def join(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Take the waiting change merged under ``changes`` (they win); nothing waits afterwards."""
        merged = merge_changes(self._waiting, changes)
        self._waiting, self._awaited = {}, None
        return merged

    def wait(self, changes: Mapping[str, Any], target: BuildTarget) -> None:
        """Let ``changes`` wait for ``target``; its build starts unless one runs already."""
        self._waiting = dict(changes)
        self._awaited = (self._start(target), target)
        self.settle()

    def settle(self) -> None:
        """Cancel the builds no waiting change needs (a newer change took another way)."""
        keep = self._awaited[1] if self._awaited is not None else None
        with self._lock:
            stale = [target for target in self._running if target != keep]
        shapes: set[Any] = set()
        for target in stale:
            shapes.add(target.unet)
            if target.vae is not None and (keep is None or target.vae != keep.vae):
                shapes.add(target.vae)
        if shapes:
            logger.info("cancelling engine builds no change waits for: %s", _label(stale))
            self.backend.cancel(shapes)

    def take_ready(self) -> dict[str, Any] | None:
        """The waiting change once the build it waits for succeeded (``None``: not yet / none).

        A failed build drops its waiting change (the failure was reported; nothing changed).
        """
        with self._lock:
            finished, self._finished = self._finished, []
        for build_id, succeeded in finished:
            if self._awaited is None or build_id != self._awaited[0]:
                continue  # a newer change replaced the one this build was for
            changes, self._waiting, self._awaited = self._waiting, {}, None
            if succeeded:
                return changes
        return None

    @property
    def label(self) -> str | None:
        """What the status shows while builds run (``None`` when none does)."""
        with self._lock:
            return _label(self._running) or None

    def close(self) -> None:
        """Drop the waiting change and cancel every running build (TensorRT stops at its next step)."""
        self._waiting, self._awaited = {}, None
        running = self.label
        if running:
            logger.warning(
                "stopping while engines for %s are prepared: that build is cancelled (a half-built "
                "engine is never used; `latentstage build` makes it before the show)",
                running,
            )
        self.settle()

    # ------------------------------------------------------------------ build threads
    def _start(self, target: BuildTarget) -> int:
        with self._lock:
            running = self._running.get(target)
            if running is not None:
                return running
            self._ids += 1
            build_id = self._ids
            self._running[target] = build_id
        logger.info("preparing engines for %s; the current configuration keeps running", target.label)
        thread = threading.Thread(
            target=self._build, args=(target, build_id), name="latentstage-build", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return build_id

    def _build(self, target: BuildTarget, build_id: int) -> None:
        try:
            if target.vae is not None:
                self.backend.prepare_vae(target.vae)
            self.backend.prepare_unet(target.unet)
        except BuildCancelledError:
            logger.info("the build for %s was cancelled", target.label)
            succeeded = False
        # a build is third-party work (exporters, TensorRT): whatever fails is reported and the
        # engine keeps running the configuration it has
        except Exception as err:
            self._report_error(f"engine build for {target.label} failed: {err}")
            succeeded = False
        else:
            succeeded = True
        with self._lock:
            del self._running[target]
            self._finished.append((build_id, succeeded))
        self._wake()


def _label(targets: Any) -> str:
    return ", ".join(target.label for target in targets)

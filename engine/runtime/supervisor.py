"""`latentstage run --supervise`: the engine as a child process, restarted when it dies or hangs."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import SuperviseSettings
from engine.exitcodes import EXIT_SUPERVISOR_GAVE_UP, START_FAILURES
from engine.runtime.heartbeat import STOP_LINE, Beat, HeartbeatReceiver, Phase

logger = logging.getLogger(__name__)

POLL_S = 0.2


def _configured(name: str) -> Any:
    """The default of ``supervise.<name>``: the config schema holds it, nothing repeats it."""
    return SuperviseSettings.model_fields[name].default


@dataclass
class SupervisorSettings:
    """How the supervisor judges and restarts the engine (``supervise`` config section)."""

    hang_seconds: float = _configured("hang_seconds")
    startup_seconds: float = _configured("startup_seconds")
    max_restarts: int = _configured("max_restarts")
    window_minutes: float = _configured("window_minutes")
    restart_delay_s: float = 1.0
    stop_timeout_s: float = 5.0

    @classmethod
    def from_config(cls, section: Any) -> SupervisorSettings:
        return cls(
            section.hang_seconds, section.startup_seconds, section.max_restarts, section.window_minutes
        )


class RestartBudget:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: deque[float] = deque()

    def spend(self, now: float) -> bool:
        """Take one restart at ``now``; False when the window holds ``max_restarts`` already."""
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True


class ChildWatch:
    """What the supervisor knows of one child: its beats, and whether it hangs.

    A child hangs when its beats stop for ``hang_seconds`` (the process is frozen), when its
    frame loop's counters stop moving for ``hang_seconds`` once it has made a frame, or when
    it needs more than ``startup_seconds`` to load and make its first frame.
    """

    def __init__(self, pid: int, settings: SupervisorSettings, now: float) -> None:
        self.pid = pid
        self.settings = settings
        self.started_at = now
        self.last_beat_at: float | None = None
        self.progress_at = now
        self.counters = (-1, -1)
        self.frames = 0
        self.state = "starting"

    def beat(self, beat: Beat, now: float) -> None:
        if beat.pid != self.pid:
            return  # a beat of the child before, still in flight
        self.last_beat_at = now
        self.state = beat.state
        counters = (beat.loop, beat.frames) if beat.phase == Phase.RUNNING else (-1, -1)
        if counters != self.counters:
            self.counters = counters
            self.progress_at = now
        self.frames = max(self.frames, beat.frames)

    @property
    def ran(self) -> bool:
        """Whether this child made a frame (a later exit is a crash, not a bad setup)."""
        return self.frames > 0

    def hang(self, now: float) -> str | None:
        """Why the child counts as hung at ``now``, or ``None``."""
        hang, startup = self.settings.hang_seconds, self.settings.startup_seconds
        if self.last_beat_at is None:
            return (
                f"no heartbeat within {startup:g} s of starting" if now - self.started_at > startup else None
            )
        if now - self.last_beat_at > hang:
            return f"no heartbeat for {now - self.last_beat_at:.1f} s (the process is frozen)"
        if not self.ran:
            if now - self.started_at > startup:
                return f"no first frame within {startup:g} s (supervise.startup_seconds)"
            return None
        if now - self.progress_at > hang:
            return f"no frame and no loop progress for {now - self.progress_at:.1f} s"
        return None


def describe_exit(status: int) -> str:
    """``-11`` → ``killed by SIGSEGV``; ``3`` → ``exit status 3 (model error)``."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    if status > 255:  # Windows: an NTSTATUS such as 0xC0000005 (access violation)
        return f"exit status {status:#x}"
    meaning = START_FAILURES.get(status)
    return f"exit status {status}" + (f" ({meaning})" if meaning else "")


class Supervisor:
    """Runs the engine as a child process and restarts it when it exits unexpectedly or hangs.

    The child is told the heartbeat port and how often it was restarted (``command``); on a
    restart it restores the live state the engine autosaved. A clean exit (status 0: a stop
    by signal, ``--frames`` reached) ends the supervisor too; a start failure of the first
    child (bad config, missing model or SDK, a port in use) ends it with that status, since
    a restart cannot mend it; more than ``max_restarts`` restarts in ``window_minutes`` end
    it with status 7 (``EXIT_SUPERVISOR_GAVE_UP``). ``stop()`` (signal handlers) stops the
    child cleanly, then returns 0.

    Args:
        command: ``(restarts, heartbeat_port) -> argv`` of the child.
        settings: hang and restart limits.
        announce: ``(state, restarts, message)`` for the feedback port, e.g. ``restarting``.
    """

    def __init__(
        self,
        command: Callable[[int, int], Sequence[str]],
        settings: SupervisorSettings,
        announce: Callable[[str, int, str], None] | None = None,
        popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
    ) -> None:
        self.command = command
        self.settings = settings
        self.announce = announce or (lambda state, restarts, message: None)
        self.restarts = 0
        self._popen = popen
        self._stop = threading.Event()
        self._budget = RestartBudget(settings.max_restarts, 60.0 * settings.window_minutes)
        self.child: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        """Ask for a clean stop of both (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> int:
        """Supervise until a clean stop, a start failure or the restart limit; the exit status."""
        with HeartbeatReceiver() as beats:
            while True:
                watch = self._start(beats.port)
                reason, status = self._watch(watch, beats)
                if reason is None:  # a clean stop
                    return status
                if status in START_FAILURES and not watch.ran and self.restarts == 0:
                    logger.error(
                        "the engine cannot start (%s); not restarting: fix the setup first",
                        describe_exit(status),
                    )
                    self.announce(
                        "stopped", self.restarts, f"the engine cannot start: {describe_exit(status)}"
                    )
                    return status
                if not self._budget.spend(time.monotonic()):
                    message = (
                        f"the engine failed again after {self.settings.max_restarts} restarts within "
                        f"{self.settings.window_minutes:g} minutes (last: {reason}); giving up. "
                        "Its log above says why; fix that and start again"
                    )
                    logger.error("%s", message)
                    self.announce("stopped", self.restarts, message)
                    return EXIT_SUPERVISOR_GAVE_UP
                self.restarts += 1
                message = (
                    f"engine {reason}; restart {self.restarts} (at most {self.settings.max_restarts} "
                    f"in {self.settings.window_minutes:g} min), restoring the live state"
                )
                logger.warning("%s", message)
                self.announce("restarting", self.restarts, message)
                if self._stop.wait(self.settings.restart_delay_s):
                    return 0

    def _start(self, port: int) -> ChildWatch:
        argv = list(self.command(self.restarts, port))
        logger.debug("starting %s", argv)
        self.child = self._popen(argv, stdin=subprocess.PIPE)
        return ChildWatch(self.child.pid, self.settings, time.monotonic())

    def _watch(self, watch: ChildWatch, beats: HeartbeatReceiver) -> tuple[str | None, int]:
        """Until the child ends: ``(None, status)`` for a clean end, else ``(why, status)``."""
        child = self.child
        assert child is not None
        try:
            return self._until_it_ends(child, watch, beats)
        finally:
            if child.stdin is not None:  # its pipe, one per start: weeks of restarts leak none
                with contextlib.suppress(OSError):
                    child.stdin.close()

    def _until_it_ends(
        self, child: subprocess.Popen[bytes], watch: ChildWatch, beats: HeartbeatReceiver
    ) -> tuple[str | None, int]:
        while True:
            if self._stop.is_set():
                return None, self._stop_child(child)
            beat = beats.receive(POLL_S)
            now = time.monotonic()
            if beat is not None:
                watch.beat(beat, now)
            status = child.poll()
            if status is not None:
                return (None, 0) if status == 0 else (describe_exit(status), status)
            hang = watch.hang(now)
            if hang is not None:
                child.kill()  # a hung frame loop cannot run a clean stop; the recording is crash-safe
                status = child.wait()
                return f"hung: {hang}", status

    def _stop_child(self, child: subprocess.Popen[bytes]) -> int:
        """Ask the child to stop (a line on its stdin), kill it after ``stop_timeout_s``."""
        if child.poll() is None:
            try:
                assert child.stdin is not None
                child.stdin.write(STOP_LINE + b"\n")
                child.stdin.flush()
            except (OSError, ValueError):  # it is exiting already
                pass
            try:
                child.wait(self.settings.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "the engine did not stop within %g s; killing it", self.settings.stop_timeout_s
                )
                child.kill()
                child.wait()
        status = child.returncode
        logger.info("engine stopped (%s)", describe_exit(status))
        return 0


def child_command(argv: Sequence[str], restarts: int, port: int) -> list[str]:
    """The child's command line: ``run`` with the user's arguments, told it is supervised.

    From the first restart on it resumes the autosaved live state (``--resume``).
    """
    args = [a for a in argv if a != "--supervise"]
    extra = ["--supervised-by", str(port), "--restart-count", str(restarts)]
    if restarts and "--resume" not in args:
        extra.append("--resume")
    return [sys.executable, "-m", "engine.cli", *args, *extra]

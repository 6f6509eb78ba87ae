"""The engine's side of the replicas: start them, hand frames round-robin, watch them, restart them."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from engine.params import SHAPE_PARAMS
from engine.runtime.replicas.reorder import ReorderBuffer
from engine.runtime.replicas.wire import ENGINE_RANK, Kind, Link, Message, link_error, plain
from engine.runtime.replicas.worker import ReplicaSpec, replica_main, same_weights
from engine.runtime.supervisor import RestartBudget

logger = logging.getLogger(__name__)

_TIMINGS = 16  # the call times the pacing takes the median of
_HANG_FRAMES = 4  # a frame is hung after this many typical frames (or scale.hang_seconds, the longer)
_STOP_WAIT_S = 2.0
_KILL_WAIT_S = 2.0  # a killed process is gone in milliseconds; this bounds a process stuck in the kernel


class LaneState(str, Enum):
    """Where one replica is."""

    STARTING = "starting"  # spawned, loading its model
    JOINING = "joining"  # loaded, gets the current state at the next frame boundary
    ACTIVE = "active"  # in the rotation
    OUT = "out"  # died or hung: out of the rotation, restarted after the delay
    FAILED = "failed"  # restarts used up, or its weights differ: stays out


@dataclass
class ReplicaSettings:
    """The ``scale`` config section as the engine uses it (``supervise`` gives the restart rules)."""

    count: int
    devices: list[str]
    threads: int = 0
    hang_s: float = 0.5
    startup_s: float = 300.0
    reorder_ms: float = 50.0
    max_restarts: int = 5
    window_s: float = 600.0
    restart_delay_s: float = 1.0
    log_level: str = "INFO"
    engine_threads: int = 0  # the engine's own torch threads beside CPU replicas (0: leave them)

    @classmethod
    def from_config(cls, config: Any, model_device: str) -> ReplicaSettings:
        scale = config.scale
        devices = [str(device) for device in scale.devices] or [model_device]
        placed = [devices[number % len(devices)] for number in range(scale.replicas)]
        threads, engine_threads = scale.threads, 0
        if all(device == "cpu" for device in placed):  # the cores shared out, not oversold
            cores = os.cpu_count() or 1
            threads = threads or max(1, cores // scale.replicas)
            engine_threads = max(1, cores - threads * scale.replicas)
        return cls(
            count=scale.replicas,
            devices=placed,
            threads=threads,
            hang_s=scale.hang_seconds,
            startup_s=config.supervise.startup_seconds,
            reorder_ms=scale.reorder_ms,
            max_restarts=config.supervise.max_restarts,
            window_s=config.supervise.window_minutes * 60.0,
            log_level=config.logging.level.value,
            engine_threads=engine_threads,
        )


@dataclass(frozen=True)
class ReplicaEvent:
    """Something that happened to a replica: ``fault`` (taken out, or out for good) or not (restarting,
    joined); ``text`` says which, and why."""

    fault: bool
    text: str


@dataclass
class Made:
    """What a replica made of one frame. ``meta``: what the engine attached when it sent it."""

    replica: int
    serial: int
    tensor: torch.Tensor | None = None
    skipped: bool = False
    warming: bool = False
    error: str | None = None
    meta: Any = None


@dataclass
class _Lane:
    number: int
    device: str
    state: LaneState = LaneState.OUT
    process: Any = None
    link: Link | None = None
    outbox: queue.Queue[Message | None] = field(default_factory=queue.Queue)
    outstanding: dict[int, tuple[float, Any, bool]] = field(default_factory=dict)  # index: (sent, meta, slow)
    started_at: float = 0.0
    out_since: float = 0.0
    generation: int = 0  # which start of this replica the threads belong to
    threads: list[threading.Thread] = field(default_factory=list)
    broken: str | None = None  # set by its threads: why it must come out
    final: bool = False  # out for good (its weights differ)
    slow: bool = False  # a shape change is on its way: its next frame may take ``startup_s``


class ReplicaSet:
    """N replica processes of the pipeline, each in a torch.distributed group of two with the engine.

    The frame loop calls everything but the lane threads: ``poll`` (health, restarts, joins) and
    ``release`` each turn, ``free_lane`` / ``send_frame`` for each input frame, ``sync`` after each
    commit. Per replica two threads of the engine talk to it (a sender with its own queue, so the
    frame loop never blocks on a socket; a receiver that puts what it made into the reorder buffer).

    A replica is taken out of the rotation when its process ends, its link breaks, or a frame it was
    sent is not back within ``hang_s`` (``startup_s`` right after a shape change, which may load
    engines): its process is killed, its frames are given up (the reorder buffer lets the later ones
    go), and it is started again after ``restart_delay_s`` while the restart budget allows
    (``supervise.max_restarts`` within ``supervise.window_minutes``). A started replica loads, says
    hello with its weights' fingerprint (a different one: it stays out), and at the next frame
    boundary gets the engine's whole current state before its first frame.

    Args:
        settings: how many, where, and the fault rules.
        config: the validated config (each replica loads its pipeline from it).
        fingerprint: the engine's weights' fingerprint (``worker.weights_fingerprint``; a replica
            whose weights differ stays out).
        start_method: how replica processes start (``spawn``: a fresh interpreter, safe with CUDA).
    """

    def __init__(
        self,
        settings: ReplicaSettings,
        config: Mapping[str, Any],
        fingerprint: dict[str, Any],
        start_method: str = "spawn",
    ) -> None:
        if settings.count < 2:
            raise ValueError(f"replicas {settings.count}: a replica set has 2 or more")
        self.settings = settings
        self.config = dict(config)
        self.fingerprint = fingerprint
        self.on_wake: Callable[[], None] | None = None  # also told when a replica sent something
        self._context: Any = mp.get_context(start_method)
        self._folder = Path(tempfile.mkdtemp(prefix="latentstage-replicas-"))  # 0700: the rendezvous
        self.lanes = [_Lane(number, device) for number, device in enumerate(settings.devices)]
        self.order: ReorderBuffer[Any] = ReorderBuffer(settings.reorder_ms / 1000.0)
        self.budget = RestartBudget(settings.max_restarts, settings.window_s)
        self._lock = threading.Lock()  # lane state and outstanding frames, frame loop vs lane threads
        self._arrived = threading.Event()
        self._timings: deque[float] = deque(maxlen=_TIMINGS)  # appended by the receivers
        self._timings_lock = threading.Lock()
        self._reaping: list[Any] = []  # killed processes not yet reaped
        self._next = 0  # the lane the rotation tries first
        self._last_sent_at = 0.0
        self._sent_state: dict[str, Any] | None = None
        self.serial = 0  # changes sent so far (a replica reports the last one it committed)
        self.events: deque[str] = deque(maxlen=64)  # what happened to the replicas, newest last
        self.taken_out = 0  # times a replica was taken out of the rotation
        self._closed = False

    # ------------------------------------------------------------------ frame loop
    def start(self, state: Mapping[str, Any]) -> None:
        """Start every replica; they join the rotation as they become ready."""
        self._sent_state = dict(state)
        for lane in self.lanes:
            self._start_lane(lane, time.monotonic())

    @property
    def active(self) -> int:
        return sum(1 for lane in self.lanes if lane.state is LaneState.ACTIVE)

    def states(self) -> list[str]:
        """Where each replica is (``LaneState`` values, by replica number): the status shows them."""
        return [lane.state.value for lane in self.lanes]

    def poll(self, now: float, state: Mapping[str, Any]) -> list[ReplicaEvent]:
        """Between two frames: take out dead or hung replicas, restart those due, let ready ones join
        with ``state`` (the engine's committed values). Returns what happened."""
        said: list[ReplicaEvent] = []
        self._reaping = [process for process in self._reaping if _still_running(process)]
        for lane in self.lanes:
            with self._lock:
                problem = self._problem(lane, now)
            if problem is not None:
                said.append(ReplicaEvent(True, self._take_out(lane, problem, now)))
            elif lane.state is LaneState.OUT and now - lane.out_since >= self.settings.restart_delay_s:
                if self.budget.spend(now):
                    said.append(ReplicaEvent(False, f"replica {lane.number}: restarting"))
                    self._start_lane(lane, now)
                else:
                    lane.state = LaneState.FAILED
                    said.append(
                        ReplicaEvent(
                            True,
                            f"replica {lane.number}: restarts used up ({self.settings.max_restarts} within "
                            f"{self.settings.window_s / 60:g} min, supervise.*); it stays out",
                        )
                    )
            elif lane.state is LaneState.JOINING:
                self._join(lane, state)
                took = now - lane.started_at
                text = f"replica {lane.number}: joined on {lane.device}, {took:.1f} s after its start"
                said.append(ReplicaEvent(False, text))
        self.events.extend(event.text for event in said)
        return said

    def order_index(self) -> int:
        """The index the next frame will get."""
        return self.order._next_expected

    def sync(self, state: Mapping[str, Any], transition: bool = False) -> None:
        """After a commit: send the values that changed since the last sync to every active replica,
        to be committed before the next frame index (``transition``: a prompt crossfade starts)."""
        previous = self._sent_state or {}
        changed = {name: value for name, value in state.items() if previous.get(name) != value}
        self._sent_state = dict(state)
        if not changed:
            return
        self.serial += 1
        message = self._change(changed, transition)
        slow = any(name in SHAPE_PARAMS for name in changed)  # its commit may load engines there
        for lane in self.lanes:
            if lane.state is LaneState.ACTIVE:
                lane.outbox.put(message)
                lane.slow = lane.slow or slow

    def free_lane(self, now: float) -> int | None:
        """The replica to take the next frame now: the next in the rotation with no frame in hand,
        no sooner than the measured call time ÷ active replicas after the last frame sent (so
        outputs leave evenly spaced). ``None``: none now (``wait_s`` says how long at most)."""
        active = [lane for lane in self.lanes if lane.state is LaneState.ACTIVE]
        if not active or now < self._last_sent_at + self._spacing(len(active)):
            return None
        with self._lock:
            for offset in range(len(self.lanes)):
                lane = self.lanes[(self._next + offset) % len(self.lanes)]
                if lane.state is LaneState.ACTIVE and not lane.outstanding:
                    return lane.number
        return None

    def wait_s(self, now: float) -> float:
        """How long the frame loop may sleep before a replica can take a frame (at most 0.1 s; what a
        replica sends wakes it sooner)."""
        active = [lane for lane in self.lanes if lane.state is LaneState.ACTIVE]
        with self._lock:
            idle = any(not lane.outstanding for lane in active)
        if not idle:
            return 0.1
        return min(0.1, max(0.0, self._last_sent_at + self._spacing(len(active)) - now))

    def wait(self, timeout: float) -> None:
        """Sleep until a replica sends something or ``timeout`` passes."""
        if self._arrived.wait(timeout):
            self._arrived.clear()

    def wake(self) -> None:
        """Wake the frame loop (``wait``, and ``on_wake``: the engine's input slot)."""
        self._arrived.set()
        if self.on_wake is not None:
            self.on_wake()

    def out_of_step(self, number: int, why: str) -> None:
        """Replica ``number`` made a frame with other values than the engine sent it: out, restarted."""
        lane = self.lanes[number]
        with self._lock:
            if lane.broken is None and lane.state is LaneState.ACTIVE:
                lane.broken = why

    def send_frame(
        self,
        number: int,
        index: int,
        image: torch.Tensor | None,
        meta: Any,
        progress: float | None = None,
        reference: torch.Tensor | None = None,
        controls: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        """Hand frame ``index`` to replica ``number`` (tensors go as they are; the receiver moves them
        to its device). ``meta`` comes back with what it made."""
        lane = self.lanes[number]
        now = time.monotonic()
        data = {"progress": progress, "controls": controls is not None}
        tensors = [image, reference, *(controls or ())]
        with self._lock:
            lane.outstanding[index] = (now, meta, lane.slow)
        lane.outbox.put(Message(Kind.FRAME, index, data, tensors))
        self._last_sent_at = now
        self._next = (number + 1) % len(self.lanes)

    def release(self, now: float) -> list[tuple[int, Any]]:
        return self.order.release(now)

    def close(self) -> None:
        """Stop every replica (STOP, then kill what is left) and remove the rendezvous; safe twice."""
        if self._closed:
            return
        self._closed = True
        for lane in self.lanes:
            if lane.state in (LaneState.ACTIVE, LaneState.JOINING):
                lane.outbox.put(Message(Kind.STOP))
            lane.outbox.put(None)
        deadline = time.monotonic() + _STOP_WAIT_S
        for lane in self.lanes:  # together they have _STOP_WAIT_S to end, then they are killed
            self._end_process(lane, max(0.0, deadline - time.monotonic()))
        for process in self._reaping:
            process.join(_KILL_WAIT_S)
        for lane in self.lanes:
            for thread in lane.threads:
                thread.join(max(0.05, deadline - time.monotonic()))
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals (frame loop)
    def typical_frame_s(self) -> float:
        """The median time a frame took from sending to its result (0 before the first)."""
        with self._timings_lock:
            timings = list(self._timings)
        return statistics.median(timings) if timings else 0.0

    def _spacing(self, active: int) -> float:
        return self.typical_frame_s() / active

    def _problem(self, lane: _Lane, now: float) -> str | None:
        """Why ``lane`` must come out now, or ``None`` (called under the lock)."""
        if lane.state in (LaneState.OUT, LaneState.FAILED):
            return None
        if lane.broken is not None:
            return lane.broken
        if lane.process is not None and not lane.process.is_alive():
            return f"its process ended (exit code {lane.process.exitcode})"
        if lane.state is LaneState.STARTING and now - lane.started_at > self.settings.startup_s:
            return f"not ready after {self.settings.startup_s:g} s (supervise.startup_seconds)"
        for sent, _, slow in lane.outstanding.values():
            if slow and now - sent > self.settings.startup_s:
                return f"a frame not back after {self.settings.startup_s:g} s (supervise.startup_seconds)"
            if not slow and now - sent > self.hang_limit_s():
                return f"a frame not back after {self.hang_limit_s():.3g} s (scale.hang_seconds)"
        return None

    def hang_limit_s(self) -> float:
        """How long a frame may take: ``hang_s``, or 4 times the median frame when frames take longer
        than a quarter of that (a slow model on a CPU is not hung)."""
        return max(self.settings.hang_s, _HANG_FRAMES * self.typical_frame_s())

    def _take_out(self, lane: _Lane, why: str, now: float) -> str:
        self.taken_out += 1
        with self._lock:
            lost = list(lane.outstanding)
            lane.outstanding.clear()
            lane.state = LaneState.FAILED if lane.final else LaneState.OUT
            lane.out_since = now
            lane.generation += 1  # its threads' last words are ignored from now on
            lane.broken = None
        for index in lost:
            self.order.lose(index)
        lane.outbox.put(None)
        self._end_process(lane, None)
        return (
            f"replica {lane.number}: out of the rotation: {why}; {self.active} of {len(self.lanes)} play on"
        )

    def _start_lane(self, lane: _Lane, now: float) -> None:
        lane.generation += 1
        generation = lane.generation
        store = self._folder / f"replica-{lane.number}-{generation}"
        spec = ReplicaSpec(
            number=lane.number,
            config=self.config,
            device=lane.device,
            threads=self.settings.threads,
            store_file=str(store),
            join_timeout_s=self.settings.startup_s,
            log_level=self.settings.log_level,
        )
        lane.state, lane.started_at, lane.broken, lane.slow = LaneState.STARTING, now, None, False
        lane.outbox = queue.Queue()
        lane.outstanding = {}
        lane.process = self._context.Process(
            target=replica_main, args=(spec,), name=f"latentstage-replica-{lane.number}", daemon=True
        )
        lane.process.start()
        receiver = threading.Thread(
            target=self._receive,
            args=(lane, generation, store),
            name=f"latentstage-replica-{lane.number}-in",
            daemon=True,
        )
        lane.threads = [receiver]
        receiver.start()

    def _join(self, lane: _Lane, state: Mapping[str, Any]) -> None:
        """At a frame boundary: the whole current state, then the rotation."""
        lane.outbox.put(self._change(dict(state), transition=False))
        lane.state = LaneState.ACTIVE
        lane.slow = True  # its first frame commits the whole state and warms up

    def _change(self, values: Mapping[str, Any], transition: bool) -> Message:
        index = self.order_index()
        data = {
            "values": plain(dict(values)),
            "transition": transition,
            "serial": self.serial,
        }
        return Message(Kind.CHANGE, index, data)

    def _end_process(self, lane: _Lane, wait_s: float | None) -> None:
        """End ``lane``'s process: let it stop within ``wait_s``, else kill it and reap it; ``None``:
        kill it now and let ``poll`` reap it (the frame loop never waits for a process)."""
        process = lane.process
        if process is None:
            return
        if wait_s is None:
            process.kill()
            self._reaping.append(process)
            return
        process.join(wait_s)
        if process.is_alive():
            process.kill()
            process.join(_KILL_WAIT_S)

    # ------------------------------------------------------------------ lane threads
    def _receive(self, lane: _Lane, generation: int, store: Path) -> None:
        """A replica's receiver: the link, its hello, then everything it makes (until it breaks)."""
        try:
            link = Link.join(store, ENGINE_RANK, self.settings.startup_s)
            hello = link.recv()
            if hello.kind is not Kind.HELLO or "error" in hello.data:
                raise RuntimeError(f"it could not start: {hello.data.get('error', hello.kind.name)}")
            if not same_weights(self.fingerprint, hello.data["fingerprint"]):
                why = "its weights differ from the engine's (another file, seed or LoRA?)"
                self._fail(lane, generation, why, final=True)
                return
            sender = threading.Thread(
                target=self._send,
                args=(lane, generation, link),
                name=f"latentstage-replica-{lane.number}-out",
                daemon=True,
            )
            with self._lock:
                if lane.generation != generation:
                    return
                lane.link = link
                lane.threads.append(sender)
                lane.state = LaneState.JOINING
            sender.start()
            self.wake()
            while True:
                message = link.recv()
                if message.kind is Kind.OUTPUT:
                    self._made(lane, generation, message)
        except RuntimeError as err:  # the link broke: the process died or was killed
            self._fail(lane, generation, f"its link broke: {link_error(err)}")

    def _send(self, lane: _Lane, generation: int, link: Link) -> None:
        while True:
            message = lane.outbox.get()
            if message is None or lane.generation != generation:
                return
            try:
                link.send(message)
            except RuntimeError as err:
                self._fail(lane, generation, f"its link broke: {link_error(err)}")
                return
            if message.kind is Kind.STOP:
                return

    def _fail(self, lane: _Lane, generation: int, why: str, final: bool = False) -> None:
        """A lane thread found ``lane`` broken: the frame loop takes it out at its next ``poll``."""
        with self._lock:
            if lane.generation != generation or lane.state in (LaneState.OUT, LaneState.FAILED):
                return
            if lane.broken is None:
                lane.broken, lane.final = why, final
        self.wake()

    def _made(self, lane: _Lane, generation: int, message: Message) -> None:
        now = time.monotonic()
        with self._lock:
            if lane.generation != generation:
                return
            entry = lane.outstanding.pop(message.index, None)
            if entry is not None and entry[2]:
                lane.slow = False  # the shape change is committed there
        if entry is None:
            return
        sent, meta, slow = entry
        if not slow:
            with self._timings_lock:
                self._timings.append(now - sent)
        data = message.data
        made = Made(
            lane.number,
            int(data.get("serial", -1)),
            message.tensors[0] if message.tensors else None,
            bool(data.get("skipped")),
            bool(data.get("warming")),
            data.get("error"),
            meta,
        )
        self.order.arrive(message.index, made, now)
        self.wake()


def _still_running(process: Any) -> bool:
    """Reap ``process`` if it ended (``join(0)``); whether it still runs."""
    process.join(0)
    return bool(process.is_alive())

"""Replicas under torch.distributed (gloo, CPU): order, changes at the same frame index, faults, wire."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from engine.config import load_config
from engine.runtime.replicas.reorder import ReorderBuffer
from engine.runtime.replicas.wire import ENGINE_RANK, REPLICA_RANK, Kind, Link, Message, plain
from engine.runtime.replicas.worker import same_weights, weights_fingerprint
from tests.fakes import SIZE, FakeSource, RecordingSink

REPLICA_CONFIG = [
    "model.id=builtin:tiny",
    f"stream.width={SIZE}",
    f"stream.height={SIZE}",
    "stream.t_index_list=[35]",  # one slot: an output is its input's and the values' alone
    "stream.cfg_type=none",
    "similarity_filter.enabled=false",
    "scale.replicas=2",
    "scale.threads=1",
    "scale.hang_seconds=5",  # a busy test machine may stall a process for a while: not a hang here
    "logging.level=WARNING",
]


# ---------------------------------------------------------------------------- the reorder buffer
def test_reorder_buffer_releases_in_index_order_once() -> None:
    order: ReorderBuffer[str] = ReorderBuffer(hold_s=10.0)
    indices = [order.expect() for _ in range(4)]
    assert indices == [0, 1, 2, 3]
    assert order.arrive(2, "c", now=0.0) and order.arrive(1, "b", now=0.0)
    assert order.release(now=0.1) == []  # 0 is still being made
    assert order.arrive(0, "a", now=0.2)
    assert order.release(now=0.2) == [(0, "a"), (1, "b"), (2, "c")]
    assert not order.arrive(1, "b again", now=0.3)  # never out twice
    assert order.arrive(3, "d", now=0.3) and order.release(now=0.3) == [(3, "d")]


def test_a_frame_later_than_hold_is_dropped_never_reordered() -> None:
    order: ReorderBuffer[str] = ReorderBuffer(hold_s=0.05)
    for _ in range(3):
        order.expect()
    order.arrive(1, "b", now=1.0)
    order.arrive(2, "c", now=1.0)
    assert order.release(now=1.01) == []  # held for 0 a while
    assert order.release(now=1.06) == [(1, "b"), (2, "c")]  # 0 waited for too long: given up
    assert not order.arrive(0, "a", now=1.07)
    assert order.late_dropped == 1 and order.release(now=1.1) == []


def test_a_lost_frame_lets_the_later_ones_go_at_once() -> None:
    order: ReorderBuffer[int] = ReorderBuffer(hold_s=60.0)
    for _ in range(3):
        order.expect()
    order.arrive(1, 1, now=0.0)
    order.lose(0)  # its replica died
    assert order.release(now=0.0) == [(1, 1)]
    assert order.lost == 1 and order.waiting == 1


# ---------------------------------------------------------------------------- the wire
def test_messages_cross_a_gloo_link_whole(tmp_path: Any) -> None:
    store = tmp_path / "store"
    links: dict[int, Link] = {}

    def join(rank: int) -> None:
        links[rank] = Link.join(store, rank, timeout_s=30.0)

    thread = threading.Thread(target=join, args=(REPLICA_RANK,))
    thread.start()
    join(ENGINE_RANK)
    thread.join(30.0)
    image = torch.rand(1, 3, 8, 8)
    half = torch.rand(2, 5, dtype=torch.float16)
    sent = Message(Kind.FRAME, 41, {"progress": 0.5, "values": plain({"t": (1, 2)})}, [image, None, half])
    done = threading.Thread(target=links[ENGINE_RANK].send, args=(sent,))
    done.start()
    got = links[REPLICA_RANK].recv()
    done.join(10.0)
    assert got.kind is Kind.FRAME and got.index == 41
    assert got.data == {"progress": 0.5, "values": {"t": [1, 2]}}
    assert got.tensors[1] is None
    assert torch.equal(got.tensors[0], image) and torch.equal(got.tensors[2], half)
    assert got.tensors[2].dtype is torch.float16


def test_weights_fingerprint_tells_other_weights_from_rounding() -> None:
    from engine.models.loader import load_models

    ours = weights_fingerprint(load_models(load_config(overrides=REPLICA_CONFIG).model))
    again = weights_fingerprint(load_models(load_config(overrides=REPLICA_CONFIG).model))
    assert same_weights(ours, again)  # built twice: the same (the builtin's calibration is on one thread)
    assert ours == again
    rounded = {**ours, "sums": [value * (1 + 1e-7) for value in ours["sums"]]}
    assert same_weights(ours, rounded)
    other = load_models(load_config(overrides=REPLICA_CONFIG).model)
    with torch.no_grad():
        next(other.unet.parameters()).mul_(1.01)  # another fine-tune of the same architecture
    assert not same_weights(ours, weights_fingerprint(other))


def test_scale_section_is_checked_and_shares_the_cores() -> None:
    from engine.config import ConfigError
    from engine.runtime.replicas.coordinator import ReplicaSettings

    with pytest.raises(ConfigError, match=r"scale\.replicas"):
        load_config(overrides=["scale.replicas=9"])
    config = load_config(overrides=["scale.replicas=3", "scale.devices=[cpu]"])
    settings = ReplicaSettings.from_config(config, "cpu")
    assert settings.devices == ["cpu"] * 3
    assert settings.threads == max(1, (os.cpu_count() or 1) // 3)
    assert settings.engine_threads == max(1, (os.cpu_count() or 1) - 3 * settings.threads)
    placed = ReplicaSettings.from_config(
        load_config(overrides=["scale.replicas=3", "scale.devices=[cuda:0, cuda:1]"]), "cpu"
    )
    assert placed.devices == ["cuda:0", "cuda:1", "cuda:0"] and placed.threads == 0
    assert placed.engine_threads == 0  # GPU replicas: the engine keeps torch's threads


# ---------------------------------------------------------------------------- the engine with replicas
class _Recorder:
    """What the engine with replicas sent where: the images handed to each replica, what came back."""

    def __init__(self, engine: Any) -> None:
        self.images: dict[int, torch.Tensor] = {}
        self.made: list[Any] = []
        replicas = engine.replicas
        send, emit = replicas.send_frame, engine._emit_made

        def send_frame(number: int, index: int, image: Any, meta: Any, *rest: Any, **named: Any) -> None:
            self.images[id(meta[0])] = image.clone()
            send(number, index, image, meta, *rest, **named)

        def emit_made(made: Any) -> None:
            self.made.append(made)
            emit(made)

        replicas.send_frame = send_frame
        engine._emit_made = emit_made


def _replica_engine(overrides: list[str], sink: RecordingSink) -> Any:
    from engine.models.loader import load_models
    from engine.pipeline import PipelineSettings
    from engine.runtime.changes import open_pipeline
    from engine.runtime.engine import Engine, EngineOptions
    from engine.runtime.replicas.coordinator import ReplicaSet, ReplicaSettings

    config = load_config(overrides=[*REPLICA_CONFIG, *overrides])
    models = load_models(config.model)
    settings = ReplicaSettings.from_config(config, "cpu")
    replicas = ReplicaSet(settings, config.model_dump(mode="json"), weights_fingerprint(models))
    pipeline = open_pipeline(models, PipelineSettings.from_config(config))
    options = EngineOptions(stall_seconds=0.0)
    return Engine(
        pipeline, lambda: FakeSource(fps=120.0), [("sink", lambda: sink)], options, replicas=replicas
    )


def _run_until(
    engine: Any, done: Callable[[], bool], limit_s: float, tick: Callable[[], None] | None = None
) -> None:
    deadline = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < deadline, f"not done in {limit_s} s: {list(engine.replicas.events)}"
        engine.run(max_frames=engine.frames_emitted + 1, tick=tick)


@pytest.mark.slow
def test_two_replicas_make_every_frame_in_order_and_commit_a_change_at_the_same_index() -> None:
    from engine.models.loader import load_models
    from engine.pipeline import PipelineSettings
    from engine.runtime.changes import apply_change, open_pipeline

    sink = RecordingSink()
    engine = _replica_engine([], sink)
    recorder = _Recorder(engine)
    changed: list[int] = []

    def change_once() -> None:
        if not changed and len(recorder.made) >= 12:
            changed.append(engine.replicas.order_index())
            engine.submit({"seed": 7, "guidance_scale": 1.0, "feedback_amount": 0.3})  # fed back too

    with engine:
        _run_until(engine, lambda: engine.stats.replicas == 2, 300.0)
        first = len(recorder.made)
        _run_until(engine, lambda: len(recorder.made) >= first + 30, 120.0, tick=change_once)
        seeded = engine.replicas.serial
        made = recorder.made[first:]
        # a shape change reaches both too: the frames after it are made at the new size
        engine.submit({"resolution": [96, 64]})
        _run_until(engine, lambda: sum(item.serial > seeded for item in recorder.made) >= 8, 120.0)
        resized = [item for item in recorder.made if item.serial > seeded]
        assert {item.replica for item in resized} == {0, 1}
        assert {tuple(item.tensor.shape) for item in resized} == {(1, 3, 64, 96)}
        engine.post.drain(2.0)
        for worker in engine.sinks:
            worker.drain(2.0)
    assert {item.replica for item in made} == {0, 1}  # both made frames
    stamps = [item.meta[0].timestamp for item in made]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # input order, no duplicates
    sent = [frame.timestamp for frame in sink.frames]
    assert sent == sorted(sent) and len(set(sent)) == len(sent)
    assert changed and {item.serial for item in made} >= {seeded}
    # every frame was made with the values the engine had when it sent it (the same frame index on both)
    assert all(item.serial == item.meta[2] for item in made)
    # ... and is bit for bit what one pipeline makes of its input with those values
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_config(overrides=REPLICA_CONFIG)
        reference = open_pipeline(load_models(config.model), PipelineSettings.from_config(config))
        before = [item for item in made if item.serial < seeded][-4:]
        after = [item for item in made if item.serial == seeded][:4]
        assert before and after and {item.replica for item in after} == {0, 1}
        for item in before:
            assert torch.equal(reference(recorder.images[id(item.meta[0])]), item.tensor)
        apply_change(reference, {"seed": 7})
        for item in after:
            assert torch.equal(reference(recorder.images[id(item.meta[0])]), item.tensor)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="stops a replica with SIGSTOP (POSIX)")
def test_a_killed_or_hung_replica_is_taken_out_the_output_flows_and_it_rejoins() -> None:
    sink = RecordingSink()
    engine = _replica_engine(["scale.hang_seconds=1.0"], sink)
    replicas = engine.replicas

    def said(since: int, text: str) -> list[str]:
        return [line for line in list(replicas.events)[since:] if text in line]

    with engine:
        _run_until(engine, lambda: engine.stats.replicas == 2, 300.0)
        for number, sent in ((0, signal.SIGKILL), (1, signal.SIGSTOP)):  # dead, then alive but stuck
            _run_until(engine, lambda: engine.stats.replicas == 2, 300.0)
            since, before = len(replicas.events), len(sink.frames)
            os.kill(replicas.lanes[number].process.pid, sent)
            out, joined = f"replica {number}: out", f"replica {number}: joined"
            _run_until(engine, lambda s=since, t=out: bool(said(s, t)), 60.0)
            if sent is signal.SIGSTOP:
                assert "scale.hang_seconds" in said(since, out)[0]
                stuck = replicas.lanes[number].process
                _run_until(engine, lambda p=stuck: not p.is_alive(), 30.0)  # a stuck process is killed
            _run_until(engine, lambda b=before: len(sink.frames) >= b + 10, 60.0)  # the other plays on
            _run_until(engine, lambda s=since, t=joined: bool(said(s, t)), 300.0)
            assert engine.stats.snapshot()["replicas"] == 2
        assert "replicas 2/2" in engine.stats.status_line()
        assert engine.stats.snapshot()["replica_states"] == ["active", "active"]
    stamps = [frame.timestamp for frame in sink.frames]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    for lane in replicas.lanes:
        assert lane.process is None or not lane.process.is_alive()  # close() ended them


def test_a_device_this_machine_lacks_stops_the_start_with_its_name(tmp_path: Any) -> None:
    from engine.preflight import check_start

    config = load_config(overrides=["scale.replicas=2", "scale.devices=[cpu, cuda:7]", "osc.enabled=false"])
    problems = [str(problem) for problem in check_start(config) if problem.key.startswith("scale")]
    assert len(problems) == 1 and problems[0].startswith("scale.devices[1]: device 'cuda:7' is not available")
    assert not [
        p for p in check_start(load_config(overrides=["scale.devices=[cuda:7]"])) if p.key.startswith("scale")
    ]


def test_one_replica_is_the_engine_itself() -> None:
    from engine.models.loader import load_models
    from engine.runtime.engine import engine_from_config

    config = load_config(overrides=[*REPLICA_CONFIG, "scale.replicas=1", "outputs=[]"])
    with engine_from_config(config, load_models(config.model)) as engine:
        assert engine.replicas is None
        snapshot = engine.stats.snapshot()
        assert snapshot["replicas"] == 1 and snapshot["replicas_configured"] == 1
        assert "replicas" not in engine.stats.status_line()


@pytest.mark.slow
def test_run_demo_with_two_replicas_60_frames(tmp_path: Any, capsys: Any) -> None:
    """The issue's done-when: ``latentstage run --preset demo --replicas 2 --frames 60`` exits 0 and
    says two replicas played; the frames reach the outputs in input order."""
    import uuid

    from bridges.shm import segment_exists
    from engine.cli import main
    from tests.peers import ShmWatcher, demo_args

    shm_name = f"ls_rep_{uuid.uuid4().hex[:8]}"
    watcher = ShmWatcher(shm_name)
    watcher.start()
    extra = ("--replicas", "2", "--set", "logging.level=WARNING", "--set", "scale.hang_seconds=5")
    status = main(demo_args(tmp_path, shm_name, frames=60, extra=extra))
    watcher.stop.set()
    watcher.join(5)
    assert status == 0
    err = capsys.readouterr().err
    assert "stopped: 60 frames out" in err and "replicas 2/2 playing" in err, err
    assert watcher.sequences == sorted(set(watcher.sequences)) and len(watcher.sequences) >= 20
    assert not segment_exists(shm_name)


def test_a_link_error_reads_as_its_gist() -> None:
    from engine.runtime.replicas.wire import link_error

    raw = RuntimeError(
        "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:6055: "
        "Connection reset by peer. This is typically caused by a remote worker crashing."
    )
    assert link_error(raw) == "Read error [127.0.0.1]:6055: Connection reset by peer"
    assert link_error(RuntimeError()) == "RuntimeError"


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (state, parent, ...), or None: no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux: /proc)."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(int(entry))
        if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the replica processes")
def test_replicas_end_when_their_engine_is_killed(tmp_path: Any) -> None:
    """An engine killed with SIGKILL leaves no replica behind (a GPU is not held by an orphan)."""
    import subprocess
    import sys

    args = [
        sys.executable, "-m", "engine.cli", "run", "--preset", "demo", "--replicas", "2", "--quiet",
        "--set", "osc.enabled=false", "--set", "outputs=[]", "--set", "stream.width=64",
        "--set", "stream.height=64", "--set", "scale.hang_seconds=30",
    ]  # fmt: skip
    log = tmp_path / "engine.log"
    with open(log, "wb") as output:
        engine = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while log.read_text(errors="replace").count(": joined on ") < 2:
                assert engine.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            replicas = _children(engine.pid)
            assert len(replicas) >= 2
            engine.kill()
            engine.wait(10)
            deadline = time.monotonic() + 60
            while any(_alive(pid) for pid in replicas):
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            if engine.poll() is None:
                engine.kill()
    assert "this replica ends" in log.read_text(errors="replace")

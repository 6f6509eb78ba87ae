"""`run --supervise`: restarts on a crash or a hang, the autosaved live state, giving up."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import threading
import time
import uuid
from types import SimpleNamespace

import psutil

from bridges.shm import segment_exists
from engine.cli import _restore_and_autosave
from engine.exitcodes import EXIT_SUPERVISOR_GAVE_UP
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.runtime.autosave import Autosaver, LiveStateFile
from engine.runtime.engine import Engine
from engine.runtime.heartbeat import Beat, HeartbeatReceiver, Phase, SupervisorLink
from engine.runtime.supervisor import (
    ChildWatch,
    RestartBudget,
    Supervisor,
    SupervisorSettings,
    child_command,
    describe_exit,
)
from engine.stream.modes import CfgType
from scripts.osc_peer import FeedbackListener, free_port, osc_flags
from tests.fakes import SIZE, FakeSource, RecordingSink, record_durability, wait_until
from tests.peers import decoded_frames, demo_args, kill_quietly, start_engine, wait_for_recording

RESTART_TARGET_S = 10.0


# --------------------------------------------------------------------------- the rules


def test_restart_budget_counts_restarts_inside_the_window():
    budget = RestartBudget(max_restarts=3, window_s=60.0)
    assert [budget.spend(t) for t in (0, 10, 20)] == [True, True, True]
    assert not budget.spend(30)  # a fourth within the minute
    assert budget.spend(60.5)  # the first has left the window
    assert not budget.spend(61)


def test_a_child_hangs_when_its_beats_or_its_loop_stop():
    settings = SupervisorSettings(hang_seconds=10, startup_seconds=100)
    watch = ChildWatch(42, settings, now=0.0)
    assert watch.hang(50.0) is None  # loading, no beat yet, within startup
    assert "no heartbeat within 100 s" in watch.hang(101.0)
    watch.beat(Beat(42, Phase.STARTING, 0, 0, "loading"), 60.0)
    assert watch.hang(65.0) is None
    assert "no heartbeat for 11.0 s" in watch.hang(71.0)
    watch.beat(Beat(42, Phase.RUNNING, 5, 0, "warming"), 70.0)
    watch.beat(Beat(42, Phase.RUNNING, 5, 0, "warming"), 99.0)
    assert watch.hang(99.5) is None  # no first frame yet, but within startup (a compile may run)
    assert "no first frame within 100 s" in watch.hang(100.5)
    watch.beat(Beat(42, Phase.RUNNING, 9, 3, "running"), 100.6)
    assert watch.ran
    watch.beat(Beat(7, Phase.RUNNING, 99, 99, "running"), 105.0)  # another process's beat
    for t in (101.0, 105.0, 110.0):
        watch.beat(Beat(42, Phase.RUNNING, 9, 3, "running"), t)  # beats, but the loop is stuck
    assert watch.hang(110.0) is None
    assert "no frame and no loop progress for 10.5 s" in watch.hang(111.1)


def test_exit_descriptions_and_the_child_command():
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(3) == "exit status 3 (model error)"
    assert describe_exit(1) == "exit status 1"
    assert describe_exit(0xC0000005) == "exit status 0xc0000005"
    first = child_command(["run", "--supervise", "--preset", "demo"], 0, 5000)
    assert first[1:] == [
        "-m",
        "engine.cli",
        "run",
        "--preset",
        "demo",
        "--supervised-by",
        "5000",
        "--restart-count",
        "0",
    ]
    assert child_command(["run", "--supervise"], 2, 5000)[-3:] == ["--restart-count", "2", "--resume"]


# --------------------------------------------------------------------------- stand-in children


def script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


FAST = {"restart_delay_s": 0.05, "stop_timeout_s": 3.0}


def test_it_gives_up_after_max_restarts_in_the_window():
    starts = []
    announced = []

    def command(restarts, port):
        starts.append(restarts)
        return script("import sys; sys.exit(1)")

    supervisor = Supervisor(
        command,
        SupervisorSettings(max_restarts=3, window_minutes=10, **FAST),
        lambda state, restarts, message: announced.append((state, restarts, message)),
    )
    assert supervisor.run() == EXIT_SUPERVISOR_GAVE_UP
    assert starts == [0, 1, 2, 3]
    assert [a[:2] for a in announced] == [
        ("restarting", 1),
        ("restarting", 2),
        ("restarting", 3),
        ("stopped", 3),
    ]
    assert "giving up" in announced[-1][2] and "exit status 1" in announced[-1][2]


def test_a_first_start_that_fails_its_checks_is_not_restarted():
    starts = []

    def command(restarts, port):
        starts.append(restarts)
        return script("import sys; sys.exit(6)")

    assert Supervisor(command, SupervisorSettings(**FAST)).run() == 6
    assert starts == [0]


BEATING_CHILD = """
import json, os, socket, sys, time
port, frames_until = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
loop = 0
while True:
    loop += 1
    moving = loop < frames_until          # then the frame loop is stuck; the beats go on
    beat = {"pid": os.getpid(), "phase": "running", "loop": loop if moving else frames_until,
            "frames": min(loop, frames_until), "state": "running"}
    s.sendto(json.dumps(beat).encode(), ("127.0.0.1", port))
    time.sleep(0.1)
"""


def test_a_stuck_frame_loop_is_killed_and_restarted():
    starts = []

    def command(restarts, port):
        starts.append(time.monotonic())
        if restarts == 0:
            return [sys.executable, "-c", BEATING_CHILD, str(port), "10"]
        return script("import sys; sys.exit(0)")  # the restarted engine ends cleanly

    supervisor = Supervisor(command, SupervisorSettings(hang_seconds=1.0, **FAST))
    assert supervisor.run() == 0
    assert supervisor.restarts == 1
    # the loop stopped after ~1 s: killed after 1 s more, restarted 0.05 s later
    assert starts[1] - starts[0] < 3 * 3.0, starts


FROZEN_CHILD = """
import json, os, socket, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for loop in range(1, 6):
    beat = {"pid": os.getpid(), "phase": "running", "loop": loop, "frames": loop, "state": "running"}
    s.sendto(json.dumps(beat).encode(), ("127.0.0.1", port))
    time.sleep(0.1)
time.sleep(3600)                          # frozen: no beat at all
"""


def test_a_frozen_process_is_killed_and_restarted():
    def command(restarts, port):
        return [sys.executable, "-c", FROZEN_CHILD, str(port)] if restarts == 0 else script("pass")

    supervisor = Supervisor(command, SupervisorSettings(hang_seconds=1.0, **FAST))
    assert supervisor.run() == 0 and supervisor.restarts == 1


def test_stop_asks_the_child_on_its_stdin_and_waits():
    marker = f"/tmp/ls-stopped-{uuid.uuid4().hex[:8]}"
    child = f"""
import sys, time
line = sys.stdin.readline()
open({marker!r}, "w").write(line)
"""
    supervisor = Supervisor(lambda r, p: script(child), SupervisorSettings(**FAST))
    timer = threading.Timer(1.0, supervisor.stop)
    timer.start()
    assert supervisor.run() == 0
    with open(marker) as handle:
        assert handle.read() == "stop\n"


def test_a_supervisor_that_dies_stops_its_child():
    """The child reads EOF on its stdin: its supervisor is gone, so it stops too."""
    stopped = threading.Event()

    class Engine:
        loop_iterations = frames_emitted = 0

        def stop(self):
            stopped.set()

    import os

    read, write = os.pipe()
    with HeartbeatReceiver() as receiver:
        link = SupervisorLink(receiver.port, os.fdopen(read, "rb"), interval_s=0.05)
        try:
            beat = receiver.receive(2.0)
            assert beat is not None and beat.phase == Phase.STARTING and beat.pid == os.getpid()
            link.attach(Engine(), lambda: "running")
            assert wait_until(lambda: (b := receiver.receive(0.5)) is not None and b.phase == Phase.RUNNING)
            os.close(write)
            assert stopped.wait(5) and link.stop_requested.is_set()
        finally:
            link.close()


# --------------------------------------------------------------------------- autosave and restore


def test_live_state_round_trip_is_atomic_and_validated(tmp_path):
    file = LiveStateFile(tmp_path / "state" / "live.json")
    assert file.read() == {}  # nothing saved yet
    file.write(
        {
            "prompt": "a red cube",
            "seed": 7,
            "seed_blend": ((1, 0.5), (2, 0.5)),
            "strength": 0.5,
            "status": None,
            "resolution": [320, 192],
            "pause": True,
        }
    )
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["live.json"]  # no temporary left
    data = json.loads(file.path.read_text())
    assert "strength" not in data["values"] and "status" not in data["values"]
    assert file.read() == {
        "prompt": "a red cube",
        "seed": 7,
        "seed_blend": [(1, 0.5), (2, 0.5)],
        "resolution": [320, 192],
        "pause": True,
    }
    data["values"]["guidance_scale"] = 500  # a hand edit out of range
    data["values"]["rm_rf"] = 1
    file.path.write_text(json.dumps(data))
    assert "guidance_scale" not in file.read() and file.read()["seed"] == 7
    file.path.write_text('{"values": {"prompt": "half a fi')  # a corrupt file never stops a start
    assert file.read() == {}


def test_the_live_state_is_fsynced_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    calls = record_durability(monkeypatch)
    LiveStateFile(tmp_path / "live.json").write({"seed": 7})
    folder_synced = [] if os.name == "nt" else [("fsync", "folder")]  # Windows cannot fsync a folder
    assert calls == [("fsync", "file"), ("replace", "live.json"), *folder_synced]


def test_autosaving_starts_by_removing_what_killed_writes_of_the_state_file_left(tmp_path):
    """The state file may sit in a user's folder: only its own old temporaries go."""
    stale = [tmp_path / ".live.json.k2_x9qzw.tmp", tmp_path / ".live.json.0123abcd.tmp"]
    kept = [tmp_path / ".thesis.docx.0123abcd.tmp", tmp_path / "notes.txt"]
    then = time.time() - 60
    for path in [*stale, *kept]:
        path.write_text("")
        os.utime(path, (then, then))
    engine = SimpleNamespace(control=SimpleNamespace(applied=lambda: {"seed": 3}), on_applied=None)
    _restore_and_autosave(engine, str(tmp_path / "live.json"), resume=False).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["live.json", *(p.name for p in kept)])
    assert LiveStateFile(tmp_path / "live.json").read() == {"seed": 3}


def test_the_autosaver_coalesces_and_writes_the_last_change(tmp_path):
    file = LiveStateFile(tmp_path / "live.json")
    with Autosaver(file, min_interval_s=0.5) as saver:
        for seed in range(50):
            saver.request({"seed": seed})
    assert file.read() == {"seed": 49}
    assert 1 <= saver.writes <= 3


def test_restore_applies_what_it_can_and_reports_the_rest(bundle):
    settings = PipelineSettings(width=SIZE, height=SIZE, t_index_list=[32], cfg_type=CfgType.NONE, prompt="x")
    errors = []
    engine = Engine(StreamPipeline(bundle, settings), lambda: FakeSource(), [("rec", RecordingSink)])
    engine.on_error = errors.append
    applied = engine.restore(
        {"prompt": "a red cube", "seed": 9, "t_index_list": [20, 40], "lora_scales": [0.5], "bypass": True}
    )
    assert engine.pipeline.state["prompt"] == "a red cube" and engine.pipeline.state["seed"] == 9
    assert engine.pipeline.state["t_index_list"] == [20, 40] and engine.runtime_state["bypass"] is True
    assert "lora_scales" not in applied and any("lora_scales" in e for e in errors)
    assert engine.control.applied()["prompt"] == "a red cube"
    engine.close()


# --------------------------------------------------------------------------- end to end


def test_a_killed_engine_comes_back_with_its_prompt(tmp_path):
    shm_name = f"ls_sup_{uuid.uuid4().hex[:8]}"
    osc_port = free_port()
    feedback = FeedbackListener()
    feedback.start()
    state = tmp_path / "state" / "live.json"
    args = demo_args(
        tmp_path,
        shm_name,
        extra=(
            "--supervise",
            "--set",
            "osc.enabled=true",
            *osc_flags(osc_port, feedback.port, status_hz=10),
            "--set",
            f"supervise.state_file={state}",
        ),
    )
    supervisor = start_engine(args)
    children: list[psutil.Process] = []
    try:
        assert wait_until(
            lambda: feedback.values("/engine/state") and feedback.values("/engine/state")[-1] == ["running"],
            90,
        ), supervisor.poll()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as osc:
            from engine.control.transport import build_message

            osc.sendto(build_message("/prompt", ["a red cube"]), ("127.0.0.1", osc_port))
        assert wait_until(lambda: state.exists() and "a red cube" in state.read_text(), 20)
        # a recording keeps what is older than ~1 s: let the first one hold frames before the kill
        wait_for_recording(tmp_path / "demo.mp4", 60)
        children = psutil.Process(supervisor.pid).children()
        assert len(children) == 1
        children[0].kill()
        killed_at = time.monotonic()
        # back: the restarted engine echoes the restored prompt and says it was restarted once
        assert wait_until(
            lambda: (
                ["a red cube"] in feedback.values("/prompt", killed_at)
                and [1] in feedback.values("/engine/restarts", killed_at)
                and ["running"] in feedback.values("/engine/state", killed_at)
            ),
            3 * RESTART_TARGET_S,
        )
        back_after = (
            min(
                t
                for t, a, v in feedback.messages
                if a == "/engine/state" and v == ["running"] and t > killed_at
            )
            - killed_at
        )
        assert ["restarting"] in feedback.values("/engine/state", killed_at)
        new_children = psutil.Process(supervisor.pid).children()
        assert len(new_children) == 1 and new_children[0].pid != children[0].pid
        children += new_children
        supervisor.send_signal(signal.SIGTERM)  # a clean stop of both
        _, err = supervisor.communicate(timeout=30)
    finally:
        kill_quietly(supervisor)
        for child in children:
            if child.is_running():
                child.kill()
        feedback.close()
    print(f"supervisor: running again {back_after:.1f} s after SIGKILL (target {RESTART_TARGET_S} s)")
    assert supervisor.returncode == 0, err[-3000:]
    assert "restart 1" in err and "restored" in err and "(prompt 'a red cube')" in err
    assert not any(child.is_running() for child in children)
    # the restarted engine took over the segment the killed one left, and released it at the stop
    assert not segment_exists(shm_name)
    # the killed engine's recording decodes; the restarted engine recorded into a new take
    assert decoded_frames(tmp_path / "demo.mp4") > 0 and decoded_frames(tmp_path / "demo-2.mp4") > 0

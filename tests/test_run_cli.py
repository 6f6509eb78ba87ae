"""`latentstage run` end to end: the demo preset into record + shm sinks, bridges, doctor."""

from __future__ import annotations

import logging
import re
import sys
import uuid

import av
import pytest

from bridges.shm import segment_exists
from engine.cli import main
from tests.peers import ShmWatcher, demo_args


def test_demo_run_60_frames_into_record_and_shm(tmp_path, capsys, caplog):
    shm_name = f"ls_e2e_{uuid.uuid4().hex[:8]}"
    watcher = ShmWatcher(shm_name)
    watcher.start()
    with caplog.at_level(logging.INFO, logger="bridges.record"):
        status = main(demo_args(tmp_path, shm_name, frames=60))
    watcher.stop.set()
    watcher.join(5)
    assert status == 0
    err = capsys.readouterr().err
    summary = re.search(r"stopped: (\d+) frames out, (\d+) in, latency ([\d.]+) ms", err)
    assert summary, err
    frames_out, frames_in, latency = int(summary[1]), int(summary[2]), float(summary[3])
    assert frames_out == 60 and frames_in >= 60 and 0 < latency < 10_000
    with av.open(str(tmp_path / "demo.mp4")) as container:
        decoded = list(container.decode(video=0))
    # the file plays at the speed of the show, whatever rate this machine ran the engine at:
    # it lasts the wall time it covers (half a frame either way, plus the frame at the end)
    wrote = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote ")]
    timing = re.search(r": ([\d.]+) s covering ([\d.]+) s of wall time, (\d+) frames", wrote[-1])
    assert timing, wrote
    seconds, covered, written = float(timing[1]), float(timing[2]), int(timing[3])
    assert len(decoded) == written and seconds == pytest.approx(written / 30, abs=0.006)
    assert -0.5 / 30 - 0.01 <= seconds - covered <= 1.5 / 30 + 0.01, (seconds, covered)
    # 64x64 upsampled by the demo's output_scale 4
    assert (decoded[0].width, decoded[0].height) == (256, 256)
    assert watcher.sequences == sorted(set(watcher.sequences)), "shm frames arrive in order"
    assert len(watcher.sequences) >= 30, f"reader saw {len(watcher.sequences)} of 60"
    assert not segment_exists(shm_name), "the writer's segment is released at exit"


def test_missing_sdk_is_one_clear_error(tmp_path, capsys):
    if sys.platform == "win32":
        pytest.skip("Spout exists on Windows")
    status = main(["run", "--preset", "demo", "--set", "outputs=[{type: spout}]", "--frames", "1"])
    assert status == 4
    err = capsys.readouterr().err
    assert "spout" in err.lower() and "latentstage[spout]" in err


def test_bridges_and_doctor_commands(capsys):
    assert main(["bridges"]) == 0
    out = capsys.readouterr().out
    for name in ("pattern", "video", "record", "shm", "ndi", "spout", "syphon", "preview"):
        assert re.search(rf"^{name}\s", out, re.M), name
    assert re.search(r"^pattern\s+in\s+-\s+yes", out, re.M)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device auto" in out and "tensorrt" in out and "bridge ndi" in out
    assert re.search(r"^bridge preview ok$", out, re.M), "a space after the longest name"
    assert re.search(r"^midi\s+mido ", out, re.M)


def test_bad_run_arguments(capsys):
    assert main(["run", "--preset", "demo", "--frames", "0"]) == 2
    assert main(["run", "--set", "stream.cfg_type=bogus"]) == 2
    assert "cfg_type" in capsys.readouterr().err


def test_a_failing_recording_is_never_overwritten(tmp_path, monkeypatch):
    """Regression: the runtime reopened a failed record sink on the same path, truncating it."""
    from bridges.base import BridgeError
    from bridges.record import RecordSink, numbered_path

    assert numbered_path("out/take.mp4", 2) == "out/take-2.mp4"
    assert numbered_path("take", 3) == "take-3"
    original_send = RecordSink.send
    calls = {"n": 0}

    def flaky_send(self, frame):
        calls["n"] += 1
        if calls["n"] == 20:
            raise BridgeError("disk hiccup")
        original_send(self, frame)

    monkeypatch.setattr(RecordSink, "send", flaky_send)
    args = [
        "run",
        "--preset",
        "demo",
        "--quiet",
        "--frames",
        "40",
        "--set",
        "stream.width=64",
        "--set",
        "stream.height=64",
        "--set",
        f"outputs=[{{type: record, path: '{tmp_path / 'take.mp4'}'}}]",
        "--set",
        "osc.enabled=false",
        "--set",
        "input.retry_seconds=0.1",
    ]
    assert main(args) == 0
    first, second = tmp_path / "take.mp4", tmp_path / "take-2.mp4"
    assert first.exists() and second.exists()
    with av.open(str(first)) as container:
        assert sum(1 for _ in container.decode(video=0)) >= 15  # kept, not truncated


def test_export_chatter_stays_out_of_the_log_at_info():
    """onnx_ir logged one INFO line per deduplicated initializer: 451 lines for one tiny export."""
    import logging

    from engine.cli import _configure_logging

    root = logging.getLogger()
    level = root.level
    try:
        _configure_logging("INFO", None)
        assert not logging.getLogger("onnx_ir.passes.common").isEnabledFor(logging.INFO)
        assert logging.getLogger("onnx_ir").isEnabledFor(logging.WARNING)
        assert logging.getLogger("engine.accel.onnx_export").isEnabledFor(logging.INFO)
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")
        def record(text: str) -> logging.LogRecord:
            return logging.LogRecord(registration.name, logging.WARNING, __file__, 1, text, (), None)

        notice = record("torchvision is not installed. Skipping torchvision::nms")
        other = record("opset 99 is odd")
        assert not registration.filter(notice) and registration.filter(other)
        _configure_logging("DEBUG", None)
        assert logging.getLogger("onnx_ir.passes.common").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(level)
        for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_a_reader_that_goes_away_early_is_no_traceback():
    """``latentstage params | head -1``: the pipe closes while the command still writes; the
    command ends quietly (it printed a BrokenPipeError traceback before)."""
    import subprocess
    import sys

    command = [sys.executable, "-c", "from engine.cli import console_main; console_main()", "params"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before the command writes (it imports first)
    error = proc.stderr.read().decode()
    proc.wait(60)
    assert "Traceback" not in error and "BrokenPipeError" not in error, error

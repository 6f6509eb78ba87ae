"""`latentstage bench` prints every group of ratios (a behaviour check, not a timing)."""

from __future__ import annotations

import re

from engine.cli import main


def test_bench_prints_all_groups(capsys, tmp_path):
    args = ["bench", "--preset", "demo", "--frames", "2", "--warmup", "1", "--steps", "1"]
    args += ["--set", "stream.width=64", "--set", "stream.height=64"]
    args += ["--set", f"acceleration.engine_dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in (
        "sequential n=1",
        "stream batch n=1",
        "cfg full (batch 4)",
        "cfg self (batch 2)",
        "filter on",
        "torch eager",
    ):
        assert name in out, name
    rows = [line for line in out.splitlines() if re.search(r"\d+\.\d\dx$", line)]
    assert len(rows) >= 8
    assert all(float(line.split()[-1].rstrip("x")) > 0 for line in rows)


def test_bench_refuses_bad_steps(capsys):
    assert main(["bench", "--preset", "demo", "--steps", "0,2"]) == 2
    assert main(["bench", "--preset", "demo", "--steps", "a"]) == 2

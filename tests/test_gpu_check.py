"""scripts/gpu-check.sh: its --cpu dry run measures every section and writes the JSON and the table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def _run(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cpu_dry_run_passes_and_reports_every_section(tmp_path: Path) -> None:
    result = _run("--cpu", out=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert data["errors"] == []
    precision = data["sections"]["precision"]
    assert precision["dtype"] == "bfloat16"
    expected = {"latentstage", "floor", "diffusers", "diffusers_taesd"}
    if importlib.util.find_spec("streamdiffusion") is not None:
        expected.add("streamdiffusion")
    for n in (1, 2):
        assert precision[f"n={n}"]["nonfinite"] == 0
        assert 0 < precision[f"n={n}"]["max_abs"] < 0.5  # low precision differs, but not wildly
        peers = data["sections"][f"peers n={n}"]
        assert {row["key"] for row in peers["rows"]} == expected
        accel = data["sections"][f"accel n={n}"]
        assert [row["key"] for row in accel["rows"]] == ["eager", "compile"]
        for row in peers["rows"] + accel["rows"]:
            assert row["ms"] > 0 and len(row["round_ms"]) == 3
        assert accel["versus_eager"]["compile"]["max_abs"] < 1e-4  # compiled = eager's frames
        assert accel["first_frames_s"]["compile"] > 0
    assert "cuda graphs: needs CUDA" in data["skipped"]
    table = (tmp_path / "gpu-check.md").read_text()
    assert "| accel n=2 | latentstage, torch compile |" in table and "bfloat16 vs float32" in table
    assert "| peers n=1 | diffusers img2img (defaults) |" in table
    tests = (tmp_path / "sdk-tests.txt").read_text()
    assert "skipped" in tests and "failed" not in tests
    replicas = json.loads((tmp_path / "replicas.json").read_text())["replicas"]
    assert [row["replicas"] for row in replicas] == [1, 2] and all(row["fps"] > 0 for row in replicas)


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    result = _run("--gpu-please", out=tmp_path)
    assert result.returncode == 2
    assert "unknown option '--gpu-please'; allowed: --cpu, --fetch-wheels" in result.stderr

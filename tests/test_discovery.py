"""Tests of bridges.discovery and `latentstage sources`: names, shm, media files, NDI, stand-in SDKs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bridges import discovery, ndi, shm, spout, syphon
from bridges.base import Frame
from bridges.discovery import (
    Discovery,
    SourceInfo,
    SourceKind,
    discover,
    find_files,
    find_shm,
    media_path,
    parse_source_name,
)
from bridges.shm import ShmHeader, ShmWriter, segment_exists
from engine.cli import main
from engine.config import media_dir

REPO = Path(__file__).resolve().parents[1]
ON_LINUX = sys.platform.startswith("linux") and Path("/dev/shm").is_dir()


def test_importing_discovery_imports_no_sdk_engine_or_torch() -> None:
    code = (
        "import sys, bridges.discovery; print([m for m in ('cyndilib', 'SpoutGL', 'syphon', 'objc', "
        "'av', 'engine', 'torch') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "[]"


# --- selectable names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "rest"),
    [
        ("pattern", SourceKind.PATTERN, ""),
        ("ndi:STUDIO (TouchDesigner)", SourceKind.NDI, "STUDIO (TouchDesigner)"),
        ("spout:TDSyphonSpoutOut", SourceKind.SPOUT, "TDSyphonSpoutOut"),
        ("syphon:Resolume - Out 1", SourceKind.SYPHON, "Resolume - Out 1"),
        ("shm:latentstage_in", SourceKind.SHM, "latentstage_in"),
        ("file:clip one.MP4", SourceKind.FILE, "clip one.MP4"),
        ("ndi:HOST (a:b)", SourceKind.NDI, "HOST (a:b)"),  # only the first ':' splits
    ],
)
def test_parse_good_names(name: str, kind: SourceKind, rest: str) -> None:
    assert parse_source_name(name) == (kind, rest)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("ndi:", "empty"),
        ("ndi:   ", "empty"),
        ("webcam:0", "unknown kind 'webcam'"),
        ("TouchDesigner", "no kind prefix"),
        ("", "no kind prefix"),
        ("pattern:x", "takes no name"),
        ("file:../secret.mp4", "not a path"),
        ("file:/etc/passwd", "not a path"),
        ("file:media\\a.mp4", "not a path"),
        ("file:..", "hidden"),
        ("file:.hidden.mp4", "hidden"),
        ("file:notes.txt", "not a video file"),
        ("file:mp4", "not a video file"),
        ("shm:a/b", "segment name"),
        ("shm:_x", "segment name"),
        ("spout:" + "x" * 256, "at most 255 bytes"),
        ("ndi:HOST\n(x)", "control character"),
        ("ndi: HOST (x)", "spaces at either end"),
        ("ndi:" + "x" * 300, "longer than"),
    ],
)
def test_parse_bad_names_say_what_is_allowed(name: str, problem: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_source_name(name)
    message = str(err.value)
    assert repr(name) in message and problem in message and "allowed:" in message
    assert "ndi:<NDI source name>" in message and "file:<video file name>" in message


def test_listed_names_parse_back() -> None:
    infos = [
        discovery.find_pattern()[0],
        discovery.ndi_info("STUDIO (TouchDesigner)", "other"),
        discovery.spout_info("TDSyphonSpoutOut", (1280, 720), active=True),
        *discovery.syphon_infos([("Out 1", "Resolume"), ("", "Madmapper")]),
    ]
    for info in infos:
        kind, _ = parse_source_name(info.name)
        assert kind is info.kind


def test_media_path_stays_in_the_folder(tmp_path: Path) -> None:
    assert media_path(tmp_path, "a.mp4") == tmp_path / "a.mp4"
    for bad in ("../a.mp4", "sub/a.mp4", ".a.mp4", "a.txt"):
        with pytest.raises(ValueError, match="media file"):
            media_path(tmp_path, bad)


# --- shared memory ----------------------------------------------------------------------------


def _segment_name() -> str:
    return f"lsd{os.getpid()}_{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _foreign_segment(data: bytes) -> Iterator[str]:
    """A shared-memory segment that is not a latentstage frame segment."""
    name = _segment_name()
    segment = SharedMemory(name=name, create=True, size=max(len(data), 64))
    try:
        assert segment.buf is not None
        segment.buf[: len(data)] = data
        yield name
    finally:
        segment.close()
        segment.unlink()


@pytest.mark.skipif(not ON_LINUX, reason="only Linux lists shared-memory segments (/dev/shm)")
def test_two_shm_writers_are_listed_with_their_sizes_and_the_pattern() -> None:
    first, second = _segment_name(), _segment_name()
    with (
        ShmWriter(first, 64, 32) as one,
        ShmWriter(second, 16, 8),
        _foreign_segment(b"NOTOURS!" + bytes(56)) as foreign,
        _foreign_segment(bytes(64)) as creating,  # magic not written yet
    ):
        one.write(np.zeros((32, 64, 4), np.uint8))
        found = discover([SourceKind.PATTERN, SourceKind.SHM])
    assert found.unavailable == {}
    by_name = {source.name: source for source in found.sources}
    assert "pattern" in by_name
    assert f"shm:{foreign}" not in by_name and f"shm:{creating}" not in by_name
    assert by_name[f"shm:{first}"].kind is SourceKind.SHM
    assert by_name[f"shm:{first}"].label == first
    assert by_name[f"shm:{first}"].detail.startswith("64x32 RGBA8, our shm writer")
    assert "last frame" in by_name[f"shm:{first}"].detail
    assert by_name[f"shm:{second}"].detail.startswith("16x8 RGBA8, our shm writer")
    assert "no frame yet" in by_name[f"shm:{second}"].detail
    assert f"pid {os.getpid()})" in by_name[f"shm:{second}"].detail
    assert not segment_exists(first) and not segment_exists(second), "listing leaves nothing behind"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_segment_files_read_from_their_header(tmp_path: Path) -> None:
    now = time.time_ns()

    def segment(name: str, header: bytes, pixels: int = 16 * 8 * 4) -> None:
        (tmp_path / name).write_bytes(header + bytes(pixels))

    segment(
        "live",
        ShmHeader(
            16, 8, writer_pid=os.getpid(), sequence=10, timestamp_ns=now - 200_000_000, segment_id=1
        ).pack(),
    )
    segment("retired", ShmHeader(16, 8, flags=shm.FLAG_RETIRED, writer_pid=os.getpid(), segment_id=2).pack())
    segment(
        "orphan", ShmHeader(16, 8, writer_pid=_dead_pid(), sequence=2, timestamp_ns=now, segment_id=3).pack()
    )
    segment(
        "bgra",
        ShmHeader(4, 2, shm.ShmPixelFormat.BGRA8, writer_pid=os.getpid(), segment_id=4).pack(),
        4 * 2 * 4,
    )
    bad = bytearray(ShmHeader(16, 8, segment_id=5).pack())
    struct.pack_into("<I", bad, 12, 0)  # width 0
    segment("broken", bytes(bad))
    segment("short", ShmHeader(16, 8, segment_id=6).pack(), 10)  # smaller than the header says
    segment("other", b"SQLite format 3\0" + bytes(48))
    segment("empty", b"", 0)
    segment(".hidden", ShmHeader(16, 8, segment_id=7).pack())
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "live")

    found = {info.label: info.detail for info in find_shm(tmp_path)}
    assert set(found) == {"live", "retired", "orphan", "bgra", "broken", "short"}
    assert found["live"].startswith(f"16x8 RGBA8, our shm writer (pid {os.getpid()}), last frame")
    assert found["live"].endswith(" s ago")
    assert found["retired"] == "16x8 RGBA8, retired: its writer closed or replaced it"
    assert ", gone)" in found["orphan"]
    assert found["bgra"].startswith("4x2 BGRA8")
    assert found["broken"].startswith("not readable here: bad frame size 0x8")
    assert found["short"].startswith("not readable here:") and "smaller" in found["short"]


@pytest.mark.parametrize(("platform", "word"), [("darwin", "macOS"), ("win32", "Windows")])
def test_shm_cannot_be_listed_on_macos_and_windows(
    monkeypatch: pytest.MonkeyPatch, platform: str, word: str
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    found = discover(["shm", "pattern"])
    assert found.names() == ["pattern"]
    assert word in found.unavailable[SourceKind.SHM]
    assert "shm:NAME" in found.unavailable[SourceKind.SHM]


# --- media files ------------------------------------------------------------------------------


def test_media_folder_lists_video_files_by_name_only(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.mp4").write_bytes(b"x" * 2_500_000)
    (media / "b.txt").write_text("not a video")
    (media / ".hidden.mp4").write_bytes(b"x")
    (media / "sub").mkdir()
    (media / "sub" / "c.mp4").write_bytes(b"x")
    (media / "folder.mov").mkdir()  # a folder with a video's name
    found = discover(["file"], media_dir=media)
    assert found.names() == ["file:a.mp4"]
    assert found.unavailable == {}
    info = found.sources[0]
    assert info.kind is SourceKind.FILE and info.label == "a.mp4"
    assert info.detail.startswith("2.5 MB")
    assert str(tmp_path) not in json.dumps(found.as_json()), "no path leaves discovery"


def test_media_file_without_pyav_is_listed_as_not_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.webm").write_bytes(b"x")
    monkeypatch.setattr(discovery.video, "unavailable_reason", lambda: "PyAV is not installed")
    [info] = find_files(tmp_path)
    assert info.detail.endswith("not readable here: PyAV is not installed")


def test_missing_media_folder_is_a_reason_not_an_error(tmp_path: Path) -> None:
    found = discover(["file", "pattern"], media_dir=tmp_path / "nowhere")
    assert found.names() == ["pattern"]
    assert found.unavailable == {SourceKind.FILE: "the media folder does not exist"}
    assert discover(["file"]).unavailable == {SourceKind.FILE: "no media folder given"}


def test_media_dir_beside_the_config_else_beside_the_presets(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    assert media_dir(config) == REPO / "media"  # no local media/ or presets/: the repository's
    (tmp_path / "presets").mkdir()
    assert media_dir(config) == tmp_path / "media"  # beside the presets used
    (tmp_path / "presets").rmdir()
    (tmp_path / "media").mkdir()
    assert media_dir(config) == tmp_path / "media"


# --- Discovery as a whole ---------------------------------------------------------------------


def test_kinds_in_order_and_unknown_kind_named() -> None:
    found = discover(["pattern", SourceKind.PATTERN])
    assert found.names() == ["pattern"] and found.unavailable == {}
    with pytest.raises(ValueError, match="unknown source kind 'webcam'; allowed: pattern, ndi"):
        discover(["webcam"])


def test_a_failing_kind_does_not_end_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[SourceInfo]:
        raise OSError("disk on fire")

    monkeypatch.setattr(discovery, "find_pattern", broken)
    found = discover(["pattern", "file"])
    assert found.sources == []
    assert found.unavailable[SourceKind.PATTERN] == "discovery failed: OSError: disk on fire"


def test_missing_ndi_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ndi, "unavailable_reason", lambda: "cyndilib is not installed")
    found = discover(["ndi", "pattern"], timeout=0)
    assert found.names() == ["pattern"]
    assert found.unavailable == {SourceKind.NDI: "cyndilib is not installed; pip install latentstage[ndi]"}


def test_as_json() -> None:
    found = Discovery([discovery.find_pattern()[0]], {SourceKind.SPOUT: "Spout needs Windows"})
    assert found.as_json() == {
        "sources": [
            {
                "name": "pattern",
                "kind": "pattern",
                "label": "test pattern",
                "detail": "built in, moving colour pattern",
            }
        ],
        "unavailable": {"spout": "Spout needs Windows"},
    }


# --- NDI, Spout, Syphon: what is made of the SDKs' answers ------------------------------------


def test_ndi_labels() -> None:
    here = discovery.ndi_info("STUDIO (TouchDesigner)", "studio")
    assert here == SourceInfo(
        "ndi:STUDIO (TouchDesigner)", SourceKind.NDI, "TouchDesigner on STUDIO", "NDI sender on this machine"
    )
    there = discovery.ndi_info("STAGE-PC (Resolume Arena)", "studio")
    assert there.label == "Resolume Arena on STAGE-PC" and there.detail == "NDI sender on the network"
    assert discovery.ndi_info("odd name", "studio").label == "odd name"


def test_spout_and_syphon_labels() -> None:
    assert discovery.spout_info("TD", (1280, 720), active=True).detail == "1280x720, the active sender"
    assert discovery.spout_info("TD", None, active=False).detail == "size unknown"
    infos = discovery.syphon_infos([("Out 1", "Resolume"), ("", "Madmapper"), ("Out 1", "Resolume")])
    assert [(i.name, i.label, i.detail) for i in infos] == [
        ("syphon:Madmapper", "Madmapper", "Syphon server of Madmapper"),
        ("syphon:Resolume - Out 1", "Resolume - Out 1", "Syphon server of Resolume"),
    ]
    assert syphon.match_server("Resolume - Out 1", [("Out 1", "Resolume")]) == 0, "the name opens it"


@pytest.mark.parametrize(
    ("kind", "platform", "reason"),
    [
        (SourceKind.SPOUT, "linux", "Spout needs Windows"),
        (SourceKind.SPOUT, "darwin", "Spout needs Windows"),
        (SourceKind.SYPHON, "linux", "Syphon needs macOS"),
        (SourceKind.SYPHON, "win32", "Syphon needs macOS"),
    ],
)
def test_spout_and_syphon_wrong_platform(
    monkeypatch: pytest.MonkeyPatch, kind: SourceKind, platform: str, reason: str
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    assert discover([kind]).unavailable == {kind: reason}


@pytest.mark.parametrize(
    ("kind", "platform", "sdk", "reason"),
    [
        (SourceKind.SPOUT, "win32", "SpoutGL", "SpoutGL is not installed; pip install latentstage[spout]"),
        (
            SourceKind.SYPHON,
            "darwin",
            "syphon",
            "syphon-python is not installed; pip install latentstage[syphon]",
        ),
    ],
)
def test_spout_and_syphon_missing_sdk(
    monkeypatch: pytest.MonkeyPatch, kind: SourceKind, platform: str, sdk: str, reason: str
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setitem(sys.modules, sdk, None)
    assert discover([kind]).unavailable == {kind: reason}


class _FakeSpoutReceiver:
    released = 0

    def getActiveSender(self) -> str | None:
        return "TD"

    def getSenderList(self) -> list[str]:
        return ["TD", "Resolume", "gone"]

    def getSenderInfo(self, name: str) -> Any:
        sizes = {"TD": (1280, 720), "Resolume": (1920, 1080)}
        if name not in sizes:
            return None
        return types.SimpleNamespace(name="", width=sizes[name][0], height=sizes[name][1])

    def releaseReceiver(self) -> None:
        _FakeSpoutReceiver.released += 1


def test_spout_flow_against_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(spout, "unavailable_reason", lambda: None)
    monkeypatch.setattr(
        spout, "load_spoutgl", lambda what: types.SimpleNamespace(SpoutReceiver=_FakeSpoutReceiver)
    )
    found = discover(["spout"])
    assert [(i.name, i.detail) for i in found.sources] == [
        ("spout:TD", "1280x720, the active sender"),
        ("spout:Resolume", "1920x1080"),
        ("spout:gone", "size unknown"),
    ]
    assert _FakeSpoutReceiver.released == 1


def test_syphon_flow_against_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[float] = []

    class Directory:
        run_loop_interval = 1.0

        @property
        def servers(self) -> list[Any]:
            reads.append(self.run_loop_interval)
            time.sleep(0.01)
            if len(reads) < 3:  # announcements arrive while the run loop runs
                return []
            return [types.SimpleNamespace(name="Out 1", app_name="Resolume", uuid="u1")]

    sdk = types.SimpleNamespace(
        syphon=types.SimpleNamespace(SyphonServerDirectory=Directory), errors=(RuntimeError,)
    )
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(syphon, "unavailable_reason", lambda: None)
    monkeypatch.setattr(syphon, "load_syphon", lambda what: sdk)
    found = discover(["syphon"], timeout=0.2)
    assert found.names() == ["syphon:Resolume - Out 1"]
    assert len(reads) >= 3 and set(reads) == {syphon.RUN_LOOP_INTERVAL}


# --- the command line -------------------------------------------------------------------------


@pytest.mark.skipif(not ON_LINUX, reason="only Linux lists shared-memory segments (/dev/shm)")
def test_cli_sources_json(capsys: pytest.CaptureFixture[str]) -> None:
    name = _segment_name()
    with ShmWriter(name, 32, 16):
        assert main(["sources", "--json", "--kinds", "pattern,shm"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [source["name"] for source in out["sources"]]
    assert names[0] == "pattern" and f"shm:{name}" in names
    mine = next(source for source in out["sources"] if source["name"] == f"shm:{name}")
    assert mine["kind"] == "shm" and mine["detail"].startswith("32x16 RGBA8")
    assert out["unavailable"] == {}


def test_cli_sources_plain_with_a_media_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "intro.mov").write_bytes(b"x" * 1000)
    args = ["sources", "--config", str(tmp_path / "config.yaml"), "--kinds", "file,pattern,spout,syphon"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"pattern\s+test pattern\s+built in, moving colour pattern", lines[0])
    assert re.fullmatch(r"file:intro\.mov\s+intro\.mov\s+0\.0 MB(, not readable here: .*)?", lines[1])
    if sys.platform not in ("win32", "darwin"):
        assert lines[2:] == [
            "spout: not available (Spout needs Windows)",
            "syphon: not available (Syphon needs macOS)",
        ]


def test_cli_sources_missing_media_folder_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "presets").mkdir()
    assert main(["sources", "--config", str(tmp_path / "config.yaml"), "--kinds", "file"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"file: not available (the media folder does not exist; put video files in {tmp_path / 'media'})"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kinds", "pattern,webcam"], "--kinds 'webcam': allowed: pattern, ndi, spout, syphon, shm, file"),
        (["--kinds", ","], "names no kind"),
        (["--timeout", "-1"], "--timeout -1: allowed: 0 to 60 seconds"),
        (["--set", "nope=1"], "configuration error"),
    ],
)
def test_cli_sources_bad_arguments(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["sources", *args]) == 2
    assert message in capsys.readouterr().err


# --- NDI for real, on loopback ----------------------------------------------------------------

NEEDS_NDI = pytest.mark.skipif(
    ndi.unavailable_reason() is not None, reason=f"cyndilib cannot be imported: {ndi.unavailable_reason()}"
)


def _ndi_child(result_path: str) -> None:
    """Runs in a fresh process whose NDI_CONFIG_DIR points discovery at 127.0.0.1."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    names = [f"latentstage-disc-a-{tag}", f"latentstage-disc-b-{tag}"]
    sinks = [ndi.NdiSink(name) for name in names]
    result: dict[str, Any] = {"names": names, "rounds": 0}
    try:
        for sink in sinks:  # a sink's sender is created (and announced) with its first frame
            sink.send(Frame(np.zeros((8, 8, 4), np.uint8)))
        result["full_names"] = [sink.source_name for sink in sinks]
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            found = discover(["ndi"], timeout=1.0)
            result["rounds"] += 1
            result["sources"] = [info.as_json() for info in found.sources]
            result["unavailable"] = {k.value: v for k, v in found.unavailable.items()}
            if set(result["full_names"]) <= {info["name"][4:] for info in result["sources"]}:
                break
    finally:
        for sink in sinks:
            sink.close()
        Path(result_path).write_text(json.dumps(result))


@NEEDS_NDI
def test_two_ndi_senders_are_discovered(tmp_path: Path) -> None:
    config = tmp_path / "ndi"
    config.mkdir()
    (config / "ndi-config.v1.json").write_text(
        json.dumps({"ndi": {"networks": {"ips": "127.0.0.1", "discovery": ""}}})
    )
    result_path = tmp_path / "result.json"
    env = {**os.environ, "NDI_CONFIG_DIR": str(config), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, __file__, "--ndi", str(result_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result_path.exists(), f"child failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(result_path.read_text())
    assert proc.returncode == 0, f"child failed: {result}\n{proc.stderr}"
    assert result["unavailable"] == {}
    by_name = {info["name"]: info for info in result["sources"]}
    for short, full in zip(result["names"], result["full_names"], strict=True):
        assert full.endswith(f"({short})")
        info = by_name[f"ndi:{full}"]
        assert info["kind"] == "ndi" and info["label"].startswith(f"{short} on ")
        assert info["detail"] == "NDI sender on this machine"
        assert parse_source_name(info["name"]) == (SourceKind.NDI, full)


if __name__ == "__main__" and sys.argv[1:2] == ["--ndi"]:
    _ndi_child(sys.argv[2])

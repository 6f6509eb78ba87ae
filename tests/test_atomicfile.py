"""Atomic files: temporary file, fsync, rename, folder fsync; the leftovers of interrupted saves."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from engine import atomicfile
from engine.accel import cache
from engine.atomicfile import STALE_AFTER_S, atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from tests.fakes import record_durability

POSIX = pytest.mark.skipif(os.name == "nt", reason="Windows cannot fsync a folder")
DURABLE = [("fsync", "file"), ("replace", "a.bin"), ("fsync", "folder")]


def stale(path: Path, seconds: float = STALE_AFTER_S + 60) -> Path:
    """Create ``path`` (empty) unless it exists and set its mtime ``seconds`` into the past."""
    if not path.exists() and not path.is_symlink():
        path.write_bytes(b"")
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=not path.is_symlink())
    return path


@POSIX
def test_a_write_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = record_durability(monkeypatch)
    path = atomic_write_bytes(tmp_path / "new" / "a.bin", b"data")
    assert calls == DURABLE
    assert path.read_bytes() == b"data"
    assert [p.name for p in path.parent.iterdir()] == ["a.bin"]  # no temporary left


def test_the_engine_cache_writes_through_the_same_helper():
    assert cache.atomic_write_bytes is atomicfile.atomic_write_bytes
    assert cache.atomic_write_text is atomicfile.atomic_write_text


def test_the_temporary_file_is_named_after_its_target(tmp_path, monkeypatch):
    seen = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), replace(src, dst)))
    atomic_write_text(tmp_path / "live.json", "{}")
    assert re.fullmatch(r"\.live\.json\.[0-9a-f]{8}\.tmp", seen[0])
    assert atomicfile.TEMPORARY.fullmatch(seen[0])["target"] == "live.json"  # type: ignore[index]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_removes_its_temporary_and_raises(tmp_path, monkeypatch, failing):
    target = atomic_write_text(tmp_path / "a.bin", "old")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_the_folder_is_not_opened_on_windows(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(os, "open", lambda *args: opened.append(args))
    monkeypatch.setattr(os, "name", "nt")
    atomicfile.fsync_folder(tmp_path)
    assert opened == []


def test_stale_temporaries_of_ours_go_and_everything_else_stays(tmp_path):
    ours = [
        stale(tmp_path / ".a.bin.0123abcd.tmp"),  # written by atomic_write_bytes
        stale(tmp_path / ".intro.k2_x9qzw.tmp"),  # tempfile.mkstemp, as scenes were saved before
        stale(tmp_path / ".live.json.abcdefgh.tmp"),  # tempfile.mkstemp, as autosave wrote before
    ]
    fresh = stale(tmp_path / ".b.bin.89abcdef.tmp", 1.0)  # another engine saving right now
    folder = tmp_path / ".scene.0123abcd.tmp"  # an ONNX export stages in folders named like this
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"x")
    others = [
        stale(tmp_path / "notes.txt"),
        stale(tmp_path / ".hidden.tmp"),
        stale(tmp_path / ".a.bin.0123abc.tmp"),  # 7 characters
        stale(tmp_path / ".a.bin.0123ABCD.tmp"),  # neither form writes capitals
        stale(tmp_path / "a.bin.0123abcd.tmp"),  # not hidden
        stale(tmp_path / ".a.bin.0123abcd.tmp.bak"),
        stale(folder),
    ]
    if os.name != "nt":  # creating a symlink on Windows needs a privilege
        link = tmp_path / ".c.bin.0123abcd.tmp"
        link.symlink_to(tmp_path / "notes.txt")
        others.append(stale(link))

    assert remove_stale_temporaries(tmp_path) == len(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [fresh, *others])
    assert (folder / "model.onnx").exists() and (tmp_path / "notes.txt").exists()
    assert remove_stale_temporaries(tmp_path, older_than_s=0) == 1  # the fresh one, when asked


def test_target_names_restrict_what_goes(tmp_path):
    stale(tmp_path / ".live.json.0123abcd.tmp")
    theirs = stale(tmp_path / ".thesis.docx.0123abcd.tmp")  # a user's folder: another program's file
    assert remove_stale_temporaries(tmp_path, ["live.json"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [theirs.name]
    assert remove_stale_temporaries(tmp_path, lambda name: name.endswith(".pdf")) == 0
    assert [p.name for p in tmp_path.iterdir()] == [theirs.name]


def test_a_missing_or_odd_folder_removes_nothing_and_never_raises(tmp_path):
    assert remove_stale_temporaries(tmp_path / "missing") == 0
    (tmp_path / "file").write_text("")
    assert remove_stale_temporaries(tmp_path / "file") == 0


def test_removal_logs_one_line_with_the_count(tmp_path, caplog):
    stale(tmp_path / ".a.bin.0123abcd.tmp")
    stale(tmp_path / ".b.bin.0123abcd.tmp")
    with caplog.at_level("INFO", logger="engine.atomicfile"):
        assert remove_stale_temporaries(tmp_path) == 2
        assert remove_stale_temporaries(tmp_path) == 0  # nothing left: nothing said
    assert [r.getMessage() for r in caplog.records] == [
        f"removed 2 stale temporary file(s) of interrupted saves from {tmp_path}"
    ]

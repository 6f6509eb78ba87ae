"""Atomic file replacement (temporary file, fsync, rename, folder fsync) and removal of its leftovers."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Collection
from pathlib import Path

logger = logging.getLogger(__name__)

STALE_AFTER_S = 10.0
"""A temporary file this many seconds old (by mtime) belongs to an interrupted save, not a live one.

A save of a scene or of the live state takes milliseconds from creating its temporary file to the
rename (its fsync seconds at worst on a very busy disk), so 10 s leaves a wide margin for another
engine sharing the folder, while a leftover of a crash is still removed at the next start.
"""
TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
"""Our temporary names (``fullmatch``): ``.{target}.{8 hex}.tmp`` as written now, and the older
``tempfile.mkstemp`` form ``.{prefix}.{8 of [a-z0-9_]}.tmp`` that scenes and autosave used before."""
_TRIES = 16
_FOLDER_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> Path:
    """Replace ``path`` with ``data``: a reader sees the old file or the whole new one, never a part.

    The data go to ``.{name}.{8 hex}.tmp`` in the same folder (created if missing), are flushed and
    fsynced, the file is renamed over ``path`` (``os.replace``), then the folder is fsynced. Once this
    returns the new content survives a power cut (POSIX; on Windows the folder cannot be fsynced and
    the rename's durability is the file system's). On any error the temporary file is removed and
    the ``OSError`` propagates; ``path`` is then untouched, or already the whole new file when only
    the folder fsync failed. A process killed mid-write leaves at most the hidden temporary file,
    which ``remove_stale_temporaries`` deletes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream, temporary = _create_temporary(path)
    try:
        with stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``atomic_write_bytes`` of UTF-8 text (written as is: ``\\n`` stays ``\\n`` on Windows)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``folder`` durable (no-op on Windows, or where unsupported)."""
    if os.name == "nt":  # Windows cannot open a directory with os.open; NTFS journals the rename itself
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    except OSError as err:
        if err.errno not in _FOLDER_SYNC_UNSUPPORTED:  # some file systems refuse it: nothing to wait for
            raise
        logger.debug("%s: the file system does not fsync folders (%s)", folder, err)
    finally:
        os.close(handle)


def remove_stale_temporaries(
    folder: str | os.PathLike[str],
    target_names: Collection[str] | Callable[[str], bool] | None = None,
    older_than_s: float = STALE_AFTER_S,
) -> int:
    """Delete the temporary files an interrupted atomic write left in ``folder``; the number removed.

    Only regular files named like ours (``TEMPORARY``) whose target name is in ``target_names`` (a
    collection of file names, or a predicate on the name; ``None``: any) and whose mtime is at least
    ``older_than_s`` seconds old are removed: a younger one may be the save another engine sharing the
    folder is making right now, and is kept. Symlinks, folders and every other name are never touched
    (nor followed). Never raises: a folder that is missing or cannot be listed removes nothing.
    """
    folder = Path(folder)
    wanted = _target_filter(target_names)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    except OSError as err:
        logger.warning("cannot look for stale temporary files in %s: %s", folder, err)
        return 0
    now = time.time()
    removed = 0
    for entry in entries:
        match = TEMPORARY.fullmatch(entry.name)
        if match is None or not wanted(match["target"]):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < older_than_s:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # renamed or removed meanwhile by its owner
            continue
        except OSError as err:
            logger.warning("cannot remove the stale temporary file %s: %s", entry.path, err)
            continue
        removed += 1
    if removed:
        logger.info("removed %d stale temporary file(s) of interrupted saves from %s", removed, folder)
    return removed


def _create_temporary(path: Path) -> tuple[io.BufferedWriter, Path]:
    """A new, exclusively created ``.{name}.{8 hex}.tmp`` next to ``path``, open for writing."""
    for _ in range(_TRIES):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return open(temporary, "xb"), temporary  # closed by the caller
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name next to {path}")


def _target_filter(target_names: Collection[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if target_names is None:
        return lambda name: True
    if callable(target_names):
        return target_names
    names = frozenset(target_names)
    return names.__contains__

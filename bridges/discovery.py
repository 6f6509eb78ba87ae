"""Discovery of input sources: what could be chosen as the engine's input right now.

``discover`` lists, per kind, the sources that exist at this moment, each under the one name a
show selects it by (``parse_source_name`` reads such a name back):

========  ============================  ==================================================
kind      selectable name               how it is found
========  ============================  ==================================================
pattern   ``pattern``                   always there (built in)
ndi       ``ndi:HOST (Source)``         cyndilib's ``Finder``, polled for ``timeout`` s
spout     ``spout:<sender>``            SpoutGL ``SpoutReceiver().getSenderList()`` (Windows)
syphon    ``syphon:App - Name``         syphon-python's ``SyphonServerDirectory`` (macOS)
shm       ``shm:<segment name>``        ``/dev/shm`` entries starting with our header magic
                                        (Linux; macOS and Windows cannot list segments)
file      ``file:<file name>``          video files in the media folder, by name, never a path
========  ============================  ==================================================

A kind whose SDK or platform is missing is skipped and its reason kept in
``Discovery.unavailable``; nothing here raises for a missing SDK. Discovery blocks up to about
``timeout`` seconds (NDI and Syphon listen for announcements that long, NDI on a helper thread
so both share the wait): call it off the frame loop, from the caller's own thread. The SDK calls
are the few lines inside ``find_ndi``, ``find_spout`` and ``find_syphon``; what is made of their
answers (``ndi_info``, ``spout_info``, ``syphon_infos``) is plain Python, tested anywhere.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from bridges import ndi, shm, spout, syphon, video
from bridges.base import BridgeError, BridgeUnavailable, shut_down

log = logging.getLogger(__name__)


class SourceKind(str, Enum):
    """The kinds of input source; the value is the prefix of a selectable name."""

    PATTERN = "pattern"
    NDI = "ndi"
    SPOUT = "spout"
    SYPHON = "syphon"
    SHM = "shm"
    FILE = "file"


#: What a selectable source name may look like (for error messages).
ALLOWED_NAMES = (
    "pattern, ndi:<NDI source name>, spout:<sender>, syphon:<server>, "
    "shm:<segment name>, file:<video file name>"
)
#: Video files the file kind lists (lower case, without the dot); still images are not sources.
VIDEO_EXTENSIONS = ("mp4", "mov", "mkv", "avi", "webm", "m4v")
#: Shared-memory segment names a source can be selected by (as config.yaml's ``name``).
SHM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Where Linux keeps POSIX shared memory: ``shm_open("/NAME")`` is the file ``/dev/shm/NAME``.
SHM_DIR = Path("/dev/shm")
#: The longest name after the prefix (an OSC argument should not be a novel).
MAX_NAME_CHARS = 256
#: How long past ``timeout`` ``discover`` waits for the NDI helper thread before giving up.
JOIN_GRACE_S = 2.0
#: How often NDI's source list is read while listening.
NDI_POLL_S = 0.1

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PREFIXES = frozenset(kind.value for kind in SourceKind)


@dataclass(frozen=True)
class SourceInfo:
    """One source that can be selected now."""

    name: str  #: the selectable name, e.g. ``ndi:STUDIO (TouchDesigner)``
    kind: SourceKind
    label: str  #: human text, e.g. ``TouchDesigner on STUDIO``
    detail: str  #: e.g. ``1280x720 RGBA8, our shm writer (pid 4242), last frame 0.2 s ago``

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind.value, "label": self.label, "detail": self.detail}


@dataclass
class Discovery:
    """What ``discover`` found: the sources, and for each kind it skipped, why."""

    sources: list[SourceInfo] = field(default_factory=list)
    unavailable: dict[SourceKind, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [source.name for source in self.sources]

    def as_json(self) -> dict[str, Any]:
        return {
            "sources": [source.as_json() for source in self.sources],
            "unavailable": {kind.value: reason for kind, reason in self.unavailable.items()},
        }


class KindUnavailable(Exception):
    """A kind cannot be listed here; the message says why (and what to install)."""


# --- selectable names -------------------------------------------------------------------------


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is not a selectable video file name (``None`` when it is).

    A file name, never a path: no ``/`` or ``\\``, not ``.``/``..``, not hidden, no control
    characters, and one of ``VIDEO_EXTENSIONS``.
    """
    if "/" in name or "\\" in name:
        return "a file name, not a path (no '/' or '\\')"
    if name.startswith("."):
        return "hidden files and '..' are not sources"
    suffix = name.rpartition(".")[2].lower() if "." in name else ""
    if suffix not in VIDEO_EXTENSIONS:
        return f"not a video file (extensions: {', '.join(VIDEO_EXTENSIONS)})"
    return None


def _name_problem(kind: SourceKind, rest: str) -> str | None:
    if not rest.strip():
        return f"the name after '{kind.value}:' is empty"
    if len(rest) > MAX_NAME_CHARS:
        return f"the name is longer than {MAX_NAME_CHARS} characters"
    if _CONTROL.search(rest):
        return "the name contains a control character"
    if rest != rest.strip():
        return "the name has spaces at either end"
    if kind is SourceKind.FILE:
        return file_name_problem(rest)
    if kind is SourceKind.SHM and not SHM_NAME_RE.match(rest):
        return "a segment name is 1 to 64 letters, digits, '_', '.' or '-' (no '/')"
    if kind is SourceKind.SPOUT and len(rest.encode()) > spout.MAX_NAME_BYTES:
        return f"a Spout sender name has at most {spout.MAX_NAME_BYTES} bytes"
    return None


def parse_source_name(name: str) -> tuple[SourceKind, str]:
    """``"ndi:HOST (TD)"`` → ``(SourceKind.NDI, "HOST (TD)")``; ``"pattern"`` → ``(PATTERN, "")``.

    ``ValueError`` naming the bad name, what is wrong and what is allowed.
    """
    if name == SourceKind.PATTERN.value:
        return SourceKind.PATTERN, ""
    prefix, sep, rest = name.partition(":")
    kind: SourceKind | None = None
    problem: str | None
    if sep and prefix in _PREFIXES:
        kind = SourceKind(prefix)
    if kind is None:
        problem = f"unknown kind {prefix!r}" if sep else "no kind prefix"
    elif kind is SourceKind.PATTERN:
        problem = "the pattern takes no name"
    else:
        problem = _name_problem(kind, rest)
    if problem is not None:
        raise ValueError(f"source name {name!r}: {problem}; allowed: {ALLOWED_NAMES}")
    assert kind is not None
    return kind, rest


def media_path(media_dir: str | os.PathLike[str], file_name: str) -> Path:
    """The file ``file_name`` (a name as ``file:`` carries it) inside ``media_dir``.

    ``ValueError`` for a name that is not a plain video file name (so no name reaches outside
    the folder).
    """
    problem = file_name_problem(file_name) or (
        "the name contains a control character" if _CONTROL.search(file_name) else None
    )
    if problem is not None:
        raise ValueError(f"media file {file_name!r}: {problem}")
    return Path(media_dir) / file_name


# --- pattern ----------------------------------------------------------------------------------


def find_pattern() -> list[SourceInfo]:
    """The built-in test pattern: always there."""
    return [SourceInfo("pattern", SourceKind.PATTERN, "test pattern", "built in, moving colour pattern")]


# --- shared memory ----------------------------------------------------------------------------


def shm_unavailable_reason(folder: Path = SHM_DIR, platform: str | None = None) -> str | None:
    """Why shared-memory segments cannot be listed here (``None`` when they can)."""
    platform = sys.platform if platform is None else platform
    if platform == "darwin":
        return "macOS cannot list shared-memory segments; select one by its name (shm:NAME)"
    if platform == "win32":
        return "Windows cannot list shared-memory segments; select one by its name (shm:NAME)"
    if not folder.is_dir():
        return f"no {folder} here to list shared-memory segments; select one by its name (shm:NAME)"
    return None


def _pid_gone(pid: int) -> bool:
    """True when no process ``pid`` exists (informational: another pid namespace may differ)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, not ours to signal
    return False


def segment_detail(path: str | os.PathLike[str], now_ns: int | None = None) -> str | None:
    """What the segment file ``path`` holds, or ``None`` when it is not a latentstage segment.

    Reads the 64-byte header only (no mapping, so the resource tracker never hears of it).
    Files this process may not read, and those not starting with ``MAGIC``, are not ours.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        head = os.read(fd, shm.HEADER_SIZE)
    except OSError:
        return None
    finally:
        os.close(fd)
    if head[:8] != shm.MAGIC:
        return None  # someone else's, or one still being created (magic written last)
    try:
        header = shm.ShmHeader.unpack(head, info.st_size)
    except BridgeError as exc:
        return f"not readable here: {exc}"
    size = f"{header.width}x{header.height} {header.pixel_format.name}"
    if header.flags & shm.FLAG_RETIRED:
        return f"{size}, retired: its writer closed or replaced it"
    writer = f"our shm writer (pid {header.writer_pid}{', gone' if _pid_gone(header.writer_pid) else ''})"
    if header.sequence < 2:
        return f"{size}, {writer}, no frame yet"
    now_ns = time.time_ns() if now_ns is None else now_ns
    age = max(0.0, (now_ns - header.timestamp_ns) / 1e9)
    return f"{size}, {writer}, last frame {age:.1f} s ago"


def find_shm(folder: Path = SHM_DIR) -> list[SourceInfo]:
    """Our shared-memory segments: entries of ``folder`` whose first bytes are ``shm.MAGIC``."""
    reason = shm_unavailable_reason(folder)
    if reason is not None:
        raise KindUnavailable(reason)
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except OSError as exc:
        raise KindUnavailable(f"cannot list {folder}: {exc.strerror or exc}") from exc
    found = []
    for name in names:
        if not SHM_NAME_RE.match(name):
            continue
        detail = segment_detail(folder / name)
        if detail is not None:
            found.append(SourceInfo(f"shm:{name}", SourceKind.SHM, name, detail))
    return found


# --- video files ------------------------------------------------------------------------------


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def find_files(media_dir: str | os.PathLike[str] | None) -> list[SourceInfo]:
    """Video files directly in ``media_dir``, by file name only (sub-folders and hidden files
    are skipped); each detail says when the file cannot be read here (no PyAV)."""
    if media_dir is None:
        raise KindUnavailable("no media folder given")
    folder = Path(media_dir)
    if not folder.is_dir():
        raise KindUnavailable("the media folder does not exist")
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as exc:
        raise KindUnavailable(f"cannot list the media folder: {exc.strerror or exc}") from exc
    unreadable = video.unavailable_reason()
    found = []
    for entry in entries:
        if file_name_problem(entry.name) is not None or _CONTROL.search(entry.name):
            continue
        try:
            if not entry.is_file():
                continue
            size = entry.stat().st_size
        except OSError:
            continue
        detail = _megabytes(size)
        if unreadable is not None:
            detail += f", not readable here: {unreadable}"
        found.append(SourceInfo(f"file:{entry.name}", SourceKind.FILE, entry.name, detail))
    return found


# --- NDI --------------------------------------------------------------------------------------


def _short_host() -> str:
    return socket.gethostname().split(".")[0]


def ndi_info(full_name: str, local_host: str | None = None) -> SourceInfo:
    """A source NDI announced as ``"HOST (Source)"``."""
    host, stream = ndi.split_source_name(full_name)
    local = (local_host if local_host is not None else _short_host()).casefold()
    where = "this machine" if host and host.casefold() == local else "the network"
    label = f"{stream} on {host}" if stream and host else full_name
    return SourceInfo(f"ndi:{full_name}", SourceKind.NDI, label, f"NDI sender on {where}")


def find_ndi(timeout: float) -> list[SourceInfo]:
    """The NDI senders announced within ``timeout`` seconds (cyndilib's ``Finder``).

    As in ``bridges.ndi``, the finder is polled with ``update_sources`` from this thread; its own
    finder thread is not started (it crashed processes that also send NDI).
    """
    reason = ndi.unavailable_reason()
    if reason is not None:
        raise KindUnavailable(f"{reason}; pip install latentstage[{ndi.EXTRA}]")
    cyndilib = ndi.load_cyndilib("NDI discovery")
    finder: Any = None
    deadline = time.monotonic() + max(0.0, timeout)
    try:
        finder = cyndilib.Finder()
        while True:
            names = [str(name) for name in finder.update_sources()]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(NDI_POLL_S, remaining))
    except (RuntimeError, ValueError, MemoryError) as exc:  # ndi.SDK_ERRORS, and a failed create
        raise KindUnavailable(f"NDI discovery failed: {exc}") from exc
    finally:
        shut_down(finder, "close", "NDI finder", ndi.SDK_ERRORS, log)
    local = _short_host()
    return [ndi_info(name, local) for name in sorted(set(names))]


# --- Spout ------------------------------------------------------------------------------------


def spout_info(sender: str, size: tuple[int, int] | None, active: bool) -> SourceInfo:
    """A Spout sender, its size (``None`` when Spout gave none) and whether it is the active one."""
    detail = f"{size[0]}x{size[1]}" if size else "size unknown"
    if active:
        detail += ", the active sender"
    return SourceInfo(f"spout:{sender}", SourceKind.SPOUT, sender, detail)


def find_spout() -> list[SourceInfo]:
    """Spout's senders (Windows): ``SpoutReceiver().getSenderList()`` and ``getSenderInfo``.

    Both read Spout's shared sender list; no OpenGL context is needed (SpoutGL >= 0.1).
    """
    if sys.platform != "win32":
        raise KindUnavailable("Spout needs Windows")
    reason = spout.unavailable_reason()
    if reason is not None:
        raise KindUnavailable(f"{reason}; pip install latentstage[{spout.EXTRA}]")
    spout_gl = spout.load_spoutgl("Spout discovery")
    receiver: Any = None
    found = []
    try:
        receiver = spout_gl.SpoutReceiver()
        active = receiver.getActiveSender()
        for sender in receiver.getSenderList():
            info = receiver.getSenderInfo(sender)
            size = (int(info.width), int(info.height)) if info is not None else None
            found.append(spout_info(str(sender), size, sender == active))
    except AttributeError as exc:
        raise KindUnavailable(
            f"SpoutGL cannot list senders ({exc}); pip install -U latentstage[{spout.EXTRA}]"
        ) from exc
    except spout.SDK_ERRORS as exc:
        raise KindUnavailable(f"Spout discovery failed: {exc}") from exc
    finally:
        shut_down(receiver, "releaseReceiver", "Spout receiver", spout.SDK_ERRORS, log)
    return found


# --- Syphon -----------------------------------------------------------------------------------


def syphon_infos(servers: Sequence[tuple[str, str]]) -> list[SourceInfo]:
    """Syphon servers as ``(name, app_name)`` pairs; each is selected by its ``"App - Name"``
    label (what ``SyphonSource`` matches exactly)."""
    found: dict[str, SourceInfo] = {}
    for name, app in servers:
        label = syphon.server_label(name, app)
        detail = f"Syphon server of {app}" if app else "Syphon server"
        found.setdefault(label, SourceInfo(f"syphon:{label}", SourceKind.SYPHON, label, detail))
    return [found[label] for label in sorted(found)]


def find_syphon(timeout: float) -> list[SourceInfo]:
    """Syphon's servers (macOS): ``SyphonServerDirectory().servers`` read for ``timeout`` s."""
    if sys.platform != "darwin":
        raise KindUnavailable("Syphon needs macOS")
    reason = syphon.unavailable_reason()
    if reason is not None:
        raise KindUnavailable(f"{reason}; pip install latentstage[{syphon.EXTRA}]")
    sdk = syphon.load_syphon("Syphon discovery")
    deadline = time.monotonic() + max(0.0, timeout)
    try:
        directory = sdk.syphon.SyphonServerDirectory()
        directory.run_loop_interval = syphon.RUN_LOOP_INTERVAL
        while True:  # each read runs this thread's run loop to take in announcements
            pairs = [(str(s.name), str(s.app_name)) for s in directory.servers]
            if time.monotonic() >= deadline:
                break
    except sdk.errors as exc:
        raise KindUnavailable(f"Syphon discovery failed: {exc}") from exc
    return syphon_infos(pairs)


# --- all kinds --------------------------------------------------------------------------------


def _kinds(kinds: Iterable[SourceKind | str] | None) -> list[SourceKind]:
    if kinds is None:
        return list(SourceKind)
    wanted = set()
    for kind in kinds:
        try:
            wanted.add(SourceKind(kind))
        except ValueError:
            allowed = ", ".join(member.value for member in SourceKind)
            raise ValueError(f"unknown source kind {kind!r}; allowed: {allowed}") from None
    return [kind for kind in SourceKind if kind in wanted]


def _guarded(kind: SourceKind, find: Callable[[], list[SourceInfo]]) -> list[SourceInfo] | str:
    """The kind's sources, or the reason it was skipped (a failing SDK never ends discovery)."""
    try:
        return find()
    except (KindUnavailable, BridgeUnavailable) as exc:
        return str(exc)
    except Exception as exc:  # one kind's failure must not hide the others during a show
        log.warning("%s discovery failed", kind.value, exc_info=True)
        return f"discovery failed: {type(exc).__name__}: {exc}"


def discover(
    kinds: Iterable[SourceKind | str] | None = None,
    media_dir: str | os.PathLike[str] | None = None,
    timeout: float = 1.0,
) -> Discovery:
    """The sources of ``kinds`` (default: all) that exist now; never raises for a missing SDK.

    ``media_dir`` is where the file kind looks (``None``: the file kind is unavailable).
    Blocks up to about ``timeout`` seconds (NDI and Syphon listen that long); run it off the
    frame loop.
    """
    wanted = _kinds(kinds)
    timeout = max(0.0, float(timeout))
    finders: dict[SourceKind, Callable[[], list[SourceInfo]]] = {
        SourceKind.PATTERN: find_pattern,
        SourceKind.NDI: lambda: find_ndi(timeout),
        SourceKind.SPOUT: find_spout,
        SourceKind.SYPHON: lambda: find_syphon(timeout),
        SourceKind.SHM: find_shm,
        SourceKind.FILE: lambda: find_files(media_dir),
    }
    results: dict[SourceKind, list[SourceInfo] | str] = {}
    helper: threading.Thread | None = None

    def listen() -> None:
        results[SourceKind.NDI] = _guarded(SourceKind.NDI, finders[SourceKind.NDI])

    if SourceKind.NDI in wanted:  # listens while the other kinds are read (Syphon listens too)
        helper = threading.Thread(target=listen, name="latentstage-discovery-ndi", daemon=True)
        helper.start()
    for kind in wanted:
        if kind is not SourceKind.NDI:
            results[kind] = _guarded(kind, finders[kind])
    if helper is not None:
        helper.join(timeout + JOIN_GRACE_S)
        if helper.is_alive():
            results[SourceKind.NDI] = f"NDI gave no answer within {timeout + JOIN_GRACE_S:g} s"
    discovery = Discovery()
    for kind in wanted:
        found = results[kind]
        if isinstance(found, str):
            discovery.unavailable[kind] = found
        else:
            discovery.sources.extend(found)
    return discovery

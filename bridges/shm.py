"""Shared-memory frames between local processes: a documented, tear-free seqlock format.

One writer process owns a named shared-memory segment holding one frame; any number of
reader processes attach to it by name and copy the newest frame out. Nothing but numpy and
the standard library (``multiprocessing.shared_memory``) is needed on either side, so a
TouchDesigner Script TOP can use ``ShmReader`` / ``ShmWriter`` by putting a copy of the
``bridges`` folder (``__init__.py``, ``base.py``, ``shm.py``) on its Python path.

Segment format, version 1 (also in ``FORMAT``; all integers little-endian)::

    offset size type      field
    0      8    char[8]   magic          b"LSFRAME1"
    8      2    u16       version        1
    10     2    u16       header_size    64; pixel data starts at this offset
    12     4    u32       width          pixels
    16     4    u32       height         pixels
    20     2    u16       pixel_format   0 = RGBA8, 1 = BGRA8 (4 bytes per pixel)
    22     2    u16       flags          bit 0 RETIRED: the writer closed or replaced this
                                         segment; readers detach and re-open the name
    24     4    u32       stride         bytes per row (>= width * 4; writers here use width*4)
    28     4    u32       writer_pid     process id of the writer (informational)
    32     8    u64       sequence       seqlock counter, see below; frames written = sequence/2
    40     8    u64       timestamp_ns   time.time_ns() of the frame: Unix epoch, UTC, wall
                                         clock (comparable across processes, may jump)
    48     8    u64       data_size      stride * height
    56     8    u64       segment_id     random non-zero id chosen when the segment is created
    64     ...            pixels         height rows, top row first, each `stride` bytes

Pixels are 8-bit, 4 bytes per pixel, rows top to bottom (TouchDesigner's ``numpyArray()``
and ``copyNumpyArray()`` put the bottom row first: flip with ``array[::-1]``).

Creation: the writer creates the segment zero-filled, fills bytes 8..63 and writes the
magic last; a reader treats an all-zero magic as "not ready yet" and any other wrong magic,
version or size as an error. Segment names follow ``multiprocessing.shared_memory`` (on
POSIX ``shm_open("/" + name)``, on Windows a named file mapping ``name``); keep them under
31 characters for macOS.

Seqlock (sequence at offset 32, an aligned u64; 0 = no frame yet). Writer, per frame:
``sequence += 1`` (odd: writing), write the pixels and timestamp_ns, ``sequence += 1``
(even: stable). Reader: ``s1 = sequence``; if ``s1`` is odd, retry; copy the pixels and
timestamp; ``s2 = sequence``; the copy is valid only if ``s1 == s2``; otherwise retry a few
times and give up for this call. The frame number is ``s1 / 2``. A C/C++ implementation
must use an atomic 64-bit load/store of ``sequence`` with acquire/release fences around the
copy (``std::atomic_thread_fence``). Python cannot emit fences: here each step is a
separate C call (a compiler barrier) and the counter is one aligned 8-byte access, which is
sufficient on x86-64 (total store order); on ARM64 the Python side is best effort.

Life cycle: the writer owns the segment and unlinks it on close after setting RETIRED. A
writer that finds a stale segment of the same name marks it RETIRED and replaces it; a
writer whose own segment was marked RETIRED by someone else stops writing (BridgeError) and
does not unlink the name. Readers never unlink; on Python < 3.13 they unregister the
segment from ``multiprocessing.resource_tracker``, whose exit would otherwise unlink it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import struct
import sys
import time
from dataclasses import dataclass
from enum import IntEnum
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from bridges.base import BridgeError, Closing, Frame, PixelFormat, SourceClosed, check_rgba, to_rgba

log = logging.getLogger(__name__)

FORMAT = __doc__ or ""
MAGIC = b"LSFRAME1"
VERSION = 1
HEADER_SIZE = 64
HEADER_STRUCT = struct.Struct("<8sHHIIHHIIQQQQ")
assert HEADER_STRUCT.size == HEADER_SIZE
SEQUENCE_OFFSET = 32
TIMESTAMP_OFFSET = 40
FLAGS_OFFSET = 22
FLAG_RETIRED = 1
BYTES_PER_PIXEL = 4
MAX_SIDE = 16384

_READ_ATTEMPTS = 16  # seqlock retries per read() call before giving up
_RETRY_SLEEP_S = 50e-6
_PROBE_IDLE_S = 1.0  # without new frames this long, check whether the name was re-created
_GONE_GRACE_S = 1.0  # how long a reader waits for a retired segment's replacement
_POLL_S = 0.001

# Names with a live ShmWriter in this process (the resource tracker must keep tracking them).
_OWNED: dict[str, int] = {}


class ShmPixelFormat(IntEnum):
    """The ``pixel_format`` field of the header."""

    RGBA8 = 0
    BGRA8 = 1

    @property
    def layout(self) -> PixelFormat:
        """The byte order as a ``PixelFormat`` (RGBA or BGRA)."""
        return PixelFormat.BGRA if self is ShmPixelFormat.BGRA8 else PixelFormat.RGBA


RGBA = ShmPixelFormat.RGBA8
BGRA = ShmPixelFormat.BGRA8


def unavailable_reason() -> str | None:
    """Shared memory needs only the standard library and numpy: always available."""
    return None


@dataclass(frozen=True)
class ShmHeader:
    """The 64-byte segment header (see the module docstring for the layout)."""

    width: int
    height: int
    pixel_format: ShmPixelFormat = ShmPixelFormat.RGBA8
    stride: int = 0  # 0 means width * 4
    flags: int = 0
    writer_pid: int = 0
    sequence: int = 0
    timestamp_ns: int = 0
    segment_id: int = 0
    version: int = VERSION
    header_size: int = HEADER_SIZE

    def __post_init__(self) -> None:
        if not self.stride:
            object.__setattr__(self, "stride", self.width * BYTES_PER_PIXEL)

    @property
    def row_bytes(self) -> int:
        return self.stride

    @property
    def data_size(self) -> int:
        return self.row_bytes * self.height

    @property
    def total_size(self) -> int:
        return self.header_size + self.data_size

    def pack(self) -> bytes:
        return HEADER_STRUCT.pack(
            MAGIC, self.version, self.header_size, self.width, self.height,
            int(self.pixel_format), self.flags, self.row_bytes, self.writer_pid,
            self.sequence, self.timestamp_ns, self.data_size, self.segment_id,
        )

    @classmethod
    def unpack(cls, buffer: bytes | bytearray | memoryview, segment_size: int | None = None
               ) -> ShmHeader:
        """Parse and validate a header; ``BridgeError`` naming what is wrong."""
        if len(buffer) < HEADER_SIZE:
            raise BridgeError(f"segment of {len(buffer)} bytes is too small for a frame header")
        (magic, version, header_size, width, height, pixel_format, flags, stride, pid,
         sequence, timestamp_ns, data_size, segment_id) = HEADER_STRUCT.unpack_from(buffer, 0)
        if magic != MAGIC:
            raise BridgeError(f"not a latentstage frame segment (magic {magic!r})")
        if version != VERSION:
            raise BridgeError(f"unsupported frame segment version {version} (need {VERSION})")
        if header_size < HEADER_SIZE:
            raise BridgeError(f"bad header_size {header_size}")
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            raise BridgeError(f"bad frame size {width}x{height}")
        try:
            fmt = ShmPixelFormat(pixel_format)
        except ValueError:
            raise BridgeError(f"unknown pixel_format {pixel_format}") from None
        if stride < width * BYTES_PER_PIXEL or data_size != stride * height:
            raise BridgeError(f"bad stride {stride} / data_size {data_size} for {width}x{height}")
        if segment_size is not None and header_size + data_size > segment_size:
            raise BridgeError(f"segment of {segment_size} bytes is smaller than its header says "
                              f"({header_size + data_size})")
        return cls(width, height, fmt, stride, flags, pid, sequence, timestamp_ns, segment_id,
                   version, header_size)


# -- segment helpers -------------------------------------------------------------------------


def _tracker_name(shm: SharedMemory, name: str) -> str:
    return str(getattr(shm, "_name", "/" + name))


def _attach(name: str) -> SharedMemory:
    """Attach to an existing segment without letting this process's exit unlink it.

    Python < 3.13 registers every attached segment with the resource tracker, which unlinks
    it when this process exits (deleting the writer's segment); undo that registration.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    shm = SharedMemory(name=name)
    if os.name == "posix" and not _OWNED.get(name):
        resource_tracker.unregister(_tracker_name(shm, name), "shared_memory")
    return shm


def segment_exists(name: str) -> bool:
    """Whether a shared-memory segment called ``name`` exists (of any content)."""
    try:
        shm = _attach(name)
    except FileNotFoundError:
        return False
    except (ValueError, OSError):
        return True  # exists but cannot be mapped (e.g. being created, size 0)
    shm.close()
    return True


def _buf(shm: SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:
        raise BridgeError(f"shared-memory segment {shm.name!r} is not mapped")
    return buf


def _is_retired(shm: SharedMemory) -> bool:
    if shm.size < HEADER_SIZE:
        return False
    (flags,) = struct.unpack_from("<H", _buf(shm), FLAGS_OFFSET)
    return bool(flags & FLAG_RETIRED)


def _retire(shm: SharedMemory) -> None:
    if shm.size >= HEADER_SIZE:
        (flags,) = struct.unpack_from("<H", _buf(shm), FLAGS_OFFSET)
        struct.pack_into("<H", _buf(shm), FLAGS_OFFSET, flags | FLAG_RETIRED)


def _segment_id(shm: SharedMemory) -> int | None:
    """The segment id when the header is complete (magic present), else None."""
    if shm.size < HEADER_SIZE or bytes(_buf(shm)[:8]) != MAGIC:
        return None
    (segment_id,) = struct.unpack_from("<Q", _buf(shm), 56)
    return int(segment_id)


def _u64_view(shm: SharedMemory, offset: int) -> np.ndarray:
    return np.ndarray((1,), dtype="<u8", buffer=_buf(shm), offset=offset)


_NO_VIEW = np.zeros((1,), dtype="<u8")
_NO_PIXELS = np.zeros((0, 0, BYTES_PER_PIXEL), dtype=np.uint8)


class _Mapped:
    """An attached segment plus numpy views of its counter, timestamp and pixels.

    ``close`` drops the views before unmapping (a live view would make the unmap fail).
    """

    def __init__(self, shm: SharedMemory) -> None:
        self.shm = shm
        self.seq = _u64_view(shm, SEQUENCE_OFFSET)
        self.timestamp = _u64_view(shm, TIMESTAMP_OFFSET)
        self.pixels = _NO_PIXELS

    def map_pixels(self, header: ShmHeader) -> None:
        flat = np.ndarray((header.data_size,), dtype=np.uint8, buffer=_buf(self.shm),
                          offset=header.header_size)
        self.pixels = np.lib.stride_tricks.as_strided(
            flat, shape=(header.height, header.width, BYTES_PER_PIXEL),
            strides=(header.row_bytes, BYTES_PER_PIXEL, 1),
        )

    def close(self) -> None:
        self.seq = self.timestamp = _NO_VIEW
        self.pixels = _NO_PIXELS
        self.shm.close()


def _unlink_name(name: str) -> None:
    """Unlink a POSIX segment that cannot even be mapped (e.g. a writer died creating it)."""
    import _posixshmem

    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink("/" + name)


def _disown(name: str) -> None:
    count = _OWNED.get(name, 0) - 1
    if count > 0:
        _OWNED[name] = count
    else:
        _OWNED.pop(name, None)


# -- writer ------------------------------------------------------------------------------------


class ShmWriter(Closing):
    """Owns the segment ``name`` and writes frames into it (see the module docstring).

    ``write`` takes ``(height, width, 4)`` uint8 pixels already in ``pixel_format`` order.
    """

    def __init__(self, name: str, width: int, height: int,
                 pixel_format: ShmPixelFormat | int = ShmPixelFormat.RGBA8) -> None:
        self.name = name
        self.pixel_format = ShmPixelFormat(pixel_format)
        self.width = 0
        self.height = 0
        self.frames_written = 0
        self.segment_id = 0
        self._map: _Mapped | None = None
        self._sequence = 0
        self._create(width, height)

    def __repr__(self) -> str:
        return f"ShmWriter({self.name!r}, {self.width}x{self.height}, {self.pixel_format.name})"

    def _create(self, width: int, height: int) -> None:
        if isinstance(width, bool) or isinstance(height, bool) or not (
            0 < int(width) <= MAX_SIDE and 0 < int(height) <= MAX_SIDE
        ):
            raise ValueError(f"frame size must be 1..{MAX_SIDE} pixels per side, "
                             f"got {width}x{height}")
        width, height = int(width), int(height)
        header = ShmHeader(width, height, self.pixel_format, writer_pid=os.getpid(),
                           segment_id=secrets.randbits(63) | 1)
        shm = self._create_segment(header.total_size)
        _OWNED[self.name] = _OWNED.get(self.name, 0) + 1
        buf = _buf(shm)
        buf[8:HEADER_SIZE] = header.pack()[8:]
        buf[:8] = MAGIC  # last: now the header is complete
        mapped = _Mapped(shm)
        mapped.map_pixels(header)
        self._map = mapped
        self.segment_id = header.segment_id
        self.width, self.height = width, height
        self._sequence = 0
        log.info("shared-memory segment %r created: %dx%d %s", self.name, width, height,
                 self.pixel_format.name)

    def _create_segment(self, size: int) -> SharedMemory:
        deadline = time.monotonic() + 2.0
        first = True
        while True:
            try:
                return SharedMemory(name=self.name, create=True, size=size)
            except FileExistsError:
                pass
            self._retire_stale(first)
            first = False
            if time.monotonic() > deadline:
                raise BridgeError(
                    f"shared-memory segment {self.name!r} exists and is still held by another "
                    "process; close its readers/writer or pick another name"
                )
            if os.name != "posix":
                time.sleep(0.02)  # Windows: the name lives until every reader lets go

    def _retire_stale(self, warn: bool) -> None:
        """Mark an existing segment of our name RETIRED and (POSIX) unlink its name."""
        try:
            stale = SharedMemory(name=self.name)  # tracked: unlink() below unregisters it
        except FileNotFoundError:
            return
        except (ValueError, OSError) as exc:
            if os.name == "posix":
                log.warning("unlinking unusable shared-memory segment %r (%s)", self.name, exc)
                _unlink_name(self.name)
            return
        if warn:
            log.warning("shared-memory segment %r already exists (stale, or another writer); "
                        "replacing it", self.name)
        _retire(stale)
        stale.close()
        if os.name == "posix":
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def _taken_over(self, mapped: _Mapped) -> bool:
        return _is_retired(mapped.shm)

    def resize(self, width: int, height: int) -> None:
        """Replace the segment with one of another size (readers re-attach by name)."""
        mapped = self._map
        if mapped is None:
            raise BridgeError(f"shared-memory writer {self.name!r} is closed")
        if (width, height) == (self.width, self.height):
            return
        if self._taken_over(mapped):
            raise BridgeError(f"shared-memory segment {self.name!r} was taken over by another "
                              "writer")
        ours = self._name_is_ours()
        self._map = None
        _disown(self.name)
        if os.name == "posix":
            # Unlink the old name and create the new segment before marking the old one
            # RETIRED, so a reader that notices the flag always finds the new segment.
            if ours:
                with contextlib.suppress(FileNotFoundError):
                    mapped.shm.unlink()
            try:
                self._create(width, height)
            finally:
                _retire(mapped.shm)
                mapped.close()
        else:
            _retire(mapped.shm)
            mapped.close()
            self._create(width, height)

    def write(self, pixels: np.ndarray, timestamp_ns: int | None = None) -> int:
        """Publish one frame; returns its frame number (1 for the first frame)."""
        mapped = self._map
        if mapped is None:
            raise BridgeError(f"shared-memory writer {self.name!r} is closed")
        check_rgba(pixels, "ShmWriter.write", (self.height, self.width), self.pixel_format.layout)
        if self._taken_over(mapped):
            raise BridgeError(f"shared-memory segment {self.name!r} was taken over by another "
                              "writer")
        stamp = time.time_ns() if timestamp_ns is None else int(timestamp_ns)
        seq = self._sequence
        mapped.seq[0] = seq + 1  # odd: writing
        np.copyto(mapped.pixels, pixels)
        mapped.timestamp[0] = stamp
        mapped.seq[0] = seq + 2  # even: stable
        self._sequence = seq + 2
        self.frames_written += 1
        return (seq + 2) >> 1

    def _name_is_ours(self) -> bool:
        """Whether the name still refers to our segment (nobody replaced or removed it)."""
        try:
            probe = _attach(self.name)
        except (ValueError, OSError):  # FileNotFoundError included
            return False
        try:
            return _segment_id(probe) == self.segment_id
        finally:
            probe.close()

    def _release(self) -> None:
        """Retire and unlink the segment (the writer owns it)."""
        mapped, self._map = self._map, None
        if mapped is None:
            return
        ours = not self._taken_over(mapped) and self._name_is_ours()
        _retire(mapped.shm)
        mapped.close()
        _disown(self.name)
        if ours:
            with contextlib.suppress(FileNotFoundError):
                mapped.shm.unlink()
        elif os.name == "posix" and not _OWNED.get(self.name):
            # The name is someone else's now (or gone): leave it alone and only drop our
            # resource-tracker registration, unless another writer in this process uses it.
            with contextlib.suppress(KeyError, OSError):
                resource_tracker.unregister(_tracker_name(mapped.shm, self.name),
                                            "shared_memory")
        log.info("shared-memory segment %r closed after %d frames", self.name,
                 self.frames_written)



# -- reader ------------------------------------------------------------------------------------


class ShmReader(Closing):
    """Attaches to the segment ``name`` and copies frames out; never unlinks it.

    ``read`` returns ``(pixels, sequence, timestamp_ns)`` for a frame newer than
    ``last_sequence`` (any frame when it is None), or None. ``pixels`` is a fresh
    ``(height, width, 4)`` uint8 array in the segment's ``pixel_format``; ``sequence`` is the
    writer's frame number (1, 2, ...). When the writer replaces the segment (new size,
    restart) the reader re-attaches by name on its own; the first read after any (re)attach
    returns the current frame whatever ``last_sequence`` says, since the new segment counts
    from 1 again (``segment_id`` tells segments apart). A segment still being created (its name
    exists, its size is not set yet) is attached on a later read. ``BridgeError`` when the
    segment is gone for good.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._map: _Mapped | None = None
        self._header: ShmHeader | None = None
        self._fresh = True
        self._gone_since: float | None = None
        self._last_activity = time.monotonic()
        self._last_probe = self._last_activity
        try:
            shm = _attach(name)
        except FileNotFoundError:
            raise BridgeError(
                f"no shared-memory segment named {name!r} (is its writer running?)"
            ) from None
        except ValueError:
            # Empty: its writer is between creating the name and sizing it. Attach on a
            # later read; a segment that stays empty is gone after the grace period.
            self._gone_since = self._last_activity
            return
        except OSError as exc:
            raise BridgeError(f"cannot attach to shared-memory segment {name!r}: {exc}") from exc
        if shm.size == 0:  # the same, where mapping an empty file succeeds
            shm.close()
            self._gone_since = self._last_activity
            return
        self._use(shm)

    def __repr__(self) -> str:
        return f"ShmReader({self.name!r})"

    @property
    def header(self) -> ShmHeader | None:
        """The current segment's header as attached (None until the writer finished it)."""
        return self._header

    @property
    def segment_id(self) -> int:
        return self._header.segment_id if self._header is not None else 0

    def _use(self, shm: SharedMemory) -> None:
        if shm.size < HEADER_SIZE:
            shm.close()
            raise BridgeError(f"shared-memory segment {self.name!r} is too small "
                              f"({shm.size} bytes) to be a frame segment")
        self._map = _Mapped(shm)
        self._header = None
        self._fresh = True
        self._gone_since = None
        self._last_activity = time.monotonic()

    def _drop(self) -> None:
        mapped, self._map = self._map, None
        self._header = None
        if mapped is not None:
            mapped.close()

    def _parse_header(self, mapped: _Mapped) -> ShmHeader | None:
        if bytes(_buf(mapped.shm)[:8]) == bytes(8):
            return None  # the writer has not finished the header yet
        header = ShmHeader.unpack(_buf(mapped.shm), mapped.shm.size)
        mapped.map_pixels(header)
        self._header = header
        return header

    def _reattach(self) -> bool:
        """Attach to whatever segment the name holds now; True when it is a live one."""
        try:
            shm = _attach(self.name)
        except (ValueError, OSError):  # FileNotFoundError included
            return False
        if shm.size < HEADER_SIZE or _is_retired(shm):
            shm.close()
            return False
        self._use(shm)
        log.info("attached to the new shared-memory segment %r", self.name)
        return True

    def _check_segment(self) -> None:
        """Follow a retired or re-created segment; BridgeError when it is gone for good."""
        now = time.monotonic()
        if self._map is not None and _is_retired(self._map.shm):
            log.info("shared-memory segment %r was retired by its writer", self.name)
            self._drop()
            self._gone_since = now
        if self._map is None:
            if self._reattach():
                return
            if self._gone_since is None:
                self._gone_since = now
            if now - self._gone_since > _GONE_GRACE_S:
                raise BridgeError(f"shared-memory segment {self.name!r} is gone "
                                  "(its writer closed)")
            return
        if now - self._last_activity >= _PROBE_IDLE_S and now - self._last_probe >= _PROBE_IDLE_S:
            # No new frames for a while: was the name re-created by a restarted writer, or
            # unlinked because the writer died?
            self._last_probe = now
            try:
                probe = _attach(self.name)
            except FileNotFoundError:
                raise BridgeError(f"shared-memory segment {self.name!r} no longer exists "
                                  "(its writer is gone)") from None
            except (ValueError, OSError):
                return
            probe_id = _segment_id(probe)
            if (probe_id is not None and probe_id != _segment_id(self._map.shm)
                    and not _is_retired(probe)):
                self._drop()
                self._use(probe)
                log.info("shared-memory segment %r was re-created; re-attached", self.name)
            else:
                probe.close()

    def read(self, last_sequence: int | None = None) -> tuple[np.ndarray, int, int] | None:
        """A consistent copy of the newest frame if newer than ``last_sequence``, else None."""
        if self._closed:
            raise BridgeError(f"shared-memory reader {self.name!r} is closed")
        self._check_segment()
        mapped = self._map
        if mapped is None:
            return None
        header = self._header or self._parse_header(mapped)
        if header is None:
            return None
        if self._fresh:
            last_sequence = None
        out: np.ndarray | None = None
        for attempt in range(_READ_ATTEMPTS):
            s1 = int(mapped.seq[0])
            if s1 & 1:
                if attempt:
                    time.sleep(_RETRY_SLEEP_S)
                continue  # the writer is in the middle of a frame
            number = s1 >> 1
            if number == 0 or (last_sequence is not None and number <= last_sequence):
                return None
            if out is None:
                out = np.empty((header.height, header.width, BYTES_PER_PIXEL), dtype=np.uint8)
            np.copyto(out, mapped.pixels)
            stamp = int(mapped.timestamp[0])
            if int(mapped.seq[0]) == s1:
                self._last_activity = time.monotonic()
                self._fresh = False
                return out, number, stamp
        return None

    def _release(self) -> None:
        """Detach (never unlinks: the writer owns the segment)."""
        self._drop()



# -- bridges -----------------------------------------------------------------------------------


class ShmSink(Closing):
    """Engine output into the shared-memory segment ``name`` (RGBA8).

    The segment is created with the first frame's size and re-created when the size changes.
    """

    def __init__(self, name: str = "latentstage_out") -> None:
        self.name = name
        self._writer: ShmWriter | None = None

    def __repr__(self) -> str:
        return f"ShmSink({self.name!r})"

    @property
    def writer(self) -> ShmWriter | None:
        return self._writer

    def send(self, frame: Frame) -> None:
        if self._closed:
            raise BridgeError(f"shared-memory sink {self.name!r} is closed")
        height, width = frame.height, frame.width
        try:
            if self._writer is None:
                self._writer = ShmWriter(self.name, width, height, ShmPixelFormat.RGBA8)
            elif (width, height) != (self._writer.width, self._writer.height):
                log.info("shared-memory sink %r: frame size changed to %dx%d", self.name,
                         width, height)
                self._writer.resize(width, height)
            self._writer.write(frame.pixels)
        except OSError as exc:
            raise BridgeError(f"shared-memory sink {self.name!r} failed: {exc}") from exc

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None



class ShmSource(Closing):
    """Engine input from another process's shared-memory segment ``name``.

    Raises ``BridgeError`` when the segment does not exist (constructor) or disappears
    (``recv``), so the runtime can retry. ``Frame.timestamp`` is ``time.monotonic()`` at
    receipt; ``Frame.sequence`` keeps increasing across writer restarts.
    """

    def __init__(self, name: str = "latentstage_in") -> None:
        self.name = name
        self._reader = ShmReader(name)
        self._segment_id = self._reader.segment_id
        self._last: int | None = None
        self._base = 0  # added to the writer's frame numbers (grows when the segment changes)
        self._emitted = 0

    def __repr__(self) -> str:
        return f"ShmSource({self.name!r})"

    def recv(self, timeout: float) -> Frame | None:
        """The next new frame, polling every ~1 ms for up to ``timeout`` seconds."""
        if self._closed:
            raise SourceClosed(f"shared-memory source {self.name!r} is closed")
        deadline = time.monotonic() + (timeout if timeout > 0 else 0.0)
        while True:
            result = self._reader.read(self._last)
            if self._reader.segment_id != self._segment_id:
                # A new segment (writer restarted or resized): its numbers start from 1.
                self._segment_id = self._reader.segment_id
                self._base = self._emitted
            if result is not None:
                pixels, number, _stamp = result
                self._last = number
                self._emitted = self._base + number
                header = self._reader.header
                bgra = header is not None and header.pixel_format is ShmPixelFormat.BGRA8
                pixels = to_rgba(pixels, PixelFormat.BGRA) if bgra else pixels
                return Frame(pixels, time.monotonic(), self._emitted)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(_POLL_S, remaining))

    def _release(self) -> None:
        self._reader.close()


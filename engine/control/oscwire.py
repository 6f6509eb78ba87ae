"""Strict OSC wire check: every argument the type tags promise must be in the datagram.

python-osc pads a float (and a few other fixed-size arguments) that is cut short with zero
bytes, so ``/guidance_scale ,f`` with no data would arrive as 0.0 and one byte ``0x3f`` as 0.5.
This walks messages and bundles before the parser sees them and names the first argument
that is short. Only completeness is checked here; python-osc still parses the values.
"""

from __future__ import annotations

import struct

FIXED_SIZES = {"i": 4, "f": 4, "c": 4, "r": 4, "m": 4, "h": 8, "d": 8, "t": 8}
"""Bytes of each fixed-size OSC argument type."""
NO_DATA = frozenset("TFNI[]")
"""Type tags that carry no bytes: true, false, nil, impulse and array brackets."""
BUNDLE_HEADER = b"#bundle\x00"
_TIMETAG_BYTES = 8


def _pad4(length: int) -> int:
    return (length + 3) & ~3


def _string_end(data: bytes, start: int) -> int | None:
    """Offset after the OSC-string at ``start`` (null-terminated, padded to 4), or None when
    the terminator or its padding is missing."""
    end = data.find(b"\x00", start)
    if end < 0 or _pad4(end + 1) > len(data):
        return None
    return _pad4(end + 1)


def truncation_error(data: bytes) -> str | None:
    """Why ``data`` (one datagram: a message or a bundle) is cut short, or None when complete.

    Unknown type tags stop the walk (the parser refuses them itself). The caller bounds the
    nesting of bundles first (``dispatch.MAX_BUNDLE_DEPTH``).
    """
    return _bundle_error(data) if data.startswith(BUNDLE_HEADER) else _message_error(data)


def _bundle_error(data: bytes) -> str | None:
    offset = len(BUNDLE_HEADER) + _TIMETAG_BYTES
    if len(data) < offset:
        return "bundle without a complete time tag"
    while offset < len(data):
        if len(data) - offset < 4:
            return "bundle element without a complete size"
        (size,) = struct.unpack_from(">i", data, offset)
        offset += 4
        if size < 0 or offset + size > len(data):
            return f"bundle element of {size} bytes with {len(data) - offset} left"
        element = data[offset:offset + size]
        problem = (
            _bundle_error(element) if element.startswith(BUNDLE_HEADER) else _message_error(element)
        )
        if problem is not None:
            return problem
        offset += size
    return None


def _message_error(data: bytes) -> str | None:
    address_end = _string_end(data, 0)
    if address_end is None:
        return "address without its terminator or padding"
    address = data[:address_end].split(b"\x00", 1)[0].decode("utf-8", "replace")[:80]
    if address_end >= len(data) or data[address_end:address_end + 1] != b",":
        return None  # no type tags: no arguments
    tags_end = _string_end(data, address_end)
    if tags_end is None:
        return f"{address}: type tags without their terminator or padding"
    tags = data[address_end + 1:tags_end].split(b"\x00", 1)[0].decode("ascii", "replace")
    offset = tags_end
    for index, tag in enumerate(tags):
        available = len(data) - offset
        if tag in NO_DATA:
            continue
        if tag in FIXED_SIZES:
            need = FIXED_SIZES[tag]
            if available < need:
                return _short(address, tags, index, f"{need} bytes, {available} present")
            offset += need
        elif tag in "sS":
            end = _string_end(data, offset)
            if end is None:
                return _short(address, tags, index, "a string without its terminator or padding")
            offset = end
        elif tag == "b":
            if available < 4:
                return _short(address, tags, index, f"a blob size, {available} bytes present")
            (size,) = struct.unpack_from(">i", data, offset)
            if size < 0 or available - 4 < size:
                return _short(address, tags, index, f"a blob of {size} bytes, {available - 4} present")
            if available - 4 < _pad4(size):
                return _short(address, tags, index, f"a blob of {size} bytes without its padding")
            offset += 4 + _pad4(size)
        else:
            return None  # an unknown tag: the parser refuses the message
    return None


def _short(address: str, tags: str, index: int, what: str) -> str:
    return f"{address} ,{tags}: argument {index + 1} ({tags[index]!r}) is cut short ({what})"

"""Frame encoding and decoding: the reference implementation.

The compiled twin (``_frames_c.pyx``) must give the same bytes for the same
frame and, for any input, the same frame or a ``FrameError`` with the same
message.  The checks therefore run in the documented order (docs/protocol.md).
"""

from __future__ import annotations

from struct import Struct

from basidia._speedups._frame import (
    DEFAULT_MAX_FRAME_SIZE,
    FIXED_HEADER_SIZE,
    FRAME_VERSION,
    MAX_HEADERS,
    PREFIX_SIZE,
    Frame,
)
from basidia.errors import FrameError

__all__ = ["decode_frame", "encode_frame"]

_PREFIX = Struct(">BBBBI")
_FIXED = Struct(">BBBBIQQHHI")
_SECTIONS = Struct(">QQHHI")
_ENTRY = Struct(">BH")
_U16 = Struct(">H")

_MAX_KIND = 4  # Kind.EVENT, the highest frame kind of version 1
_KNOWN_FLAGS = 0x03  # FLAG_JSON | FLAG_KWARGS
_U64_MAX = (1 << 64) - 1


def _check_prefix(data: bytes | bytearray | memoryview, max_size: int) -> int:
    """Validate the 8-byte prefix and return the declared total length."""
    version, kind, flags, count, total = _PREFIX.unpack_from(data)
    if version != FRAME_VERSION:
        raise FrameError(f"unsupported frame version {version}")
    if kind < 1 or kind > _MAX_KIND:
        raise FrameError(f"unknown frame kind {kind}")
    if flags & ~_KNOWN_FLAGS:
        raise FrameError(f"unknown frame flags 0x{flags:02x}")
    if count > MAX_HEADERS:
        raise FrameError(f"too many headers: {count} > {MAX_HEADERS}")
    if total > max_size:
        raise FrameError(f"frame of {total} bytes exceeds the limit of {max_size} bytes")
    if total < FIXED_HEADER_SIZE:
        raise FrameError(f"declared frame length {total} is shorter than the fixed header")
    return int(total)


def _text(data: bytes, start: int, length: int, end: int, section: str) -> str:
    if start + length > end:
        raise FrameError(f"{section} of {length} bytes overruns the frame at offset {start}")
    try:
        return data[start : start + length].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(f"{section} is not valid UTF-8") from None


def decode_frame(data: bytes, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> Frame:
    """Decode one whole frame; raise ``FrameError`` on anything malformed."""
    size = len(data)
    if size < PREFIX_SIZE:
        raise FrameError(f"truncated frame: {size} bytes, the prefix needs {PREFIX_SIZE}")
    total = _check_prefix(data, max_size)
    if size < total:
        raise FrameError(f"truncated frame: {size} of {total} bytes")
    if size > total:
        raise FrameError(f"{size - total} trailing bytes after the frame")
    data = bytes(data)
    kind = data[1]
    flags = data[2]
    count = data[3]
    correlation_id, deadline, target_len, reply_len, payload_len = _SECTIONS.unpack_from(data, 8)
    pos = FIXED_HEADER_SIZE
    target = _text(data, pos, target_len, total, "target")
    pos += target_len
    reply_to = _text(data, pos, reply_len, total, "reply_to")
    pos += reply_len
    headers: dict[str, str] = {}
    for index in range(count):
        if pos + 3 > total:
            raise FrameError(f"header {index} overruns the frame at offset {pos}")
        key_len, value_len = _ENTRY.unpack_from(data, pos)
        pos += 3
        key = _text(data, pos, key_len, total, "header key")
        pos += key_len
        headers[key] = _text(data, pos, value_len, total, "header value")
        pos += value_len
    if len(headers) != count:
        raise FrameError("duplicate header keys")
    if pos + payload_len > total:
        raise FrameError(f"payload of {payload_len} bytes overruns the frame at offset {pos}")
    if pos + payload_len < total:
        raise FrameError(f"{total - pos - payload_len} unused bytes in the frame")
    return Frame(
        kind,
        correlation_id,
        target,
        data[pos:total],
        reply_to,
        deadline,
        headers,
        flags,
    )


def _encoded(value: str, limit: int, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > limit:
        raise FrameError(f"{what} of {len(raw)} bytes exceeds {limit} bytes")
    return raw


def encode_frame(frame: Frame, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Encode ``frame``; raise ``FrameError`` if a field is out of range or the frame too big."""
    kind = frame.kind
    if kind < 1 or kind > _MAX_KIND:
        raise FrameError(f"unknown frame kind {kind}")
    flags = frame.flags
    if flags & ~_KNOWN_FLAGS or flags < 0:
        raise FrameError(f"unknown frame flags 0x{flags:02x}")
    correlation_id = frame.correlation_id
    if correlation_id < 0 or correlation_id > _U64_MAX:
        raise FrameError("correlation id out of range")
    deadline = frame.deadline
    if deadline < 0 or deadline > _U64_MAX:
        raise FrameError("deadline out of range")
    headers = frame.headers
    if len(headers) > MAX_HEADERS:
        raise FrameError(f"too many headers: {len(headers)} > {MAX_HEADERS}")
    target = _encoded(frame.target, 0xFFFF, "target")
    reply_to = _encoded(frame.reply_to, 0xFFFF, "reply_to")
    payload = frame.payload
    parts = [b"", target, reply_to]
    for key, value in headers.items():
        raw_key = _encoded(key, 0xFF, "header key")
        raw_value = _encoded(value, 0xFFFF, "header value")
        parts.append(_ENTRY.pack(len(raw_key), len(raw_value)))
        parts.append(raw_key)
        parts.append(raw_value)
    parts.append(payload)
    total = FIXED_HEADER_SIZE + sum(map(len, parts))
    if total > max_size:
        raise FrameError(f"frame of {total} bytes exceeds the limit of {max_size} bytes")
    parts[0] = _FIXED.pack(
        FRAME_VERSION,
        kind,
        flags,
        len(headers),
        total,
        correlation_id,
        deadline,
        len(target),
        len(reply_to),
        len(payload),
    )
    return b"".join(parts)

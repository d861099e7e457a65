"""The wire frame type and constants, shared by both implementations of the codec.

See ``docs/protocol.md`` for the byte layout.  This module is plain Python on
purpose: both twins build and return the same ``Frame`` type, so their results
compare equal.
"""

from __future__ import annotations

from enum import IntEnum

import msgspec

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FIXED_HEADER_SIZE",
    "FLAG_JSON",
    "FLAG_KWARGS",
    "FRAME_VERSION",
    "HARD_MAX_FRAME_SIZE",
    "MAX_HEADERS",
    "PREFIX_SIZE",
    "Frame",
    "Kind",
]

#: Protocol version, the first byte of every frame.
FRAME_VERSION = 1
#: version, kind, flags, header count, total length: enough to frame a stream.
PREFIX_SIZE = 8
#: The prefix plus correlation id, deadline and the three section lengths.
FIXED_HEADER_SIZE = 32
#: Default limit on a whole frame (docs/reliability.md: 1 MiB, configurable).
DEFAULT_MAX_FRAME_SIZE = 1 << 20
#: No configuration may raise the limit above this.
HARD_MAX_FRAME_SIZE = 16 << 20
#: Header entries allowed in one frame.
MAX_HEADERS = 64

#: The payload is JSON rather than MessagePack.
FLAG_JSON = 0x01
#: A request payload is ``[args, kwargs]`` rather than the positional arguments alone.
FLAG_KWARGS = 0x02


class Kind(IntEnum):
    """What a frame is; the values are part of the wire format."""

    REQUEST = 1
    REPLY = 2
    ERROR = 3
    EVENT = 4


class Frame(msgspec.Struct, gc=False):
    """One decoded Basidia frame.

    ``deadline`` is in milliseconds since the Unix epoch, ``0`` meaning none.
    Header keys and values are strings (trace context, call-id stack,
    idempotency key, ...).
    """

    kind: int
    correlation_id: int
    target: str
    payload: bytes
    reply_to: str = ""
    deadline: int = 0
    headers: dict[str, str] = {}
    flags: int = 0

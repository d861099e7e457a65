"""The one place that picks the compiled core or its pure-Python twin.

``BASIDIA_NO_EXTENSIONS=1`` (or ``true``/``yes``/``on``) forces the pure-Python
implementation; so does running on an interpreter other than CPython.
Nothing else in Basidia imports ``_*_c`` or ``_*_py`` modules directly.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from basidia._speedups._frame import (
    DEFAULT_MAX_FRAME_SIZE,
    FIXED_HEADER_SIZE,
    FLAG_JSON,
    FLAG_KWARGS,
    FRAME_VERSION,
    HARD_MAX_FRAME_SIZE,
    MAX_HEADERS,
    Frame,
    Kind,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "CompiledCall",
    "CompiledClientCore",
    "CompiledInbox",
    "CompiledMemoryReplier",
    "CompiledMemorySender",
    "CompiledMethodProxy",
    "CompiledRequestHandler",
    "FIXED_HEADER_SIZE",
    "FLAG_JSON",
    "FLAG_KWARGS",
    "FRAME_VERSION",
    "HARD_MAX_FRAME_SIZE",
    "IMPLEMENTATION",
    "MAX_HEADERS",
    "NO_EXTENSIONS",
    "Frame",
    "Kind",
    "ReplyRouter",
    "decode_frame",
    "encode_frame",
    "future_factory",
]


def env_flag(name: str) -> bool:
    """Read a boolean switch from the environment: ``1/true/yes/on`` are on, anything else off."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


NO_EXTENSIONS = env_flag("BASIDIA_NO_EXTENSIONS") or sys.implementation.name != "cpython"

from basidia._speedups._frames_py import decode_frame, encode_frame  # noqa: E402
from basidia._speedups._router_py import ReplyRouter, future_factory  # noqa: E402

#: The compiled call path's awaitables (docs/benchmarks.md#the-compiled-call-path), or
#: None on the pure-Python core, whose twins are ``RpcClient._call`` and
#: ``RequestServer.on_request``.
CompiledCall: Any = None
CompiledClientCore: Any = None
CompiledInbox: Any = None
CompiledMemoryReplier: Any = None
CompiledMemorySender: Any = None
CompiledMethodProxy: Any = None
CompiledRequestHandler: Any = None

IMPLEMENTATION = "py"
#: Why the compiled core is not in use, or None when it is (for diagnostics and tests).
_FALLBACK_REASON: str | None = "BASIDIA_NO_EXTENSIONS or a non-CPython interpreter"

if not TYPE_CHECKING and not NO_EXTENSIONS:  # pragma: no branch
    try:
        # All or nothing: a half-compiled install runs the pure twins throughout.
        # Full module names: "No module named ..." when absent, not a circular-import hint.
        import basidia._speedups._calls_c as _calls_c
        import basidia._speedups._frames_c as _frames_c
        import basidia._speedups._router_c as _router_c
    except ImportError as exc:  # pragma: no cover - no compiled core in this install
        _FALLBACK_REASON = f"{type(exc).__name__}: {exc}"
    else:
        decode_frame = _frames_c.decode_frame
        encode_frame = _frames_c.encode_frame
        ReplyRouter = _router_c.ReplyRouter
        CompiledCall = _calls_c.Call
        CompiledClientCore = _calls_c.ClientCore
        CompiledMemoryReplier = _calls_c.MemoryReplier
        CompiledInbox = _calls_c.Inbox
        CompiledMemorySender = _calls_c.MemorySender
        CompiledMethodProxy = _calls_c.MethodProxy
        CompiledRequestHandler = _calls_c.RequestHandler
        IMPLEMENTATION = "c"
        _FALLBACK_REASON = None

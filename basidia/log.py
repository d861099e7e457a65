"""Structured logging: every record carries the call id of the request being handled."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from basidia.context import current_call

__all__ = ["CallContextFilter", "JsonFormatter", "ThrottledLog", "configure_logging", "shorten"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(call_id)s] %(message)s"

#: Characters of untrusted text (an exception message, a reason) kept in a log line.
MAX_LOGGED_CHARS = 2048

#: The current span's (trace id, span id) in hex, or None outside a span: set by
#: ``basidia.telemetry`` when tracing is on (docs/observability.md).
trace_ids: Callable[[], tuple[str, str] | None] | None = None


def shorten(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class ThrottledLog:
    """Logs a recurring condition (bad input, a failing peer) once per kind per interval.

    Each kind (``"malformed request"``, say) gets at most one line per ``interval``
    seconds; the next line says how many were left out meanwhile, and ``counts`` keeps
    the total per kind, so a flood of bad frames costs a few lines and a counter.
    docs/security.md lists the kinds Basidia logs this way.
    """

    __slots__ = ("_interval", "_logger", "_next", "_suppressed", "counts")

    #: Distinct kinds remembered; past it the oldest are forgotten (kinds are few).
    MAX_KINDS = 256

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        #: Occurrences per kind since this log was made.
        self.counts: dict[str, int] = {}

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` at ``level`` unless ``kind`` was logged within the interval."""
        counts = self.counts
        counts[kind] = counts.get(kind, 0) + 1
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        if kind not in self._next and len(self._next) >= self.MAX_KINDS:
            oldest = next(iter(self._next))
            del self._next[oldest]
            self._suppressed.pop(oldest, None)
        self._next[kind] = now + self._interval
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (and %d more like it in the last %g s)"
            args = (*args, suppressed, self._interval)
        self._logger.log(level, message, *args)


class CallContextFilter(logging.Filter):
    """Adds ``call_id``, ``root_call_id`` (the outermost call of the chain), ``service``,
    ``entrypoint``, and with tracing on ``trace_id`` and ``span_id``, to records (``-``
    outside a call or a span).

    Attach it to your own handlers to get the same fields when embedding Basidia.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_call.get()
        if ctx is None:
            record.call_id = record.root_call_id = record.service = record.entrypoint = "-"
        else:
            record.call_id = ctx.call_id
            record.root_call_id = ctx.call_id_stack[0]
            record.service = ctx.service
            record.entrypoint = ctx.entrypoint
        ids = trace_ids() if trace_ids is not None else None
        record.trace_id, record.span_id = ids or ("-", "-")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, call context, exception."""

    _encode = msgspec.json.Encoder().encode

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "call_id": getattr(record, "call_id", "-"),
            "root_call_id": getattr(record, "root_call_id", "-"),
            "service": getattr(record, "service", "-"),
            "entrypoint": getattr(record, "entrypoint", "-"),
        }
        trace_id = getattr(record, "trace_id", "-")
        if trace_id != "-":
            entry["trace_id"] = trace_id
            entry["span_id"] = getattr(record, "span_id", "-")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self._encode(entry).decode()


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at ``level``, as text or JSON lines, with the call context on every record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())

"""Structured logging: every record carries the call id of the request being handled."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

from basidia.context import current_call

__all__ = ["CallContextFilter", "JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(call_id)s] %(message)s"


class CallContextFilter(logging.Filter):
    """Adds ``call_id``, ``service`` and ``entrypoint`` to records (``-`` outside a call).

    Attach it to your own handlers to get the same fields when embedding Basidia.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_call.get()
        if ctx is None:
            record.call_id = record.service = record.entrypoint = "-"
        else:
            record.call_id = ctx.call_id
            record.service = ctx.service
            record.entrypoint = ctx.entrypoint
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
            "service": getattr(record, "service", "-"),
            "entrypoint": getattr(record, "entrypoint", "-"),
        }
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

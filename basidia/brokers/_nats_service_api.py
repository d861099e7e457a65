"""The NATS service API (ADR-32) for the NATS broker: what ``$SRV.PING/INFO/STATS`` answer.

Each registered service has a record with its RPC methods as endpoints.  The
broker's request workers count requests, errors and processing time per
endpoint; the answers are built only when someone asks.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from basidia._speedups import decode_frame

__all__ = ["Endpoint", "ServiceRecord", "WorkerState", "announceable", "new_record", "serving"]

_SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# The semver.org expression, as ADR-32 asks.
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_json_encode = msgspec.json.encode


class Endpoint:
    """One RPC method as the service API shows it, with its counters."""

    __slots__ = (
        "last_error",
        "name",
        "num_errors",
        "num_requests",
        "processing_time",
        "queue_group",
        "subject",
    )

    def __init__(self, name: str, subject: str, queue_group: str) -> None:
        self.name = name
        self.subject = subject
        self.queue_group = queue_group
        self.num_requests = 0
        self.num_errors = 0
        self.processing_time = 0  # nanoseconds
        # The last error *frame*: turned into text only when someone asks for STATS.
        self.last_error: bytes | None = None

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "metadata": {"basidia_kind": "rpc"},
        }

    def stats(self) -> dict[str, Any]:
        requests = self.num_requests
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "num_requests": requests,
            "num_errors": self.num_errors,
            "last_error": _error_text(self.last_error),
            "processing_time": self.processing_time,
            "average_processing_time": self.processing_time // requests if requests else 0,
            "data": None,  # optional in ADR-32, but nats-py's parser requires the key
        }


def _error_text(frame: bytes | None) -> str:
    """``"Type: message"`` from an error frame, for ``last_error`` ("" when none)."""
    if frame is None:
        return ""
    try:
        error = msgspec.msgpack.decode(decode_frame(frame).payload)
        return f"{error.get('type', 'Error')}: {error.get('message', '')}"
    except Exception:  # an unreadable error frame is still an error
        return "unreadable error frame"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class ServiceRecord:
    """A running service instance as ``$SRV.PING/INFO/STATS`` describe it."""

    name: str
    id: str
    version: str
    description: str
    metadata: dict[str, str]
    endpoints: list[Endpoint]
    started: str = field(default_factory=_utc_now)

    def matches(self, name: str | None, service_id: str | None) -> bool:
        """Whether a request for ``name`` and ``service_id`` (None: any) concerns it."""
        return (name is None or name == self.name) and (service_id is None or service_id == self.id)

    def response(self, verb: str) -> bytes | None:
        """The JSON answer to ``$SRV.<verb>``, or None for an unknown verb."""
        answer: dict[str, Any] = {
            "type": f"io.nats.micro.v1.{verb.lower()}_response",
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
        }
        if verb == "INFO":
            answer["description"] = self.description
            answer["endpoints"] = [endpoint.info() for endpoint in self.endpoints]
        elif verb == "STATS":
            answer["started"] = self.started
            answer["endpoints"] = [endpoint.stats() for endpoint in self.endpoints]
        elif verb != "PING":
            return None
        return _json_encode(answer)


def announceable(name: str) -> bool:
    """Whether ``name`` is a valid service name on the service API."""
    return _SERVICE_NAME_RE.match(name) is not None


def new_record(
    name: str,
    service_id: str,
    *,
    version: str,
    methods: Iterable[str],
    subject: str,
    description: str,
    metadata: Mapping[str, str] | None,
) -> ServiceRecord:
    """A record for service ``name`` (``announceable``) whose RPC ``methods`` listen on
    ``subject``; raises ``ValueError`` for a version that is not a semantic one.
    """
    if not _SEMVER_RE.match(version):
        raise ValueError(f"service version {version!r} is not a semantic version")
    # The queue group of a Basidia service is its name (see NatsBroker.serve_requests).
    endpoints = [Endpoint(method, subject, name) for method in methods]
    return ServiceRecord(name, service_id, version, description, dict(metadata or {}), endpoints)


class WorkerState:
    """Per request worker: lets ``send_reply`` report an error reply to the worker's stats."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: bytes | None = None

    def take_error(self) -> bytes | None:
        """The error frame replied since the last call, if any."""
        error, self.error = self.error, None
        return error


#: Set once in each request worker task (and inherited by tasks it spawns): the framework
#: replies from inside the delivery handler, so ``send_reply`` finds the worker it serves.
serving: contextvars.ContextVar[WorkerState | None] = contextvars.ContextVar(
    "basidia_nats_serving", default=None
)

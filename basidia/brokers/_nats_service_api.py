"""The NATS service API (ADR-32) for the NATS broker: what ``$SRV.PING/INFO/STATS`` answer.

Each registered service has a record with its RPC methods as endpoints.  Their
requests, errors and processing times are the container's counters
(``EndpointStats``), read when someone asks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from basidia.brokers.base import EndpointStats, ServiceInfo
from basidia.service import SEMVER

__all__ = ["Endpoint", "ServiceRecord", "announceable", "new_record"]

_SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_json_encode = msgspec.json.encode


class Endpoint:
    """One RPC method as the service API shows it, with its container's counters."""

    __slots__ = ("counters", "name", "queue_group", "subject")

    def __init__(self, name: str, subject: str, queue_group: str, counters: EndpointStats) -> None:
        self.name = name
        self.subject = subject
        self.queue_group = queue_group
        self.counters = counters

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "metadata": {"basidia_kind": "rpc"},
        }

    def stats(self) -> dict[str, Any]:
        counters = self.counters
        requests = counters.num_requests
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "num_requests": requests,
            "num_errors": counters.num_errors,
            "last_error": counters.last_error,
            "processing_time": counters.processing_time,
            "average_processing_time": counters.processing_time // requests if requests else 0,
            "data": None,  # optional in ADR-32, but nats-py's parser requires the key
        }


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


def new_record(info: ServiceInfo, service_id: str, *, subject: str) -> ServiceRecord:
    """A record for the service of ``info`` (``announceable``), whose RPC methods listen on
    ``subject``; raises ``ValueError`` for a version that is not a semantic one."""
    if not SEMVER.match(info.version):
        raise ValueError(f"service version {info.version!r} is not a semantic version")
    # The queue group of a Basidia service is its name (see NatsBroker.serve_requests).
    endpoints = [
        Endpoint(method, subject, info.name, info.stats.get(method) or EndpointStats())
        for method in info.methods
    ]
    return ServiceRecord(
        info.name, service_id, info.version, info.description, dict(info.metadata), endpoints
    )

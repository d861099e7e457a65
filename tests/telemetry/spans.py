"""Checking a chain's spans, whether an in-memory exporter or a file exporter wrote them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The traceparent the HTTP client sends: the chain continues this trace.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

Span = dict[str, Any]


def read_spans(paths: Iterable[Path]) -> list[Span]:
    """The spans in the JSON-lines files the ``file`` traces exporter wrote."""
    spans: list[Span] = []
    for path in paths:
        if path.exists():
            spans += [json.loads(line) for line in path.read_text().splitlines() if line]
    return spans


def _one(spans: list[Span], kind: str, name: str) -> Span:
    found = [s for s in spans if s["kind"] == f"SpanKind.{kind}" and s["name"] == name]
    assert len(found) == 1, (kind, name, [(s["kind"], s["name"]) for s in spans])
    return found[0]


def _id(span: Span) -> str:
    return str(span["context"]["span_id"])


def assert_chain(spans: list[Span], suffix: str, system: str) -> None:
    """HTTP SERVER → RPC CLIENT → RPC SERVER → nested CLIENT → SERVER, and PRODUCER →
    CONSUMER for the event, all in the incoming trace, every parent right."""
    users, db, event = f"chain_users_{suffix}", f"chain_db_{suffix}", f"chain.greeted.{suffix}"
    http = _one(spans, "SERVER", "GET /chain/{user_id}")
    greet_client = _one(spans, "CLIENT", f"{users}/greet")
    greet_server = _one(spans, "SERVER", f"{users}/greet")
    db_client = _one(spans, "CLIENT", f"{db}/get_user")
    db_server = _one(spans, "SERVER", f"{db}/get_user")
    producer = _one(spans, "PRODUCER", f"send {event}")
    consumer = _one(spans, "CONSUMER", f"process {event}")
    chain = [http, greet_client, greet_server, db_client, db_server, producer, consumer]

    assert {span["context"]["trace_id"] for span in chain} == {f"0x{TRACE_ID}"}
    assert http["parent_id"] == f"0x{PARENT_ID}"
    for child, parent in [
        (greet_client, http),
        (greet_server, greet_client),
        (db_client, greet_server),
        (db_server, db_client),
        (producer, greet_server),
        (consumer, producer),
    ]:
        assert child["parent_id"] == _id(parent), (child["name"], parent["name"])
    assert all(span["status"]["status_code"] == "UNSET" for span in chain)

    assert http["attributes"] == {
        **http["attributes"],
        "http.request.method": "GET",
        "http.route": "/chain/{user_id}",
        "url.path": "/chain/7",
        "http.response.status_code": 200,
    }
    for span, method in [
        (greet_client, f"{users}/greet"),
        (greet_server, f"{users}/greet"),
        (db_client, f"{db}/get_user"),
        (db_server, f"{db}/get_user"),
    ]:
        assert span["attributes"] == {
            **span["attributes"],
            "rpc.system.name": "basidia",
            "rpc.method": method,
            "rpc.response.status_code": "OK",
            "messaging.system": system,
        }
    assert producer["attributes"] == {
        **producer["attributes"],
        "messaging.system": system,
        "messaging.operation.type": "send",
        "messaging.destination.name": event,
    }
    assert consumer["attributes"] == {
        **consumer["attributes"],
        "messaging.system": system,
        "messaging.operation.type": "process",
        "messaging.destination.name": event,
        "messaging.consumer.group.name": f"chain_notify_{suffix}.on_greeted",
        "messaging.message.id": producer["attributes"]["messaging.message.id"],
        "basidia.event.attempt": 1,
        "basidia.event.outcome": "ack",
    }

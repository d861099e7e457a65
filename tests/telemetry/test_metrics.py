"""Metrics as a user reads them: calls by method and outcome, event attempts by outcome
(ack, retry, dead_letter) with their CONSUMER spans, and services observed while they run."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from basidia import Service, ServiceRunner, connect, event_handler, rpc
from basidia.errors import RemoteError
from basidia.telemetry import OpenTelemetry

pytestmark = pytest.mark.timeout(30)


class Orders(Service):
    name = "telemetry_orders"

    @rpc
    async def place(self, item: str) -> str:
        if item == "nothing":
            raise ValueError("nothing to place")
        return item

    @event_handler("telemetry.order.broken", max_attempts=2)
    async def on_broken(self, data: dict[str, Any]) -> None:
        raise RuntimeError("cannot handle it")


def _points(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    found: dict[tuple[tuple[str, Any], ...], Any] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        value = getattr(point, "count", None)
                        if value is None:
                            value = point.value
                        found[tuple(sorted(point.attributes.items()))] = value
    return found


async def test_calls_by_method_and_outcome_and_event_attempts_by_outcome(memory_url: str) -> None:
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = OpenTelemetry(tracer_provider, MeterProvider(metric_readers=[reader]))
    async with (
        ServiceRunner([Orders], broker=memory_url, middleware=[telemetry]) as runner,
        connect(memory_url, middleware=[telemetry]) as cluster,
    ):
        for item in ("tea", "cake", "tea"):
            assert await cluster.rpc.telemetry_orders.place(item) == item
        with pytest.raises(RemoteError):
            await cluster.rpc.telemetry_orders.place("nothing")
        await cluster.dispatch("telemetry.order.broken", {"id": 1})
        for _ in range(200):  # the event is tried twice, then dead-lettered
            if runner.containers["telemetry_orders"].stats.dead_lettered:
                break
            await asyncio.sleep(0.02)
        served = _points(reader, "rpc.server.call.duration")
        attempts = _points(reader, "basidia.events.handled")
        in_flight = _points(reader, "basidia.calls.in_flight")
        dead = _points(reader, "basidia.events.dead_lettered")

    method = "telemetry_orders/place"
    assert served == {
        (("rpc.method", method), ("rpc.response.status_code", "OK")): 3,
        (
            ("error.type", "ValueError"),
            ("rpc.method", method),
            ("rpc.response.status_code", "remote_error"),
        ): 1,
    }
    group = ("messaging.consumer.group.name", "telemetry_orders.on_broken")
    event = ("messaging.destination.name", "telemetry.order.broken")
    assert attempts == {
        (("basidia.event.outcome", outcome), ("error.type", "RuntimeError"), group, event): 1
        for outcome in ("retry", "dead_letter")
    }
    assert in_flight == {(("basidia.service", "telemetry_orders"),): 0}
    assert dead == {(("basidia.service", "telemetry_orders"),): 1}

    consumers = [
        json.loads(span.to_json(indent=None))
        for span in exporter.get_finished_spans()
        if span.name == "process telemetry.order.broken"
    ]
    assert [
        (s["attributes"]["basidia.event.attempt"], s["attributes"]["basidia.event.outcome"])
        for s in consumers
    ] == [(1, "retry"), (2, "dead_letter")]
    assert all(s["status"]["status_code"] == "ERROR" for s in consumers)
    # Stopped and closed, the services are no longer observed.
    assert _points(reader, "basidia.calls.in_flight") == {}

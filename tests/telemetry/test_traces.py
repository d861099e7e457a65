"""One trace across HTTP, RPC and events in one process, on the memory broker; errors
recorded with their type; log records that name the span they were written in."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.requests import Request

from basidia import Service, ServiceRunner, connect, http_endpoint, rpc
from basidia.errors import BulkheadFull, CircuitOpen, RateLimited, RemoteError
from basidia.http.server import HttpSettings, build_app
from basidia.log import CallContextFilter, JsonFormatter
from basidia.telemetry import OpenTelemetry
from tests.telemetry.chain import chain_services
from tests.telemetry.spans import TRACEPARENT, assert_chain

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    found = InMemorySpanExporter()
    yield found
    found.clear()


@pytest.fixture
def telemetry(exporter: InMemorySpanExporter) -> OpenTelemetry:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetry(tracer_provider=provider)


def _spans(exporter: InMemorySpanExporter) -> list[dict[str, Any]]:
    return [json.loads(span.to_json(indent=None)) for span in exporter.get_finished_spans()]


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_http_rpc_nested_rpc_and_event_form_one_trace_on_the_memory_broker(
    memory_url: str, unique: str, exporter: InMemorySpanExporter, telemetry: OpenTelemetry
) -> None:
    services = list(chain_services(unique).values())
    async with ServiceRunner(services, broker=memory_url, middleware=[telemetry]) as runner:
        app = build_app(runner, HttpSettings())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            response = await client.get("/chain/7", headers={"traceparent": TRACEPARENT})
        assert response.json() == {"message": "Hello, User 7!"}
        await _until(lambda: any(s["kind"] == "SpanKind.CONSUMER" for s in _spans(exporter)))
    assert_chain(_spans(exporter), unique, "memory")


class Failing(Service):
    name = "telemetry_failing"

    @rpc
    async def explode(self) -> None:
        raise KeyError("no such order")


async def test_a_failing_call_is_recorded_with_status_error_and_its_type(
    memory_url: str, exporter: InMemorySpanExporter, telemetry: OpenTelemetry
) -> None:
    async with (
        ServiceRunner([Failing], broker=memory_url, middleware=[telemetry]),
        connect(memory_url, middleware=[telemetry]) as cluster,
    ):
        with pytest.raises(RemoteError):
            await cluster.rpc.telemetry_failing.explode()
    spans = {s["kind"]: s for s in _spans(exporter)}
    server, client = spans["SpanKind.SERVER"], spans["SpanKind.CLIENT"]
    assert server["parent_id"] == client["context"]["span_id"]
    for span in (server, client):
        assert span["status"]["status_code"] == "ERROR"
        assert span["attributes"]["rpc.response.status_code"] == "remote_error"
    assert server["attributes"]["error.type"] == "KeyError"
    assert server["events"][0]["attributes"]["exception.type"] == "KeyError"
    assert client["attributes"]["error.type"] == "RemoteError"


class Refusing(Service):
    name = "telemetry_refusing"

    @http_endpoint("GET", "/refuse/{why}")
    async def refuse(self, request: Request) -> dict[str, str]:
        why = request.path_params["why"]
        if why == "rate":
            raise RateLimited("downstream over its limit", 2.0)
        if why == "circuit":
            raise CircuitOpen("downstream's circuit is open")
        raise BulkheadFull("downstream's bulkhead is full")


async def test_an_http_span_records_the_status_the_client_got(
    memory_url: str, exporter: InMemorySpanExporter, telemetry: OpenTelemetry
) -> None:
    """Refusals answered 429 or 503 are recorded as 429 and 503, not as 500."""
    async with ServiceRunner([Refusing], broker=memory_url, middleware=[telemetry]) as runner:
        transport = httpx.ASGITransport(app=build_app(runner, HttpSettings()))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            answered = {
                why: (await client.get(f"/refuse/{why}")).status_code
                for why in ("rate", "circuit", "bulkhead")
            }
    assert answered == {"rate": 429, "circuit": 503, "bulkhead": 503}
    recorded = sorted(
        span["attributes"]["http.response.status_code"]
        for span in _spans(exporter)
        if span["kind"] == "SpanKind.SERVER"
    )
    assert recorded == [429, 503, 503]


logger = logging.getLogger("tests.telemetry.logs")


class Logging(Service):
    name = "telemetry_logging"

    @rpc
    async def work(self) -> None:
        logger.warning("working")


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(CallContextFilter())
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


async def test_json_log_records_carry_the_trace_and_span_ids_and_the_root_call(
    memory_url: str,
    exporter: InMemorySpanExporter,
    telemetry: OpenTelemetry,
    log_lines: io.StringIO,
) -> None:
    async with (
        ServiceRunner([Logging], broker=memory_url, middleware=[telemetry]),
        connect(memory_url, middleware=[telemetry]) as cluster,
    ):
        await cluster.rpc.telemetry_logging.work()
    (record,) = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    server = next(s for s in _spans(exporter) if s["kind"] == "SpanKind.SERVER")
    assert f"0x{record['trace_id']}" == server["context"]["trace_id"]
    assert f"0x{record['span_id']}" == server["context"]["span_id"]
    assert record["call_id"].startswith("telemetry_logging.work.")
    assert record["root_call_id"] == record["call_id"]  # the outermost call of its chain


async def test_without_telemetry_no_instrumentation_is_in_the_call_path(memory_url: str) -> None:
    async with ServiceRunner([Logging], broker=memory_url) as runner:
        assert runner.middleware == []
        assert runner.runtime.publisher.telemetry is None

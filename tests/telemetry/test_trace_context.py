"""Untrusted trace context: whatever arrives in a frame or an HTTP request, the call goes
on; what is malformed or oversized is dropped and counted (docs/observability.md)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from basidia import Middleware, Service, ServiceRunner, connect, current_context, http_endpoint, rpc
from basidia.http.server import HttpSettings, build_app
from basidia.middleware import CallNext, OutgoingCall
from basidia.telemetry import OpenTelemetry
from basidia.telemetry._otel import MAX_BAGGAGE_ENTRIES, TraceContextReader, parse_traceparent

pytestmark = pytest.mark.timeout(60)

TRACE_ID, SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
GOOD = f"00-{TRACE_ID}-{SPAN_ID}-01"

# (traceparent, tracestate, baggage, why it is dropped)
HOSTILE: list[tuple[str | None, str | None, str | None, str]] = [
    (f"ff-{TRACE_ID}-{SPAN_ID}-01", None, None, "malformed traceparent"),  # version ff
    (f"0x-{TRACE_ID}-{SPAN_ID}-01", None, None, "malformed traceparent"),
    (f"00-{TRACE_ID}-{SPAN_ID}-01-extra", None, None, "malformed traceparent"),
    (f"00-{'z' * 32}-{SPAN_ID}-01", None, None, "malformed traceparent"),  # bad hex
    (f"00-{TRACE_ID.upper()}-{SPAN_ID}-01", None, None, "malformed traceparent"),
    (f"00-{'0' * 32}-{SPAN_ID}-01", None, None, "malformed traceparent"),  # all-zero id
    (f"00-{TRACE_ID}-{'0' * 16}-01", None, None, "malformed traceparent"),
    ("", None, None, "malformed traceparent"),
    ("\u00e9" * 55, None, None, "malformed traceparent"),
    ("0" * 60_000, None, None, "oversized"),  # as much as a frame header can hold
    (GOOD, "x" * 9000, None, "oversized"),
    (GOOD, "=,=,=", None, "malformed tracestate"),
    (GOOD, None, ",".join(["k=v"] * 10_000), "oversized"),  # 10,000 entries
    (
        GOOD,
        None,
        ",".join(f"k{i}=v" for i in range(MAX_BAGGAGE_ENTRIES + 1)),
        "too many baggage entries",
    ),
    (GOOD, None, "no equals sign", "malformed baggage"),
    (GOOD, None, "k=v\u00e9", "malformed baggage"),
]


class Echo(Service):
    name = "telemetry_hostile_echo"

    @rpc
    async def echo(self, value: int) -> dict[str, Any]:
        span = trace.get_current_span().get_span_context()
        ctx = current_context()
        assert ctx is not None
        return {"trace_id": f"{span.trace_id:032x}", "baggage": dict(baggage.get_all())}

    @http_endpoint("GET", "/echo")
    async def http_echo(self, request: Any) -> dict[str, Any]:
        span = trace.get_current_span().get_span_context()
        return {"trace_id": f"{span.trace_id:032x}", "baggage": dict(baggage.get_all())}


class Forge(Middleware):
    """Sends whatever trace headers the test puts in ``headers``, as a hostile caller."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    async def call(self, call: OutgoingCall, call_next: CallNext) -> Any:
        call.headers.update(self.headers)
        return await call_next(call)


@pytest.fixture
def telemetry() -> OpenTelemetry:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return OpenTelemetry(tracer_provider=provider)


def _headers(tp: str | None, ts: str | None, bg: str | None) -> dict[str, str]:
    found = {"tp": tp, "ts": ts, "bg": bg}
    return {key: value for key, value in found.items() if value is not None}


async def test_hostile_trace_context_in_frames_never_fails_a_call_and_is_counted(
    memory_url: str, telemetry: OpenTelemetry
) -> None:
    forge = Forge()
    async with (
        ServiceRunner([Echo], broker=memory_url, middleware=[telemetry]),
        connect(memory_url, middleware=[forge]) as cluster,
    ):
        forge.headers = {"tp": GOOD, "bg": "user=ada,tenant=7"}
        trusted = await cluster.rpc.telemetry_hostile_echo.echo(1)
        assert trusted == {"trace_id": TRACE_ID, "baggage": {"user": "ada", "tenant": "7"}}
        for index, (tp, ts, bg, reason) in enumerate(HOSTILE):
            before = telemetry.reader.dropped.get(reason, 0)
            forge.headers = _headers(tp, ts, bg)
            result = await cluster.rpc.telemetry_hostile_echo.echo(index)
            assert telemetry.reader.dropped.get(reason, 0) == before + 1, (index, reason)
            if reason == "malformed tracestate":
                assert result["trace_id"] == TRACE_ID  # the parent stays, its state goes
            elif tp is not GOOD or reason == "oversized":
                assert result["trace_id"] != TRACE_ID  # a new trace
            assert result["baggage"] == {}, index


async def test_hostile_trace_context_in_http_requests_is_dropped_and_counted(
    memory_url: str, telemetry: OpenTelemetry
) -> None:
    async with ServiceRunner([Echo], broker=memory_url, middleware=[telemetry]) as runner:
        # Headers up to 1 MiB reach the endpoint (the server's default limit answers 431
        # past 16 KiB before any endpoint runs): the trace context bound is what is tested.
        app = build_app(runner, HttpSettings(max_header_size=1 << 20))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            answer = await client.get("/echo", headers={"traceparent": GOOD, "baggage": "a=1"})
            assert answer.json() == {"trace_id": TRACE_ID, "baggage": {"a": "1"}}
            cases = [*HOSTILE, ("0" * 100 * 1024, None, None, "oversized")]  # 100 KiB
            for tp, ts, bg, reason in cases:
                before = telemetry.reader.dropped.get(reason, 0)
                headers = {"traceparent": tp, "tracestate": ts, "baggage": bg}
                sent = {k: v for k, v in headers.items() if v is not None and v.isascii()}
                if len(sent) != len(headers) - sum(v is None for v in headers.values()):
                    continue  # HTTP headers are ASCII: a non-ASCII case cannot be sent
                response = await client.get("/echo", headers=sent)
                assert response.status_code == 200
                assert telemetry.reader.dropped.get(reason, 0) == before + 1, reason
                assert response.json()["baggage"] == {}


printable = st.text(st.characters(codec="ascii"), max_size=120)
hexish = st.text(alphabet="0123456789abcdefABCDEF-xz", min_size=50, max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    tp=st.none() | printable | hexish,
    ts=st.none() | printable,
    bg=st.none() | printable | st.lists(printable, max_size=300).map(",".join),
)
def test_any_trace_context_reads_into_a_context_or_is_dropped(
    tp: str | None, ts: str | None, bg: str | None
) -> None:
    reader = TraceContextReader()
    ctx = reader.read(tp, ts, bg)  # never raises
    parent = trace.get_current_span(ctx).get_span_context()
    if tp is not None and parse_traceparent(tp) is None:
        assert not parent.is_valid
        assert sum(reader.dropped.values()) >= 1
    if parent.is_valid:
        assert tp is not None and f"{parent.trace_id:032x}" == tp[3:35]
    assert len(baggage.get_all(ctx)) <= MAX_BAGGAGE_ENTRIES
    json.dumps(reader.dropped)

"""The OpenTelemetry instrumentation (``basidia[otel]``): spans, metrics, trace context.

Imported only when telemetry is on (``basidia.telemetry.instrumentation_for``).  What
each span and metric means is in docs/observability.md; the frame headers that carry
the trace context (``tp``, ``ts``, ``bg``) are in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, context, metrics, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TracerProvider,
    TraceState,
)

from basidia import __version__, log
from basidia._speedups import Kind
from basidia.errors import (
    BrokerError,
    MethodNotFound,
    RemoteError,
    RpcError,
    RpcTimeout,
    ServiceUnavailable,
    ValidationError,
)
from basidia.log import ThrottledLog
from basidia.middleware import CallNext, HandleNext, OutgoingCall
from basidia.telemetry import Instrumentation, PublishNext, TelemetrySettings

if TYPE_CHECKING:
    from basidia.brokers.base import Broker
    from basidia.container import ServiceContainer
    from basidia.context import CallContext

__all__ = [
    "MAX_BAGGAGE_ENTRIES",
    "MAX_TRACE_CONTEXT",
    "OpenTelemetry",
    "TraceContextReader",
    "process_instrumentation",
    "prometheus_text",
]

logger = logging.getLogger("basidia.telemetry")

#: Frame headers carrying W3C trace context (docs/protocol.md).
TRACEPARENT_HEADER = "tp"
TRACESTATE_HEADER = "ts"
BAGGAGE_HEADER = "bg"
#: Bytes of untrusted trace context (traceparent, tracestate and baggage together)
#: and baggage entries read from a frame or an HTTP request; beyond, it is dropped.
MAX_TRACE_CONTEXT = 8192
MAX_BAGGAGE_ENTRIES = 180
#: W3C Trace Context: tracestate has at most 32 members (512 characters is the
#: length a vendor may rely on being propagated).
_MAX_TRACESTATE = 512

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# W3C Baggage: key is a token, value baggage-octets or percent-encoded, properties after ';'.
_BAGGAGE_ENTRY = re.compile(
    r"\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+\s*=\s*[!#$%&'()*+\-./0-9:<=>?@A-Z\[\]^_`a-z{|}~]*\s*(;.*)?"
)
# W3C Trace Context: a tracestate member is ``key=value``; checked here, so that a
# malformed one is counted once rather than logged by the SDK for every member.
_TRACESTATE_MEMBER = re.compile(
    r"\s*(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\s*"
)
_MAX_TRACESTATE_MEMBERS = 32
_BAGGAGE = W3CBaggagePropagator()
_EMPTY = Context()
_REQUEST, _EVENT = int(Kind.REQUEST), int(Kind.EVENT)
HTTP_ORIGIN = "http"  # basidia.http.routing: the reply address of HTTP calls' frames

_MESSAGING_SYSTEMS = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "nats": "nats",
    "tls": "nats",
    "redis": "redis",
    "rediss": "redis",
    "kafka": "kafka",
    "memory": "memory",
}


# -- trace context ------------------------------------------------------------------------------


def parse_traceparent(value: str) -> SpanContext | None:
    """The remote span context a W3C ``traceparent`` names; None when it is malformed."""
    if len(value) < 55:
        return None
    version = value[:2]
    if version == "00":
        if len(value) != 55:
            return None
    elif version == "ff" or (len(value) > 55 and value[55] != "-"):
        return None  # a later version may add fields after a dash; ff is never valid
    head = value[:55]
    if _TRACEPARENT.fullmatch(head) is None:
        return None
    trace_id, span_id = int(head[3:35], 16), int(head[36:52], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(head[53:55], 16) & 0x01)
    )


class TraceContextReader:
    """Reads untrusted trace context, within bounds; what it drops it counts and logs."""

    def __init__(self) -> None:
        #: Trace contexts dropped, by reason.
        self.dropped: dict[str, int] = {}
        self._log = ThrottledLog(logger)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self._log.log(logging.WARNING, reason, "dropped untrusted trace context: %s", reason)

    def read(
        self, traceparent: str | None, tracestate: str | None, baggage_: str | None
    ) -> Context:
        """The context to continue: the remote parent and baggage, or an empty context."""
        size = len(traceparent or "") + len(tracestate or "") + len(baggage_ or "")
        if size > MAX_TRACE_CONTEXT:
            self._drop("oversized")
            return _EMPTY
        ctx = _EMPTY
        if traceparent is not None:
            parent = parse_traceparent(traceparent)
            if parent is None:
                self._drop("malformed traceparent")
            else:
                if tracestate:
                    parent = self._with_state(parent, tracestate)
                ctx = trace.set_span_in_context(NonRecordingSpan(parent), ctx)
        if baggage_:
            entries = baggage_.split(",")
            if len(entries) > MAX_BAGGAGE_ENTRIES:
                self._drop("too many baggage entries")
            elif not all(_BAGGAGE_ENTRY.fullmatch(entry) for entry in entries):
                self._drop("malformed baggage")
            else:
                ctx = _BAGGAGE.extract({"baggage": baggage_}, ctx)
        return ctx

    def _with_state(self, parent: SpanContext, tracestate: str) -> SpanContext:
        members = [member for member in tracestate.split(",") if member.strip()]
        state = None
        if (
            len(tracestate) <= _MAX_TRACESTATE
            and len(members) <= _MAX_TRACESTATE_MEMBERS
            and all(_TRACESTATE_MEMBER.fullmatch(member) for member in members)
        ):
            state = TraceState.from_header([tracestate])
        if not state:
            self._drop("malformed tracestate")
            return parent
        return SpanContext(
            parent.trace_id,
            parent.span_id,
            is_remote=True,
            trace_flags=parent.trace_flags,
            trace_state=state,
        )


def trace_headers(span: Span, ctx: Context) -> dict[str, str]:
    """The frame headers that carry ``span`` (and ``ctx``'s baggage) to the next hop."""
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return {}
    headers = {
        TRACEPARENT_HEADER: (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
            f"{int(span_context.trace_flags):02x}"
        )
    }
    if span_context.trace_state:
        headers[TRACESTATE_HEADER] = span_context.trace_state.to_header()
    if baggage.get_all(ctx):
        carrier: dict[str, str] = {}
        _BAGGAGE.inject(carrier, ctx)
        if "baggage" in carrier:
            headers[BAGGAGE_HEADER] = carrier["baggage"]
    return headers


def _current_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids, for log records (``basidia.log``)."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"


# -- outcomes -----------------------------------------------------------------------------------


def _status_code(exc: BaseException | None) -> str:
    """The outcome of a call as its caller sees it: ``OK`` or the error's code."""
    if exc is None:
        return "OK"
    if isinstance(exc, RpcError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return RemoteError.code


def _http_status(result: Any, exc: BaseException | None) -> int:
    """The status an HTTP endpoint answers with (as ``basidia.http.errors`` maps them)."""
    if exc is None:
        return int(getattr(result, "status_code", 200))
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status  # starlette's HTTPException
    if isinstance(exc, ValidationError):
        return 422
    if isinstance(exc, (ServiceUnavailable, BrokerError)):
        return 503
    if isinstance(exc, (RpcTimeout, TimeoutError, asyncio.CancelledError)):
        return 504
    if isinstance(exc, (RemoteError, MethodNotFound)):
        return 502
    return 500


def _fail(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:512]))
    span.set_attribute("error.type", type(exc).__qualname__)


# -- the instrumentation ------------------------------------------------------------------------


class _Entrypoint:
    """What the spans and metrics of one entrypoint share, worked out once."""

    __slots__ = ("attempts", "attributes", "kind", "metric", "name", "route")

    def __init__(
        self,
        kind: str,
        name: str,
        attributes: dict[str, Any],
        metric: dict[str, Any],
        attempts: int = 0,
        route: str = "",
    ) -> None:
        self.kind = kind
        self.name = name
        self.attributes = attributes
        self.metric = metric
        self.attempts = attempts
        self.route = route


class OpenTelemetry(Instrumentation):
    """Spans and metrics into OpenTelemetry providers: the global ones by default.

    ``OpenTelemetry(tracer_provider=..., meter_provider=...)`` in a runner's or client's
    ``middleware`` uses those instead; either may be None for no spans (or no metrics).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        messaging_system: str | None = None,
    ) -> None:
        self._tracer = None
        if tracer_provider is not None:
            self._tracer = tracer_provider.get_tracer("basidia", __version__)
            log.trace_ids = _current_ids  # log records name the span they were written in
        self._messaging_system = messaging_system
        self.reader = TraceContextReader()
        self._runners: list[tuple[Mapping[str, ServiceContainer], Broker]] = []
        self._clients: dict[tuple[str, str], dict[str, Any]] = {}
        self._client_metrics: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._entrypoints: dict[tuple[str, str], _Entrypoint] = {}
        self._providers: list[Any] = []  # the SDK providers Basidia set up (flushed on stop)
        self._meter = None
        if meter_provider is not None:
            self._meter = meter_provider.get_meter("basidia", __version__)
            self._instruments(self._meter)

    def _instruments(self, meter: metrics.Meter) -> None:
        seconds = "s"
        self._client_duration = meter.create_histogram(
            "rpc.client.call.duration", seconds, "Duration of RPC calls, as their callers see it"
        )
        self._server_duration = meter.create_histogram(
            "rpc.server.call.duration", seconds, "Duration of RPC calls handled"
        )
        self._process_duration = meter.create_histogram(
            "messaging.process.duration", seconds, "Duration of event handling attempts"
        )
        self._publish_duration = meter.create_histogram(
            "messaging.client.operation.duration", seconds, "Duration of event publishing"
        )
        self._sent = meter.create_counter(
            "messaging.client.sent.messages", "{message}", "Events published"
        )
        self._http_duration = meter.create_histogram(
            "http.server.request.duration", seconds, "Duration of HTTP endpoint requests"
        )
        self._events = meter.create_counter(
            "basidia.events.handled",
            "{event}",
            "Event handling attempts, by outcome: ack, retry or dead_letter",
        )
        meter.create_observable_up_down_counter(
            "basidia.calls.in_flight", [self._in_flight], "{call}", "Calls being handled now"
        )
        meter.create_observable_counter(
            "basidia.events.dead_lettered",
            [self._dead_lettered],
            "{event}",
            "Events parked in a dead-letter queue (handler failures and unreadable events)",
        )
        meter.create_observable_counter(
            "basidia.frames.rejected",
            [self._rejected],
            "{frame}",
            "Frames dropped as malformed or unusable (requests, events, replies)",
        )
        meter.create_observable_counter(
            "basidia.broker.reconnections",
            [self._reconnections],
            "{reconnection}",
            "Times the broker connection was re-established",
        )
        meter.create_observable_counter(
            "basidia.trace_context.dropped",
            [self._dropped],
            "{context}",
            "Untrusted trace contexts dropped as malformed or oversized, by reason",
        )

    # -- observed counters

    def _containers(self) -> Iterable[ServiceContainer]:
        for containers, _ in self._runners:
            yield from list(containers.values())

    def _in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        for container in self._containers():
            yield Observation(container.in_flight, {"basidia.service": container.service_name})

    def _dead_lettered(self, options: CallbackOptions) -> Iterable[Observation]:
        for container in self._containers():
            yield Observation(
                container.stats.dead_lettered, {"basidia.service": container.service_name}
            )

    def _rejected(self, options: CallbackOptions) -> Iterable[Observation]:
        for container in self._containers():
            yield Observation(
                container.stats.malformed, {"basidia.service": container.service_name}
            )
        replies = 0
        for containers, _ in self._runners:
            for container in list(containers.values()):
                replies += container.runtime.client.malformed_replies
                break  # one RPC client per runner
        yield Observation(replies, {"basidia.service": "", "basidia.frame": "reply"})

    def _reconnections(self, options: CallbackOptions) -> Iterable[Observation]:
        total = sum(int(getattr(broker, "reconnects", 0)) for _, broker in self._runners)
        yield Observation(total)

    def _dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        for reason, count in list(self.reader.dropped.items()):
            yield Observation(count, {"basidia.reason": reason})

    # -- Instrumentation

    def attach(self, containers: Mapping[str, ServiceContainer], broker: Broker) -> None:
        self._runners.append((containers, broker))
        if self._messaging_system is None:
            scheme = broker.safe_url.partition("://")[0].lower()
            self._messaging_system = _MESSAGING_SYSTEMS.get(scheme, scheme)

    async def flush(self) -> None:
        if self._providers:
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        for provider in self._providers:
            provider.force_flush()

    # -- outgoing calls: CLIENT spans

    def _client(self, service: str, method: str) -> dict[str, Any]:
        key = (service, method)
        found = self._clients.get(key)
        if found is None:
            found = self._clients[key] = {
                "rpc.system.name": "basidia",
                "rpc.method": f"{service}/{method}",
                "server.address": service,
            }
            if self._messaging_system:
                found["messaging.system"] = self._messaging_system
        return found

    async def call(self, call: OutgoingCall, call_next: CallNext) -> Any:
        tracer = self._tracer
        attributes = self._client(call.service, call.method)
        span: Span | None = None
        if tracer is not None:
            parent = context.get_current()
            span = tracer.start_span(
                attributes["rpc.method"], parent, SpanKind.CLIENT, attributes=attributes
            )
            call.headers.update(trace_headers(span, parent))
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await call_next(call)
        except BaseException as exc:
            failure = exc
            if span is not None:
                _fail(span, exc)
            raise
        finally:
            status = _status_code(failure)
            if span is not None:
                span.set_attribute("rpc.response.status_code", status)
                span.end()
            if self._meter is not None:
                self._client_duration.record(
                    time.perf_counter() - start, self._client_metric(call, status, failure)
                )

    def _client_metric(
        self, call: OutgoingCall, status: str, failure: BaseException | None
    ) -> dict[str, Any]:
        key = (call.service, call.method, status)
        found = self._client_metrics.get(key)
        if found is None:
            found = {
                "rpc.system.name": "basidia",
                "rpc.method": f"{call.service}/{call.method}",
                "rpc.response.status_code": status,
            }
            if failure is not None:
                found["error.type"] = type(failure).__qualname__
            if len(self._client_metrics) < 10_000:  # methods are few; a bound all the same
                self._client_metrics[key] = found
        return found

    # -- events: PRODUCER spans

    async def publish(
        self,
        send: PublishNext,
        event: str,
        data: Any,
        source: str,
        idempotency_key: str | None,
        version: int | None,
    ) -> str:
        tracer = self._tracer
        attributes: dict[str, Any] = {
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": event,
        }
        if self._messaging_system:
            attributes["messaging.system"] = self._messaging_system
        if source:
            attributes["basidia.service"] = source
        span: Span | None = None
        headers = None
        if tracer is not None:
            parent = context.get_current()
            span = tracer.start_span(
                f"send {event}", parent, SpanKind.PRODUCER, attributes=attributes
            )
            headers = trace_headers(span, parent)
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            key = await send(event, data, source, idempotency_key, version, headers)
            if span is not None:
                span.set_attribute("messaging.message.id", key)
            return key
        except BaseException as exc:
            failure = exc
            if span is not None:
                _fail(span, exc)
            raise
        finally:
            if span is not None:
                span.end()
            if self._meter is not None:
                metric = {k: v for k, v in attributes.items() if k != "basidia.service"}
                if failure is not None:
                    metric["error.type"] = type(failure).__qualname__
                self._publish_duration.record(time.perf_counter() - start, metric)
                self._sent.add(1, metric)

    # -- calls handled: SERVER, CONSUMER and HTTP SERVER spans

    def _entrypoint(self, ctx: CallContext) -> _Entrypoint:
        key = (ctx.service, ctx.entrypoint)
        found = self._entrypoints.get(key)
        if found is None:
            found = self._entrypoints[key] = self._describe(ctx)
        return found

    def _describe(self, ctx: CallContext) -> _Entrypoint:
        from basidia.service import EventHandler, HttpEndpoint, Rpc

        container = next((c for c in self._containers() if c.service_name == ctx.service), None)
        entrypoint = (
            container.service_cls.__entrypoints__.get(ctx.entrypoint) if container else None
        )
        system = self._messaging_system
        if isinstance(entrypoint, EventHandler) or ctx.frame.kind == _EVENT:
            event = entrypoint.event if isinstance(entrypoint, EventHandler) else ctx.frame.target
            attributes = {
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": event,
                "messaging.consumer.group.name": f"{ctx.service}.{ctx.entrypoint}",
                "basidia.service": ctx.service,
            }
            if system:
                attributes["messaging.system"] = system
            attempts = 0
            if isinstance(entrypoint, EventHandler) and container is not None:
                attempts = entrypoint.max_attempts or container.runtime.settings.event_max_attempts
            metric = {k: v for k, v in attributes.items() if k != "basidia.service"}
            return _Entrypoint("event", f"process {event}", attributes, metric, attempts)
        if isinstance(entrypoint, HttpEndpoint) or ctx.frame.reply_to == HTTP_ORIGIN:
            route = entrypoint.path if isinstance(entrypoint, HttpEndpoint) else ctx.entrypoint
            attributes = {"http.route": route, "basidia.service": ctx.service}
            return _Entrypoint("http", route, attributes, {"http.route": route}, route=route)
        if isinstance(entrypoint, Rpc) or entrypoint is None:
            method = f"{ctx.service}/{ctx.entrypoint}"
            attributes = {
                "rpc.system.name": "basidia",
                "rpc.method": method,
                "server.address": ctx.service,
            }
            if system:
                attributes["messaging.system"] = system
            return _Entrypoint("rpc", method, attributes, dict(attributes))
        name = f"{ctx.service}.{ctx.entrypoint}"  # timers and other kinds
        return _Entrypoint("internal", name, {"basidia.service": ctx.service}, {})

    async def handle(self, ctx: CallContext, args: tuple[Any, ...], call_next: HandleNext) -> Any:
        info = self._entrypoint(ctx)
        tracer = self._tracer
        span: Span | None = None
        token = None
        request = args[0] if info.kind == "http" and args else None
        method = str(getattr(request, "method", "")) if request is not None else ""
        if tracer is not None:
            if info.kind == "http":
                found = getattr(request, "headers", None) or {}
                parent = self.reader.read(
                    found.get("traceparent"), found.get("tracestate"), found.get("baggage")
                )
                attributes = {**info.attributes, "http.request.method": method}
                url = getattr(request, "url", None)
                if url is not None:
                    attributes["url.path"] = url.path
                    attributes["url.scheme"] = url.scheme
                span = tracer.start_span(
                    f"{method} {info.route}", parent, SpanKind.SERVER, attributes=attributes
                )
            else:
                headers = ctx.frame.headers
                parent = (
                    self.reader.read(
                        headers.get(TRACEPARENT_HEADER),
                        headers.get(TRACESTATE_HEADER),
                        headers.get(BAGGAGE_HEADER),
                    )
                    if headers
                    else _EMPTY
                )
                if info.kind == "event":
                    span = tracer.start_span(
                        info.name, parent, SpanKind.CONSUMER, attributes=info.attributes
                    )
                    span.set_attribute("basidia.event.attempt", ctx.attempt)
                    key = ctx.idempotency_key
                    if key:
                        span.set_attribute("messaging.message.id", key)
                elif info.kind == "rpc":
                    span = tracer.start_span(
                        info.name, parent, SpanKind.SERVER, attributes=info.attributes
                    )
                else:
                    span = tracer.start_span(
                        info.name, parent, SpanKind.INTERNAL, attributes=info.attributes
                    )
            token = context.attach(trace.set_span_in_context(span, parent))
        start = time.perf_counter()
        failure: BaseException | None = None
        result: Any = None
        try:
            result = await call_next(ctx, args)
            return result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            elapsed = time.perf_counter() - start
            if token is not None:
                context.detach(token)
            self._finish(info, ctx, span, failure, result, elapsed, method)

    def _finish(
        self,
        info: _Entrypoint,
        ctx: CallContext,
        span: Span | None,
        failure: BaseException | None,
        result: Any,
        elapsed: float,
        method: str,
    ) -> None:
        kind = info.kind
        outcome = ""
        if kind == "event":
            if failure is None:
                outcome = "ack"
            elif isinstance(failure, asyncio.CancelledError):
                outcome = "requeue"  # shutdown: the event goes back to the broker
            else:
                outcome = "retry" if ctx.attempt < info.attempts else "dead_letter"
        if span is not None:
            if kind == "http":
                status = _http_status(result, failure)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    if failure is not None:
                        _fail(span, failure)
                    else:
                        span.set_status(Status(StatusCode.ERROR))
                        span.set_attribute("error.type", str(status))
            else:
                if failure is not None:
                    _fail(span, failure)
                if kind == "rpc":
                    span.set_attribute("rpc.response.status_code", _status_code(failure))
                elif kind == "event":
                    span.set_attribute("basidia.event.outcome", outcome)
            span.end()
        if self._meter is None:
            return
        metric = dict(info.metric)
        if failure is not None:
            metric["error.type"] = type(failure).__qualname__
        if kind == "rpc":
            metric["rpc.response.status_code"] = _status_code(failure)
            self._server_duration.record(elapsed, metric)
        elif kind == "event":
            metric["basidia.event.outcome"] = outcome
            self._process_duration.record(elapsed, metric)
            self._events.add(1, metric)
        elif kind == "http":
            metric["http.response.status_code"] = _http_status(result, failure)
            if method:
                metric["http.request.method"] = method
            self._http_duration.record(elapsed, metric)


# -- the process's instrumentation and SDK setup ------------------------------------------------

_lock = threading.Lock()
_process: OpenTelemetry | None = None
_prometheus_registry: Any = None


def _configured(provider: object, proxies: tuple[type, ...]) -> bool:
    return not isinstance(provider, proxies)


def process_instrumentation(
    settings: TelemetrySettings, services: Sequence[str]
) -> OpenTelemetry | None:
    """The process's instrumentation over the global providers, set up once; None when
    neither the application nor Basidia's config has set up a provider."""
    global _process
    with _lock:
        if _process is not None:
            return _process
        from opentelemetry.metrics import NoOpMeterProvider
        from opentelemetry.metrics._internal import _ProxyMeterProvider
        from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider

        if settings.wants_sdk:
            _setup_sdk(settings, services)
        tracer_provider = trace.get_tracer_provider()
        meter_provider = metrics.get_meter_provider()
        traced = _configured(tracer_provider, (ProxyTracerProvider, NoOpTracerProvider))
        measured = _configured(meter_provider, (_ProxyMeterProvider, NoOpMeterProvider))
        if not (traced or measured):
            return None
        _process = OpenTelemetry(
            tracer_provider if traced else None, meter_provider if measured else None
        )
        _process._providers = list(_sdk_providers)
        return _process


_sdk_providers: list[Any] = []


def _resource(settings: TelemetrySettings, services: Sequence[str]) -> Any:
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, Any] = {
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        "service.version": __version__,
        "telemetry.distro.name": "basidia",
    }
    name = settings.service_name or "+".join(services)
    if name:
        attributes["service.name"] = name
    return Resource.create(attributes)


def _setup_sdk(settings: TelemetrySettings, services: Sequence[str]) -> None:
    """Set the global SDK providers with the exporters the settings name."""
    global _prometheus_registry
    resource = _resource(settings, services)
    span_exporters = settings.exporters("traces")
    if span_exporters and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider = SdkTracerProvider(resource=resource)
        for name in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(name, settings)))
        trace.set_tracer_provider(tracer_provider)
        _sdk_providers.append(tracer_provider)
    metric_exporters = settings.exporters("metrics")
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    if metric_exporters and isinstance(metrics.get_meter_provider(), _ProxyMeterProvider):
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

        readers: list[Any] = []
        for name in metric_exporters:
            if name == "prometheus":
                from opentelemetry.exporter.prometheus import PrometheusMetricReader
                from prometheus_client import CollectorRegistry

                _prometheus_registry = CollectorRegistry()
                readers.append(PrometheusMetricReader(registry=_prometheus_registry))
            else:
                from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

                readers.append(PeriodicExportingMetricReader(_metric_exporter(name)))
        meter_provider = SdkMeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        _sdk_providers.append(meter_provider)
        if settings.system_metrics:
            _system_metrics(meter_provider)


def _span_exporter(name: str, settings: TelemetrySettings) -> Any:
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if name == "console":
        return ConsoleSpanExporter()
    # "file": one JSON object a line, appended (docs/observability.md).
    out = open(settings.traces_file, "a", encoding="utf-8")  # noqa: SIM115 - the exporter's for life
    return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")


def _metric_exporter(name: str) -> Any:
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

    return ConsoleMetricExporter()


#: The process metrics collected with ``system_metrics`` (what a service monitor shows).
_PROCESS_METRICS: dict[str, list[str] | None] = {
    "process.cpu.time": ["user", "system"],
    "process.cpu.utilization": None,
    "process.memory.usage": None,
    "process.memory.virtual": None,
    "process.open_file_descriptor.count": None,
    "process.thread.count": None,
    "process.context_switches": ["involuntary", "voluntary"],
}


def _system_metrics(meter_provider: Any) -> None:
    from opentelemetry.instrumentation.system_metrics import SystemMetricsInstrumentor

    SystemMetricsInstrumentor(config=_PROCESS_METRICS).instrument(meter_provider=meter_provider)
    import psutil

    process = psutil.Process()

    def connections(options: CallbackOptions) -> Iterable[Observation]:
        try:
            yield Observation(len(process.net_connections(kind="inet")))
        except psutil.Error:
            return

    meter = meter_provider.get_meter("basidia", __version__)
    meter.create_observable_up_down_counter(
        "process.network.connections",
        [connections],
        "{connection}",
        "TCP and UDP sockets the process has open",
    )


def prometheus_text() -> tuple[bytes, str] | None:
    """The metrics as Prometheus text, when Basidia set up the Prometheus exporter."""
    if _prometheus_registry is None:
        return None
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(_prometheus_registry), CONTENT_TYPE_LATEST

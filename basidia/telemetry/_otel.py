"""The OpenTelemetry instrumentation (``basidia[otel]``): spans and metrics of every hop.

Imported only when telemetry is on (``basidia.telemetry.instrumentation_for``).  What
each span and metric means is in docs/observability.md; the frame headers that carry
the trace context (``tp``, ``ts``, ``bg``) are in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context, metrics, trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
    TracerProvider,
)

from basidia import __version__, log
from basidia._speedups import Kind
from basidia.errors import RemoteError, RpcError, http_status
from basidia.middleware import CallNext, HandleNext, OutgoingCall
from basidia.telemetry import Instrumentation, PublishNext, TelemetrySettings
from basidia.telemetry._context import (
    BAGGAGE_HEADER,
    EMPTY,
    TRACEPARENT_HEADER,
    TRACESTATE_HEADER,
    TraceContextReader,
    current_ids,
    trace_headers,
)
from basidia.telemetry._sdk import providers as sdk_providers
from basidia.telemetry._sdk import setup_sdk

if TYPE_CHECKING:
    from basidia.brokers.base import Broker
    from basidia.container import ServiceContainer
    from basidia.context import CallContext

__all__ = ["OpenTelemetry", "process_instrumentation"]

logger = logging.getLogger("basidia.telemetry")

_EVENT = int(Kind.EVENT)
HTTP_ORIGIN = "http"  # basidia.http.routing: the reply address of HTTP calls' frames

#: The span kind of each entrypoint kind; timers and other kinds make INTERNAL spans.
_SPAN_KINDS = {"event": SpanKind.CONSUMER, "rpc": SpanKind.SERVER, "http": SpanKind.SERVER}

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
    """The status an HTTP endpoint answers with (``basidia.errors.http_status``, which
    ``basidia.http.errors`` answers by); a cancelled handler answered nothing: 504."""
    if exc is None:
        return int(getattr(result, "status_code", 200))
    if isinstance(exc, asyncio.CancelledError):
        return 504
    return http_status(exc)


def _fail(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:512]))
    span.set_attribute("error.type", type(exc).__qualname__)


# -- the instrumentation ------------------------------------------------------------------------


#: How long a stopping runner waits for the exporters (an unreachable collector must not
#: hold a shutdown for the SDK's default 30 s).
_FLUSH_MILLIS = 5000


class _Entrypoint:
    """What the spans and metrics of one entrypoint share, worked out once."""

    __slots__ = ("attempts", "attributes", "kind", "metric", "name", "route", "span_kind")

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
        self.span_kind = _SPAN_KINDS.get(kind, SpanKind.INTERNAL)


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
            log.trace_ids = current_ids  # log records name the span they were written in
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

    async def detach(self, containers: Mapping[str, ServiceContainer]) -> None:
        self._runners = [item for item in self._runners if item[0] is not containers]
        # A service of the same name may come back with other entrypoints (tests do).
        names = set(containers)
        self._entrypoints = {k: v for k, v in self._entrypoints.items() if k[0] not in names}
        if self._providers:
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        for provider in self._providers:
            provider.force_flush(_FLUSH_MILLIS)

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
        span: Span | None = None
        if tracer is not None:
            attributes = self._client(call.service, call.method)
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
        span: Span | None = None
        headers = None
        if tracer is not None:
            attributes: dict[str, Any] = {
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": event,
            }
            if self._messaging_system:
                attributes["messaging.system"] = self._messaging_system
            if source:
                attributes["basidia.service"] = source
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
                metric: dict[str, Any] = {"messaging.destination.name": event}
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
            metric = {
                "messaging.destination.name": event,
                "messaging.consumer.group.name": f"{ctx.service}.{ctx.entrypoint}",
            }
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
            # Metrics carry what tells series apart, and no constants: each attribute of a
            # measurement costs the SDK time on every call (docs/observability.md).
            return _Entrypoint("rpc", method, attributes, {"rpc.method": method})
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
                    f"{method} {info.route}", parent, info.span_kind, attributes=attributes
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
                    else EMPTY
                )
                span = tracer.start_span(
                    info.name, parent, info.span_kind, attributes=info.attributes
                )
                if info.kind == "event":
                    span.set_attribute("basidia.event.attempt", ctx.attempt)
                    key = ctx.idempotency_key
                    if key:
                        span.set_attribute("messaging.message.id", key)
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
        status: Any = None  # the call's outcome: an RPC status code, an HTTP status
        if kind == "event":
            if failure is None:
                outcome = "ack"
            elif isinstance(failure, asyncio.CancelledError):
                outcome = "requeue"  # shutdown: the event goes back to the broker
            else:
                outcome = "retry" if ctx.attempt < info.attempts else "dead_letter"
        elif kind == "rpc":
            status = _status_code(failure)
        elif kind == "http":
            status = _http_status(result, failure)
        if span is not None:
            if kind == "http":
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
                    span.set_attribute("rpc.response.status_code", status)
                elif kind == "event":
                    span.set_attribute("basidia.event.outcome", outcome)
            span.end()
        if self._meter is None:
            return
        metric = dict(info.metric)
        if failure is not None:
            metric["error.type"] = type(failure).__qualname__
        if kind == "rpc":
            metric["rpc.response.status_code"] = status
            self._server_duration.record(elapsed, metric)
        elif kind == "event":
            metric["basidia.event.outcome"] = outcome
            self._process_duration.record(elapsed, metric)
            self._events.add(1, metric)
        elif kind == "http":
            metric["http.response.status_code"] = status
            if method:
                metric["http.request.method"] = method
            self._http_duration.record(elapsed, metric)


# -- the process's instrumentation and SDK setup ------------------------------------------------

_lock = threading.Lock()
_process: OpenTelemetry | None = None


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
            setup_sdk(settings, services)
        tracer_provider = trace.get_tracer_provider()
        meter_provider = metrics.get_meter_provider()
        traced = _configured(tracer_provider, (ProxyTracerProvider, NoOpTracerProvider))
        measured = _configured(meter_provider, (_ProxyMeterProvider, NoOpMeterProvider))
        if not (traced or measured):
            return None
        _process = OpenTelemetry(
            tracer_provider if traced else None, meter_provider if measured else None
        )
        _process._providers = list(sdk_providers)
        return _process

"""OpenTelemetry traces and metrics for calls, events and HTTP requests (docs/observability.md).

Nothing here imports OpenTelemetry: the ``basidia[otel]`` extra is loaded only when
telemetry is asked for (an exporter in the ``OTEL_*`` variables or the ``telemetry``
config section) or when the application has loaded OpenTelemetry itself, and may
have set up its own providers.  Without either, no instrumentation is in the call
path at all: the middleware chain stays empty, as if this package did not exist.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from basidia.config import _boolean
from basidia.errors import ConfigError
from basidia.middleware import Middleware

if TYPE_CHECKING:
    from basidia.brokers.base import Broker
    from basidia.config import Config
    from basidia.container import ServiceContainer

__all__ = [
    "EXPORTERS",
    "Instrumentation",
    "PublishNext",
    "TelemetrySettings",
    "instrumentation_for",
    "prometheus_text",
]

#: ``publish(event, data, source, idempotency_key, version, headers)``: the event
#: publisher's own sending, which the instrumentation wraps in a PRODUCER span.
PublishNext = Callable[
    [str, Any, str, "str | None", "int | None", "dict[str, str] | None"], Awaitable[str]
]

#: Exporter names ``traces_exporter`` and ``metrics_exporter`` accept (comma-separated).
EXPORTERS = {
    "traces": ("otlp", "console", "file", "none"),
    "metrics": ("prometheus", "otlp", "console", "none"),
}


class Instrumentation(Middleware):
    """What the runner and the event publisher know of telemetry.

    The OpenTelemetry implementation (``basidia.telemetry.OpenTelemetry``) is a
    middleware: its ``call`` hook makes the CLIENT span of an outgoing call and writes
    the trace context into the request's headers, its ``handle`` hook the SERVER,
    CONSUMER or HTTP SERVER span of a call being handled.  Pass one in a runner's or
    client's ``middleware`` to use providers of your own instead of the global ones.
    """

    def attach(self, containers: Mapping[str, ServiceContainer], broker: Broker) -> None:
        """Observe the services of a runner or client (their counters become metrics)."""

    async def publish(
        self,
        send: PublishNext,
        event: str,
        data: Any,
        source: str,
        idempotency_key: str | None,
        version: int | None,
    ) -> str:
        """Publish an event through ``send``, traced."""
        return await send(event, data, source, idempotency_key, version, None)

    async def detach(self, containers: Mapping[str, ServiceContainer]) -> None:
        """Stop observing a connection that closed; export what is buffered (spans,
        metrics) of the providers Basidia set up."""


def _flag(value: Any) -> bool:
    try:
        return _boolean(value)
    except ValueError:
        raise ValueError(f"expected true or false, got {value!r}") from None


@dataclass(frozen=True)
class TelemetrySettings:
    """The ``telemetry`` config section (``BASIDIA_TELEMETRY__<FIELD>``); a value set here
    wins over the ``OTEL_*`` variable that says the same."""

    #: Instrument calls, events and HTTP requests when a tracer or meter provider is
    #: configured (needs ``basidia[otel]``); false keeps every call path bare.
    enabled: bool = True
    #: Where Basidia's own SDK setup sends spans: otlp, console, file, none (comma-separated).
    #: Default: ``OTEL_TRACES_EXPORTER``, else otlp when an OTLP endpoint is set, else none.
    traces_exporter: str = ""
    #: Where metrics go: prometheus (``GET /metrics``), otlp, console, none.
    #: Default: ``OTEL_METRICS_EXPORTER``, else otlp when an OTLP endpoint is set, else none.
    metrics_exporter: str = ""
    #: The file the ``file`` traces exporter appends spans to, one JSON object a line.
    traces_file: str = "basidia-spans.jsonl"
    #: The resource's ``service.name``; default ``OTEL_SERVICE_NAME``, else the services'
    #: names joined with ``+``.
    service_name: str = ""
    #: With metrics on: the process's CPU, memory, threads, open files and connections.
    system_metrics: bool = True

    @classmethod
    def from_config(
        cls, config: Config, environ: Mapping[str, str] | None = None
    ) -> TelemetrySettings:
        """The settings from the ``telemetry`` section, then the ``OTEL_*`` variables."""
        environ = os.environ if environ is None else environ
        section = config.get("telemetry", {})
        if not isinstance(section, Mapping):
            raise ConfigError("the 'telemetry' setting must be a mapping (telemetry.enabled...)")
        values = {str(key).lower(): value for key, value in section.items()}
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown telemetry setting {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        endpoint = any(
            environ.get(name)
            for name in (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            )
        )
        otlp = "otlp" if endpoint else "none"
        try:
            enabled = _flag(values.get("enabled", True))
            if _flag(environ.get("OTEL_SDK_DISABLED", "false") or "false"):
                enabled = False
            settings = cls(
                enabled=enabled,
                traces_exporter=str(
                    values.get("traces_exporter") or environ.get("OTEL_TRACES_EXPORTER") or otlp
                ).lower(),
                metrics_exporter=str(
                    values.get("metrics_exporter") or environ.get("OTEL_METRICS_EXPORTER") or otlp
                ).lower(),
                traces_file=str(values.get("traces_file", cls.traces_file)),
                service_name=str(
                    values.get("service_name") or environ.get("OTEL_SERVICE_NAME") or ""
                ),
                system_metrics=_flag(values.get("system_metrics", True)),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid telemetry setting: {exc}") from None
        for signal in ("traces", "metrics"):
            for name in settings.exporters(signal):
                if name not in EXPORTERS[signal]:
                    raise ConfigError(
                        f"unknown {signal} exporter {name!r}; use " + ", ".join(EXPORTERS[signal])
                    )
        return settings

    def exporters(self, signal: str) -> list[str]:
        """The exporters named for ``signal`` (``traces`` or ``metrics``), ``none`` left out."""
        text = self.traces_exporter if signal == "traces" else self.metrics_exporter
        names = [part.strip() for part in text.split(",") if part.strip()]
        return [name for name in names if name != "none"]

    @property
    def wants_sdk(self) -> bool:
        """Whether an exporter is asked for: Basidia then sets up the SDK providers."""
        return self.enabled and bool(self.exporters("traces") or self.exporters("metrics"))


def _opentelemetry_loaded() -> bool:
    """Whether the application has imported OpenTelemetry (it may have set providers)."""
    return "opentelemetry.trace" in sys.modules or "opentelemetry.metrics" in sys.modules


def instrumentation_for(
    config: Config, middleware: Sequence[Middleware], services: Sequence[str] = ()
) -> Instrumentation | None:
    """The instrumentation a runner or client uses: one passed in ``middleware``, else the
    process's (over the global providers, set up by Basidia when an exporter is asked
    for), else None: telemetry off, nothing in the call path."""
    for item in middleware:
        if isinstance(item, Instrumentation):
            return item
    settings = TelemetrySettings.from_config(config)
    if not settings.enabled or not (settings.wants_sdk or _opentelemetry_loaded()):
        return None
    try:
        from basidia.telemetry import _otel
    except ImportError as exc:
        if settings.wants_sdk:
            raise ImportError(
                f"telemetry exporters need an extra: pip install 'basidia[otel]' ({exc})"
            ) from None
        return None
    return _otel.process_instrumentation(settings, services)


def prometheus_text() -> tuple[bytes, str] | None:
    """The metrics in Prometheus's text format and its content type, or None when no
    Prometheus exporter is set up (``metrics_exporter`` without ``prometheus``)."""
    module = sys.modules.get("basidia.telemetry._sdk")
    if module is None:
        return None
    found: tuple[bytes, str] | None = module.prometheus_text()
    return found


def __getattr__(name: str) -> Any:
    if name == "OpenTelemetry":  # imports the extra: only when asked for by name
        try:
            from basidia.telemetry._otel import OpenTelemetry
        except ImportError as exc:
            raise ImportError(
                "basidia.telemetry.OpenTelemetry needs an extra: "
                f"pip install 'basidia[otel]' ({exc})"
            ) from None
        return OpenTelemetry
    raise AttributeError(name)

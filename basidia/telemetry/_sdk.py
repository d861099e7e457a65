"""The SDK providers Basidia sets up when an exporter is asked for (docs/observability.md):
span and metric exporters, the resource, process metrics, the Prometheus registry."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from basidia import __version__
from basidia.telemetry import TelemetrySettings

__all__ = ["prometheus_text", "providers", "setup_sdk"]

#: The providers set up here (flushed when a runner stops).
providers: list[Any] = []
_prometheus_registry: Any = None


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


def setup_sdk(settings: TelemetrySettings, services: Sequence[str]) -> None:
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
        providers.append(tracer_provider)
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
        providers.append(meter_provider)
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

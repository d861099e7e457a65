"""``basidia bench --telemetry``: the echo service again, instrumented, beside the bare one.

Each mode hosts its own echo service and client with an ``OpenTelemetry`` middleware
over providers of its own (the process's global providers are left alone), so every
mode is measured in the same run, call by call against the bare service:

- ``metrics``: an SDK ``MeterProvider`` whose reader collects on demand (as Prometheus
  scraping ``/metrics`` does): the cost of recording every call.
- ``traces``: an SDK ``TracerProvider`` sampling every call (ratio 1.0) into the batch
  span processor, with an exporter that drops what it gets: the cost of making, ending
  and queueing the spans, not of sending them anywhere.
- ``all``: both.

``off`` is the bare service: no instrumentation in the call path, as without the extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TELEMETRY_MODES", "instrumentation"]

#: The modes ``--telemetry`` takes, besides ``off``.
TELEMETRY_MODES = ("metrics", "traces", "all")


def instrumentation(mode: str) -> tuple[Any, list[Any]]:
    """The middleware for ``mode``, and the providers to shut down after the run."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

        from basidia.telemetry import OpenTelemetry
    except ImportError as exc:
        raise ImportError(
            f"--telemetry needs an extra: pip install 'basidia[otel]' ({exc})"
        ) from None

    class _Dropping(SpanExporter):
        """Takes the batches and drops them: exporting is the collector's cost."""

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    providers: list[Any] = []
    tracer_provider = meter_provider = None
    if mode in ("traces", "all"):
        tracer_provider = TracerProvider(sampler=TraceIdRatioBased(1.0))
        tracer_provider.add_span_processor(BatchSpanProcessor(_Dropping()))
        providers.append(tracer_provider)
    if mode in ("metrics", "all"):
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        providers.append(meter_provider)
    return OpenTelemetry(tracer_provider, meter_provider), providers

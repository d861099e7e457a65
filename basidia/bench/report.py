"""Showing a bench run: the table for people, JSON for machines, and the CI gate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from basidia.bench.core import BenchReport, Figures, size_label

__all__ = ["JSON_SCHEMA_VERSION", "Gate", "GateResult", "check_gate", "render_table", "to_json"]

#: Bumped whenever a key of ``to_json`` changes meaning or goes away.
JSON_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Gate:
    """Limits a run must stay within (None: not checked)."""

    #: Most microseconds Basidia may add to the raw floor's p50, for every payload.
    max_overhead_us: float | None = None
    #: Least fraction of the raw floor's calls/s Basidia must reach, for every payload.
    min_throughput_ratio: float | None = None


@dataclass
class GateResult:
    """What the gate found: failures make the run fail, notices explain what was not checked."""

    failures: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no limit was exceeded."""
        return not self.failures


def check_gate(report: BenchReport, gate: Gate) -> GateResult:
    """Check every payload of ``report`` against ``gate``.

    Without a raw floor (memory://, or a floor that could not be measured) the
    overhead limit applies to Basidia's absolute p50, which bounds the overhead
    from above; the throughput ratio cannot be judged and is skipped.
    """
    result = GateResult()
    without_floor = report.raw_unavailable or "the memory broker has no network floor"
    if gate.max_overhead_us is not None:
        limit = gate.max_overhead_us
        for item in report.results:
            label = size_label(item.size)
            overhead = item.overhead_p50_us
            if overhead is not None:
                if overhead > limit:
                    result.failures.append(
                        f"{label}: p50 overhead {overhead:.1f} µs over the raw floor "
                        f"exceeds --max-overhead-us {limit:g}"
                    )
            elif item.basidia.p50_us > limit:
                result.failures.append(
                    f"{label}: p50 {item.basidia.p50_us:.1f} µs (no raw floor) "
                    f"exceeds --max-overhead-us {limit:g}"
                )
        if any(item.raw is None for item in report.results):
            result.notices.append(
                f"no raw floor ({without_floor}): --max-overhead-us was checked against "
                "the absolute p50, an upper bound of the overhead"
            )
    if gate.min_throughput_ratio is not None:
        least = gate.min_throughput_ratio
        for item in report.results:
            ratio = item.throughput_ratio
            if ratio is not None and ratio < least:
                result.failures.append(
                    f"{size_label(item.size)}: throughput {ratio:.1%} of the raw floor's "
                    f"is below --min-throughput-ratio {least:g}"
                )
        if any(item.throughput_ratio is None for item in report.results):
            result.notices.append(
                f"no raw floor ({without_floor}): --min-throughput-ratio was not checked"
            )
    return result


def to_json(report: BenchReport, gate: Gate, verdict: GateResult) -> dict[str, Any]:
    """The run as a JSON-ready dict; its keys are the stable schema ``docs/benchmarks.md`` lists."""
    plan = report.plan
    return {
        "schema": JSON_SCHEMA_VERSION,
        "basidia": report.basidia_version,
        "implementation": report.implementation,
        "python": report.python,
        "uvloop": report.uvloop,
        "cpus": report.cpus,
        "broker": report.broker,
        "raw_floor": {
            "name": report.raw_floor,
            "available": any(item.raw is not None for item in report.results),
            "reason": report.raw_unavailable,
        },
        "latency_calls": plan.calls,
        "throughput_seconds": plan.duration,
        "concurrency": plan.concurrency,
        "rounds": plan.rounds,
        "payloads": [
            {
                "bytes": item.size,
                "label": size_label(item.size),
                "basidia": item.basidia.as_dict(),
                "raw": item.raw.as_dict() if item.raw is not None else None,
                "overhead_p50_us": _round(item.overhead_p50_us, 1),
                "throughput_ratio": _round(item.throughput_ratio, 3),
                "telemetry": {
                    mode: {
                        **figures.as_dict(),
                        "added_p50_us": _round(item.telemetry_cost_us(mode)[0], 1),
                        "added_cpu_us": _round(item.telemetry_cost_us(mode)[1], 1),
                    }
                    for mode, figures in item.telemetry.items()
                },
            }
            for item in report.results
        ],
        "gate": {
            "max_overhead_us": gate.max_overhead_us,
            "min_throughput_ratio": gate.min_throughput_ratio,
            "passed": verdict.passed,
            "failures": verdict.failures,
            "notices": verdict.notices,
        },
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


_HEADINGS = ("payload", "client", "p50 µs", "p90 µs", "p99 µs", "calls/s")
_WIDTHS = (9, 9, 9, 9, 9, 14)


def _row(*cells: str) -> str:
    first, second, *numbers = cells
    line = f"{first:<{_WIDTHS[0]}}{second:<{_WIDTHS[1]}}"
    line += "".join(f"{cell:>{width}}" for cell, width in zip(numbers, _WIDTHS[2:], strict=True))
    return line.rstrip()


def _figures_row(label: str, client: str, figures: Figures) -> str:
    return _row(
        label,
        client,
        f"{figures.p50_us:.1f}",
        f"{figures.p90_us:.1f}",
        f"{figures.p99_us:.1f}",
        f"{figures.calls_per_s:,.0f}",
    )


def render_table(report: BenchReport) -> str:
    """The run as aligned plain text: a header naming what ran where, then the figures."""
    plan = report.plan
    core = "compiled (c)" if report.implementation == "c" else "pure Python (py)"
    loop = f"uvloop {report.uvloop}" if report.uvloop else "asyncio loop"
    if report.raw_floor is None:
        floor = "none (memory broker: in-process, the whole p50 is framework)"
    elif report.raw_unavailable is not None:
        floor = f"{report.raw_floor}: raw floor unavailable ({report.raw_unavailable})"
    else:
        floor = f"{report.raw_floor}, interleaved call by call"
    lines = [
        f"basidia {report.basidia_version} · core: {core} · {report.python} · {loop} · "
        f"{report.cpus} CPUs",
        f"broker: {report.broker} · floor: {floor}",
        f"latency: {plan.calls} sequential calls · throughput: {plan.duration:g} s at "
        f"{plan.concurrency} in flight · echo RPC",
        "",
        _row(*_HEADINGS),
    ]
    for item in report.results:
        label = size_label(item.size)
        lines.append(_figures_row(label, "basidia", item.basidia))
        if item.raw is not None:
            lines.append(_figures_row("", "raw", item.raw))
            overhead = item.overhead_p50_us
            ratio = item.throughput_ratio
            lines.append(
                _row(
                    "",
                    "overhead",
                    f"{overhead:+.1f}" if overhead is not None else "",
                    "",
                    "",
                    f"{ratio:.1%} of raw" if ratio is not None else "",
                )
            )
        for mode, figures in item.telemetry.items():
            lines.append(_figures_row("", f"+{mode}", figures))
    notes = telemetry_notes(report)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def telemetry_notes(report: BenchReport) -> list[str]:
    """What each ``--telemetry`` mode adds per call (a CLIENT and a SERVER side each)."""
    notes: list[str] = []
    for item in report.results:
        for mode in item.telemetry:
            latency, cpu = item.telemetry_cost_us(mode)
            ratio = item.telemetry[mode].calls_per_s / item.basidia.calls_per_s
            notes.append(
                f"telemetry {mode} ({size_label(item.size)}): {latency:+.1f} µs per call at "
                f"p50, {cpu:+.1f} µs of CPU per call at {report.plan.concurrency} in flight "
                f"({ratio:.1%} of the bare service's calls/s)"
            )
    return notes

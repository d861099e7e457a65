"""``basidia bench --sweep``: how the cost of a call grows with its payload and with load.

Two series, each point measured for Basidia and, on a network broker, for the raw
client floor, alternating (docs/benchmarks.md, "Scaling: --sweep"):

- payload axis: 16 B to 1 MiB at a fixed number of calls in flight, with the p50 of
  sequential calls at one in flight;
- in-flight axis: 1 to 1,024 calls in flight at a fixed payload; the mean latency is
  in flight ÷ calls/s (Little's law).

A point that a broker refuses (1 MiB over NATS's default ``max_payload``, say) is
kept, with the error, so the JSON always holds every point of the plan.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basidia.bench.core import (
    BenchPlan,
    BenchReport,
    Call,
    Progress,
    echo_contenders,
    figures,
    measure_latency,
    measure_throughput,
    new_report,
    size_label,
)

__all__ = [
    "SWEEP_CONCURRENCIES",
    "SWEEP_PAYLOADS",
    "SweepPlan",
    "SweepPoint",
    "SweepReport",
    "plot_sweep",
    "run_sweep",
    "sweep_json",
]

#: The payload axis, in bytes: 16 B to 1 MiB.
SWEEP_PAYLOADS = (16, 1 << 10, 16 << 10, 256 << 10, 1 << 20)
#: The in-flight axis: 1 to 1,024 calls.
SWEEP_CONCURRENCIES = (1, 4, 16, 64, 256, 1024)
_MIB = float(1 << 20)


@dataclass(frozen=True)
class SweepPlan:
    """What the sweep measures, and for how long each point."""

    broker: str = "memory://"
    payloads: tuple[int, ...] = SWEEP_PAYLOADS
    concurrencies: tuple[int, ...] = SWEEP_CONCURRENCIES
    #: Calls in flight along the payload axis.
    concurrency: int = 64
    #: Payload along the in-flight axis.
    payload: int = 16
    #: Seconds of throughput per point and contender (split in two alternating windows).
    duration: float = 1.0
    #: Sequential calls for the p50 at each payload.
    calls: int = 500


@dataclass
class SweepPoint:
    """One point of an axis: its x value and each contender's figures (or the error)."""

    #: Payload bytes on the payload axis, calls in flight on the other.
    x: int
    #: Contender ("basidia", "raw") → {"calls_per_s", "mib_per_s", "p50_us" | "mean_latency_us"}.
    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Contender → why the point could not be measured for it.
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class SweepReport:
    """A sweep run: the bench header (core, Python, broker, floor) and both axes."""

    plan: SweepPlan
    header: BenchReport
    payload_axis: list[SweepPoint] = field(default_factory=list)
    concurrency_axis: list[SweepPoint] = field(default_factory=list)


async def _throughput(call: Call, payload: bytes, in_flight: int, seconds: float) -> float:
    done, elapsed = await measure_throughput(call, payload, in_flight, seconds)
    return done / elapsed if elapsed > 0 else 0.0


async def _point(
    contenders: Sequence[tuple[str, Call]],
    size: int,
    in_flight: int,
    plan: SweepPlan,
    *,
    latency: bool,
) -> SweepPoint:
    """Measure one point for every contender; a contender that fails keeps its error."""
    point = SweepPoint(x=size if latency else in_flight)
    payload = os.urandom(size)
    live = list(contenders)
    rates: dict[str, list[float]] = {name: [] for name, _ in live}
    for window in range(2):  # two windows, in alternating order, as basidia bench does
        for name, call in live if window == 0 else list(reversed(live)):
            if name in point.errors:
                continue
            gc.collect()
            try:
                if window == 0:  # warm-up: a few calls, which also tells a refused size
                    await measure_latency(call, payload, 3)
                rates[name].append(await _throughput(call, payload, in_flight, plan.duration / 2))
            except Exception as exc:  # a refused size (MessageTooLarge), a raw client's error
                point.errors[name] = f"{type(exc).__name__}: {exc}"
    for name, call in live:
        if name in point.errors:
            continue
        calls_per_s = sum(rates[name]) / len(rates[name])
        entry = {"calls_per_s": calls_per_s, "mib_per_s": calls_per_s * size / _MIB}
        if latency:
            samples = await measure_latency(call, payload, plan.calls)
            entry["p50_us"] = figures(samples, 1, 1.0).p50_us
        elif calls_per_s > 0:
            entry["mean_latency_us"] = in_flight / calls_per_s * 1e6
        point.figures[name] = entry
    return point


async def run_sweep(plan: SweepPlan, progress: Progress = lambda line: None) -> SweepReport:
    """Host an echo service on ``plan.broker`` and measure both axes of the sweep."""
    header = new_report(
        BenchPlan(
            broker=plan.broker,
            payloads=plan.payloads,
            calls=plan.calls,
            duration=plan.duration,
            concurrency=plan.concurrency,
        )
    )
    report = SweepReport(plan=plan, header=header)
    workers = max((plan.concurrency, *plan.concurrencies))
    # Frames up to 4 MiB on both sides, so that 1 MiB is refused only by a broker's own limit.
    config = {"max_frame_size": 4 << 20}
    async with echo_contenders(plan.broker, workers, header, progress, config) as contenders:
        for size in plan.payloads:
            progress(f"sweep: {size_label(size)} at {plan.concurrency} in flight ...")
            report.payload_axis.append(
                await _point(contenders, size, plan.concurrency, plan, latency=True)
            )
        for in_flight in plan.concurrencies:
            progress(f"sweep: {in_flight} in flight at {size_label(plan.payload)} ...")
            report.concurrency_axis.append(
                await _point(contenders, plan.payload, in_flight, plan, latency=False)
            )
    return report


def _rounded(entry: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 1) for key, value in entry.items()}


def _points(axis: list[SweepPoint], key: str) -> list[dict[str, Any]]:
    rows = []
    for point in axis:
        basidia, raw = point.figures.get("basidia"), point.figures.get("raw")
        ratio = None
        if basidia is not None and raw is not None and raw["calls_per_s"] > 0:
            ratio = round(basidia["calls_per_s"] / raw["calls_per_s"], 3)
        row: dict[str, Any] = {key: point.x}
        if key == "bytes":
            row["label"] = size_label(point.x)
        row |= {
            "basidia": _rounded(basidia) if basidia is not None else None,
            "raw": _rounded(raw) if raw is not None else None,
            "throughput_ratio": ratio,
            "errors": dict(point.errors),
        }
        rows.append(row)
    return rows


def sweep_json(report: SweepReport) -> dict[str, Any]:
    """The sweep as a JSON-ready dict (schema in docs/benchmarks.md)."""
    header, plan = report.header, report.plan
    return {
        "schema": 1,
        "kind": "sweep",
        "basidia": header.basidia_version,
        "implementation": header.implementation,
        "python": header.python,
        "uvloop": header.uvloop,
        "cpus": header.cpus,
        "broker": header.broker,
        "raw_floor": {"name": header.raw_floor, "reason": header.raw_unavailable},
        "seconds_per_point": plan.duration,
        "latency_calls": plan.calls,
        "payload_axis": {
            "concurrency": plan.concurrency,
            "points": _points(report.payload_axis, "bytes"),
        },
        "concurrency_axis": {
            "bytes": plan.payload,
            "points": _points(report.concurrency_axis, "in_flight"),
        },
    }


def render_sweep(report: SweepReport) -> str:
    """The sweep as two plain-text tables."""
    header = report.header
    core = "compiled (c)" if header.implementation == "c" else "pure Python (py)"
    lines = [
        f"basidia {header.basidia_version} · core: {core} · {header.python} · {header.cpus} CPUs",
        f"broker: {header.broker} · floor: {header.raw_floor or 'none'}"
        + (f" (unavailable: {header.raw_unavailable})" if header.raw_unavailable else ""),
        "",
        f"payload axis, {report.plan.concurrency} in flight:",
    ]
    lines += _axis_table(report.payload_axis, "payload", size_label, "p50_us", "p50 µs")
    lines += ["", f"in-flight axis, {size_label(report.plan.payload)}:"]
    lines += _axis_table(report.concurrency_axis, "in flight", str, "mean_latency_us", "mean µs")
    return "\n".join(lines)


def _axis_table(
    axis: list[SweepPoint], heading: str, label: Any, latency_key: str, latency_heading: str
) -> list[str]:
    lines = [f"{heading:<11}{'client':<9}{'calls/s':>12}{'MiB/s':>10}{latency_heading:>11}"]
    for point in axis:
        first = label(point.x)
        for name in ("basidia", "raw"):
            entry = point.figures.get(name)
            if entry is not None:
                lines.append(
                    f"{first:<11}{name:<9}{entry['calls_per_s']:>12,.0f}"
                    f"{entry['mib_per_s']:>10.1f}{entry.get(latency_key, 0.0):>11.1f}"
                )
                first = ""
            elif name in point.errors:
                lines.append(f"{first:<11}{name:<9}  refused: {point.errors[name]}")
                first = ""
    return lines


def plot_sweep(report: SweepReport, path: Path) -> None:
    """Draw both axes (calls/s, log-log) to ``path``; PNG or SVG by its suffix.

    Raises ``ImportError`` with an install hint when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "--plot needs matplotlib: pip install 'basidia[plot]' (the JSON needs nothing)"
        ) from exc
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axes, axis, xlabel in (
        (left, report.payload_axis, f"payload bytes ({report.plan.concurrency} in flight)"),
        (right, report.concurrency_axis, f"calls in flight ({size_label(report.plan.payload)})"),
    ):
        for name, style in (("basidia", "o-"), ("raw", "s--")):
            xs = [p.x for p in axis if name in p.figures]
            ys = [p.figures[name]["calls_per_s"] for p in axis if name in p.figures]
            if xs:
                axes.plot(xs, ys, style, label=name if name == "basidia" else "raw client")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel("calls/s")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    header = report.header
    figure.suptitle(f"basidia bench --sweep · {header.broker} · core {header.implementation}")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)

"""The ``basidia bench`` command: options, progress, table or JSON, exit status."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from basidia.bench.core import BenchPlan, BenchReport, run_bench
from basidia.bench.report import Gate, check_gate, render_table, telemetry_notes, to_json
from basidia.bench.telemetry import TELEMETRY_MODES
from basidia.errors import BasidiaError

__all__ = ["command", "parse_size", "parse_telemetry"]

#: Larger payloads would exceed NATS's default max_payload (1 MiB) once framed and encoded.
MAX_PAYLOAD = 512 * 1024
_HINT = "'--payload' / '-p'"
_SIZE = re.compile(r"^\s*(\d+)\s*(?:(k|m)(?:i?b)?|b)?\s*$", re.IGNORECASE)

# (latency calls, throughput seconds) without and with --quick.
_FULL = (5000, 3.0)
_QUICK = (500, 0.5)


def parse_size(text: str) -> int:
    """``16`` → 16, ``1k``/``1KiB``/``1kb`` → 1024, ``1MiB`` → 1048576 (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a size: write 16, 1KiB or 4k", param_hint=_HINT)
    number, unit = int(match.group(1)), (match.group(2) or "").lower()
    size = number * {"": 1, "k": 1 << 10, "m": 1 << 20}[unit]
    if not 1 <= size <= MAX_PAYLOAD:
        raise typer.BadParameter(
            f"{text!r}: payloads are 1 byte to {MAX_PAYLOAD // 1024} KiB", param_hint=_HINT
        )
    return size


def parse_telemetry(values: list[str]) -> tuple[str, ...]:
    """``["metrics,traces", "off"]`` → ``("metrics", "traces")``: the modes to measure."""
    modes: list[str] = []
    for value in values:
        for part in value.split(","):
            mode = part.strip().lower()
            if mode in ("", "off"):
                continue
            if mode not in TELEMETRY_MODES:
                raise typer.BadParameter(
                    f"{part!r}: telemetry modes are off, {', '.join(TELEMETRY_MODES)}",
                    param_hint="'--telemetry'",
                )
            if mode not in modes:
                modes.append(mode)
    return tuple(modes)


def _progress(line: str) -> None:
    typer.echo(line, err=True)


PayloadOption = typer.Option(
    None,
    "--payload",
    "-p",
    help="Payload size (16, 1KiB, 4k); repeat for several. Default: 16 B and 1 KiB.",
)

PlotOption = typer.Option(
    None, "--plot", help="With --sweep: also draw it to this PNG or SVG file (needs matplotlib)."
)


TelemetryOption = typer.Option(
    None,
    "--telemetry",
    "-t",
    help="Also measure the echo with telemetry: metrics, traces or all (basidia[otel]); "
    "repeat or comma-separate for several; off adds nothing. The closing note gives "
    "the µs each adds per call.",
)


def command(
    broker: str = typer.Option(
        "memory://",
        "--broker",
        "-b",
        help="Broker URL: memory://, nats://..., amqp://..., redis://..., kafka://...",
    ),
    concurrency: int = typer.Option(
        64, "--concurrency", "-c", min=1, max=10_000, help="Calls in flight for throughput."
    ),
    payload: Optional[list[str]] = PayloadOption,  # noqa: UP045 - typer reads the annotation
    calls: Optional[int] = typer.Option(  # noqa: UP045
        None, "--calls", "-n", min=10, help="Sequential calls timed for latency [5000; quick 500]."
    ),
    duration: Optional[float] = typer.Option(  # noqa: UP045
        None,
        "--duration",
        "-d",
        min=0.05,
        help="Seconds of throughput per client and payload [3; quick 0.5].",
    ),
    quick: bool = typer.Option(False, "--quick", help="A short run, for CI and smoke tests."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    max_overhead_us: Optional[float] = typer.Option(  # noqa: UP045
        None,
        "--max-overhead-us",
        min=0,
        help="Exit 1 if p50 overhead over the raw floor exceeds this for any payload "
        "(without a floor: the absolute p50).",
    ),
    telemetry: Optional[list[str]] = TelemetryOption,  # noqa: UP045
    min_throughput_ratio: Optional[float] = typer.Option(  # noqa: UP045
        None,
        "--min-throughput-ratio",
        min=0,
        help="Exit 1 if calls/s fall below this fraction of the raw floor's (0.8 = 80%).",
    ),
    sweep: bool = typer.Option(
        False,
        "--sweep",
        help="Scaling run: payloads 16 B to 1 MiB at --concurrency in flight, then 1 to 1,024 "
        "in flight at the first --payload (default 16 B); each point beside the raw floor.",
    ),
    plot: Optional[Path] = PlotOption,  # noqa: UP045
) -> None:
    """Measure echo RPC: p50/p90/p99 latency at 1 in flight, calls/s at N in flight.

    On nats://, amqp://, redis:// and kafka:// the raw client floor is measured in the same run, and
    Basidia's overhead over it is printed.  Progress goes to stderr.
    """
    if sweep:
        if max_overhead_us is not None or min_throughput_ratio is not None:
            raise typer.BadParameter("--sweep measures, it does not gate", param_hint="'--sweep'")
        _sweep(broker, concurrency, payload, calls, duration, quick, json_output, plot)
        return
    if plot is not None:
        raise typer.BadParameter("--plot draws a sweep: add --sweep", param_hint="'--plot'")
    default_calls, default_duration = _QUICK if quick else _FULL
    sizes = tuple(dict.fromkeys(parse_size(text) for text in payload)) if payload else (16, 1024)
    plan = BenchPlan(
        broker=broker,
        payloads=sizes,
        calls=calls or default_calls,
        duration=duration or default_duration,
        concurrency=concurrency,
        telemetry=parse_telemetry(telemetry or []),
    )
    gate = Gate(max_overhead_us=max_overhead_us, min_throughput_ratio=min_throughput_ratio)

    from basidia.cli import run_async  # here: basidia.cli imports this module
    from basidia.log import configure_logging

    configure_logging("WARNING")
    try:
        report: BenchReport = run_async(run_bench(plan, _progress))
    except (BasidiaError, ImportError, OSError, RuntimeError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    verdict = check_gate(report, gate)
    if json_output:
        typer.echo(json.dumps(to_json(report, gate, verdict), indent=2))
        for note in telemetry_notes(report):
            typer.echo(note, err=True)
    else:
        typer.echo(render_table(report))
    for notice in verdict.notices:
        typer.echo(f"notice: {notice}", err=True)
    for failure in verdict.failures:
        typer.echo(f"gate failed: {failure}", err=True)
    if not verdict.passed:
        raise typer.Exit(code=1)


# Seconds per point and contender, and sequential calls per payload, without and with --quick.
_SWEEP_FULL = (1.0, 500)
_SWEEP_QUICK = (0.1, 30)


def _sweep(
    broker: str,
    concurrency: int,
    payload: list[str] | None,
    calls: int | None,
    duration: float | None,
    quick: bool,
    json_output: bool,
    plot: Path | None,
) -> None:
    from basidia.bench.sweep import SweepPlan, plot_sweep, render_sweep, run_sweep, sweep_json
    from basidia.cli import run_async
    from basidia.log import configure_logging

    default_duration, default_calls = _SWEEP_QUICK if quick else _SWEEP_FULL
    plan = SweepPlan(
        broker=broker,
        concurrency=concurrency,
        payload=parse_size(payload[0]) if payload else 16,
        duration=duration or default_duration,
        calls=calls or default_calls,
    )
    configure_logging("WARNING")
    try:
        report = run_async(run_sweep(plan, _progress))
    except (BasidiaError, ImportError, OSError, RuntimeError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(json.dumps(sweep_json(report), indent=2) if json_output else render_sweep(report))
    if plot is not None:
        try:
            plot_sweep(report, plot)
        except ImportError as exc:
            typer.echo(f"notice: no picture: {exc}", err=True)
        else:
            typer.echo(f"wrote {plot}", err=True)

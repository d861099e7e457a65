"""The ``basidia bench`` command: options, progress, table or JSON, exit status."""

from __future__ import annotations

import json
import re
from typing import Optional

import typer

from basidia.bench.core import BenchPlan, BenchReport, run_bench
from basidia.bench.report import Gate, check_gate, render_table, to_json
from basidia.errors import BasidiaError

__all__ = ["command", "parse_size"]

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


def _progress(line: str) -> None:
    typer.echo(line, err=True)


PayloadOption = typer.Option(
    None,
    "--payload",
    "-p",
    help="Payload size (16, 1KiB, 4k); repeat for several. Default: 16 B and 1 KiB.",
)


def command(
    broker: str = typer.Option(
        "memory://",
        "--broker",
        "-b",
        help="Broker URL: memory://, nats://..., amqp://..., redis://...",
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
    min_throughput_ratio: Optional[float] = typer.Option(  # noqa: UP045
        None,
        "--min-throughput-ratio",
        min=0,
        help="Exit 1 if calls/s fall below this fraction of the raw floor's (0.8 = 80%).",
    ),
) -> None:
    """Measure echo RPC: p50/p90/p99 latency at 1 in flight, calls/s at N in flight.

    On nats://, amqp:// and redis:// the raw client floor is measured in the same run, and
    Basidia's overhead over it is printed.  Progress goes to stderr.
    """
    default_calls, default_duration = _QUICK if quick else _FULL
    sizes = tuple(dict.fromkeys(parse_size(text) for text in payload)) if payload else (16, 1024)
    plan = BenchPlan(
        broker=broker,
        payloads=sizes,
        calls=calls or default_calls,
        duration=duration or default_duration,
        concurrency=concurrency,
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
    else:
        typer.echo(render_table(report))
    for notice in verdict.notices:
        typer.echo(f"notice: {notice}", err=True)
    for failure in verdict.failures:
        typer.echo(f"gate failed: {failure}", err=True)
    if not verdict.passed:
        raise typer.Exit(code=1)

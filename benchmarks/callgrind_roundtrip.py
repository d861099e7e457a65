"""Instructions per in-process RPC round trip, compiled core and pure Python, under callgrind.

    python benchmarks/callgrind_roundtrip.py          # needs valgrind; about a minute per core
    python benchmarks/callgrind_roundtrip.py --telemetry traces   # metrics, traces, all, off
    python benchmarks/callgrind_roundtrip.py --without-otel       # OpenTelemetry unimportable

An echo call on the memory broker, on asyncio's loop.  Each core runs twice under
``valgrind --tool=callgrind``, for N = 1,280 and 3,840: N sequential calls, then N
more from 64 concurrent workers.  The difference of the two counts, divided by the
2 x 2,560 calls it adds, is what one round trip costs, without the start-up and
shutdown both runs share.  An instruction count does not move with the machine's
load, and repeats to within about 1% (hash seeds, addresses): the figure to compare
when a change is worth a few percent of a round trip.

``--telemetry MODE`` instruments the echo and its client as ``basidia bench
--telemetry`` does (docs/observability.md); ``--without-otel`` makes OpenTelemetry
unimportable, as in an environment without ``basidia[otel]``: telemetry off and no
extra should count the same.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

SMALL, LARGE = 1280, 3840  # round trips per run; multiples of the 64 workers
WORKERS = 64


async def _round_trips(count: int) -> None:
    """In the measured process: ``count`` sequential echo calls, then ``count`` concurrent ones."""
    from basidia import IMPLEMENTATION, ServiceRunner, connect
    from basidia.bench.core import echo_service

    print(IMPLEMENTATION)

    middleware = []
    mode = os.environ.get("BASIDIA_CALLGRIND_TELEMETRY", "off")
    if mode != "off":
        from basidia.bench.telemetry import instrumentation

        middleware.append(instrumentation(mode)[0])
    name = "basidia_callgrind_echo"
    payload = b"x" * 16
    broker = "memory://callgrind"
    async with ServiceRunner([echo_service(name, WORKERS)], broker=broker, middleware=middleware):
        async with connect(broker, middleware=middleware) as cluster:
            echo = cluster.rpc[name].echo
            for _ in range(count):
                await echo(payload)

            async def worker(calls: int) -> None:
                for _ in range(calls):
                    await echo(payload)

            await asyncio.gather(*(worker(count // WORKERS) for _ in range(WORKERS)))


def instructions(count: int, core: str, extra: dict[str, str] | None = None) -> int:
    """Instructions callgrind counts for a whole process making ``count`` x 2 round trips."""
    env = {**os.environ, "BASIDIA_NO_EXTENSIONS": "1" if core == "py" else "", **(extra or {})}
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    done = subprocess.run(
        [*valgrind, sys.executable, __file__, "--run", str(count)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    if done.stdout.strip() != core:
        raise RuntimeError(f"asked for the {core!r} core, ran {done.stdout.strip()!r}")
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr}")
    return int(match.group(1))


def main(args: list[str]) -> None:
    extra: dict[str, str] = {}
    what = ""
    if args[:1] == ["--telemetry"] and len(args) == 2:
        extra["BASIDIA_CALLGRIND_TELEMETRY"] = args[1]
        what = f", telemetry {args[1]}"
    elif args == ["--without-otel"]:
        extra["BASIDIA_CALLGRIND_WITHOUT_OTEL"] = "1"
        what = ", without OpenTelemetry"
    elif args:
        sys.exit("usage: callgrind_roundtrip.py [--telemetry MODE | --without-otel]")
    for core in ("c", "py"):
        small = instructions(SMALL, core, extra)
        large = instructions(LARGE, core, extra)
        per_call = (large - small) / (2 * (LARGE - SMALL))
        print(f"{core}{what}: {per_call:,.0f} instructions per round trip")


if __name__ == "__main__":
    if os.environ.get("BASIDIA_CALLGRIND_WITHOUT_OTEL"):
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    if sys.argv[1:2] == ["--run"]:
        asyncio.run(_round_trips(int(sys.argv[2])))
    else:
        main(sys.argv[1:])

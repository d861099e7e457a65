"""Instructions per in-process RPC round trip, compiled core and pure Python, under callgrind.

    python benchmarks/callgrind_roundtrip.py          # needs valgrind; about a minute per core
    python benchmarks/callgrind_roundtrip.py --broker nats://127.0.0.1:4222
    python benchmarks/callgrind_roundtrip.py --telemetry traces   # metrics, traces, all, off
    python benchmarks/callgrind_roundtrip.py --without-otel       # OpenTelemetry unimportable
    python benchmarks/callgrind_roundtrip.py --payload 1024 --broker nats://127.0.0.1:4222

With ``--broker`` (``nats://`` or ``amqp://``), the echo service and its caller talk
through that broker, in one process, and the raw client floor of ``basidia bench``
(``basidia/bench/raw_<broker>.py``) is counted the same way beside the compiled core:
the instructions the client library and Basidia spend per call, on both sides, which
a loaded machine does not change (the broker's own work is another process's).

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
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable

SMALL, LARGE = 1280, 3840  # round trips per run; multiples of the 64 workers
WORKERS = 64


async def _calls(echo: Callable[[bytes], Awaitable[bytes]], count: int) -> None:
    """``count`` sequential echo calls, then ``count`` from ``WORKERS`` concurrent callers."""
    payload = b"x" * int(os.environ.get("BASIDIA_CALLGRIND_PAYLOAD", "16"))
    for _ in range(count):
        await echo(payload)

    async def worker(calls: int) -> None:
        for _ in range(calls):
            await echo(payload)

    await asyncio.gather(*(worker(count // WORKERS) for _ in range(WORKERS)))


async def _round_trips(count: int, url: str = "memory://callgrind", raw: bool = False) -> None:
    """In the measured process: ``count`` sequential echo calls, then ``count`` concurrent ones."""
    from basidia import IMPLEMENTATION, ServiceRunner, connect
    from basidia.bench.core import echo_service

    print("raw" if raw else IMPLEMENTATION)
    if raw:
        floor = importlib.import_module(f"basidia.bench.raw_{_FLOORS[url.split(':')[0]]}")
        echo = await floor.open_raw_echo(url)
        try:
            await _calls(echo.call, count)
        finally:
            await echo.close()
        return
    middleware = []
    mode = os.environ.get("BASIDIA_CALLGRIND_TELEMETRY", "off")
    if mode != "off":
        from basidia.bench.telemetry import instrumentation

        middleware.append(instrumentation(mode)[0])
    name = f"basidia_callgrind_echo_{os.getpid()}"
    async with ServiceRunner([echo_service(name, WORKERS)], broker=url, middleware=middleware):
        async with connect(url, middleware=middleware) as cluster:
            await _calls(cluster.rpc[name].echo, count)


# Scheme -> the raw floor module's suffix (basidia/bench/raw_*.py).
_FLOORS = {"nats": "nats", "tls": "nats", "amqp": "amqp", "amqps": "amqp"}


def instructions(
    count: int, core: str, url: str = "", extra_env: dict[str, str] | None = None
) -> int:
    """Instructions callgrind counts for a whole process making ``count`` x 2 round trips
    (``core``: "c", "py", or "raw" for the raw client floor on ``url``)."""
    env = {
        **os.environ,
        "BASIDIA_NO_EXTENSIONS": "1" if core == "py" else "",
        **(extra_env or {}),
    }
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    extra = [url, "raw" if core == "raw" else ""] if url else []
    done = subprocess.run(
        [*valgrind, sys.executable, __file__, "--run", str(count), *extra],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    if done.stdout.strip() != core:
        raise RuntimeError(f"asked for {core!r}, ran {done.stdout.strip()!r}")
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr}")
    return int(match.group(1))


def main(url: str = "", extra_env: dict[str, str] | None = None, what: str = "") -> None:
    if url and url.split(":")[0] not in _FLOORS:
        raise SystemExit(f"--broker takes a nats:// or amqp:// URL, not {url!r}")
    counts: dict[str, float] = {}
    for core in ("c", "raw") if url else ("c", "py"):
        small = instructions(SMALL, core, url, extra_env)
        large = instructions(LARGE, core, url, extra_env)
        counts[core] = per_call = (large - small) / (2 * (LARGE - SMALL))
        print(f"{core}{what}: {per_call:,.0f} instructions per round trip")
    if url:
        print(f"raw / basidia: {counts['raw'] / counts['c']:.2f}")


if __name__ == "__main__":
    if os.environ.get("BASIDIA_CALLGRIND_WITHOUT_OTEL"):
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    if "--payload" in sys.argv[1:-1]:  # with any of the forms below; the env reaches --run
        at = sys.argv.index("--payload")
        os.environ["BASIDIA_CALLGRIND_PAYLOAD"] = str(int(sys.argv[at + 1]))
        del sys.argv[at : at + 2]
    if sys.argv[1:2] == ["--run"]:
        url = sys.argv[3] if len(sys.argv) > 3 else "memory://callgrind"
        asyncio.run(_round_trips(int(sys.argv[2]), url, sys.argv[4:5] == ["raw"]))
    elif sys.argv[1:2] == ["--broker"] and len(sys.argv) == 3:
        main(sys.argv[2])
    elif sys.argv[1:2] == ["--telemetry"] and len(sys.argv) == 3:
        main("", {"BASIDIA_CALLGRIND_TELEMETRY": sys.argv[2]}, f", telemetry {sys.argv[2]}")
    elif sys.argv[1:] == ["--without-otel"]:
        main("", {"BASIDIA_CALLGRIND_WITHOUT_OTEL": "1"}, ", without OpenTelemetry")
    elif len(sys.argv) == 1:
        main()
    else:
        raise SystemExit(__doc__)

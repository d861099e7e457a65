"""Instructions per in-process RPC round trip, compiled core and pure Python, under callgrind.

    python benchmarks/callgrind_roundtrip.py          # needs valgrind; about a minute per core

An echo call on the memory broker, on asyncio's loop.  Each core runs twice under
``valgrind --tool=callgrind``, for N = 1,280 and 3,840: N sequential calls, then N
more from 64 concurrent workers.  The difference of the two counts, divided by the
2 x 2,560 calls it adds, is what one round trip costs, without the start-up and
shutdown both runs share.  An instruction count does not move with the machine's
load, and repeats to within about 1% (hash seeds, addresses): the figure to compare
when a change is worth a few percent of a round trip.
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

    name = "basidia_callgrind_echo"
    payload = b"x" * 16
    async with ServiceRunner([echo_service(name, WORKERS)], broker="memory://callgrind"):
        async with connect("memory://callgrind") as cluster:
            echo = cluster.rpc[name].echo
            for _ in range(count):
                await echo(payload)

            async def worker(calls: int) -> None:
                for _ in range(calls):
                    await echo(payload)

            await asyncio.gather(*(worker(count // WORKERS) for _ in range(WORKERS)))


def instructions(count: int, core: str) -> int:
    """Instructions callgrind counts for a whole process making ``count`` x 2 round trips."""
    env = {**os.environ, "BASIDIA_NO_EXTENSIONS": "1" if core == "py" else ""}
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


def main() -> None:
    for core in ("c", "py"):
        small = instructions(SMALL, core)
        large = instructions(LARGE, core)
        per_call = (large - small) / (2 * (LARGE - SMALL))
        print(f"{core}: {per_call:,.0f} instructions per round trip")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        asyncio.run(_round_trips(int(sys.argv[2])))
    else:
        main()

"""In-process RPC throughput: echo calls on the memory broker, 64 in flight, both cores.

    python -m pytest benchmarks/test_inprocess.py     # prints c and py calls/s side by side
    python benchmarks/test_inprocess.py               # the same, without pytest

The implementation is chosen when basidia is imported, so every figure comes
from a fresh subprocess (``BASIDIA_NO_EXTENSIONS=1`` for the pure-Python one);
the two alternate, so that load from elsewhere on the machine hits both alike.
Each subprocess warms up, then measures several windows; the table shows the
best and the median window of each implementation, as wall-clock calls/s and
as CPU microseconds per call (what one call costs, however busy the machine).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = 64
PAYLOAD_BYTES = 16
WINDOW_SECONDS = 0.5  # one measured window
WINDOWS = 6  # windows per subprocess
RUNS = 2  # subprocesses per implementation, alternating c, py, c, py


async def _measure_windows() -> dict[str, Any]:
    """In the subprocess: host an echo service, call it CONCURRENCY at a time, per window."""
    from basidia import IMPLEMENTATION, ServiceRunner, connect
    from basidia.bench.core import echo_service, measure_throughput

    url = "memory://inprocess-bench"
    name = "basidia_bench_inprocess_echo"
    payload = os.urandom(PAYLOAD_BYTES)
    windows: list[dict[str, float]] = []
    async with ServiceRunner([echo_service(name, CONCURRENCY)], broker=url):
        async with connect(url) as cluster:
            echo = cluster.rpc[name].echo
            assert await echo(payload) == payload
            await measure_throughput(echo, payload, CONCURRENCY, 0.5)  # warm-up
            for _ in range(WINDOWS):
                cpu = time.process_time()
                calls, seconds = await measure_throughput(
                    echo, payload, CONCURRENCY, WINDOW_SECONDS
                )
                cpu = time.process_time() - cpu
                windows.append({"calls_per_s": calls / seconds, "cpu_us": cpu / calls * 1e6})
    return {"implementation": IMPLEMENTATION, "windows": windows}


def _main_in_subprocess() -> None:
    try:
        import uvloop
    except ImportError:  # the figures then say asyncio
        import asyncio

        result = asyncio.run(_measure_windows())
        result["loop"] = "asyncio"
    else:
        result = uvloop.run(_measure_windows())
        result["loop"] = "uvloop"
    print(json.dumps(result))


def run_once(pure_python: bool) -> dict[str, Any]:
    """Measure in a fresh interpreter; the compiled core unless ``pure_python``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["BASIDIA_NO_EXTENSIONS"] = "1" if pure_python else ""
    done = subprocess.run(
        [sys.executable, __file__, "--measure"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark subprocess failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure_both() -> dict[str, dict[str, Any]]:
    """Alternate c and py subprocesses; pool each implementation's windows."""
    pooled: dict[str, dict[str, Any]] = {}
    for _ in range(RUNS):
        for pure_python in (False, True):
            result = run_once(pure_python)
            slot = pooled.setdefault(
                "py" if pure_python else "c",
                {"implementation": result["implementation"], "loop": result["loop"], "windows": []},
            )
            slot["windows"] += result["windows"]
    return pooled


def render(pooled: dict[str, dict[str, Any]]) -> str:
    """A small table: best and median calls/s, and CPU µs per call, per implementation."""
    lines = [
        f"in-process echo RPC, memory broker, {CONCURRENCY} in flight, {PAYLOAD_BYTES} B payload, "
        f"{len(next(iter(pooled.values()))['windows'])} windows of {WINDOW_SECONDS:g} s each, "
        f"{os.cpu_count()} CPUs",
        f"{'core':<6}{'loop':<9}{'best calls/s':>14}{'median calls/s':>16}{'CPU µs/call':>13}",
    ]
    for requested, slot in pooled.items():
        rates = [window["calls_per_s"] for window in slot["windows"]]
        cpu = min(window["cpu_us"] for window in slot["windows"])
        core = slot["implementation"]
        if core != requested:
            core = f"{core}(!)"  # the compiled core was asked for and did not load
        lines.append(
            f"{core:<6}{slot['loop']:<9}{max(rates):>14,.0f}"
            f"{statistics.median(rates):>16,.0f}{cpu:>13.1f}"
        )
    if "c" in pooled and "py" in pooled:
        c_best = max(window["calls_per_s"] for window in pooled["c"]["windows"])
        py_best = max(window["calls_per_s"] for window in pooled["py"]["windows"])
        c_cpu = min(window["cpu_us"] for window in pooled["c"]["windows"])
        py_cpu = min(window["cpu_us"] for window in pooled["py"]["windows"])
        lines.append(
            f"compiled vs pure Python: {py_cpu / c_cpu:.2f}x less CPU per call, "
            f"{c_best / py_best:.2f}x the best calls/s (the CPU figure is the steadier one)"
        )
    return "\n".join(lines)


def test_inprocess_rpc_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    """Report calls/s for both cores (a report, not a timed test: see ``basidia bench``)."""
    pooled = measure_both()

    with capsys.disabled():
        print("\n" + render(pooled))
    assert pooled["py"]["implementation"] == "py"
    if pooled["c"]["implementation"] != "c":
        if os.environ.get("BASIDIA_REQUIRE_EXTENSIONS", "").strip().lower() in ("1", "true"):
            pytest.fail("the compiled core did not load and BASIDIA_REQUIRE_EXTENSIONS=1 is set")
        pytest.skip("the compiled core is not built here: only the pure-Python figure is real")
    for slot in pooled.values():
        assert all(window["calls_per_s"] > 0 for window in slot["windows"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--measure"]:
        _main_in_subprocess()
    else:
        print(render(measure_both()))

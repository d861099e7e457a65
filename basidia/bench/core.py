"""Measuring echo RPC: latency at one call in flight, throughput at many.

Basidia is measured through its public surface only: an echo service hosted
by a ``ServiceRunner`` and called through ``connect(url)``, as a user would.
On a network broker the raw client floor (``basidia.bench.raw_<broker>``) is
measured in the same run, interleaved (latency call by call, throughput in
alternating windows), so that both figures see the same machine and the same noise.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import importlib.metadata
import math
import os
import platform
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from basidia import IMPLEMENTATION, __version__
from basidia.brokers import redact_url
from basidia.errors import BasidiaError
from basidia.runner import Cluster, ServiceRunner, connect
from basidia.service import Service, rpc

__all__ = [
    "BenchPlan",
    "BenchReport",
    "Call",
    "Figures",
    "PayloadResult",
    "echo_contenders",
    "echo_service",
    "figures",
    "measure_latency",
    "measure_throughput",
    "new_report",
    "run_bench",
    "size_label",
]

#: One echo round trip: send ``payload``, return what came back.
Call = Callable[[bytes], Awaitable[bytes]]
#: Where progress lines go (stderr in the CLI).
Progress = Callable[[str], None]

# Scheme → (module holding ``open_raw_echo``, what the floor is, in the table's words).
_RAW_FLOORS: dict[str, tuple[str, str]] = {
    "nats": ("basidia.bench.raw_nats", "raw nats-py request/reply"),
    "tls": ("basidia.bench.raw_nats", "raw nats-py request/reply"),
    "amqp": ("basidia.bench.raw_amqp", "raw aiormq RPC"),
    "amqps": ("basidia.bench.raw_amqp", "raw aiormq RPC"),
    "kafka": ("basidia.bench.raw_kafka", "raw aiokafka request-reply"),
    "kafkas": ("basidia.bench.raw_kafka", "raw aiokafka request-reply"),
    "redis": ("basidia.bench.raw_redis", "raw redis-py stream request/pub-sub reply"),
    "rediss": ("basidia.bench.raw_redis", "raw redis-py stream request/pub-sub reply"),
}


# Seconds a raw floor's echo responder gets to answer its first call.
_RAW_READY_SECONDS = 2.0


class RawEcho(Protocol):
    """What a raw floor module's ``open_raw_echo(url)`` returns."""

    async def call(self, payload: bytes) -> bytes:
        """One raw request/reply round trip to the echo responder."""
        ...

    async def close(self) -> None:
        """Stop the responder and close the connections."""
        ...


@dataclass(frozen=True)
class BenchPlan:
    """What to measure and for how long."""

    broker: str = "memory://"
    #: Payload sizes in bytes.
    payloads: tuple[int, ...] = (16, 1024)
    #: Sequential calls timed for the latency percentiles (per contender and payload).
    calls: int = 5000
    #: Seconds of throughput measurement (per contender and payload).
    duration: float = 3.0
    #: Calls in flight during the throughput measurement.
    concurrency: int = 64
    #: Throughput alternates between contenders in twice this many windows, so slow
    #: drift hits both alike (latency samples alternate call by call).
    rounds: int = 3
    #: Telemetry modes measured beside the bare service (``basidia.bench.telemetry``).
    telemetry: tuple[str, ...] = ()


@dataclass(frozen=True)
class Figures:
    """The four numbers measured for one contender and payload."""

    p50_us: float
    p90_us: float
    p99_us: float
    calls_per_s: float

    def as_dict(self) -> dict[str, float]:
        """The figures for JSON, rounded to what a measurement can tell."""
        return {
            "p50_us": round(self.p50_us, 1),
            "p90_us": round(self.p90_us, 1),
            "p99_us": round(self.p99_us, 1),
            "calls_per_s": round(self.calls_per_s),
        }


@dataclass(frozen=True)
class PayloadResult:
    """Basidia's figures for one payload size, beside the raw floor's when there is one."""

    size: int
    basidia: Figures
    raw: Figures | None
    #: The instrumented echo's figures, by telemetry mode (``--telemetry``).
    telemetry: dict[str, Figures] = field(default_factory=dict)

    def telemetry_cost_us(self, mode: str) -> tuple[float, float]:
        """Microseconds ``mode`` adds per call: at p50 (1 in flight), and in CPU time at
        saturation (from calls/s: 1/throughput with it less 1/throughput without)."""
        measured = self.telemetry[mode]
        latency = measured.p50_us - self.basidia.p50_us
        if measured.calls_per_s <= 0 or self.basidia.calls_per_s <= 0:
            return latency, math.nan
        return latency, 1e6 / measured.calls_per_s - 1e6 / self.basidia.calls_per_s

    @property
    def overhead_p50_us(self) -> float | None:
        """Microseconds Basidia adds to the raw client's p50; None without a floor."""
        if self.raw is None:
            return None
        return self.basidia.p50_us - self.raw.p50_us

    @property
    def throughput_ratio(self) -> float | None:
        """Basidia's calls/s as a fraction of the raw client's; None without a floor."""
        if self.raw is None or self.raw.calls_per_s <= 0:
            return None
        return self.basidia.calls_per_s / self.raw.calls_per_s


@dataclass
class BenchReport:
    """Everything one ``basidia bench`` run measured, and on what."""

    plan: BenchPlan
    #: The broker URL without its password.
    broker: str
    #: What the raw floor is (e.g. "raw nats-py request/reply"), or None for memory://.
    raw_floor: str | None
    #: Why a real broker's raw floor was not measured, or None when it was (or is moot).
    raw_unavailable: str | None
    implementation: str = IMPLEMENTATION
    basidia_version: str = __version__
    python: str = field(
        default_factory=lambda: f"{platform.python_implementation()} {platform.python_version()}"
    )
    #: uvloop's version when the run used its loop, else None.
    uvloop: str | None = None
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    results: list[PayloadResult] = field(default_factory=list)


def echo_service(name: str, max_workers: int) -> type[Service]:
    """An echo service class called ``name`` that handles ``max_workers`` calls at once."""
    service_name, workers = name, max_workers

    class BenchEcho(Service):
        """Returns its payload: the cheapest handler, so the framework is what is measured."""

        name = service_name
        max_workers = workers

        @rpc
        async def echo(self, payload: bytes) -> bytes:
            return payload

    return BenchEcho


def _percentile(ordered: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile of sorted nanosecond samples, in microseconds."""
    # ceil(fraction * n), less a hair so that float noise cannot push 99.0 to 100.
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered) - 1e-9) - 1))
    return ordered[index] / 1000.0


def figures(latencies_ns: Sequence[int], calls: int, seconds: float) -> Figures:
    """Percentiles of ``latencies_ns`` and the throughput of ``calls`` in ``seconds``."""
    if not latencies_ns:
        raise ValueError("no latency samples")
    ordered = sorted(latencies_ns)
    return Figures(
        p50_us=_percentile(ordered, 0.50),
        p90_us=_percentile(ordered, 0.90),
        p99_us=_percentile(ordered, 0.99),
        calls_per_s=calls / seconds if seconds > 0 else 0.0,
    )


async def measure_latency(call: Call, payload: bytes, calls: int) -> list[int]:
    """Time ``calls`` sequential round trips (one in flight); nanoseconds each."""
    clock = time.perf_counter_ns
    samples = [0] * calls
    for index in range(calls):
        start = clock()
        await call(payload)
        samples[index] = clock() - start
    return samples


async def measure_throughput(
    call: Call, payload: bytes, concurrency: int, duration: float
) -> tuple[int, float]:
    """Keep ``concurrency`` calls in flight for ``duration`` seconds; (calls done, seconds).

    ``concurrency`` worker coroutines each loop call after call until the time is
    up: the cost measured is the framework's, not that of creating a task per call.
    The clock stops when the last call in flight has returned.
    """
    clock = time.perf_counter
    start = clock()
    end = start + duration

    async def worker() -> int:
        done = 0
        while clock() < end:
            await call(payload)
            done += 1
        return done

    counts = await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(counts), clock() - start


async def _compare(
    contenders: Sequence[tuple[str, Call]],
    size: int,
    plan: BenchPlan,
    progress: Progress,
) -> dict[str, Figures]:
    """Measure every contender on one payload size, alternating them round by round."""
    payload = os.urandom(size)
    names = ", ".join(name for name, _ in contenders)
    label = size_label(size)
    rounds = max(1, plan.rounds)
    progress(f"warming up ({label}): {names} ...")
    for _, call in contenders:
        await measure_latency(call, payload, max(50, plan.calls // 10))
        await measure_throughput(call, payload, plan.concurrency, min(0.5, plan.duration / 5))

    latencies: dict[str, list[int]] = {name: [] for name, _ in contenders}
    progress(f"measuring latency ({label}, {plan.calls} calls at 1 in flight): {names} ...")
    # Paired samples: call after call the contenders take turns (in alternating order),
    # so a broker's drift over the run, large next to the differences measured, hits
    # every contender alike.
    clock = time.perf_counter_ns
    orders = [list(contenders), list(reversed(contenders))]
    gc.collect()
    for index in range(plan.calls):
        for name, call in orders[index % 2]:
            start = clock()
            await call(payload)
            latencies[name].append(clock() - start)

    done: dict[str, int] = {name: 0 for name, _ in contenders}
    elapsed: dict[str, float] = {name: 0.0 for name, _ in contenders}
    progress(
        f"measuring throughput ({label}, {plan.duration:g} s at {plan.concurrency} in flight):"
        f" {names} ..."
    )
    windows = 2 * rounds  # short windows, alternating, for the same reason
    for index in range(windows):
        for name, call in orders[index % 2]:
            gc.collect()  # the last contender's garbage is not this one's to pay for
            calls, seconds = await measure_throughput(
                call, payload, plan.concurrency, plan.duration / windows
            )
            done[name] += calls
            elapsed[name] += seconds
    return {name: figures(latencies[name], done[name], elapsed[name]) for name, _ in contenders}


def size_label(size: int) -> str:
    """``16 B``, ``1 KiB``, ``1.5 KiB``, ``1 MiB``."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


async def _open_raw(url: str, probe: bytes) -> tuple[str | None, str | None, RawEcho | None]:
    """(floor name, why unavailable, raw echo answering ``probe``) for ``url``'s broker."""
    scheme = url.partition("://")[0].lower()
    found = _RAW_FLOORS.get(scheme)
    if found is None:
        return None, None, None
    module_name, floor = found
    try:
        module: Any = importlib.import_module(module_name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
            return floor, f"{module_name} is not installed", None
        return floor, f"{module_name} cannot be imported: {exc}", None
    try:
        raw: RawEcho = await module.open_raw_echo(url)
    except Exception as exc:
        return floor, f"{type(exc).__name__}: {redact_url(str(exc)) or 'cannot connect'}", None
    try:
        await _until_echoed(raw.call, probe, _RAW_READY_SECONDS)
    except Exception as exc:
        await raw.close()
        return floor, f"its echo did not answer: {type(exc).__name__}: {exc}", None
    return floor, None, raw


async def _until_echoed(call: Call, probe: bytes, within: float) -> None:
    """Call until ``probe`` comes back unchanged; retry failures for ``within`` seconds.

    A responder's subscription can reach a clustered broker a moment after its
    connection does, so the first calls may find no responder yet.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            reply = await call(probe)
        except Exception:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        if reply != probe:
            raise RuntimeError("the echo returned a different payload")
        return


def _uvloop_in_use() -> str | None:
    loop = asyncio.get_running_loop()
    if not type(loop).__module__.startswith("uvloop"):
        return None
    return importlib.metadata.version("uvloop")


@asynccontextmanager
async def echo_contenders(
    broker: str,
    max_workers: int,
    report: BenchReport,
    progress: Progress,
    config: dict[str, Any] | None = None,
) -> AsyncIterator[list[tuple[str, Call]]]:
    """Host an echo service on ``broker``; yield ``[("basidia", call), ("raw", call)?]``.

    ``config`` goes to the service's runner and to the client.  Fills
    ``report.raw_floor`` and ``report.raw_unavailable``; the raw floor's client
    is closed and the service stopped on the way out.
    """
    name = f"basidia_bench_echo_{uuid.uuid4().hex[:12]}"
    runner = ServiceRunner([echo_service(name, max_workers)], broker=broker, config=config)
    report.broker = runner.broker.safe_url
    progress(f"starting the echo service {name} on {report.broker} ...")
    await runner.start()
    raw: RawEcho | None = None
    try:
        async with connect(broker, config=config) as cluster:
            echo: Call = cluster.rpc[name].echo
            probe = os.urandom(32)
            if await echo(probe) != probe:
                raise RuntimeError("the echo service returned a different payload")
            report.raw_floor, report.raw_unavailable, raw = await _open_raw(broker, probe)
            contenders: list[tuple[str, Call]] = [("basidia", echo)]
            if raw is not None:
                contenders.append(("raw", raw.call))
            elif report.raw_unavailable is not None:
                progress(f"raw floor unavailable: {report.raw_unavailable}")
            yield contenders
    finally:
        if raw is not None:
            await raw.close()
        await runner.stop()


def new_report(plan: BenchPlan) -> BenchReport:
    """An empty report for a run of ``plan``; ``echo_contenders`` names its broker."""
    return BenchReport(
        plan=plan,
        broker=redact_url(plan.broker),
        raw_floor=None,
        raw_unavailable=None,
        uvloop=_uvloop_in_use(),
    )


async def run_bench(plan: BenchPlan, progress: Progress = lambda line: None) -> BenchReport:
    """Host an echo service on ``plan.broker``, call it through ``connect``, measure.

    Raises what Basidia raises when the broker cannot be reached or a call fails,
    and ``RuntimeError`` when an echo answers wrongly or a raw client fails while
    measuring.  A raw floor that cannot be opened is reported, not raised.
    """
    report = new_report(plan)
    instrumented = _instrumented(plan, f"basidia_bench_echo_{uuid.uuid4().hex[:12]}")
    try:
        async with echo_contenders(plan.broker, plan.concurrency, report, progress) as contenders:
            for mode, (mode_runner, mode_cluster, mode_name, _) in instrumented.items():
                await mode_runner.start()
                await mode_cluster.start()
                contenders.append((mode, mode_cluster.rpc[mode_name].echo))
            for size in plan.payloads:
                try:
                    measured = await _compare(contenders, size, plan, progress)
                except BasidiaError:
                    raise
                except Exception as exc:  # a raw client's own error types
                    raise RuntimeError(
                        f"a call failed while measuring: {type(exc).__name__}: {exc}"
                    ) from exc
                modes = {mode: measured[mode] for mode in instrumented}
                report.results.append(
                    PayloadResult(size, measured["basidia"], measured.get("raw"), modes)
                )
    finally:
        for mode_runner, mode_cluster, _, providers in instrumented.values():
            await mode_cluster.close()
            await mode_runner.stop()
            for provider in providers:
                provider.shutdown()
    return report


def _instrumented(
    plan: BenchPlan, name: str
) -> dict[str, tuple[ServiceRunner, Cluster, str, list[Any]]]:
    """Per telemetry mode: an instrumented echo service, a client, its name, its providers."""
    found: dict[str, tuple[ServiceRunner, Cluster, str, list[Any]]] = {}
    if not plan.telemetry:
        return found
    from basidia.bench.telemetry import instrumentation  # OpenTelemetry: only when asked

    for mode in plan.telemetry:
        middleware, providers = instrumentation(mode)
        mode_name = f"{name}_{mode}"
        runner = ServiceRunner(
            [echo_service(mode_name, plan.concurrency)],
            broker=plan.broker,
            middleware=[middleware],
        )
        found[mode] = (runner, connect(plan.broker, middleware=[middleware]), mode_name, providers)
    return found

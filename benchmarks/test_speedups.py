"""Micro-benchmarks of the compiled core against its pure-Python twin, and their gate.

    python -m pytest benchmarks/test_speedups.py --benchmark-only   # table + speed-ups
    python -m pytest benchmarks/test_speedups.py                    # the same, then the gate
    python -m pytest benchmarks/test_speedups.py -k gate            # only the gate

Each operation runs once per implementation (ids ``py`` and ``c``); the run ends
with a "compiled core speed-ups" section giving the ratios.  The gate measures
both implementations again, alternating them so that load from elsewhere on the
machine hits both alike, in CPU time, and asserts that the compiled core pays for
itself: frame encode+decode at least 3x faster compiled, reply routing at least
1.15x (the compiled router is the pure-Python one compiled in Cython's pure-Python
mode; docs/benchmarks.md has why).  The compiled module is required where
``BASIDIA_REQUIRE_EXTENSIONS=1``; elsewhere its cases are skipped.
"""

from __future__ import annotations

import asyncio
import importlib
import time
import timeit
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from basidia._speedups import FLAG_KWARGS, Frame, Kind, env_flag

# A typical small request: a 22-byte target, a 10-byte reply address, two
# headers and a 60-byte MessagePack payload.
REQUEST = Frame(
    Kind.REQUEST,
    123_456_789,
    "greeting_service.hello",
    b"\x92\x91\xa5World\x81\xa4name" + b"x" * 48,
    "inbox.7f3a",
    1_767_225_600_000,
    {"tp": "00-4bf92f3577b34da6-01", "call": "user_service.get.inbox.1:7"},
    FLAG_KWARGS,
)
TIMEOUT = 30.0  # seconds; routing benchmarks resolve every call long before it


def _load(tag: str) -> SimpleNamespace:
    frames = importlib.import_module(f"basidia._speedups._frames_{tag}")
    router = importlib.import_module(f"basidia._speedups._router_{tag}")
    return SimpleNamespace(
        tag=tag,
        encode=frames.encode_frame,
        decode=frames.decode_frame,
        ReplyRouter=router.ReplyRouter,
    )


def _implementation(tag: str) -> SimpleNamespace:
    if tag == "py":
        return _load("py")
    try:
        return _load("c")
    except ImportError as exc:
        if env_flag("BASIDIA_REQUIRE_EXTENSIONS"):
            pytest.fail(f"the compiled core is not built ({exc}) and it is required")
        pytest.skip(f"the compiled core is not built ({exc})")


@pytest.fixture(scope="module", params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    return _implementation(request.param)


Recorder = Callable[[str, str, float], None]


# Rounds of at least 100 µs (about a hundred operations each) keep the timer's own
# cost out of the figures; pytest-benchmark's default is one operation per round.
benchmark_settings = pytest.mark.benchmark(min_time=0.0001, warmup=True)


def _run(benchmark: Any, record_speed: Recorder, group: str, tag: str, function: Any) -> None:
    benchmark.group = group
    benchmark(function)
    if benchmark.stats is not None:  # None under --benchmark-disable
        record_speed(group, tag, benchmark.stats.stats.min)


@benchmark_settings
def test_frame_encode(benchmark: Any, record_speed: Recorder, impl: SimpleNamespace) -> None:
    encode = impl.encode
    _run(benchmark, record_speed, "frame encode", impl.tag, lambda: encode(REQUEST))


@benchmark_settings
def test_frame_decode(benchmark: Any, record_speed: Recorder, impl: SimpleNamespace) -> None:
    decode, data = impl.decode, impl.encode(REQUEST)
    _run(benchmark, record_speed, "frame decode", impl.tag, lambda: decode(data))


@benchmark_settings
def test_frame_encode_decode(benchmark: Any, record_speed: Recorder, impl: SimpleNamespace) -> None:
    encode, decode = impl.encode, impl.decode
    _run(benchmark, record_speed, "frame encode+decode", impl.tag, lambda: decode(encode(REQUEST)))


def _route_cycle(router: Any) -> Callable[[], None]:
    """One call's life in the router: register it, then hand it its reply."""
    create, resolve = router.create, router.resolve

    def cycle() -> None:
        correlation_id, _future = create(TIMEOUT)
        resolve(correlation_id, None)

    return cycle


@benchmark_settings
async def test_reply_routing(benchmark: Any, record_speed: Recorder, impl: SimpleNamespace) -> None:
    router = impl.ReplyRouter(asyncio.get_running_loop())
    _run(benchmark, record_speed, "reply routing create+resolve", impl.tag, _route_cycle(router))
    router.fail_all(RuntimeError("benchmark over"))


def _fastest(functions: dict[str, Callable[[], object]], rounds: int = 9) -> dict[str, float]:
    """CPU seconds per call of each function, best of ``rounds``, the functions alternating."""
    best = dict.fromkeys(functions, float("inf"))
    timers = {tag: timeit.Timer(f, timer=time.process_time) for tag, f in functions.items()}
    numbers = {tag: max(timer.autorange()[0], 1000) for tag, timer in timers.items()}
    for _ in range(rounds):
        for tag, timer in timers.items():
            best[tag] = min(best[tag], timer.timeit(numbers[tag]) / numbers[tag])
    return best


async def test_gate(record_speed: Recorder) -> None:
    """The compiled core must pay for itself on its hot paths (docs/benchmarks.md)."""
    py, c = _implementation("py"), _implementation("c")
    codec = _fastest({impl.tag: (lambda i=impl: i.decode(i.encode(REQUEST))) for impl in (py, c)})
    loop = asyncio.get_running_loop()
    routers = {impl.tag: impl.ReplyRouter(loop) for impl in (py, c)}
    # More rounds than the codec's: a routing cycle is shorter, so noisier.
    routing = _fastest({tag: _route_cycle(router) for tag, router in routers.items()}, rounds=15)
    for router in routers.values():
        router.fail_all(RuntimeError("gate over"))
    record_speed("gate: frame encode+decode", "py", codec["py"])
    record_speed("gate: frame encode+decode", "c", codec["c"])
    record_speed("gate: reply routing", "py", routing["py"])
    record_speed("gate: reply routing", "c", routing["c"])
    # The issue asks for 3x; typical runs measure 6-9x.
    assert codec["py"] / codec["c"] >= 3.0, codec
    # Typical runs measure 1.3-1.45x on asyncio's loop (callgrind: about 8,800 instructions
    # a cycle pure, 6,200 compiled); compiled without _router_c.pxd, the router measures 1.0x.
    assert routing["py"] / routing["c"] >= 1.15, routing

"""``@timer``: a method run every so many seconds in each instance of a service."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from basidia import Service, ServiceRunner, current_context, rpc, timer
from basidia.http.management import describe

from .brokers.contract import eventually

pytestmark = pytest.mark.timeout(30)

ticks: list[float] = []
running = 0
overlaps = 0
failures = 0
finished: list[str] = []


class Heartbeat(Service):
    name = "heartbeat"

    @timer(0.05)
    async def beat(self) -> None:
        global running, overlaps
        running += 1
        overlaps = max(overlaps, running)
        ticks.append(time.monotonic())
        await asyncio.sleep(0.01)
        running -= 1

    @rpc
    async def count(self) -> int:
        return len(ticks)


class Eager(Service):
    name = "eager"

    @timer(3600, eager=True)
    async def once(self) -> None:
        ctx = current_context()
        assert ctx is not None
        finished.append(ctx.entrypoint)


class Slow(Service):
    name = "slow"

    @timer(0.01)
    async def work(self) -> None:
        global running, overlaps
        running += 1
        overlaps = max(overlaps, running)
        await asyncio.sleep(0.2)
        running -= 1
        finished.append("work")


class Flaky(Service):
    name = "flaky"

    @timer(0.02)
    async def tick(self) -> None:
        global failures
        failures += 1
        if failures <= 2:
            raise RuntimeError("not yet")
        ticks.append(time.monotonic())


@pytest.fixture(autouse=True)
def _reset() -> None:
    global running, overlaps, failures
    ticks.clear()
    finished.clear()
    running = overlaps = failures = 0


async def test_a_timer_calls_its_method_again_and_again_beside_rpc(memory_url: str) -> None:
    async with ServiceRunner([Heartbeat], broker=memory_url) as runner:
        await eventually(lambda: len(ticks) >= 5, timeout=10)
        assert await runner.rpc.heartbeat.count() >= 5
        container = runner.containers["heartbeat"]
        assert describe(container)["entrypoints"]["timers"] == [
            {"name": "beat", "interval": 0.05, "eager": False}
        ]
        assert container.stats.handled >= 5
    stopped = len(ticks)
    await asyncio.sleep(0.2)
    assert len(ticks) == stopped, "the timer went on after the service stopped"
    assert overlaps == 1


async def test_an_eager_timer_runs_at_start_with_a_call_context(memory_url: str) -> None:
    async with ServiceRunner([Eager], broker=memory_url):
        await eventually(lambda: finished == ["once"], timeout=5)


async def test_calls_never_overlap_and_a_stop_lets_the_running_one_finish(
    memory_url: str,
) -> None:
    global running
    async with ServiceRunner([Slow], broker=memory_url):
        await eventually(lambda: running == 1, timeout=5)
    # The call running at the stop finished (within the grace period), none overlapped.
    assert running == 0
    assert finished and overlaps == 1


async def test_a_failing_call_is_logged_and_the_timer_goes_on(
    memory_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with ServiceRunner([Flaky], broker=memory_url):
        await eventually(lambda: len(ticks) >= 2, timeout=5)
    errors = [r.getMessage() for r in caplog.records if r.name == "basidia.timers"]
    assert errors[:2] == ["flaky.tick raised RuntimeError: not yet"] * 2


def test_declaration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="interval must be > 0"):

        class Zero(Service):
            name = "zero"

            @timer(0)
            async def never(self) -> None: ...

    with pytest.raises(TypeError, match="takes no argument but self"):

        class WithArgument(Service):
            name = "with_argument"

            @timer(1)
            async def tick(self, value: Any) -> None: ...

"""Containers: lifecycle, concurrency limit, graceful stop, bad frames."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from basidia import (
    ConfigError,
    Dependency,
    Service,
    ServiceRunner,
    ServiceUnavailable,
    State,
    connect,
    event_handler,
    provides,
    rpc,
)
from basidia._speedups import Frame, Kind, encode_frame
from basidia.brokers.memory import MemoryBroker

from .brokers.contract import dead_letters_of, eventually

pytestmark = pytest.mark.timeout(30)


class Gate:
    """Holds handlers until released, counting how many wait at once."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0
        self.peak = 0
        self.finished = 0

    async def pass_through(self) -> None:
        self.waiting += 1
        self.peak = max(self.peak, self.waiting)
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1
        self.finished += 1


gate: Gate


class Worker(Service):
    name = "worker"
    max_workers = 4

    @rpc
    async def work(self, n: int) -> int:
        await gate.pass_through()
        return n

    @event_handler("job.queued")
    async def on_job(self, job: dict[str, int]) -> None:
        await gate.pass_through()


@pytest.fixture(autouse=True)
def fresh_gate() -> None:
    global gate
    gate = Gate()


async def test_lifecycle_states(memory_url: str) -> None:
    runner = ServiceRunner([Worker], broker=memory_url)
    container = runner.containers["worker"]
    assert container.state is State.INITIALIZED
    await runner.start()
    assert container.state is State.RUNNING
    await runner.stop_service("worker")
    assert container.state is State.STOPPED
    async with connect(memory_url) as cluster:
        with pytest.raises(ServiceUnavailable):
            await cluster.rpc.worker.work(1)
        await runner.start_service("worker")
        assert container.state is State.RUNNING
        gate.open.set()
        assert await cluster.rpc.worker.work(7) == 7
    await runner.stop()
    assert container.state is State.STOPPED


async def test_failing_start_leaves_error_state_with_reason(memory_url: str) -> None:
    class Missing:
        pass

    class NeedsMissing(Service):
        name = "needs_missing"
        thing = Dependency(Missing)

        @rpc
        async def ping(self) -> None: ...

    runner = ServiceRunner([NeedsMissing], broker=memory_url)
    with pytest.raises(ConfigError, match=r"no provider for .*Missing"):
        await runner.start()
    container = runner.containers["needs_missing"]
    assert container.state is State.ERROR
    assert isinstance(container.error, ConfigError)


async def test_dependency_by_type_is_set_up_and_torn_down(memory_url: str) -> None:
    class Pool:
        def __init__(self, dsn: str) -> None:
            self.dsn = dsn
            self.closed = False

    pools: list[Pool] = []

    @provides(Pool)
    async def make_pool(config: Any) -> AsyncIterator[Pool]:
        pool = Pool(config["database.url"])
        pools.append(pool)
        yield pool
        pool.closed = True

    class Repository(Service):
        name = "repository"
        pool = Dependency(Pool)

        @rpc
        async def dsn(self) -> str:
            return self.pool.dsn

    config = {"database": {"url": "postgresql://db/app"}}
    async with ServiceRunner([Repository], broker=memory_url, config=config) as runner:
        assert await runner.rpc.repository.dsn() == "postgresql://db/app"
        assert pools and not pools[0].closed
    assert pools[0].closed


async def test_concurrency_limit_is_shared_by_rpc_and_events(memory_url: str) -> None:
    async with ServiceRunner([Worker], broker=memory_url) as runner:
        calls = [asyncio.ensure_future(runner.rpc.worker.work(i)) for i in range(6)]
        for i in range(6):
            await runner.dispatch("job.queued", {"id": i})
        await eventually(lambda: gate.waiting == 4)
        await asyncio.sleep(0.1)
        assert gate.peak == 4  # never more than max_workers handlers at once
        gate.open.set()
        assert await asyncio.gather(*calls) == list(range(6))
        await eventually(lambda: gate.finished == 12)


async def test_stop_lets_calls_in_flight_finish(memory_url: str) -> None:
    runner = ServiceRunner([Worker], broker=memory_url)
    await runner.start()
    async with connect(memory_url) as cluster:
        calls = [asyncio.ensure_future(cluster.rpc.worker.work(i)) for i in range(3)]
        await eventually(lambda: gate.waiting == 3)
        stopping = asyncio.ensure_future(runner.stop_service("worker", grace=5))
        await asyncio.sleep(0.1)
        container = runner.containers["worker"]
        assert container.state is State.STOPPING and container.in_flight == 3
        gate.open.set()
        await stopping
        assert await asyncio.gather(*calls) == [0, 1, 2]
        assert container.state is State.STOPPED
    await runner.stop()


async def test_stop_after_grace_cancels_and_requeues_events(memory_url: str) -> None:
    first = ServiceRunner([Worker], broker=memory_url)
    await first.start()
    await first.dispatch("job.queued", {"id": 1})
    await eventually(lambda: gate.waiting == 1)
    await first.stop(grace=0.1)
    assert gate.finished == 0
    # The cancelled event went back to its queue: the next instance handles it.
    gate.open.set()
    async with ServiceRunner([Worker], broker=memory_url):
        await eventually(lambda: gate.finished == 1)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x01",
        b"\x09garbage that is not a frame",
        encode_frame(Frame(Kind.REQUEST, 1, "worker.work", b"\x91\x01", "inbox.x"))[:-3],
        encode_frame(Frame(Kind.REPLY, 1, "worker.work", b"", "inbox.x")),
        b"\x01\x01\x00\x00\xff\xff\xff\xff" + b"\x00" * 24,
    ],
    ids=["empty", "one-byte", "bad-version", "truncated", "reply-kind", "4GiB-length"],
)
async def test_malformed_request_frames_are_rejected_and_service_keeps_serving(
    memory_url: str, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    gate.open.set()
    async with ServiceRunner([Worker], broker=memory_url) as runner:
        broker = runner.broker
        with caplog.at_level(logging.ERROR, logger="basidia.container"):
            await broker.send_request("worker", body, correlation_id=99)
            await eventually(lambda: runner.containers["worker"].stats.malformed == 1)
        assert any("rejected" in record.getMessage() for record in caplog.records)
        assert await runner.rpc.worker.work(5) == 5


async def test_malformed_event_frames_are_dead_lettered(memory_url: str) -> None:
    gate.open.set()
    async with ServiceRunner([Worker], broker=memory_url) as runner:
        broker = runner.broker
        assert isinstance(broker, MemoryBroker)
        await broker.publish_event("job.queued", b"\x01\x04 not really", idempotency_key="k1")
        [letter] = await dead_letters_of(broker, "worker.on_job", 1)
        assert letter.reason.startswith("malformed frame: ")
        await runner.dispatch("job.queued", {"id": 2})
        await eventually(lambda: gate.finished == 1)


async def test_invalid_event_data_is_dead_lettered_without_retries(memory_url: str) -> None:
    gate.open.set()
    async with ServiceRunner([Worker], broker=memory_url) as runner:
        broker = runner.broker
        assert isinstance(broker, MemoryBroker)
        await runner.dispatch("job.queued", ["not", "a", "dict"])
        [letter] = await dead_letters_of(broker, "worker.on_job", 1)
        assert letter.attempts == 1
        assert "invalid event data" in letter.reason
        assert gate.finished == 0


class Counted(Service):
    name = "counted"

    @rpc
    async def ok(self, n: int) -> int:
        return n

    @rpc
    async def fails(self) -> None:
        raise ValueError("no")

    @rpc
    async def waits(self) -> int:
        await asyncio.sleep(0.001)
        return 1


async def test_every_call_is_counted_in_flight_and_in_the_statistics(memory_url: str) -> None:
    # What the management API and $SRV.STATS report, whichever core serves the call
    # (the compiled one counts in C: docs/benchmarks.md#the-compiled-call-path).
    async with ServiceRunner([Counted], broker=memory_url) as runner:
        counted = runner.rpc.counted
        assert await asyncio.gather(*(counted.ok(n) for n in range(5))) == list(range(5))
        assert await counted.waits() == 1
        for _ in range(2):
            with pytest.raises(Exception, match="no"):
                await counted.fails()
        container = runner.containers["counted"]
        stats, endpoints = container.stats, container.endpoint_stats
        assert (stats.handled, stats.errors) == (8, 2)
        assert stats.last_error == "ValueError: no"
        assert stats.processing_time > 0
        assert (endpoints["ok"].num_requests, endpoints["ok"].num_errors) == (5, 0)
        assert endpoints["waits"].num_requests == 1 and endpoints["waits"].processing_time > 0
        assert (endpoints["fails"].num_requests, endpoints["fails"].num_errors) == (2, 2)
        assert endpoints["fails"].last_error == "ValueError: no"
        assert container.in_flight == 0

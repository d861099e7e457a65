"""The memory broker against the broker contract, plus what only it does."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from basidia import (
    Dependency,
    Retry,
    RpcTimeout,
    Service,
    ServiceRunner,
    ServiceUnavailable,
    connect,
    event_handler,
    rpc,
)
from basidia.brokers.base import Delivery
from basidia.brokers.memory import EAGER_BUDGET, EAGER_DEPTH, MemoryBroker

from .contract import BrokerContract, dead_letters_of


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    def broker_url(self, memory_url: str) -> str:
        return memory_url

    @pytest.mark.skip(
        reason="a memory broker has no connection to lose: it is up from connect() to "
        "close(), and close() is deliberate (it calls no disconnect callback, as "
        "RabbitMQ's and NATS's close() do not)"
    )
    async def test_the_disconnect_callback_is_called_when_the_connection_is_lost(
        self, broker_url: str, broker_options: dict[str, Any]
    ) -> None:
        raise AssertionError("skipped")


async def test_memory_brokers_with_the_same_url_share_queues(memory_url: str) -> None:
    class Greeter(Service):
        name = "shared_greeter"

        @rpc
        async def hello(self, who: str) -> str:
            return f"Hello, {who}!"

    async with ServiceRunner([Greeter], broker=memory_url):
        async with connect(memory_url) as cluster:
            assert await cluster.rpc.shared_greeter.hello("World") == "Hello, World!"
        async with connect(memory_url + "-other") as elsewhere:
            with pytest.raises(ServiceUnavailable):
                await elsewhere.rpc.shared_greeter.hello("World")


async def test_dead_letters_keep_the_reason(memory_url: str) -> None:
    class Picky(Service):
        name = "picky"

        @event_handler("order.placed", max_attempts=2, retry=Retry(delay=0.01))
        async def on_order(self, order: dict[str, int]) -> None:
            raise ValueError(f"order {order['id']} is not acceptable")

    async with ServiceRunner([Picky], broker=memory_url) as runner:
        await runner.dispatch("order.placed", {"id": 7})
        broker = runner.broker
        assert isinstance(broker, MemoryBroker)
        [letter] = await dead_letters_of(broker, "picky.on_order", 1)
        assert letter.reason == "ValueError: order 7 is not acceptable"
        assert letter.exception == "ValueError"
        assert letter.attempts == 2
        assert letter.group == "picky.on_order"
        assert letter.first_failure < letter.last_failure  # carried by the retry
        assert await broker.dead_letters("picky.on_other") == []


async def test_a_broadcast_handler_s_dead_letter_names_its_group(memory_url: str) -> None:
    class Loud(Service):
        name = "loud"

        @event_handler("config.changed", broadcast=True, max_attempts=1)
        async def on_change(self, data: int) -> None:
            raise RuntimeError("cannot reload")

    async with ServiceRunner([Loud], broker=memory_url) as runner:
        await runner.dispatch("config.changed", 1)
        [letter] = await dead_letters_of(runner.broker, "loud.on_change", 1)
    assert (letter.group, letter.attempts, letter.exception) == (
        "loud.on_change",
        1,
        "RuntimeError",
    )


async def test_a_burst_reaches_every_free_worker_although_one_is_woken_at_a_time(
    memory_url: str,
) -> None:
    """The queue wakes one consumer at a time; handlers that suspend still all run at
    once, up to the concurrency, and a second consumer takes what the first cannot."""
    server, client = MemoryBroker(memory_url), MemoryBroker(memory_url)
    await server.connect()
    await client.connect()
    release = asyncio.Event()
    running: list[bytes] = []

    async def slow(delivery: Delivery) -> None:
        running.append(delivery.body)
        await release.wait()

    first = await server.serve_requests("burst", slow, concurrency=8)
    await asyncio.sleep(0)
    for index in range(12):
        await client.send_request("burst", b"%d" % index, correlation_id=index + 1)
    for _ in range(50):
        await asyncio.sleep(0)
    assert sorted(running, key=int) == [b"%d" % index for index in range(8)]
    await server.serve_requests("burst", slow, concurrency=4)  # takes the other four
    for _ in range(50):
        await asyncio.sleep(0)
    assert sorted(running, key=int) == [b"%d" % index for index in range(12)]
    release.set()
    await first.cancel()
    await server.close()
    await client.close()


# -- the hand-off in the sender's task (docs/memory.md#the-hand-off) ---------------------------

_caller_only: contextvars.ContextVar[str] = contextvars.ContextVar("caller_only", default="")
_handler_only: contextvars.ContextVar[str] = contextvars.ContextVar("handler_only", default="")


async def test_a_handler_runs_as_its_worker_even_when_it_starts_in_the_caller_s_task(
    memory_url: str,
) -> None:
    """Whether a request is handed to a waiting worker or begun at once in the caller's
    task, the handler sees its worker's task and context, never the caller's, and the
    caller sees nothing the handler set."""
    seen: list[tuple[asyncio.Task[Any] | None, str]] = []

    class Probe(Service):
        name = "probe"

        @rpc
        async def where(self, suspend: bool) -> str:
            seen.append((asyncio.current_task(), _caller_only.get()))
            _handler_only.set("handler")
            if suspend:
                await asyncio.sleep(0.01)
                seen.append((asyncio.current_task(), _caller_only.get()))
            return _handler_only.get()

    async with ServiceRunner([Probe], broker=memory_url):
        async with connect(memory_url) as cluster:
            _caller_only.set("caller")  # after the workers started: theirs is unset
            caller = asyncio.current_task()
            for suspend in (False, True, False):
                assert await cluster.rpc.probe.where(suspend) == "handler"
                assert _handler_only.get() == ""
            assert len(seen) == 4
            assert all(task is not caller and task is not None for task, _ in seen)
            assert all(value == "" for _, value in seen)
            # The part after the handler's first suspension ran in the same worker.
            assert seen[1][0] is seen[2][0]


async def test_max_workers_holds_for_handlers_begun_in_the_caller_s_task(memory_url: str) -> None:
    release = asyncio.Event()
    running = 0
    most = 0

    class Narrow(Service):
        name = "narrow"
        max_workers = 2

        @rpc
        async def wait(self, index: int) -> int:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1
            return index

    async with ServiceRunner([Narrow], broker=memory_url):
        async with connect(memory_url) as cluster:
            calls = [asyncio.ensure_future(cluster.rpc.narrow.wait(i)) for i in range(6)]
            for _ in range(20):
                await asyncio.sleep(0)
            assert (running, most) == (2, 2)
            release.set()
            assert await asyncio.gather(*calls) == list(range(6))
            assert most == 2


async def test_a_handler_begun_in_the_caller_s_task_is_cancelled_at_its_deadline(
    memory_url: str,
) -> None:
    """The deadline cancels the handler (its worker), not the caller; the service keeps
    all its workers and answers the next calls."""
    cancelled = asyncio.Event()

    class Slow(Service):
        name = "slow_after_a_while"
        max_workers = 1

        @rpc
        async def nap(self, seconds: float) -> str:
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "rested"

    async with ServiceRunner([Slow], broker=memory_url):
        async with connect(memory_url) as cluster:
            with pytest.raises(RpcTimeout):
                await cluster.rpc.slow_after_a_while.nap.with_timeout(0.2)(5.0)
            await asyncio.wait_for(cancelled.wait(), 2)
            for _ in range(3):
                assert await cluster.rpc.slow_after_a_while.nap(0) == "rested"


async def test_callers_in_a_tight_loop_still_let_the_loop_run(memory_url: str) -> None:
    """Calls whose handlers never suspend complete without the caller waiting; the
    hand-off stops after a few dozen per loop iteration, so other tasks keep running."""
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    class Quick(Service):
        name = "quick"

        @rpc
        async def echo(self, value: int) -> int:
            return value

    async with ServiceRunner([Quick], broker=memory_url):
        async with connect(memory_url) as cluster:
            running = asyncio.ensure_future(ticker())
            await asyncio.sleep(0)
            before = ticks
            for index in range(2000):
                assert await cluster.rpc.quick.echo(index) == index
            stop = True
            await running
            assert ticks - before >= 2000 // EAGER_BUDGET - 1


async def test_services_calling_each_other_deeply_all_answer(memory_url: str) -> None:
    """A chain of calls deeper than the hand-off goes in one task (EAGER_DEPTH)."""

    class Countdown(Service):
        name = "countdown"
        countdown = Dependency("countdown")

        @rpc
        async def down(self, depth: int) -> int:
            if depth == 0:
                return 0
            return 1 + await self.countdown.down(depth - 1)

    async with ServiceRunner([Countdown], broker=memory_url):
        async with connect(memory_url) as cluster:
            depth = 3 * EAGER_DEPTH
            assert await cluster.rpc.countdown.down(depth) == depth
            assert await cluster.rpc.countdown.down(2) == 2


async def test_a_stop_waits_for_a_handler_begun_in_the_caller_s_task(memory_url: str) -> None:
    started = asyncio.Event()

    class Draining(Service):
        name = "draining"

        @rpc
        async def work(self) -> str:
            started.set()
            await asyncio.sleep(0.2)
            return "done"

    runner = ServiceRunner([Draining], broker=memory_url)
    await runner.start()
    async with connect(memory_url) as cluster:
        call = asyncio.ensure_future(cluster.rpc.draining.work())
        await started.wait()
        await runner.stop()
        assert await call == "done"

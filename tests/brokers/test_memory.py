"""The memory broker against the broker contract, plus what only it does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from basidia import (
    Retry,
    Service,
    ServiceRunner,
    ServiceUnavailable,
    connect,
    event_handler,
    rpc,
)
from basidia.brokers.base import Delivery
from basidia.brokers.memory import MemoryBroker

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

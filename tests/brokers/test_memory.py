"""The memory broker against the broker contract, plus what only it does."""

from __future__ import annotations

import pytest

from basidia import Service, ServiceRunner, ServiceUnavailable, connect, event_handler, rpc
from basidia.brokers.memory import MemoryBroker

from .contract import BrokerContract, eventually


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    def broker_url(self, memory_url: str) -> str:
        return memory_url


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

        @event_handler("order.placed", max_attempts=2)
        async def on_order(self, order: dict[str, int]) -> None:
            raise ValueError(f"order {order['id']} is not acceptable")

    async with ServiceRunner([Picky], broker=memory_url) as runner:
        await runner.dispatch("order.placed", {"id": 7})
        broker = runner.broker
        assert isinstance(broker, MemoryBroker)
        await eventually(lambda: len(broker.dead_letters) == 1)
        letter = broker.dead_letters[0]
        assert letter.reason == "ValueError: order 7 is not acceptable"
        assert letter.attempts == 2
        assert letter.group == "picky.on_order"

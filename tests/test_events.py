"""Events: once per subscribing service, broadcast, idempotency keys, retries, dead letters."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from basidia import (
    EventDispatcher,
    Retry,
    Service,
    ServiceRunner,
    current_context,
    event_handler,
    rpc,
)
from basidia.brokers.memory import MemoryBroker

from .brokers.contract import dead_letters_of, eventually

pytestmark = pytest.mark.timeout(30)

received: list[tuple[str, Any, str | None]] = []
attempts: Counter[str] = Counter()


def record(label: str, data: Any) -> None:
    ctx = current_context()
    received.append((label, data, ctx.idempotency_key if ctx else None))


class Mailer(Service):
    name = "mailer"

    @event_handler("user.created")
    async def on_user_created(self, user: dict[str, Any]) -> None:
        record("mailer", user)


class Audit(Service):
    name = "audit"

    @event_handler("user.created")
    async def on_user_created(self, user: dict[str, Any]) -> None:
        record("audit", user)

    @event_handler("cache.flush", broadcast=True)
    async def on_flush(self, data: None) -> None:
        record("audit-flush", data)


class Flaky(Service):
    name = "flaky"

    @event_handler("payment.due", max_attempts=3, retry=Retry(delay=0.01))
    async def on_payment(self, payment: dict[str, int]) -> None:
        attempts[str(payment["id"])] += 1
        if attempts[str(payment["id"])] < payment["succeed_on"]:
            raise ConnectionError("ledger unavailable")
        record("flaky", payment)


class Signup(Service):
    name = "signup"
    dispatch = EventDispatcher()

    @rpc
    async def register(self, email: str) -> str:
        return await self.dispatch("user.created", {"email": email})


@pytest.fixture(autouse=True)
def clear() -> None:
    received.clear()
    attempts.clear()


async def test_each_subscribing_service_gets_each_event_once(memory_url: str) -> None:
    # Two instances of each service (two runners), as in a scaled deployment.
    runners = [ServiceRunner([Mailer, Audit], broker=memory_url) for _ in range(2)]
    for runner in runners:
        await runner.start()
    try:
        for n in range(50):
            await runners[0].dispatch("user.created", {"n": n})
        await eventually(lambda: len(received) >= 100)
        await asyncio.sleep(0.1)
    finally:
        for runner in runners:
            await runner.stop()
    per_service = Counter(label for label, _, _ in received)
    assert per_service == {"mailer": 50, "audit": 50}
    assert sorted(data["n"] for label, data, _ in received if label == "mailer") == list(range(50))


async def test_broadcast_handlers_run_on_every_instance(memory_url: str) -> None:
    runners = [ServiceRunner([Audit], broker=memory_url) for _ in range(3)]
    for runner in runners:
        await runner.start()
    try:
        await runners[0].dispatch("cache.flush", None)
        await eventually(lambda: len(received) == 3)
    finally:
        for runner in runners:
            await runner.stop()
    assert [label for label, _, _ in received] == ["audit-flush"] * 3


async def test_events_from_a_service_carry_an_idempotency_key(memory_url: str) -> None:
    async with ServiceRunner([Signup, Mailer], broker=memory_url) as runner:
        key = await runner.rpc.signup.register("ada@example.com")
        await eventually(lambda: len(received) == 1)
    assert received == [("mailer", {"email": "ada@example.com"}, key)]
    assert len(key) == 32


async def test_republishing_with_the_same_key_is_handled_once(memory_url: str) -> None:
    # The broker drops a repeat within its duplicate window (docs/dead-letters.md); from
    # elsewhere (another RabbitMQ publisher) it would reach handlers with the same key.
    async with ServiceRunner([Mailer], broker=memory_url) as runner:
        for _ in range(2):
            await runner.dispatch("user.created", {"n": 1}, idempotency_key="order-42")
        await runner.dispatch("user.created", {"n": 2}, idempotency_key="order-43")
        await eventually(lambda: len(received) == 2)
        await asyncio.sleep(0.05)
    assert [(data, key) for _, data, key in received] == [
        ({"n": 1}, "order-42"),
        ({"n": 2}, "order-43"),
    ]


async def test_failing_handler_is_retried_until_it_succeeds(memory_url: str) -> None:
    async with ServiceRunner([Flaky], broker=memory_url) as runner:
        await runner.dispatch("payment.due", {"id": 1, "succeed_on": 3})
        await eventually(lambda: len(received) == 1)
        broker = runner.broker
        assert isinstance(broker, MemoryBroker)
        assert await broker.dead_letters("flaky.on_payment") == []
    assert attempts["1"] == 3


async def test_handler_failing_every_attempt_is_dead_lettered_with_the_reason(
    memory_url: str,
) -> None:
    async with ServiceRunner([Flaky], broker=memory_url) as runner:
        await runner.dispatch("payment.due", {"id": 2, "succeed_on": 99})
        broker = runner.broker
        assert isinstance(broker, MemoryBroker)
        [letter] = await dead_letters_of(broker, "flaky.on_payment", 1)
        await asyncio.sleep(0.05)
        assert await broker.dead_letters("flaky.on_payment") == [letter]
    assert attempts["2"] == 3
    assert (letter.event, letter.group, letter.attempts) == ("payment.due", "flaky.on_payment", 3)
    assert letter.reason == "ConnectionError: ledger unavailable"


async def test_events_published_while_a_service_is_down_wait_for_it(memory_url: str) -> None:
    async with ServiceRunner([Mailer], broker=memory_url):
        pass  # the durable group exists from now on
    async with ServiceRunner([Signup], broker=memory_url) as publisher:
        await publisher.rpc.signup.register("late@example.com")
        async with ServiceRunner([Mailer], broker=memory_url):
            await eventually(lambda: len(received) == 1)
    assert received[0][1] == {"email": "late@example.com"}


async def test_handlers_see_the_attempt_number(memory_url: str) -> None:
    seen: list[int] = []

    class Counting(Service):
        name = "counting"

        @event_handler("tick", max_attempts=2, retry=Retry(delay=0.01))
        async def on_tick(self, data: int) -> None:
            ctx = current_context()
            assert ctx is not None
            seen.append(ctx.attempt)
            if ctx.attempt == 1:
                raise RuntimeError("first attempt fails")

    async with ServiceRunner([Counting], broker=memory_url) as runner:
        await runner.dispatch("tick", 1)
        await eventually(lambda: seen == [1, 2])


async def test_an_event_redelivered_past_its_attempts_is_dead_lettered_unrun(
    memory_url: str,
) -> None:
    # As if every earlier attempt had killed the process before it could settle.
    from basidia._speedups import Frame, Kind, encode_frame
    from basidia.brokers.memory import _EventDelivery

    async with ServiceRunner([Flaky], broker=memory_url) as runner:
        broker = runner.broker
        assert isinstance(broker, MemoryBroker)
        queue = broker._connected_hub().groups["payment.due"]["flaky.on_payment"]
        body = encode_frame(Frame(Kind.EVENT, 0, "payment.due", b"\x81\xa2id\x05", "", 0, {}))
        queue.put(_EventDelivery(body, queue, attempt=4))
        [letter] = await dead_letters_of(broker, "flaky.on_payment", 1)
        assert "delivered 4 times" in letter.reason
        assert (letter.attempts, letter.exception) == (4, "")
    assert attempts["5"] == 0

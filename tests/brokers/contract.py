"""The broker contract: what every adapter must do, written once.

Each adapter's test module subclasses ``BrokerContract`` and provides a
``broker_url`` fixture (and, if it needs short timers, ``broker_options``)::

    class TestMemoryBroker(BrokerContract):
        @pytest.fixture
        def broker_url(self, memory_url):
            return memory_url

Names are unique per test so that runs on a shared broker cannot interfere.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import pytest

from basidia import (
    MethodNotFound,
    RemoteError,
    Retry,
    Service,
    ServiceRunner,
    ServiceUnavailable,
    connect,
    current_context,
    event_handler,
    rpc,
)
from basidia._speedups import Frame, Kind, decode_frame, encode_frame
from basidia.brokers import Broker, Delivery, EventSubscription, broker_from_url
from basidia.brokers.base import DeadLetter, Failure
from basidia.context import IDEMPOTENCY_HEADER
from basidia.errors import ConnectionLost
from basidia.errors import ServiceUnavailable as _ServiceUnavailable

from ..conftest import require_broker
from ..faults.proxy import FaultProxy

pytestmark = pytest.mark.timeout(60)

#: The shared Redis, for the Redis deduplication store (keys are scoped by unique groups).
REDIS_URL = "redis://127.0.0.1:6379/0"


async def delete_redis_keys(pattern: str) -> None:
    """Remove what a test left in the shared Redis."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        async for key in client.scan_iter(match=pattern):
            await client.delete(key)
    finally:
        await client.aclose()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


async def dead_letters_of(
    broker: Broker, group: str, count: int, timeout: float = 10.0
) -> list[DeadLetter]:
    """``group``'s dead letters once there are ``count`` of them (read without taking them)."""
    deadline = time.monotonic() + timeout
    while True:
        letters = await broker.dead_letters(group)
        if len(letters) >= count:
            return letters
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(letters)} dead letters of {group}, not {count}, in {timeout} s"
            )
        await asyncio.sleep(0.05)


def picky_service(name: str, seen: list[int], *, succeed_on: int = 0) -> type[Service]:
    """``<name>_picky``, whose ``on_order`` handler (3 attempts) of ``<name>.order`` records
    the attempt numbers it sees in ``seen`` and raises ``ValueError`` until attempt
    ``succeed_on`` (never, by default)."""

    class Picky(Service):
        @event_handler(f"{name}.order", max_attempts=3, retry=Retry(delay=0.01))
        async def on_order(self, order: dict[str, Any]) -> None:
            ctx = current_context()
            assert ctx is not None
            seen.append(ctx.attempt)
            if not succeed_on or ctx.attempt < succeed_on:
                raise ValueError(f"order {order['id']} is not acceptable")

    Picky.name = f"{name}_picky"
    return Picky


async def exercise_examples(
    broker_url: str, unique: str, *, event_broker: str | None = None
) -> None:
    """Run the services of ``examples/`` on ``broker_url`` and use them as the README does
    (with their events on ``event_broker`` when given).

    Service names get ``unique`` appended: other runs may share the broker.  The
    caller removes the durable group ``notification_<unique>.on_user_created``.
    """
    from basidia import Dependency
    from examples.greeting_service import GreetingService
    from examples.notification_service import NotificationService
    from examples.user_service import DatabaseService, UserService

    greeting = type("GreetingService", (GreetingService,), {"name": f"greeting_{unique}"})
    database = type("DatabaseService", (DatabaseService,), {"name": f"database_{unique}"})
    users = type(
        "UserService",
        (UserService,),
        {"name": f"user_{unique}", "db": Dependency(f"database_{unique}")},
    )
    notifications = type(
        "NotificationService",
        (NotificationService,),
        {"name": f"notification_{unique}", "sent": [], "seen_keys": set()},
    )
    config = {"database": {"url": "postgres://example"}}
    services = [greeting, database, users, notifications]
    async with ServiceRunner(services, broker=broker_url, config=config, event_broker=event_broker):
        async with connect(broker_url, event_broker=event_broker) as cluster:
            assert await cluster.rpc[f"greeting_{unique}"].hello("World") == "Hello, World!"
            greeting_text = await cluster.rpc[f"user_{unique}"].get_user_greeting(7)
            assert greeting_text == "Hello, User 7!"
            user_id = await cluster.rpc[f"user_{unique}"].create_user("ada@example.com")
            notes = cluster.rpc[f"notification_{unique}"].sent_notes
            deadline = time.monotonic() + 10
            while not await notes():
                assert time.monotonic() < deadline, "no welcome note within 10 s"
                await asyncio.sleep(0.05)
            assert await notes() == [{"id": user_id, "email": "ada@example.com"}]


class BrokerContract:
    """Behaviour every broker adapter must show; see the module docstring."""

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def name(self) -> str:
        return f"contract_{uuid.uuid4().hex[:10]}"

    @pytest.fixture
    async def make_broker(
        self, broker_url: str, broker_options: dict[str, Any]
    ) -> AsyncIterator[Callable[[], Awaitable[Broker]]]:
        brokers: list[Broker] = []

        async def make() -> Broker:
            broker = broker_from_url(broker_url, broker_options)
            await broker.connect()
            brokers.append(broker)
            return broker

        yield make
        for broker in brokers:
            await broker.close()

    # -- connection ----------------------------------------------------------------

    async def test_connect_and_close(self, broker_url: str, broker_options: dict[str, Any]) -> None:
        broker = broker_from_url(broker_url, broker_options)
        assert not broker.connected
        await broker.connect()
        assert broker.connected
        await broker.close()
        assert not broker.connected
        await broker.close()  # closing twice is harmless

    # -- requests and replies ---------------------------------------------------------

    async def test_request_reaches_a_consumer_and_reply_reaches_the_inbox(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        server, client = await make_broker(), await make_broker()
        replies: list[bytes] = []

        async def handle(delivery: Delivery) -> None:
            await server.send_reply(inbox, b"reply:" + delivery.body)
            await delivery.ack()

        await server.serve_requests(name, handle, concurrency=4)
        inbox = await client.open_inbox(replies.append)
        await client.send_request(name, b"\x00request\xff", correlation_id=1)
        await eventually(lambda: replies == [b"reply:\x00request\xff"])

    async def test_requests_are_shared_between_competing_consumers(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        first, second, client = await make_broker(), await make_broker(), await make_broker()
        seen: Counter[bytes] = Counter()
        by_consumer: Counter[str] = Counter()

        def handler(label: str) -> Callable[[Delivery], Awaitable[None]]:
            async def handle(delivery: Delivery) -> None:
                seen[delivery.body] += 1
                by_consumer[label] += 1
                await asyncio.sleep(0.001)
                await delivery.ack()

            return handle

        await first.serve_requests(name, handler("first"), concurrency=2)
        await second.serve_requests(name, handler("second"), concurrency=2)
        for index in range(200):
            await client.send_request(name, str(index).encode(), correlation_id=index + 1)
        await eventually(lambda: sum(seen.values()) >= 200)
        await asyncio.sleep(0.1)
        assert len(seen) == 200 and set(seen.values()) == {1}  # each handled exactly once
        assert by_consumer["first"] > 0 and by_consumer["second"] > 0

    async def test_concurrency_limit_bounds_handlers_in_flight(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        server, client = await make_broker(), await make_broker()
        running = 0
        peak = 0
        done = 0

        async def handle(delivery: Delivery) -> None:
            nonlocal running, peak, done
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1
            done += 1
            await delivery.ack()

        await server.serve_requests(name, handle, concurrency=3)
        for index in range(12):
            await client.send_request(name, b"x", correlation_id=index + 1)
        await eventually(lambda: done == 12)
        assert peak == 3

    async def test_cancelled_consumer_takes_no_more_requests(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        old, new, client = await make_broker(), await make_broker(), await make_broker()
        old_seen: list[bytes] = []
        new_seen: list[bytes] = []

        async def collect_old(delivery: Delivery) -> None:
            old_seen.append(delivery.body)
            await delivery.ack()

        async def collect_new(delivery: Delivery) -> None:
            new_seen.append(delivery.body)
            await delivery.ack()

        subscription = await old.serve_requests(name, collect_old, concurrency=2)
        await new.serve_requests(name, collect_new, concurrency=2)
        await subscription.cancel()
        for index in range(20):
            await client.send_request(name, b"after", correlation_id=index + 1)
        await eventually(lambda: len(new_seen) == 20)
        assert old_seen == []

    async def test_a_request_nobody_serves_is_answered_at_once(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        # Either send_request raises ServiceUnavailable, or the broker's "no responders"
        # reaches the inbox as an error frame for the right call; both within a second.
        client = await make_broker()
        frames: list[Frame] = []
        await client.open_inbox(lambda body: frames.append(decode_frame(body)))
        started = time.monotonic()
        raised: list[int] = []
        for correlation_id, service in ((7, "a"), (8, "b")):
            try:
                await client.send_request(
                    f"{name}_nobody_{service}", b"x", correlation_id=correlation_id
                )
            except ServiceUnavailable as exc:
                assert f"{name}_nobody_{service}" in str(exc)
                raised.append(correlation_id)
        await eventually(lambda: len(frames) + len(raised) == 2, timeout=1.0)
        assert time.monotonic() - started < 1.0
        for frame in frames:
            assert frame.kind == Kind.ERROR
            error = msgspec.msgpack.decode(frame.payload)
            assert error["code"] == ServiceUnavailable.code
            service = "a" if frame.correlation_id == 7 else "b"
            assert f"{name}_nobody_{service}" in error["message"]
        assert sorted([f.correlation_id for f in frames] + raised) == [7, 8]

    async def test_reply_to_a_vanished_inbox_is_not_an_error(
        self, make_broker: Callable[[], Awaitable[Broker]]
    ) -> None:
        broker = await make_broker()
        client = await make_broker()
        address = await client.open_inbox(lambda body: None)
        await client.close()
        await broker.send_reply(address, b"too late")

    # -- events ----------------------------------------------------------------------

    async def test_each_group_gets_each_event_once(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        a1, a2, b1, publisher = [await make_broker() for _ in range(4)]
        event = f"{name}.created"
        seen_a: Counter[bytes] = Counter()
        seen_b: Counter[bytes] = Counter()

        def collect(counter: Counter[bytes]) -> Callable[[Delivery], Awaitable[None]]:
            async def handle(delivery: Delivery) -> None:
                counter[delivery.body] += 1
                await delivery.ack()

            return handle

        group_a = EventSubscription(event, f"{name}_a.on_created")
        group_b = EventSubscription(event, f"{name}_b.on_created")
        await a1.subscribe_events(group_a, collect(seen_a), concurrency=4)
        await a2.subscribe_events(group_a, collect(seen_a), concurrency=4)
        await b1.subscribe_events(group_b, collect(seen_b), concurrency=4)
        for index in range(50):
            await publisher.publish_event(event, b"%d" % index, idempotency_key=f"{name}-{index}")
        await eventually(lambda: sum(seen_a.values()) >= 50 and sum(seen_b.values()) >= 50)
        await asyncio.sleep(0.2)
        assert len(seen_a) == 50 and set(seen_a.values()) == {1}
        assert len(seen_b) == 50 and set(seen_b.values()) == {1}

    async def test_events_wait_for_a_durable_group_that_is_down(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        consumer, publisher = await make_broker(), await make_broker()
        event = f"{name}.queued"
        group = EventSubscription(event, f"{name}.on_queued")
        seen: list[bytes] = []

        async def collect(delivery: Delivery) -> None:
            seen.append(delivery.body)
            await delivery.ack()

        subscription = await consumer.subscribe_events(group, collect, concurrency=1)
        await subscription.cancel()
        await publisher.publish_event(event, b"while down", idempotency_key=f"{name}-1")
        await consumer.subscribe_events(group, collect, concurrency=1)
        await eventually(lambda: seen == [b"while down"])

    async def test_broadcast_reaches_every_instance(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        first, second, publisher = [await make_broker() for _ in range(3)]
        event = f"{name}.config_changed"
        group = EventSubscription(event, f"{name}.on_change", broadcast=True)
        seen: list[tuple[str, bytes]] = []

        def collect(label: str) -> Callable[[Delivery], Awaitable[None]]:
            async def handle(delivery: Delivery) -> None:
                seen.append((label, delivery.body))
                await delivery.ack()

            return handle

        await first.subscribe_events(group, collect("first"), concurrency=1)
        await second.subscribe_events(group, collect("second"), concurrency=1)
        await publisher.publish_event(event, b"v2", idempotency_key=f"{name}-1")
        await eventually(lambda: len(seen) == 2)
        assert sorted(seen) == [("first", b"v2"), ("second", b"v2")]

    async def test_nack_redelivers_with_the_next_attempt_number(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        consumer, publisher = await make_broker(), await make_broker()
        event = f"{name}.flaky"
        attempts: list[int] = []

        async def flaky(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            if delivery.attempt < 3:
                await delivery.nack(requeue=True)
            else:
                await delivery.ack()

        await consumer.subscribe_events(
            EventSubscription(event, f"{name}.on_flaky"), flaky, concurrency=1
        )
        await publisher.publish_event(event, b"retry me", idempotency_key=f"{name}-1")
        await eventually(lambda: attempts == [1, 2, 3])
        await asyncio.sleep(0.2)
        assert attempts == [1, 2, 3]  # acked on the third attempt: no fourth

    async def test_dead_lettered_event_is_not_redelivered(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        consumer, publisher = await make_broker(), await make_broker()
        event = f"{name}.poison"
        seen: list[bytes] = []

        async def park(delivery: Delivery) -> None:
            seen.append(delivery.body)
            await delivery.dead_letter(Failure("cannot handle this"))

        await consumer.subscribe_events(
            EventSubscription(event, f"{name}.on_poison"), park, concurrency=1
        )
        await publisher.publish_event(event, b"poison", idempotency_key=f"{name}-1")
        await eventually(lambda: seen == [b"poison"])
        await asyncio.sleep(0.3)
        assert seen == [b"poison"]

    async def test_a_repeat_publish_of_an_idempotency_key_is_handled_once(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        # JetStream drops it (Nats-Msg-Id); RabbitMQ and memory remember the keys the
        # publisher sent lately (basidia.brokers._common.RecentKeys).
        consumer, publisher = await make_broker(), await make_broker()
        event = f"{name}.once"
        seen: Counter[bytes] = Counter()

        async def collect(delivery: Delivery) -> None:
            seen[delivery.body] += 1
            await delivery.ack()

        await consumer.subscribe_events(
            EventSubscription(event, f"{name}.on_once"), collect, concurrency=4
        )
        for _ in range(2):
            await publisher.publish_event(event, b"once", idempotency_key=f"{name}-same")
        await publisher.publish_event(event, b"other", idempotency_key=f"{name}-other")
        await eventually(lambda: sum(seen.values()) >= 2)
        await asyncio.sleep(0.3)
        assert seen == Counter({b"once": 1, b"other": 1})

    async def test_dead_letters_are_listed_oldest_first_without_being_taken(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        consumer, publisher = await make_broker(), await make_broker()
        event, group = f"{name}.parked", f"{name}.on_parked"
        assert await consumer.dead_letters(group) == []  # a group nobody ever had

        async def park(delivery: Delivery) -> None:
            await delivery.dead_letter(Failure(f"parked {delivery.body.decode()}"))

        await consumer.subscribe_events(EventSubscription(event, group), park, concurrency=1)
        for index in range(3):
            await publisher.publish_event(event, b"%d" % index, idempotency_key=f"{name}-{index}")
            await dead_letters_of(publisher, group, index + 1)  # one at a time: a known order
        letters = await publisher.dead_letters(group)
        assert [letter.frame for letter in letters] == [b"0", b"1", b"2"]
        assert [letter.reason for letter in letters] == ["parked 0", "parked 1", "parked 2"]
        assert {(letter.event, letter.group, letter.attempts) for letter in letters} == {
            (event, group, 1)
        }
        assert {(letter.service, letter.handler, letter.exception) for letter in letters} == {
            (name, "on_parked", "")
        }
        # Listing takes nothing away, and stops at the limit.
        assert await consumer.dead_letters(group) == letters
        assert await consumer.dead_letters(group, limit=2) == letters[:2]
        assert await consumer.dead_letters(group, limit=0) == []
        assert await consumer.dead_letters(f"{name}.on_other") == []

    # -- retries with a delay, and dead letters replayed or purged -----------------------

    async def test_a_delayed_retry_comes_later_and_does_not_block_the_consumer(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        consumer, publisher = await make_broker(), await make_broker()
        event = f"{name}.later"
        seen: list[tuple[bytes, int, float]] = []

        async def handle(delivery: Delivery) -> None:
            seen.append((delivery.body, delivery.attempt, time.monotonic()))
            if delivery.body == b"slow" and delivery.attempt == 1:
                await delivery.nack(requeue=True, delay=1.0)
            else:
                await delivery.ack()

        # One handler slot: a retry that waited in the consumer would hold it.
        await consumer.subscribe_events(
            EventSubscription(event, f"{name}.on_later"), handle, concurrency=1
        )
        await publisher.publish_event(event, b"slow", idempotency_key=f"{name}-slow")
        await eventually(lambda: len(seen) == 1)
        await publisher.publish_event(event, b"fast", idempotency_key=f"{name}-fast")
        await eventually(lambda: len(seen) == 3, timeout=15)
        (first, one, t1), (fast, _, _), (again, two, t2) = seen
        assert (first, one, fast, again, two) == (b"slow", 1, b"fast", b"slow", 2)
        assert t2 - t1 >= 0.9  # the delay was kept (the fast one went meanwhile)

    async def test_dead_letters_are_replayed_once_to_their_own_group(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        consumer, publisher = await make_broker(), await make_broker()
        event, group, other = f"{name}.replayed", f"{name}.on_replayed", f"{name}_b.on_replayed"
        fixed = False
        handled: list[tuple[bytes, int]] = []
        others: list[bytes] = []

        async def picky(delivery: Delivery) -> None:
            if not fixed:
                await delivery.dead_letter(Failure(f"not yet: {delivery.body.decode()}"))
            else:
                handled.append((delivery.body, delivery.attempt))
                await delivery.ack()

        async def bystander(delivery: Delivery) -> None:
            others.append(delivery.body)
            await delivery.ack()

        await consumer.subscribe_events(EventSubscription(event, group), picky, concurrency=2)
        await consumer.subscribe_events(EventSubscription(event, other), bystander, concurrency=2)
        for index in range(3):
            await publisher.publish_event(event, b"%d" % index, idempotency_key=f"{name}-{index}")
        letters = await dead_letters_of(publisher, group, 3)
        assert len({letter.id for letter in letters}) == 3 and all(letter.id for letter in letters)
        assert group in await publisher.dead_letter_groups()
        fixed = True
        # One chosen letter, then the rest; each reaches the handler once, as a first attempt.
        chosen = next(letter for letter in letters if letter.frame == b"1")
        assert await publisher.replay_dead_letters(group, [chosen.id]) == 1
        await eventually(lambda: handled == [(b"1", 1)])
        remaining = await publisher.dead_letters(group)
        assert sorted(letter.frame for letter in remaining) == [b"0", b"2"]
        assert await publisher.replay_dead_letters(group) == 2
        await eventually(lambda: len(handled) == 3)
        assert await publisher.replay_dead_letters(group) == 0
        await asyncio.sleep(0.5)
        assert sorted(handled) == [(b"0", 1), (b"1", 1), (b"2", 1)]
        assert sorted(others) == [b"0", b"1", b"2"]  # the other group saw each event once
        assert await publisher.dead_letters(group) == []
        assert group not in await publisher.dead_letter_groups()

    async def test_dead_letters_are_purged_by_id_or_all_at_once(
        self, make_broker: Callable[[], Awaitable[Broker]], name: str
    ) -> None:
        consumer, publisher = await make_broker(), await make_broker()
        event, group = f"{name}.purged", f"{name}.on_purged"

        async def park(delivery: Delivery) -> None:
            await delivery.dead_letter(Failure("parked"))

        await consumer.subscribe_events(EventSubscription(event, group), park, concurrency=1)
        for index in range(3):
            await publisher.publish_event(event, b"%d" % index, idempotency_key=f"{name}-{index}")
            await dead_letters_of(publisher, group, index + 1)
        letters = await publisher.dead_letters(group)
        assert await publisher.purge_dead_letters(group, [letters[1].id]) == 1
        assert [letter.frame for letter in await publisher.dead_letters(group)] == [b"0", b"2"]
        assert await publisher.purge_dead_letters(group) == 2
        assert await publisher.dead_letters(group) == []
        assert await publisher.purge_dead_letters(f"{name}.on_nothing") == 0

    async def test_the_disconnect_callback_is_called_when_the_connection_is_lost(
        self, broker_url: str, broker_options: dict[str, Any]
    ) -> None:
        parts = urlsplit(broker_url)
        assert parts.hostname and parts.port, "a broker reached over TCP (memory skips this)"
        async with FaultProxy(parts.hostname, parts.port) as proxy:
            credentials, at, _ = parts.netloc.rpartition("@")
            url = urlunsplit(parts._replace(netloc=f"{credentials}{at}127.0.0.1:{proxy.port}"))
            broker = broker_from_url(url, broker_options)
            lost: list[ConnectionLost] = []
            broker.add_disconnect_callback(lost.append)
            await broker.connect()
            try:
                await asyncio.sleep(0.1)
                assert lost == []
                proxy.down()
                await eventually(lambda: bool(lost), timeout=15)
                assert isinstance(lost[0], ConnectionLost)
            finally:
                proxy.pass_through()
                await broker.close()

    # -- the framework on this broker ---------------------------------------------------

    @pytest.fixture
    def services(self, name: str) -> dict[str, type[Service]]:
        calls: list[str] = []

        class Echo(Service):
            @rpc
            async def echo(self, value: Any) -> Any:
                return value

            @rpc
            async def fail(self) -> None:
                raise ValueError("x")

        class Listener(Service):
            received: list[Any] = calls  # type: ignore[assignment]

            @event_handler(f"{name}.ping")
            async def on_ping(self, data: dict[str, Any]) -> None:
                calls.append(data["n"])

        Echo.name = f"{name}_echo"
        Listener.name = f"{name}_listener"
        return {"echo": Echo, "listener": Listener}

    async def test_rpc_through_the_framework(
        self, broker_url: str, services: dict[str, type[Service]]
    ) -> None:
        echo = services["echo"]
        async with ServiceRunner([echo], broker=broker_url), connect(broker_url) as cluster:
            proxy = cluster.rpc[echo.name]
            assert await proxy.echo({"a": [1, 2, "three"]}) == {"a": [1, 2, "three"]}
            results = await asyncio.gather(*(proxy.echo(i) for i in range(200)))
            assert results == list(range(200))
            with pytest.raises(RemoteError) as raised:
                await proxy.fail()
            assert (raised.value.exc_type, raised.value.message) == ("ValueError", "x")
            with pytest.raises(MethodNotFound):
                await proxy.missing()

    async def test_call_to_a_service_without_instances_fails_fast(
        self, broker_url: str, name: str
    ) -> None:
        async with connect(broker_url, timeout=10) as cluster:
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                await cluster.rpc[f"{name}_nobody"].anything()
            assert time.monotonic() - started < 1.0
            assert issubclass(ServiceUnavailable, _ServiceUnavailable)

    async def test_handlers_see_the_attempt_numbers_1_2_3_in_order(
        self, broker_url: str, broker_options: dict[str, Any], name: str
    ) -> None:
        seen: list[int] = []
        picky = picky_service(name, seen, succeed_on=3)
        broker = broker_from_url(broker_url, broker_options)
        async with ServiceRunner([picky], broker=broker) as runner:
            await runner.dispatch(f"{name}.order", {"id": 1})
            await eventually(lambda: len(seen) >= 3)
            await asyncio.sleep(0.3)
            assert await broker.dead_letters(f"{picky.name}.on_order") == []
        assert seen == [1, 2, 3]  # succeeded on the third: no fourth, no dead letter

    async def test_a_failing_event_is_dead_lettered_with_its_whole_record(
        self, broker_url: str, broker_options: dict[str, Any], name: str
    ) -> None:
        seen: list[int] = []
        picky = picky_service(name, seen)
        event, group = f"{name}.order", f"{picky.name}.on_order"
        key = f"{name}-poison"
        broker = broker_from_url(broker_url, broker_options)
        started = time.time()
        async with ServiceRunner([picky], broker=broker) as runner:
            await runner.dispatch(event, {"id": 7}, idempotency_key=key)
            [letter] = await dead_letters_of(broker, group, 1)
            # A malformed event: dead-lettered at once, not the handler's failure.
            await broker.publish_event(event, b"\x01\x04 not a frame", idempotency_key=f"{key}2")
            letters = await dead_letters_of(broker, group, 2)
            await asyncio.sleep(0.3)
            assert await broker.dead_letters(group) == letters  # nothing more, nothing taken
        assert seen == [1, 2, 3]
        assert letters[0] == letter
        assert letter.reason == "ValueError: order 7 is not acceptable"
        assert letter.exception == "ValueError"
        assert letter.attempts == 3
        assert (letter.service, letter.handler) == (picky.name, "on_order")
        assert (letter.event, letter.group) == (event, group)
        assert started - 1 <= letter.first_failure <= letter.last_failure <= time.time() + 1
        assert letter.truncated_from == 0
        frame = decode_frame(letter.frame)  # the original event, whole
        assert (frame.kind, frame.target) == (Kind.EVENT, event)
        assert frame.headers[IDEMPOTENCY_HEADER] == key
        assert msgspec.msgpack.decode(frame.payload) == {"id": 7}

        malformed = letters[1]
        assert malformed.reason.startswith("malformed frame: "), malformed.reason
        assert (malformed.exception, malformed.attempts) == ("", 1)
        assert (malformed.service, malformed.handler) == (picky.name, "on_order")
        assert (malformed.event, malformed.group) == (event, group)
        assert malformed.first_failure == malformed.last_failure
        assert malformed.frame == b"\x01\x04 not a frame"

    async def test_events_through_the_framework(
        self, broker_url: str, services: dict[str, type[Service]], name: str
    ) -> None:
        listener = services["listener"]
        received: list[Any] = listener.received  # type: ignore[attr-defined]
        async with ServiceRunner([listener], broker=broker_url):
            async with connect(broker_url) as cluster:
                for n in range(20):
                    await cluster.dispatch(f"{name}.ping", {"n": n})
                await eventually(lambda: len(received) >= 20)
        assert sorted(received) == list(range(20))

    @pytest.mark.parametrize("store", ["memory", "redis"])
    async def test_one_idempotency_key_runs_the_handler_once(
        self, broker_url: str, broker_options: dict[str, Any], name: str, store: str
    ) -> None:
        # The same event frame published twice under different publish keys: no broker
        # drops the second, so only the deduplication store keeps the handler to one run.
        if store == "redis":
            require_broker("redis", "127.0.0.1", 6379)
        seen: list[int] = []

        class Once(Service):
            @event_handler(f"{name}.once")
            async def on_once(self, data: dict[str, int]) -> None:
                seen.append(data["n"])
                await asyncio.sleep(0.2)  # still at work when the duplicate comes

        Once.name = f"{name}_once"
        config = {
            "dedup_store": REDIS_URL if store == "redis" else "memory",
            "event_retry_delay": 0.2,
        }
        frame = Frame(
            Kind.EVENT,
            0,
            f"{name}.once",
            msgspec.msgpack.encode({"n": 1}),
            "",
            0,
            {IDEMPOTENCY_HEADER: f"{name}-key"},
        )
        body = encode_frame(frame)
        broker = broker_from_url(broker_url, broker_options)
        try:
            async with ServiceRunner([Once], broker=broker, config=config) as runner:
                container = runner.containers[Once.name]
                await broker.publish_event(f"{name}.once", body, idempotency_key=f"{name}-a")
                await broker.publish_event(f"{name}.once", body, idempotency_key=f"{name}-b")
                await eventually(lambda: container.stats.duplicates >= 1 and seen == [1])
                await asyncio.sleep(0.5)
                assert seen == [1]
        finally:
            if store == "redis":
                await delete_redis_keys(f"basidia:dedup:{Once.name}.on_once:*")

    # -- the service directory (docs/operations.md) ------------------------------------------

    async def test_directory_lists_every_instance_and_forgets_a_silent_one(
        self,
        broker_url: str,
        broker_options: dict[str, Any],
        services: dict[str, type[Service]],
    ) -> None:
        # Built on publish_event and broadcast subscriptions alone: an adapter that passes
        # the event tests above carries the directory (and `basidia services`) too.
        echo, listener = services["echo"], services["listener"]
        config = {
            "directory_heartbeat": 1.0,
            "directory_expiry": 3.0,
            "broker_options": broker_options,
        }
        first = ServiceRunner([echo], broker=broker_url, config=config)
        second = ServiceRunner([echo, listener], broker=broker_url, config=config)
        ours = {echo.name, listener.name}

        async def listed(cluster: Any) -> set[tuple[str, str, str]]:
            return {
                (i.service, i.instance, i.state)
                for i in await cluster.services()
                if i.service in ours  # the broker may be shared
            }

        async with first, second, connect(broker_url, config=config) as cluster:
            started = time.monotonic()
            assert await listed(cluster) == {
                (echo.name, first.directory.process, "RUNNING"),
                (echo.name, second.directory.process, "RUNNING"),
                (listener.name, second.directory.process, "RUNNING"),
            }
            # The ping's answers fill the view within the 1 s wait (a heartbeat here); the
            # bound leaves room for a busy machine.
            assert time.monotonic() - started < 1.0 + 2.0
            mine = [i for i in await cluster.services() if i.service == listener.name]
            assert mine[0].entrypoints == {"events": ["on_ping"]}
            assert mine[0].broker == second.broker.safe_url
            assert cluster.directory.has_live_instance(listener.name) is True

            await second.directory.close(leave=False)  # it stops renewing, as a killed one
            silent = time.monotonic()
            while (listener.name, second.directory.process, "RUNNING") in await listed(cluster):
                assert time.monotonic() - silent < 3.0 + 2.0, "not forgotten after the expiry"
                await asyncio.sleep(0.1)
            assert await listed(cluster) == {(echo.name, first.directory.process, "RUNNING")}
            if cluster.directory.complete:
                assert cluster.directory.has_live_instance(listener.name) is False

"""The RabbitMQ broker against the broker contract, plus what only RabbitMQ does.

Everything runs against the shared RabbitMQ (``amqp_url``) with names made unique per
test, and deletes the queues and exchanges it declared.  Link faults go through an
in-tree ``FaultProxy`` in front of the shared broker, which is never stopped; TLS tests
put a TLS-terminating proxy with a throw-away certificate authority in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import ssl
import subprocess
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiormq
import pytest

from basidia import ConnectionLost, connect
from basidia._speedups import Frame, Kind, decode_frame
from basidia.brokers import Delivery, EventSubscription, broker_from_url
from basidia.brokers.amqp import DIRECT_REPLY_TO, AmqpBroker
from basidia.brokers.base import Failure
from basidia.errors import BrokerError, ConfigError

from ..faults.proxy import FaultProxy
from ..faults.servers import free_port
from ..logs import captured_logs
from .cleanup import delete_amqp
from .contract import BrokerContract, dead_letters_of, eventually, exercise_examples

pytestmark = [pytest.mark.amqp, pytest.mark.timeout(60)]

SENTINEL = "SENTINEL-PASSWORD-1234"

# The contract's consumer groups, by the suffix they add to its per-test name.
_CONTRACT_GROUPS = (
    "_a.on_created",
    "_b.on_created",
    ".on_queued",
    ".on_flaky",
    ".on_poison",
    ".on_change",
    "_listener.on_ping",
    ".on_once",
    ".on_parked",
    "_picky.on_order",
)


def _group_queues(prefix: str, group: str) -> list[str]:
    return [f"{prefix}.events.{group}", f"{prefix}.events.{group}.dlq"]


class TestAmqpBroker(BrokerContract):
    @pytest.fixture
    def broker_url(self, amqp_url: str) -> str:
        return amqp_url

    @pytest.fixture(autouse=True)
    async def _delete_contract_queues(self, amqp_url: str, name: str) -> AsyncIterator[None]:
        yield
        groups = [name + suffix for suffix in _CONTRACT_GROUPS]
        await delete_amqp(
            amqp_url, [q for group in groups for q in _group_queues("basidia", group)]
        )


# -- helpers for the RabbitMQ-only tests ----------------------------------------------------------


class Topology:
    """A per-test name prefix, and the queues to delete after the test."""

    def __init__(self, unique: str) -> None:
        self.prefix = f"basidia-test-{unique}"
        self.queues: list[str] = []

    def group(self, group: str) -> str:
        """The queue of consumer group ``group``, registered for deletion with its DLQ."""
        queue, dlq = _group_queues(self.prefix, group)
        self.queues += [queue, dlq]
        return queue


@pytest.fixture
async def topology(amqp_url: str, unique: str) -> AsyncIterator[Topology]:
    found = Topology(unique)
    yield found
    await delete_amqp(amqp_url, found.queues, [f"{found.prefix}.events"])


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the shared broker."""
    async with FaultProxy("127.0.0.1", 5672) as started:
        yield started


@pytest.fixture
async def make_broker(
    amqp_url: str, topology: Topology
) -> AsyncIterator[Callable[..., Awaitable[AmqpBroker]]]:
    """Connected brokers with the test's prefix and short timers, closed after the test."""
    brokers: list[AmqpBroker] = []

    async def make(url: str | None = None, **options: Any) -> AmqpBroker:
        settings: dict[str, Any] = {
            "prefix": topology.prefix,
            "heartbeat": 1,
            "reconnect_wait": 0.05,
            "reconnect_wait_max": 0.5,
            "publish_timeout": 2.0,
            **options,
        }
        broker = AmqpBroker(url or amqp_url, **settings)
        brokers.append(broker)
        await broker.connect()
        return broker

    yield make
    for broker in brokers:
        await broker.close()


def _collect(into: list[Delivery]) -> Callable[[Delivery], Awaitable[None]]:
    async def handle(delivery: Delivery) -> None:
        into.append(delivery)
        await delivery.ack()

    return handle


async def _echo_service(broker: AmqpBroker, service: str) -> None:
    async def echo(delivery: Delivery) -> None:
        frame = decode_frame(delivery.body)
        reply = Frame(Kind.REPLY, frame.correlation_id, "", frame.payload)
        from basidia._speedups import encode_frame

        await broker.send_reply(frame.reply_to, encode_frame(reply))
        await delivery.ack()

    await broker.serve_requests(service, echo, concurrency=4)


def _request(correlation_id: int, payload: bytes = b"ping") -> bytes:
    from basidia._speedups import encode_frame

    return encode_frame(Frame(Kind.REQUEST, correlation_id, "svc.echo", payload, DIRECT_REPLY_TO))


# -- requests and replies -------------------------------------------------------------------------


async def test_the_request_queue_goes_with_the_last_instance(
    make_broker: Callable[..., Awaitable[AmqpBroker]], unique: str
) -> None:
    server, client = await make_broker(), await make_broker()
    replies: list[Frame] = []
    await client.open_inbox(lambda body: replies.append(decode_frame(body)))
    service = f"leaving_{unique}"
    await _echo_service(server, service)
    await client.send_request(service, _request(1), correlation_id=1)
    await eventually(lambda: len(replies) == 1)
    assert replies[0].kind == Kind.REPLY
    for subscription in list(server._consumers):
        await subscription.cancel()
    await client.send_request(service, _request(2), correlation_id=2)
    await eventually(lambda: len(replies) == 2, timeout=1.0)
    assert (replies[1].kind, replies[1].correlation_id) == (Kind.ERROR, 2)


async def test_many_calls_in_flight_share_one_reply_consumer(
    make_broker: Callable[..., Awaitable[AmqpBroker]], unique: str
) -> None:
    server, client = await make_broker(), await make_broker()
    replies: dict[int, bytes] = {}
    await client.open_inbox(lambda body: replies.update({decode_frame(body).correlation_id: body}))
    service = f"echo_{unique}"
    await _echo_service(server, service)
    for correlation_id in range(1, 501):
        await client.send_request(service, _request(correlation_id), correlation_id=correlation_id)
    await eventually(lambda: len(replies) == 500)
    assert client._rpc is not None and len(client._rpc.consumers) == 1


async def test_bodies_larger_than_a_frame_arrive_whole_when_the_link_is_busy(
    make_broker: Callable[..., Awaitable[AmqpBroker]], unique: str
) -> None:
    """Forty requests of 300 KB at once: each spans several AMQP frames, the connection's
    write queue fills, publishes wait for room rather than fail, and every body comes
    back whole to its own caller."""
    server, client = await make_broker(), await make_broker()
    replies: dict[int, bytes] = {}

    def on_reply(body: bytes) -> None:
        frame = decode_frame(body)
        replies[frame.correlation_id] = frame.payload

    await client.open_inbox(on_reply)
    service = f"big_{unique}"
    await _echo_service(server, service)
    payloads = {n: os.urandom(300_000 + n) for n in range(1, 41)}
    await asyncio.gather(
        *(
            client.send_request(service, _request(n, p), correlation_id=n)
            for n, p in payloads.items()
        )
    )
    await eventually(lambda: len(replies) == len(payloads), timeout=20)
    assert replies == payloads


async def test_a_reply_sent_later_from_another_task_reaches_its_own_caller(
    make_broker: Callable[..., Awaitable[AmqpBroker]], unique: str
) -> None:
    """The worker moves on to the next caller's request before the reply goes out."""
    server, first, second = await make_broker(), await make_broker(), await make_broker()
    got: dict[str, list[bytes]] = {"first": [], "second": []}
    await first.open_inbox(got["first"].append)
    await second.open_inbox(got["second"].append)
    later: list[asyncio.Task[None]] = []

    async def reply_later(body: bytes) -> None:
        await asyncio.sleep(0.2)
        await server.send_reply(DIRECT_REPLY_TO, body)

    async def handle(delivery: Delivery) -> None:
        later.append(asyncio.ensure_future(reply_later(delivery.body)))
        await delivery.ack()

    await server.serve_requests(f"later_{unique}", handle, concurrency=1)
    await first.send_request(f"later_{unique}", b"for first", correlation_id=1)
    await second.send_request(f"later_{unique}", b"for second", correlation_id=1)
    await eventually(lambda: len(later) == 2)
    await asyncio.gather(*later)
    await eventually(lambda: got == {"first": [b"for first"], "second": [b"for second"]})


async def test_replies_only_go_to_direct_reply_to_inboxes(
    make_broker: Callable[..., Awaitable[AmqpBroker]], amqp_url: str, unique: str
) -> None:
    """A forged reply address cannot make a service publish into a queue of its choosing."""
    broker = await make_broker()
    victim = f"victim-{unique}"
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.queue_declare(victim, auto_delete=True, timeout=5)
        await broker.send_reply(victim, b"forged")
        await broker.send_reply(DIRECT_REPLY_TO, b"no request is being served")
        await asyncio.sleep(0.2)
        ok = await channel.queue_declare(victim, passive=True, timeout=5)
        assert ok.message_count == 0
        await channel.queue_delete(victim, timeout=5)
    finally:
        await connection.close()


async def test_a_second_inbox_on_one_connection_is_refused(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
) -> None:
    broker = await make_broker()
    assert await broker.open_inbox(lambda body: None) == DIRECT_REPLY_TO
    with pytest.raises(BrokerError, match="already has a reply inbox"):
        await broker.open_inbox(lambda body: None)


# -- events ---------------------------------------------------------------------------------------


async def test_dead_letters_keep_body_and_the_dead_letter_headers(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
    topology: Topology,
    amqp_url: str,
    unique: str,
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event = f"order_{unique}.placed"
    group = f"billing_{unique}.on_order"
    topology.group(group)
    attempts: list[int] = []

    async def fail_twice(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < 2:
            await delivery.nack(requeue=True)
        else:
            await delivery.dead_letter(
                Failure(
                    "ValueError: order 7 is not acceptable", "ValueError", "billing", "on_order"
                )
            )

    await consumer.subscribe_events(EventSubscription(event, group), fail_twice, concurrency=1)
    await publisher.publish_event(event, b"order 7", idempotency_key=f"key-{unique}")
    await eventually(lambda: attempts == [1, 2])
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel()
        deadline = time.monotonic() + 5
        while True:
            got = await channel.basic_get(f"{topology.prefix}.events.{group}.dlq", timeout=5)
            if isinstance(got.delivery, aiormq.spec.Basic.GetOk):
                break
            assert time.monotonic() < deadline, "nothing reached the dead-letter queue"
            await asyncio.sleep(0.05)
        await channel.basic_ack(got.delivery_tag or 0)
    finally:
        await connection.close()
    properties = got.header.properties
    assert got.body == b"order 7"
    assert properties.message_id == f"key-{unique}"
    assert properties.delivery_mode == 2
    headers = properties.headers or {}
    # Every value a string, as on every broker (docs/dead-letters.md).
    assert {name: type(value) for name, value in headers.items()} == {
        name: str
        for name in (
            "basidia-reason",
            "basidia-exception",
            "basidia-attempts",
            "basidia-first-failure",
            "basidia-last-failure",
            "basidia-service",
            "basidia-handler",
            "basidia-event",
            "basidia-group",
            "basidia-dead-letter-id",  # RabbitMQ's handle on it (DeadLetter.id)
        )
    }
    assert headers["basidia-reason"] == "ValueError: order 7 is not acceptable"
    assert headers["basidia-exception"] == "ValueError"
    assert headers["basidia-event"] == event
    assert headers["basidia-group"] == group
    assert headers["basidia-attempts"] == "2"
    assert (headers["basidia-service"], headers["basidia-handler"]) == ("billing", "on_order")
    first, last = int(headers["basidia-first-failure"]), int(headers["basidia-last-failure"])
    assert abs(time.time() * 1000 - last) < 10_000 and first <= last
    await asyncio.sleep(0.2)
    assert attempts == [1, 2]


async def test_retry_headers_on_an_event_from_the_exchange_are_not_believed(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
    topology: Topology,
    amqp_url: str,
    unique: str,
) -> None:
    """A publisher cannot skip a handler's attempts, nor date its first failure: on an
    event published to the events exchange every retry header is ignored."""
    consumer, publisher = await make_broker(), await make_broker()
    event = f"forged_{unique}.placed"
    group = f"forged_{unique}.on_placed"
    topology.group(group)
    attempts: list[int] = []

    async def fail_once(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < 2:
            await delivery.nack(requeue=True)
        else:
            await delivery.dead_letter(Failure("enough"))

    await consumer.subscribe_events(EventSubscription(event, group), fail_once, concurrency=1)
    started = time.time()
    forged = {
        "basidia-attempts": "999",
        "basidia-first-failure": "1000",
        "basidia-reason": "forged",
        "x-basidia-attempt": 999,
    }
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.basic_publish(
            b"x",
            exchange=f"{topology.prefix}.events",
            routing_key=event,
            properties=aiormq.spec.Basic.Properties(headers=forged),
            timeout=5,
        )
    finally:
        await connection.close()
    [letter] = await dead_letters_of(publisher, group, 1)
    assert attempts == [1, 2]
    assert (letter.attempts, letter.reason) == (2, "enough")
    assert letter.first_failure >= started - 1


async def test_an_event_over_max_message_size_is_dead_lettered_as_truncated(
    make_broker: Callable[..., Awaitable[AmqpBroker]], topology: Topology, unique: str
) -> None:
    consumer, publisher = await make_broker(max_message_size=1000), await make_broker()
    event = f"huge_{unique}.sent"
    group = f"huge_{unique}.on_sent"
    topology.group(group)
    seen: list[Delivery] = []
    await consumer.subscribe_events(EventSubscription(event, group), _collect(seen), concurrency=1)
    await publisher.publish_event(event, b"x" * 5000, idempotency_key=f"key-{unique}")
    [letter] = await dead_letters_of(publisher, group, 1)
    assert seen == []  # never read, never handled
    assert (letter.frame, letter.truncated_from, letter.attempts) == (b"", 5000, 1)
    assert letter.exception == ""
    assert "exceeds max_message_size" in letter.reason, letter.reason


async def test_a_dead_letter_moved_back_to_its_queue_starts_at_attempt_1(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
    topology: Topology,
    amqp_url: str,
    unique: str,
) -> None:
    """Replay: a dead letter shovelled back to the group's queue (default exchange, its
    headers kept) is a new event as far as attempts go, and its retry drops the old
    dead-letter headers."""
    consumer, publisher = await make_broker(), await make_broker()
    event = f"replay_{unique}.placed"
    group = f"replay_{unique}.on_placed"
    queue = topology.group(group)
    dlq = f"{queue}.dlq"
    attempts: list[int] = []

    async def handle(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if len(attempts) == 1:
            await delivery.dead_letter(Failure("not yet"))
        elif delivery.attempt == 1:
            await delivery.nack(requeue=True)  # the replay's first attempt fails
        else:
            await delivery.ack()

    await consumer.subscribe_events(EventSubscription(event, group), handle, concurrency=1)
    await publisher.publish_event(event, b"x", idempotency_key=f"key-{unique}")
    [letter] = await dead_letters_of(publisher, group, 1)
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel()
        got = await channel.basic_get(dlq, no_ack=True, timeout=5)
        assert isinstance(got.delivery, aiormq.spec.Basic.GetOk)
        await channel.basic_publish(
            got.body, routing_key=queue, properties=got.header.properties, timeout=5
        )
    finally:
        await connection.close()
    await eventually(lambda: len(attempts) == 3)
    assert attempts == [1, 1, 2]
    assert letter.reason == "not yet"


async def test_transient_queues_go_with_their_consumer_and_durable_ones_stay(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
    topology: Topology,
    amqp_url: str,
    unique: str,
) -> None:
    broker = await make_broker()
    event = f"cfg_{unique}.changed"
    durable = EventSubscription(event, f"keep_{unique}.on_change")
    transient = EventSubscription(event, f"drop_{unique}.on_change", durable=False)
    broadcast = EventSubscription(event, f"all_{unique}.on_change", broadcast=True)
    for subscription in (durable, transient, broadcast):
        topology.group(subscription.group)
    subscriptions = [
        await broker.subscribe_events(s, _collect([]), concurrency=1)
        for s in (durable, transient, broadcast)
    ]
    queues: list[str] = [cast(Any, subscription).queue for subscription in subscriptions]
    for subscription in subscriptions:
        await subscription.cancel()
    await asyncio.sleep(0.2)
    exists = []
    connection = await aiormq.connect(amqp_url)
    try:
        for queue in queues:
            channel = await connection.channel(timeout=5)
            try:
                await channel.queue_declare(queue, passive=True, timeout=5)
                exists.append(True)
            except aiormq.ChannelNotFoundEntity:
                exists.append(False)
    finally:
        await connection.close()
    assert exists == [True, False, False]


async def test_invalid_names_are_refused_with_a_clear_error(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
) -> None:
    broker = await make_broker()
    with pytest.raises(ValueError, match="cannot contain"):
        await broker.subscribe_events(
            EventSubscription("orders.#", "g.h"), _collect([]), concurrency=1
        )
    with pytest.raises(ValueError, match="bytes long"):
        await broker.publish_event("x" * 300, b"x", idempotency_key="k")
    with pytest.raises(ValueError, match="bytes long"):
        await broker.serve_requests("s" * 300, _collect([]), concurrency=1)


async def test_a_consumer_whose_queue_is_deleted_consumes_again(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
    topology: Topology,
    amqp_url: str,
    unique: str,
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event = f"audit_{unique}.logged"
    group = f"audit_{unique}.on_logged"
    queue = topology.group(group)
    seen: list[Delivery] = []
    await consumer.subscribe_events(EventSubscription(event, group), _collect(seen), concurrency=1)
    await delete_amqp(amqp_url, [queue])  # an operator deletes it: the broker cancels the consumer

    tries = itertools.count()

    async def published_and_seen() -> bool:
        # A new key each time: a repeat of one already confirmed would be dropped.
        await publisher.publish_event(event, b"again", idempotency_key=f"{unique}-{next(tries)}")
        await asyncio.sleep(0.1)
        return bool(seen)

    deadline = time.monotonic() + 10
    while not await published_and_seen():
        assert time.monotonic() < deadline, "the consumer did not come back"


# -- connection faults ----------------------------------------------------------------------------


async def test_pending_calls_fail_fast_when_the_connection_drops(
    make_broker: Callable[..., Awaitable[AmqpBroker]], proxy: FaultProxy, unique: str
) -> None:
    server = await make_broker()
    client = await make_broker(proxy.url_for("amqp", "guest", "guest"))
    lost: list[ConnectionLost] = []
    client.add_disconnect_callback(lost.append)
    await client.open_inbox(lambda body: None)

    async def never_answer(delivery: Delivery) -> None:
        await asyncio.sleep(30)

    await server.serve_requests(f"silent_{unique}", never_answer, concurrency=2)
    await client.send_request(f"silent_{unique}", _request(1), correlation_id=1)
    started = time.monotonic()
    proxy.down()
    await eventually(lambda: bool(lost), timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert "lost the connection" in str(lost[0])
    with pytest.raises(ConnectionLost):
        await client.send_request(f"silent_{unique}", _request(2), correlation_id=2)


async def test_reconnection_restores_requests_replies_and_events(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
    proxy: FaultProxy,
    topology: Topology,
    unique: str,
) -> None:
    url = proxy.url_for("amqp", "guest", "guest")
    server, client = await make_broker(url), await make_broker(url)
    replies: list[Frame] = []
    await client.open_inbox(lambda body: replies.append(decode_frame(body)))
    service = f"phoenix_{unique}"
    await _echo_service(server, service)
    event, group = f"phoenix_{unique}.risen", f"phoenix_{unique}.on_risen"
    topology.group(group)
    seen: list[Delivery] = []
    await server.subscribe_events(EventSubscription(event, group), _collect(seen), concurrency=2)
    proxy.down()
    await eventually(lambda: not server.connected and not client.connected, timeout=5)
    proxy.pass_through()
    await eventually(lambda: server.connected and client.connected, timeout=10)
    await client.send_request(service, _request(9), correlation_id=9)
    await eventually(lambda: [f.correlation_id for f in replies] == [9])
    assert replies[0].kind == Kind.REPLY
    await client.publish_event(event, b"after", idempotency_key=f"{unique}-1")
    await eventually(lambda: [d.body for d in seen] == [b"after"])
    assert server.reconnects >= 1 and client.reconnects >= 1


async def test_reconnection_backs_off_exponentially_up_to_a_cap(
    make_broker: Callable[..., Awaitable[AmqpBroker]], proxy: FaultProxy
) -> None:
    base, cap, outage = 0.05, 0.5, 3.0
    broker = await make_broker(
        proxy.url_for("amqp", "guest", "guest"), reconnect_wait=base, reconnect_wait_max=cap
    )
    proxy.down()  # every attempt is refused at once: only the backoff spaces them
    started = time.monotonic()
    await eventually(lambda: not broker.connected, timeout=5)
    await asyncio.sleep(outage)
    attempts = broker.reconnect_attempts
    proxy.pass_through()
    await eventually(lambda: broker.connected, timeout=5)
    elapsed = time.monotonic() - started
    # Doubling from `base` reaches the cap after `ramp` attempts; after that each wait is
    # between cap/2 and cap (jitter).
    ramp = math.ceil(math.log2(cap / base)) + 1
    assert elapsed / cap - 1 <= attempts <= ramp + elapsed / (cap / 2) + 1, (attempts, elapsed)


async def test_a_redelivery_after_a_lost_connection_counts_as_an_attempt(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
    proxy: FaultProxy,
    topology: Topology,
    unique: str,
) -> None:
    consumer = await make_broker(proxy.url_for("amqp", "guest", "guest"))
    publisher = await make_broker()
    event, group = f"crash_{unique}.happened", f"crash_{unique}.on_happened"
    topology.group(group)
    attempts: list[int] = []
    release = asyncio.Event()

    async def hold_first(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if len(attempts) == 1:
            await release.wait()  # the connection dies while this handler runs
        await delivery.ack()

    await consumer.subscribe_events(EventSubscription(event, group), hold_first, concurrency=1)
    await publisher.publish_event(event, b"x", idempotency_key=f"{unique}-1")
    await eventually(lambda: attempts == [1])
    proxy.down()
    await eventually(lambda: not consumer.connected, timeout=5)
    release.set()  # its ack goes nowhere: the broker has requeued the event
    proxy.pass_through()
    await eventually(lambda: attempts == [1, 2], timeout=10)


async def test_publishes_during_an_outage_fail_within_their_deadline(
    make_broker: Callable[..., Awaitable[AmqpBroker]], proxy: FaultProxy, unique: str
) -> None:
    broker = await make_broker(
        proxy.url_for("amqp", "guest", "guest"), publish_timeout=1.0, reconnect_wait=5.0
    )
    proxy.down()
    await eventually(lambda: not broker.connected, timeout=5)
    started = time.monotonic()
    with pytest.raises(ConnectionLost):
        await broker.send_request(f"svc_{unique}", b"x", correlation_id=1)
    assert time.monotonic() - started < 0.5  # a call fails at once
    with pytest.raises(ConnectionLost):
        await broker.publish_event(f"ev_{unique}.x", b"x", idempotency_key="k")
    assert 0.9 < time.monotonic() - started < 2.0  # an event waits for a reconnection, boundedly


async def test_a_publish_on_a_half_open_link_fails_within_its_deadline(
    make_broker: Callable[..., Awaitable[AmqpBroker]], proxy: FaultProxy, unique: str
) -> None:
    """aiormq #57: with the broker unreachable a publish could hang forever."""
    broker = await make_broker(proxy.url_for("amqp", "guest", "guest"), publish_timeout=1.0)
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(ConnectionLost):
        await broker.publish_event(f"ev_{unique}.x", b"x", idempotency_key="k")
    assert time.monotonic() - started < 1.5


async def test_connecting_to_a_silent_port_fails_within_the_connect_timeout(
    proxy: FaultProxy,
) -> None:
    proxy.blackhole()
    broker = AmqpBroker(proxy.url_for("amqp", "guest", "guest"), connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match="no answer"):
        await broker.connect()
    assert time.monotonic() - started < 1.5
    assert not broker.connected
    await broker.close()


async def test_a_half_open_link_is_detected_by_heartbeats(
    make_broker: Callable[..., Awaitable[AmqpBroker]], proxy: FaultProxy
) -> None:
    broker = await make_broker(proxy.url_for("amqp", "guest", "guest"), heartbeat=1)
    lost: list[ConnectionLost] = []
    broker.add_disconnect_callback(lost.append)
    # Only the broker's side goes silent: it still gets our heartbeats and keeps the link,
    # so detecting the silence is up to the client.
    proxy.blackhole("down")
    started = time.monotonic()
    # aiormq declares a link dead after 3 * (heartbeat + 1) s without a frame, checked
    # once per heartbeat.
    await eventually(lambda: bool(lost), timeout=10)
    assert 2 < time.monotonic() - started < 3 * (1 + 1) + 1 + 1
    assert "heartbeat" in str(lost[0])
    proxy.pass_through()
    await eventually(lambda: broker.connected, timeout=10)


# -- credentials and TLS --------------------------------------------------------------------------


def _exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


@pytest.mark.parametrize("where", ["closed port", "wrong password"])
async def test_the_password_never_appears_in_logs_or_errors(where: str) -> None:
    port = free_port() if where == "closed port" else 5672
    url = f"amqp://guest:{SENTINEL}@127.0.0.1:{port}/"
    with captured_logs() as lines:
        broker = broker_from_url(url, {"connect_timeout": 3})
        with pytest.raises(BrokerError) as raised:
            await broker.connect()
        await broker.close()
        with pytest.raises(BrokerError) as raised_by_runner:
            async with connect(url):
                pass
    texts = [repr(broker), broker.safe_url, *lines]
    texts += [_exception_text(raised.value), _exception_text(raised_by_runner.value)]
    assert lines, "nothing was logged: the check would prove nothing"
    assert not [text for text in texts if SENTINEL in text]
    assert "***" in repr(broker)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A throw-away CA and a server certificate for ``localhost`` only."""
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    days = ("-days", "1")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", *days, "-subj", "/CN=basidia-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=tmp_path)  # fmt: skip
    (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", *days, "-extfile", "ext.cnf", "-out", "server.pem",
             cwd=tmp_path)  # fmt: skip
    return tmp_path


@pytest.fixture
async def tls_port(certificates: Path) -> AsyncIterator[int]:
    """A TLS listener that forwards to the shared broker (RabbitMQ's TLS, as a client sees it)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    pumps: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", 5672)
        except OSError:
            writer.close()
            return
        for task in (
            asyncio.ensure_future(pump(reader, upstream_writer)),
            asyncio.ensure_future(pump(upstream_reader, writer)),
        ):
            pumps.add(task)
            task.add_done_callback(pumps.discard)

    server = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=context)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for task in list(pumps):
        task.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2)


async def test_amqps_verifies_the_server_certificate(
    make_broker: Callable[..., Awaitable[AmqpBroker]],
    certificates: Path,
    tls_port: int,
    unique: str,
) -> None:
    url = f"amqps://guest:guest@localhost:{tls_port}/"
    broker = await make_broker(url, tls_ca_file=str(certificates / "ca.pem"))
    replies: list[Frame] = []
    await broker.open_inbox(lambda body: replies.append(decode_frame(body)))
    await _echo_service(broker, f"tls_{unique}")
    await broker.send_request(f"tls_{unique}", _request(3), correlation_id=3)
    await eventually(lambda: len(replies) == 1)
    assert replies[0].kind == Kind.REPLY

    untrusted = AmqpBroker(url, connect_timeout=3)
    with pytest.raises(BrokerError, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusted.connect()
    wrong_host = AmqpBroker(
        f"amqps://guest:guest@127.0.0.1:{tls_port}/",
        connect_timeout=3,
        tls_ca_file=str(certificates / "ca.pem"),
    )
    with pytest.raises(BrokerError, match="CERTIFICATE_VERIFY_FAILED"):
        await wrong_host.connect()


def test_certificate_checks_cannot_be_switched_off() -> None:
    with pytest.raises(ConfigError, match="always verified"):
        AmqpBroker("amqps://guest:guest@localhost/?no_verify_ssl=1")
    with pytest.raises(ConfigError, match="amqps://"):
        AmqpBroker("amqp://guest:guest@localhost/", tls_ca_file="ca.pem")


def test_broker_options_come_from_the_config() -> None:
    broker = broker_from_url("amqps://u:p@rabbit.example:5671/vhost", {"heartbeat": 3})
    assert isinstance(broker, AmqpBroker)
    assert broker.safe_url == "amqps://u:***@rabbit.example:5671/vhost"
    with pytest.raises(TypeError):
        broker_from_url("amqp://localhost/", {"no_such_option": 1})


# -- the framework on RabbitMQ --------------------------------------------------------------------


async def test_examples_run_on_rabbitmq(amqp_url: str, unique: str) -> None:
    try:
        await exercise_examples(amqp_url, unique)
    finally:
        await delete_amqp(
            amqp_url, _group_queues("basidia", f"notification_{unique}.on_user_created")
        )


async def test_examples_run_on_aiormqs_public_api_alone(
    amqp_url: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the aiormq internals of the hot path (basidia/brokers/_amqp_fast.py), the
    adapter uses aiormq's public API: deliveries through its callbacks, publishes through
    basic_publish, and the examples behave the same."""
    monkeypatch.setattr("basidia.brokers.amqp.direct_deliveries", lambda channel: None)
    monkeypatch.setattr("basidia.brokers.amqp.publish_nowait", lambda *args, **kwargs: False)
    try:
        await exercise_examples(amqp_url, unique)
    finally:
        await delete_amqp(
            amqp_url, _group_queues("basidia", f"notification_{unique}.on_user_created")
        )

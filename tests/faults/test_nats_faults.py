"""Fault scenarios on NATS (docs/reliability.md F2 to F12, and nats.py#504).

Each test runs a throw-away nats-server (``nats_server``), sometimes behind a
``FaultProxy``, with short timers: ping every second, two outstanding pings,
acks within 2 s.  The scenarios themselves are in ``scenarios.py``, shared with
RabbitMQ; the nats.py#504 regressions are NATS's own here.  F12 keeps
docs/reliability.md's three-minute outage (``BASIDIA_F12_OUTAGE`` shortens it for a
quick local run).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from basidia import Service, ServiceRunner, connect, event_handler, rpc
from basidia.brokers import Delivery, EventSubscription
from basidia.brokers.nats import NatsBroker

from .ledger import Ledger
from .proxy import FaultProxy
from .scenarios import (
    BrokerKit,
    f1_f2_killed_and_restarted_under_load,
    f3_service_link_dropped_mid_handler,
    f4_caller_link_dropped_with_calls_in_flight,
    f5_no_instances_is_service_unavailable,
    f6_half_open_link,
    f7_links_cut_after_2_to_the_k_bytes,
    f8_killed_worker_events_are_all_redelivered,
    f9_poison_event_among_1000_good_ones,
    f10_server_paused,
    f11_sigterm_with_200_handlers_in_flight,
    f12_long_outage,
    f13_downstream_down_during_the_backoff,
    until,
)
from .servers import NatsServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PING = 1.0
MAX_PINGS = 2
ACK_WAIT = 2.0
FAST: dict[str, Any] = {
    "connect_timeout": 1.0,
    "ping_interval": PING,
    "max_outstanding_pings": MAX_PINGS,
    "reconnect_wait": 0.05,
    "reconnect_wait_max": 0.5,
    "publish_timeout": 2.0,
    "api_timeout": 2.0,
    "ack_wait": ACK_WAIT,
    "pull_expires": 4.0,
}


@pytest.fixture
def kit(nats_server: NatsServer) -> BrokerKit:
    return BrokerKit(
        url=nats_server.url,
        options=FAST,
        detection_bound=PING * MAX_PINGS + 1,
        redelivery_after=ACK_WAIT,  # JetStream redelivers what is not acked in time
    )


@pytest.fixture
async def proxy(nats_server: NatsServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", nats_server.port) as fault_proxy:
        yield fault_proxy


# -- F2 -----------------------------------------------------------------------------------------


@pytest.mark.long_fault
@pytest.mark.timeout(300)
async def test_f2_jetstream_killed_and_restarted_under_load(
    nats_server: NatsServer, kit: BrokerKit, ledger: Ledger
) -> None:
    await f1_f2_killed_and_restarted_under_load(kit, nats_server.kill, nats_server.start, ledger)


# -- F3 -----------------------------------------------------------------------------------------


async def test_f3_service_connection_dropped_mid_handler(kit: BrokerKit, proxy: FaultProxy) -> None:
    late = await f3_service_link_dropped_mid_handler(
        proxy, kit.broker(kit.via(proxy)), kit.broker()
    )
    print(f"late replies dropped: {late}")


# -- F4 -----------------------------------------------------------------------------------------


async def test_f4_caller_connection_dropped_with_calls_in_flight(
    nats_server: NatsServer, proxy: FaultProxy
) -> None:
    """Calls in flight fail with ConnectionLost at once; after reconnecting, late replies of
    the old calls never reach the new ones."""
    await f4_caller_link_dropped_with_calls_in_flight(
        proxy,
        NatsBroker(nats_server.url, **FAST),
        NatsBroker(proxy.url_for("nats"), **FAST),
        bound=PING * MAX_PINGS + 1,
    )


# -- F5 -----------------------------------------------------------------------------------------


async def test_f5_no_instances_is_service_unavailable_at_once_not_a_timeout(
    nats_server: NatsServer,
) -> None:
    await f5_no_instances_is_service_unavailable(
        NatsBroker(nats_server.url, **FAST), NatsBroker(nats_server.url, **FAST)
    )


# -- F6 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_f6_half_open_link_is_detected_and_recovers(
    kit: BrokerKit, proxy: FaultProxy, direction: Any
) -> None:
    """Declared dead within ping x max outstanding pings + 1 s, whichever way it is cut."""
    detected = await f6_half_open_link(
        proxy, kit.broker(), kit.broker(kit.via(proxy)), direction, kit.detection_bound
    )
    print(f"blackholed {direction}: noticed after {detected:.2f} s")


# -- F7, F10 ------------------------------------------------------------------------------------


async def test_f7_links_cut_after_2_to_the_k_bytes(kit: BrokerKit, proxy: FaultProxy) -> None:
    url = kit.via(proxy)
    await f7_links_cut_after_2_to_the_k_bytes(proxy, kit.broker(url), kit.broker(url))


@pytest.mark.long_fault
async def test_f10_server_paused_for_20_s(nats_server: NatsServer, kit: BrokerKit) -> None:
    await f10_server_paused(nats_server.pause, nats_server.resume, kit.broker(), kit.broker())


# -- F8, F9, F11 (JetStream events) -------------------------------------------------------------


async def test_f8_killed_worker_events_are_all_redelivered_as_second_attempts(
    kit: BrokerKit, ledger: Ledger
) -> None:
    await f8_killed_worker_events_are_all_redelivered(kit, ledger)


async def test_f9_poison_event_among_1000_good_ones_is_dead_lettered_with_its_reason(
    kit: BrokerKit,
) -> None:
    await f9_poison_event_among_1000_good_ones(kit)


async def test_f11_sigterm_with_200_handlers_in_flight(kit: BrokerKit) -> None:
    await f11_sigterm_with_200_handlers_in_flight(kit)


# -- nats.py#504 --------------------------------------------------------------------------------


async def test_pull_consumers_deliver_again_after_a_server_restart(
    nats_server: NatsServer,
) -> None:
    """Regression for nats-io/nats.py#504: pull subscriptions stayed silent after a reboot."""
    consumer = NatsBroker(nats_server.url, **FAST)
    publisher = NatsBroker(nats_server.url, **FAST)
    await consumer.connect()
    await publisher.connect()
    seen: list[tuple[str, bytes]] = []

    def collect(label: str) -> Any:
        async def handle(delivery: Delivery) -> None:
            seen.append((label, delivery.body))
            await delivery.ack()

        return handle

    try:
        await consumer.subscribe_events(
            EventSubscription("reboot.test", "svc.durable"), collect("durable"), concurrency=4
        )
        await consumer.subscribe_events(
            EventSubscription("reboot.test", "svc.bcast", broadcast=True),
            collect("broadcast"),
            concurrency=4,
        )
        await publisher.publish_event("reboot.test", b"before", idempotency_key="1")
        await until(lambda: len(seen) == 2, 10, "delivery before the restart")
        nats_server.kill()
        await until(lambda: not consumer.connected, 5, "noticing the crash")
        await nats_server.start()
        await until(lambda: consumer.connected and publisher.connected, 10, "reconnection")
        await publisher.publish_event("reboot.test", b"after", idempotency_key="2")
        await until(lambda: len(seen) == 4, 10, "delivery after the restart")
        assert sorted(seen) == [
            ("broadcast", b"after"),
            ("broadcast", b"before"),
            ("durable", b"after"),
            ("durable", b"before"),
        ]
    finally:
        await consumer.close()
        await publisher.close()


async def test_stopping_while_the_server_is_down_does_not_hang(nats_server: NatsServer) -> None:
    class Everything(Service):
        name = "everything"

        @rpc
        async def ping(self) -> None: ...

        @event_handler("down.durable")
        async def on_durable(self, data: int) -> None: ...

        @event_handler("down.broadcast", broadcast=True)
        async def on_broadcast(self, data: int) -> None: ...

        @event_handler("down.core", durable=False)
        async def on_core(self, data: int) -> None: ...

    service_broker = NatsBroker(nats_server.url, **FAST)
    runner = ServiceRunner([Everything], broker=service_broker)
    await runner.start()
    cluster = await connect(NatsBroker(nats_server.url, **FAST)).start()
    nats_server.kill()
    await until(lambda: not service_broker.connected, 5, "noticing the crash")
    started = time.monotonic()
    await runner.stop()
    await cluster.close()
    assert time.monotonic() - started < 2.0


# -- F12 ----------------------------------------------------------------------------------------


@pytest.mark.long_fault
@pytest.mark.timeout(300)
async def test_f12_long_outage_then_every_subscription_delivers_again(
    nats_server: NatsServer, kit: BrokerKit
) -> None:
    """Publishes wait in a 64 kB outbound buffer, and fail at once once it is full."""
    backoff: dict[str, Any] = {"reconnect_wait": 0.05, "reconnect_wait_max": 1.0}
    await f12_long_outage(
        kit.broker(**backoff),
        kit.broker(**backoff, outbound_buffer=64 * 1024),
        nats_server.kill,
        nats_server.start,
        buffer_full="outbound buffer",
        **backoff,
    )


# -- F13 ------------------------------------------------------------------------------------------


@pytest.mark.long_fault
@pytest.mark.timeout(180)
async def test_f13_a_downstream_down_for_5_s_costs_no_event_and_a_restart_loses_no_retry(
    kit: BrokerKit,
) -> None:
    figures = await f13_downstream_down_during_the_backoff(kit)
    print("F13:", figures)  # shown with -s: the report's figures
    assert figures["pending_at_restart"] > 0

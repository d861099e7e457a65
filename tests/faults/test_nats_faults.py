"""Fault scenarios on NATS (RELIABILITY.md F2, F4, F5, F6, F7, F10, F12, and nats.py#504).

Each test runs a throw-away nats-server (``nats_server``), sometimes behind a
``FaultProxy``, with short timers: ping every second, two outstanding pings,
acks within 2 s.  F12 keeps RELIABILITY.md's three-minute outage
(``BASIDIA_F12_OUTAGE`` shortens it for a quick local run); it also checks that
the reconnection attempts stay within the capped backoff's bound.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest

from basidia import (
    RpcTimeout,
    Service,
    ServiceRunner,
    ServiceUnavailable,
    connect,
    current_context,
    event_handler,
    rpc,
)
from basidia.brokers import Delivery, EventSubscription
from basidia.brokers.nats import NatsBroker
from basidia.errors import BrokerError, ConnectionLost

from .ledger import Ledger, publish_until_confirmed
from .proxy import FaultProxy
from .scenarios import f7_links_cut_after_2_to_the_k_bytes, f10_server_paused, until
from .servers import NatsServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PING = 1.0
MAX_PINGS = 2
FAST: dict[str, Any] = {
    "connect_timeout": 1.0,
    "ping_interval": PING,
    "max_outstanding_pings": MAX_PINGS,
    "reconnect_wait": 0.05,
    "reconnect_wait_max": 0.5,
    "publish_timeout": 2.0,
    "api_timeout": 2.0,
    "ack_wait": 2.0,
    "pull_expires": 4.0,
}


@pytest.fixture
async def proxy(nats_server: NatsServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", nats_server.port) as fault_proxy:
        yield fault_proxy


def slow_service(delay: float) -> type[Service]:
    class Slow(Service):
        name = "slow"

        @rpc
        async def work(self, n: int) -> int:
            await asyncio.sleep(delay)
            return n

    return Slow


# -- F2 -----------------------------------------------------------------------------------------


async def test_f2_jetstream_killed_and_restarted_under_load(
    nats_server: NatsServer, ledger: Ledger
) -> None:
    """10,000 events, the server SIGKILLed at 30% and restarted: nothing confirmed is lost,
    no side effect happens twice, and the subscription delivers again."""
    total = 10_000
    applied: set[str] = set()
    restarted_at = math.inf
    resumed_at = math.inf

    class Sink(Service):
        name = "sink"

        @event_handler("orders.placed")
        async def on_placed(self, order: dict[str, str]) -> None:
            nonlocal resumed_at
            ledger.record_received(order["id"])
            if resumed_at == math.inf and time.monotonic() > restarted_at:
                resumed_at = time.monotonic()
            ctx = current_context()
            key = ctx.idempotency_key if ctx else None
            assert key is not None
            if key not in applied:  # the idempotency store of a real handler
                applied.add(key)
                ledger.record_side_effect(key)

    service_broker = NatsBroker(nats_server.url, **FAST)
    client = NatsBroker(nats_server.url, **FAST)
    runner = ServiceRunner([Sink], broker=service_broker)
    await runner.start()
    cluster = await connect(client).start()
    try:
        ids = iter(range(total))
        published = 0

        async def publisher() -> None:
            nonlocal published
            for number in ids:
                message_id = f"order-{number}"
                await publish_until_confirmed(
                    ledger,
                    message_id,
                    partial(
                        cluster.dispatch,
                        "orders.placed",
                        {"id": message_id},
                        idempotency_key=message_id,
                    ),
                    timeout=FAST["publish_timeout"] + 2,
                    attempts=20,
                    retry_on=(BrokerError, ConnectionLost),
                )
                published += 1

        async def crash() -> None:
            nonlocal restarted_at
            await until(lambda: published >= total * 0.3, 60, "30% published")
            nats_server.kill()
            await asyncio.sleep(1.0)
            await nats_server.start()
            restarted_at = time.monotonic()

        await asyncio.gather(crash(), *(publisher() for _ in range(32)))
        assert await ledger.wait_delivered(timeout=30), str(ledger.report())
        assert service_broker.reconnects == client.reconnects == 1  # the crash did happen
        assert resumed_at - restarted_at <= 10, "consumers resumed late"
        # Every subscription delivers again: a probe after the restart arrives.
        await cluster.dispatch("orders.placed", {"id": "probe"}, idempotency_key="probe")
        await until(lambda: "probe" in applied, 10, "the probe event")
    finally:
        await cluster.close()
        await runner.stop()
    report = ledger.report()
    print(report)  # the Jepsen-style summary, for the CI log
    assert report.confirmed == total, str(report)
    ledger.record_sent("probe")
    ledger.record_confirmed("probe")
    ledger.assert_clean()


# -- F4 -----------------------------------------------------------------------------------------


async def test_f4_caller_connection_dropped_with_calls_in_flight(
    nats_server: NatsServer, proxy: FaultProxy
) -> None:
    """Calls in flight fail with ConnectionLost at once; after reconnecting, late replies of
    the old calls never reach the new ones."""
    async with ServiceRunner([slow_service(1.5)], broker=NatsBroker(nats_server.url, **FAST)):
        client = NatsBroker(proxy.url_for("nats"), **FAST)
        async with connect(client, timeout=10) as cluster:
            work = cluster.rpc.slow.work
            assert await work(-1) == -1
            in_flight = [asyncio.ensure_future(work(n)) for n in range(20)]
            await asyncio.sleep(0.3)
            dropped = time.monotonic()
            proxy.down()
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
            assert time.monotonic() - dropped < PING * MAX_PINGS + 1
            assert all(isinstance(outcome, ConnectionLost) for outcome in outcomes), outcomes
            proxy.pass_through()
            await until(lambda: client.connected, 10, "reconnection")
            # The old calls' replies come back to the same inbox while these wait.
            fresh = await asyncio.gather(*(work(n) for n in range(100, 120)))
            assert fresh == list(range(100, 120))


# -- F5 -----------------------------------------------------------------------------------------


async def test_f5_no_instances_is_service_unavailable_at_once_not_a_timeout(
    nats_server: NatsServer,
) -> None:
    runner = ServiceRunner([slow_service(1.0)], broker=NatsBroker(nats_server.url, **FAST))
    async with connect(NatsBroker(nats_server.url, **FAST), timeout=5) as cluster:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await cluster.rpc.never_started.anything()
        assert time.monotonic() - started < 1.0
        await runner.start()
        with pytest.raises(RpcTimeout):  # a slow instance is a timeout, and says so
            await cluster.rpc.slow.work.with_timeout(0.2)(1)
        await runner.stop()
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await cluster.rpc.slow.work(1)
        assert time.monotonic() - started < 1.0


# -- F6 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_f6_half_open_link_is_detected_and_recovers(
    nats_server: NatsServer, proxy: FaultProxy, direction: str
) -> None:
    """A blackholed link is declared dead within ping x max outstanding pings + 1 s: calls
    and event publishes in flight fail instead of hanging; then the link recovers."""
    bound = PING * MAX_PINGS + 1
    async with ServiceRunner([slow_service(0.5)], broker=NatsBroker(nats_server.url, **FAST)):
        client = NatsBroker(proxy.url_for("nats"), **FAST)
        async with connect(client, timeout=30) as cluster:
            work = cluster.rpc.slow.work
            assert await work(0) == 0
            await cluster.dispatch("f6.warmup", {})  # the streams exist from here on
            proxy.blackhole(direction)  # type: ignore[arg-type]
            holed = time.monotonic()
            call = asyncio.ensure_future(work(1))
            publish = asyncio.ensure_future(cluster.dispatch("f6.during", {}))
            with pytest.raises(ConnectionLost):
                await call
            detected = time.monotonic() - holed
            assert detected < bound, f"detected after {detected:.2f} s, bound {bound} s"
            with pytest.raises(BrokerError):
                await asyncio.wait_for(publish, FAST["publish_timeout"] + 1)
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - holed)))
            proxy.pass_through()
            await until(lambda: client.connected, 10, "reconnection")
            assert await work(2) == 2


# -- F7, F10 (tests/faults/scenarios.py) -------------------------------------------------------


async def test_f7_links_cut_after_2_to_the_k_bytes(proxy: FaultProxy) -> None:
    url = proxy.url_for("nats")
    await f7_links_cut_after_2_to_the_k_bytes(
        proxy, NatsBroker(url, **FAST), NatsBroker(url, **FAST)
    )


async def test_f10_server_paused_for_20_s(nats_server: NatsServer) -> None:
    url = nats_server.url
    await f10_server_paused(
        nats_server.pause, nats_server.resume, NatsBroker(url, **FAST), NatsBroker(url, **FAST)
    )


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


@pytest.mark.timeout(300)
async def test_f12_long_outage_then_every_subscription_delivers_again(
    nats_server: NatsServer,
) -> None:
    outage = float(os.environ.get("BASIDIA_F12_OUTAGE", "180"))
    base, cap = 0.05, 1.0
    options = {**FAST, "reconnect_wait": base, "reconnect_wait_max": cap}
    received: dict[str, list[Any]] = {"durable": [], "broadcast": [], "core": []}

    class Probe(Service):
        name = "probe"

        @rpc
        async def ping(self, n: int) -> int:
            return n

        @event_handler("f12.durable")
        async def on_durable(self, data: int) -> None:
            received["durable"].append(data)

        @event_handler("f12.broadcast", broadcast=True)
        async def on_broadcast(self, data: int) -> None:
            received["broadcast"].append(data)

        @event_handler("f12.core", durable=False)
        async def on_core(self, data: int) -> None:
            received["core"].append(data)

    async def probe_everything(round_: int) -> float:
        """One probe per subscription; the seconds until all of them were handled."""
        started = time.monotonic()
        assert await cluster.rpc.probe.ping(round_) == round_
        for kind in received:
            await cluster.dispatch(f"f12.{kind}", round_)
        await until(lambda: all(round_ in got for got in received.values()), 10, "probes")
        return time.monotonic() - started

    service_broker = NatsBroker(nats_server.url, **options)
    client = NatsBroker(nats_server.url, **{**options, "outbound_buffer": 64 * 1024})
    async with ServiceRunner([Probe], broker=service_broker), connect(client) as cluster:
        await probe_everything(1)
        attempts_before = client.reconnect_attempts
        nats_server.kill()
        down = time.monotonic()
        await until(lambda: not client.connected, 5, "noticing the outage")

        # While down: calls fail fast, and publishes fill a bounded buffer, then fail at once.
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            await cluster.rpc.probe.ping(0)
        assert time.monotonic() - started < 0.5
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(cluster.dispatch("f12.durable", "x" * 16_000) for _ in range(12)),
                return_exceptions=True,
            ),
            FAST["publish_timeout"] + 2,
        )
        assert all(isinstance(outcome, BrokerError) for outcome in outcomes), outcomes
        assert any("outbound buffer" in str(outcome) for outcome in outcomes)

        await asyncio.sleep(max(0.0, outage - (time.monotonic() - down)))
        await nats_server.start()
        outage_seconds = time.monotonic() - down
        resumed = await until(
            lambda: client.connected and service_broker.connected, 10, "reconnection"
        )
        # Capped exponential backoff with jitter: between (cap/2 and cap) after the ramp.
        ramp = math.ceil(math.log2(cap / base)) + 1
        attempts = client.reconnect_attempts - attempts_before
        assert outage_seconds / cap - 1 <= attempts <= ramp + outage_seconds / (cap / 2) + 2, (
            attempts,
            outage_seconds,
        )
        handled_within = await probe_everything(2)
        assert resumed + handled_within <= 10

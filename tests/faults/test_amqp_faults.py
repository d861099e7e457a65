"""Fault scenarios on RabbitMQ (docs/reliability.md F1 and F3 to F12; B3's password).

Every test runs against a throw-away RabbitMQ node on an ephemeral loopback port (one per
module, restarted after a test that killed it), with short timers: heartbeat 1 s,
reconnection backoff 0.05 s capped at 0.5 s, publish deadline 2 s.  The node's ``guest``
password is a sentinel, and every log line of this process and of the worker processes the
tests start is checked for it afterwards (B3).  The scenarios themselves are in
``scenarios.py``, shared with NATS; F8's requests are RabbitMQ's own here.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import pytest
import pytest_asyncio

from basidia import Service, ServiceRunner, connect, rpc
from basidia.brokers.amqp import AmqpBroker

from ..logs import captured_logs
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
from .servers import RabbitServer

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(240)]

SENTINEL = "SENTINEL-PASSWORD-1234"
HEARTBEAT = 1
FAST: dict[str, Any] = {
    "connect_timeout": 3.0,
    "heartbeat": HEARTBEAT,
    "operation_timeout": 3.0,
    "publish_timeout": 2.0,
    "reconnect_wait": 0.05,
    "reconnect_wait_max": 0.5,
}
# aiormq declares a silent link dead after 3 * (heartbeat + 1) s, checked once per heartbeat.
HEARTBEAT_GRACE = 3 * (HEARTBEAT + 1) + HEARTBEAT


class SentinelRabbit(RabbitServer):
    """A throw-away node whose ``guest`` password is the sentinel."""

    @property
    def url(self) -> str:
        return f"amqp://guest:{SENTINEL}@127.0.0.1:{self.port}/"

    def _write_files(self) -> None:
        super()._write_files()
        config = self.data_dir / "rabbitmq.conf"
        config.write_text(config.read_text() + f"default_pass = {SENTINEL}\n")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def _module_rabbit() -> AsyncIterator[SentinelRabbit]:
    if not os.access(RabbitServer.BINARY, os.X_OK):
        if os.environ.get("BASIDIA_REQUIRE_BROKERS", "") not in ("", "0"):
            pytest.fail(f"{RabbitServer.BINARY} is missing (BASIDIA_REQUIRE_BROKERS is set)")
        pytest.skip(f"{RabbitServer.BINARY} is missing: apt-get install rabbitmq-server")
    async with SentinelRabbit() as server:
        yield server


@pytest.fixture
async def rabbit(_module_rabbit: SentinelRabbit) -> AsyncIterator[SentinelRabbit]:
    """The module's node, running again after the test (a test may kill it)."""
    yield _module_rabbit
    _module_rabbit.resume()
    if not _module_rabbit.running:
        await _module_rabbit.start()


@pytest.fixture(autouse=True)
def no_password_in_logs() -> Iterator[list[str]]:
    """B3: every record at DEBUG, tracebacks included, must be free of the password."""
    with captured_logs() as lines:
        yield lines
    assert lines, "nothing was logged: the password check would prove nothing"
    leaks = [line for line in lines if SENTINEL in line]
    assert not leaks, leaks[:3]


def broker(url: str, **options: Any) -> AmqpBroker:
    return AmqpBroker(url, **{**FAST, **options})


@pytest.fixture
def kit(rabbit: SentinelRabbit) -> BrokerKit:
    return BrokerKit(
        url=rabbit.url,
        options=FAST,
        detection_bound=HEARTBEAT_GRACE + 1,
        redelivery_after=0.0,  # a closed channel's unacked messages go back at once
        secret=SENTINEL,
    )


# -- F1 -------------------------------------------------------------------------------------------


@pytest.mark.long_fault
@pytest.mark.timeout(300)
async def test_f1_rabbitmq_killed_and_restarted_under_a_load_of_10k_events(
    rabbit: SentinelRabbit, kit: BrokerKit, ledger: Ledger
) -> None:
    await f1_f2_killed_and_restarted_under_load(kit, rabbit.kill, rabbit.start, ledger)


# -- F3 -------------------------------------------------------------------------------------------


async def test_f3_service_connection_dropped_mid_handler(kit: BrokerKit) -> None:
    async with FaultProxy("127.0.0.1", kit.port) as proxy:
        late = await f3_service_link_dropped_mid_handler(
            proxy, kit.broker(kit.via(proxy)), kit.broker()
        )
    print(f"late replies dropped: {late}")


# -- F4 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["down", "blackhole"])
async def test_f4_caller_connection_dropped_with_calls_in_flight(
    rabbit: SentinelRabbit, fault: str
) -> None:
    """Calls in flight fail with ConnectionLost within the heartbeat grace + 1 s; after the
    reconnection, replies to the old calls never reach the new ones."""
    async with FaultProxy("127.0.0.1", rabbit.port) as proxy:
        took = await f4_caller_link_dropped_with_calls_in_flight(
            proxy,
            broker(rabbit.url),
            broker(proxy.url_for("amqp", "guest", SENTINEL)),
            bound=HEARTBEAT_GRACE + 1,
            # Blackholed down, the broker still hears us: only heartbeats tell.
            cut=proxy.down if fault == "down" else partial(proxy.blackhole, "down"),
            connect_timeout=20,
        )
    if fault == "down":
        assert took < 1.0


# -- F5 -------------------------------------------------------------------------------------------


async def test_f5_no_instances_is_service_unavailable_at_once_not_a_timeout(
    rabbit: SentinelRabbit,
) -> None:
    await f5_no_instances_is_service_unavailable(
        broker(rabbit.url), broker(rabbit.url), name="f5_slow"
    )


# -- F6 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_f6_half_open_link_is_detected_and_recovers(kit: BrokerKit, direction: Any) -> None:
    """Blackholed up, the node misses our heartbeats and closes the link; blackholed down,
    aiormq misses the node's: either way within the heartbeat grace + 1 s."""
    async with FaultProxy("127.0.0.1", kit.port) as proxy:
        detected = await f6_half_open_link(
            proxy, kit.broker(), kit.broker(kit.via(proxy)), direction, kit.detection_bound
        )
    print(f"blackholed {direction}: noticed after {detected:.2f} s")


# -- F7, F10 --------------------------------------------------------------------------------------


async def test_f7_links_cut_after_2_to_the_k_bytes(kit: BrokerKit) -> None:
    async with FaultProxy("127.0.0.1", kit.port) as proxy:
        url = kit.via(proxy)
        await f7_links_cut_after_2_to_the_k_bytes(proxy, kit.broker(url), kit.broker(url))


@pytest.mark.long_fault
async def test_f10_broker_paused_for_20_s(rabbit: SentinelRabbit, kit: BrokerKit) -> None:
    await f10_server_paused(rabbit.pause, rabbit.resume, kit.broker(), kit.broker())


# -- F8 -------------------------------------------------------------------------------------------


async def test_f8_killed_worker_events_are_all_redelivered_as_second_attempts(
    kit: BrokerKit, ledger: Ledger
) -> None:
    await f8_killed_worker_events_are_all_redelivered(kit, ledger)


async def test_f8_killed_workers_requests_are_answered_by_another_instance(
    kit: BrokerKit,
) -> None:
    """Requests held by a SIGKILLed instance go to the surviving one; callers get results.
    (RabbitMQ only: NATS requests are core NATS, at most once.)"""

    class Survivor(Service):
        name = "f8_rpc"

        @rpc
        async def work(self, n: int, seconds: float) -> int:
            return n

    async with kit.worker("f8_rpc", workers=5) as worker:
        survivor = ServiceRunner([Survivor], broker=kit.broker())
        async with connect(kit.broker(), timeout=30) as cluster:
            # The survivor starts once the worker holds every call: nothing for it yet.
            calls = [asyncio.ensure_future(cluster.rpc.f8_rpc.work(n, 60)) for n in range(5)]
            await until(lambda: len(worker.started) == 5, 20, "the worker holds every call")
            await survivor.start()
            try:
                worker.signal(signal.SIGKILL)
                await worker.wait(10)
                results = await asyncio.wait_for(asyncio.gather(*calls), 20)
            finally:
                await survivor.stop()
    assert sorted(results) == list(range(5))


# -- F9, F11 --------------------------------------------------------------------------------------


async def test_f9_poison_event_among_1000_good_ones_is_dead_lettered_with_its_reason(
    kit: BrokerKit,
) -> None:
    await f9_poison_event_among_1000_good_ones(kit)


async def test_f11_sigterm_with_200_handlers_in_flight(kit: BrokerKit) -> None:
    await f11_sigterm_with_200_handlers_in_flight(kit)


# -- F12 ------------------------------------------------------------------------------------------


@pytest.mark.long_fault
@pytest.mark.timeout(360)
async def test_f12_long_outage_then_every_subscription_delivers_again(
    rabbit: SentinelRabbit, kit: BrokerKit
) -> None:
    """RabbitMQ holds no publish while down: each waits for the connection until its
    publish timeout, then fails (nothing to bound but the callers' own concurrency)."""
    backoff: dict[str, Any] = {"reconnect_wait": 0.05, "reconnect_wait_max": 1.0}
    await f12_long_outage(
        kit.broker(**backoff),
        kit.broker(**backoff),
        rabbit.kill,
        rabbit.start,
        buffer_full=None,
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

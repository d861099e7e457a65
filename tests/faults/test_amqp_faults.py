"""Fault scenarios on RabbitMQ (RELIABILITY.md F1, F4, F5, F7, F8, F9, F10, F11; B3's password).

Every test runs against a throw-away RabbitMQ node on an ephemeral loopback port (one per
module, restarted after a test that killed it), with short timers: heartbeat 1 s,
reconnection backoff 0.05 s capped at 0.5 s, publish deadline 2 s.  The node's ``guest``
password is a sentinel, and every log line of this process and of the worker processes the
tests start is checked for it afterwards (B3).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiormq
import msgspec
import pytest
import pytest_asyncio

from basidia import (
    RpcError,
    RpcTimeout,
    Service,
    ServiceRunner,
    ServiceUnavailable,
    connect,
    current_context,
    event_handler,
    rpc,
)
from basidia._speedups import decode_frame
from basidia.brokers import Delivery, EventSubscription
from basidia.brokers.amqp import AmqpBroker
from basidia.errors import BrokerError, ConnectionLost

from ..logs import captured_logs
from .ledger import Ledger, publish_until_confirmed
from .proxy import FaultProxy
from .scenarios import f7_links_cut_after_2_to_the_k_bytes, f10_server_paused, until
from .servers import RabbitServer

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(240)]

SENTINEL = "SENTINEL-PASSWORD-1234"
HEARTBEAT = 1
CALL_TIMEOUT = 2.0
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
ROOT = Path(__file__).resolve().parents[2]


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


async def _dead_letters(url: str, queue: str) -> list[aiormq.abc.DeliveredMessage]:
    """Everything in ``queue``, taken (and acked) with basic.get."""
    connection = await asyncio.wait_for(aiormq.connect(url), 10)
    taken = []
    try:
        channel = await connection.channel(timeout=5)
        while True:
            got = await channel.basic_get(queue, timeout=5)
            if not isinstance(got.delivery, aiormq.spec.Basic.GetOk):
                return taken
            taken.append(got)
            await channel.basic_ack(got.delivery_tag or 0)
    finally:
        await connection.close(timeout=5)


# -- worker processes -----------------------------------------------------------------------------

_WORKER = """
import asyncio, sys
from basidia import Service, ServiceRunner, event_handler, rpc
from basidia.brokers.amqp import AmqpBroker

url, name, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
options = {options!r}

class Worker(Service):
    max_workers = {workers}

    @event_handler("{event}")
    async def on_work(self, job: dict) -> None:
        print("start", job["id"], flush=True)
        await asyncio.sleep(job["seconds"])
        print("done", job["id"], flush=True)

    @rpc
    async def work(self, n: int, seconds: float) -> int:
        print("start", n, flush=True)
        await asyncio.sleep(seconds)
        print("done", n, flush=True)
        return n

Worker.name = name
runner = ServiceRunner([Worker], broker=AmqpBroker(url, **options),
                       config={{"shutdown_grace": grace, "log_level": "DEBUG"}})

async def main() -> None:
    task = asyncio.ensure_future(runner.run())
    while not runner.broker.connected or any(
        c.state.value != "RUNNING" for c in runner.containers.values()
    ):
        await asyncio.sleep(0.02)
    print("running", flush=True)
    await task
    print("exited", flush=True)

import logging
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
asyncio.run(main())
"""


class WorkerProcess:
    """A service in a process of its own, reporting ``start <id>`` and ``done <id>`` lines."""

    def __init__(self, url: str, name: str, event: str, workers: int, grace: float) -> None:
        self._args = (url, name, str(grace))
        self._script = _WORKER.format(options=FAST, workers=workers, event=event)
        self.process: asyncio.subprocess.Process | None = None
        self.started: list[str] = []
        self.done: list[str] = []
        self.stderr = b""
        self.running = asyncio.Event()
        self.exited = False
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", textwrap.dedent(self._script), *self._args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        self._reader = asyncio.ensure_future(self._read())
        await asyncio.wait_for(self.running.wait(), 30)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            word, _, value = line.decode().strip().partition(" ")
            if word == "running":
                self.running.set()
            elif word == "start":
                self.started.append(value)
            elif word == "done":
                self.done.append(value)
            elif word == "exited":
                self.exited = True

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        """Wait for the exit; return the code.  Collects stderr for the password check."""
        assert self.process is not None and self.process.stderr is not None
        stderr = asyncio.ensure_future(self.process.stderr.read())
        code = await asyncio.wait_for(self.process.wait(), timeout)
        self.stderr = await stderr
        if self._reader is not None:
            await self._reader
        return code

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.wait(10)


@contextlib.asynccontextmanager
async def worker_process(
    url: str, name: str, event: str = "none", workers: int = 10, grace: float = 5.0
) -> AsyncIterator[WorkerProcess]:
    worker = WorkerProcess(url, name, event, workers, grace)
    try:
        await worker.start()
        yield worker
    finally:
        await worker.close()
        assert SENTINEL.encode() not in worker.stderr  # B3 in the worker's log too


# -- F1 -------------------------------------------------------------------------------------------


async def test_f1_rabbitmq_killed_and_restarted_under_a_load_of_10k_events(
    rabbit: SentinelRabbit, ledger: Ledger
) -> None:
    """10,000 events, RabbitMQ SIGKILLed at 30 % and restarted 2 s later: nothing confirmed
    is lost, no side effect happens twice, no publish hangs, consumers resume within 10 s."""
    total = 10_000
    applied: set[str] = set()
    handled_at: list[float] = []

    class Sink(Service):
        name = "f1_sink"
        max_workers = 20

        @event_handler("f1.placed")
        async def on_placed(self, order: dict[str, str]) -> None:
            ledger.record_received(order["id"])
            handled_at.append(time.monotonic())
            ctx = current_context()
            key = ctx.idempotency_key if ctx else None
            assert key is not None
            if key not in applied:  # the idempotency store of a real handler
                applied.add(key)
                ledger.record_side_effect(key)

        @rpc
        async def echo(self, n: int) -> int:
            return n

    # Two instances compete for the group's queue, as two processes would.
    first = ServiceRunner([Sink], broker=broker(rabbit.url))
    second = ServiceRunner([Sink], broker=broker(rabbit.url))
    await first.start()
    await second.start()
    cluster = await connect(broker(rabbit.url), timeout=CALL_TIMEOUT).start()
    back_at = 0.0
    calls: Counter[str] = Counter()
    try:
        ids = iter(range(total))
        published = 0
        publish_errors = 0

        async def publisher() -> None:
            nonlocal published, publish_errors
            for number in ids:
                message_id = f"order-{number}"
                publish_errors += await publish_until_confirmed(
                    ledger,
                    message_id,
                    partial(
                        cluster.dispatch,
                        "f1.placed",
                        {"id": message_id},
                        idempotency_key=message_id,
                    ),
                    timeout=FAST["publish_timeout"] + 2,
                    attempts=50,
                    retry_on=(BrokerError,),
                )
                published += 1

        async def crash() -> None:
            nonlocal back_at
            await until(lambda: published >= total * 0.3, 120, "30% published")
            rabbit.kill()
            await asyncio.sleep(2.0)
            await rabbit.start()
            back_at = time.monotonic()

        async def caller() -> None:
            # Calls all through: each ends in a result or a typed error, none hangs.
            for number in itertools.count():
                if published >= total:
                    return
                try:
                    call = cluster.rpc.f1_sink.echo(number)
                    result = await ledger.guard(call, CALL_TIMEOUT + 2, f"call {number}")
                    calls["ok" if result == number else "wrong"] += 1
                except (RpcError, BrokerError) as exc:
                    calls[type(exc).__name__] += 1
                    await asyncio.sleep(0.1)

        await asyncio.gather(crash(), caller(), *(publisher() for _ in range(32)))
        assert await ledger.wait_delivered(timeout=60), str(ledger.report())
        resumed = min(at for at in handled_at if at > back_at) - back_at
        print(f"consumers resumed {resumed:.2f} s after the broker; {publish_errors} "
              f"publish attempts raised and were retried; calls: {dict(calls)}")  # fmt: skip
        assert calls["ok"] > 0 and calls["wrong"] == 0, calls
        assert resumed <= 10, f"consumers resumed {resumed:.1f} s after the broker"
        await cluster.dispatch("f1.placed", {"id": "probe"}, idempotency_key="probe")
        await until(lambda: "probe" in applied, 10, "the probe event")
    finally:
        await cluster.close()
        await first.stop()
        await second.stop()
    report = ledger.report()
    print(report)  # the Jepsen-style summary, for the CI log
    assert report.confirmed == total, str(report)
    ledger.record_sent("probe")
    ledger.record_confirmed("probe")
    ledger.assert_clean()


# -- F4 -------------------------------------------------------------------------------------------


def slow_service(delay: float, name: str = "slow") -> type[Service]:
    class Slow(Service):
        @rpc
        async def work(self, n: int) -> int:
            await asyncio.sleep(delay)
            return n

    Slow.name = name
    return Slow


@pytest.mark.parametrize("fault", ["down", "blackhole"])
async def test_f4_caller_connection_dropped_with_calls_in_flight(
    rabbit: SentinelRabbit, fault: str
) -> None:
    """Calls in flight fail with ConnectionLost within the heartbeat grace + 1 s; after the
    reconnection, replies to the old calls never reach the new ones."""
    async with (
        ServiceRunner([slow_service(1.5)], broker=broker(rabbit.url)),
        FaultProxy("127.0.0.1", rabbit.port) as proxy,
    ):
        client = broker(proxy.url_for("amqp", "guest", SENTINEL))
        async with connect(client, timeout=20) as cluster:
            work = cluster.rpc.slow.work
            assert await work(-1) == -1
            in_flight = [asyncio.ensure_future(work(n)) for n in range(20)]
            await asyncio.sleep(0.3)
            dropped = time.monotonic()
            if fault == "down":
                proxy.down()
            else:
                proxy.blackhole("down")  # the broker still hears us: only heartbeats tell
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
            took = time.monotonic() - dropped
            assert took < HEARTBEAT_GRACE + 1, f"failed after {took:.2f} s"
            if fault == "down":
                assert took < 1.0
            assert all(isinstance(outcome, ConnectionLost) for outcome in outcomes), outcomes
            proxy.pass_through()
            await until(lambda: client.connected, 10, "reconnection")
            fresh = await asyncio.gather(*(work(n) for n in range(100, 120)))
            assert fresh == list(range(100, 120))


# -- F5 -------------------------------------------------------------------------------------------


async def test_f5_no_instances_is_service_unavailable_at_once_not_a_timeout(
    rabbit: SentinelRabbit,
) -> None:
    runner = ServiceRunner([slow_service(1.0, "f5_slow")], broker=broker(rabbit.url))
    async with connect(broker(rabbit.url), timeout=5) as cluster:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await cluster.rpc.never_started.anything()
        assert time.monotonic() - started < 1.0
        await runner.start()
        with pytest.raises(RpcTimeout):  # a slow instance is a timeout, and says so
            await cluster.rpc.f5_slow.work.with_timeout(0.2)(1)
        await runner.stop()
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await cluster.rpc.f5_slow.work(1)
        assert time.monotonic() - started < 1.0


# -- F7, F10 (tests/faults/scenarios.py) ---------------------------------------------------------


async def test_f7_links_cut_after_2_to_the_k_bytes(rabbit: SentinelRabbit) -> None:
    async with FaultProxy("127.0.0.1", rabbit.port) as proxy:
        url = proxy.url_for("amqp", "guest", SENTINEL)
        await f7_links_cut_after_2_to_the_k_bytes(proxy, broker(url), broker(url))


async def test_f10_broker_paused_for_20_s(rabbit: SentinelRabbit) -> None:
    await f10_server_paused(rabbit.pause, rabbit.resume, broker(rabbit.url), broker(rabbit.url))


# -- F8 -------------------------------------------------------------------------------------------


async def test_f8_killed_worker_events_are_all_redelivered_as_second_attempts(
    rabbit: SentinelRabbit, ledger: Ledger
) -> None:
    """A worker holding a full prefetch window of events is SIGKILLed: every one of them
    comes back, to the next member of the group, marked as attempt 2."""
    workers = 10
    async with worker_process(rabbit.url, "f8_worker", "f8.job", workers=workers) as worker:
        async with connect(broker(rabbit.url)) as cluster:
            for number in range(workers):
                ledger.record_sent(str(number))
                await cluster.dispatch("f8.job", {"id": number, "seconds": 60})
                ledger.record_confirmed(str(number))
        await until(lambda: len(worker.started) == workers, 20, "the worker holds every event")
        worker.signal(signal.SIGKILL)
        await worker.wait(10)
    assert worker.done == []

    attempts: Counter[int] = Counter()
    survivor = broker(rabbit.url)
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
        await until(lambda: sum(attempts.values()) == workers, 20, "every event again")
        await asyncio.sleep(0.3)
    finally:
        await survivor.close()
    assert attempts == {2: workers}
    ledger.assert_clean(allow_duplicates_delivered=False)


async def test_f8_killed_workers_requests_are_answered_by_another_instance(
    rabbit: SentinelRabbit,
) -> None:
    """Requests held by a SIGKILLed instance go to the surviving one; callers get results."""

    class Survivor(Service):
        name = "f8_rpc"

        @rpc
        async def work(self, n: int, seconds: float) -> int:
            return n

    async with worker_process(rabbit.url, "f8_rpc", workers=5) as worker:
        survivor = ServiceRunner([Survivor], broker=broker(rabbit.url))
        async with connect(broker(rabbit.url), timeout=30) as cluster:
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


# -- F9 -------------------------------------------------------------------------------------------


async def test_f9_poison_event_among_1000_good_ones_is_dead_lettered_with_its_reason(
    rabbit: SentinelRabbit,
) -> None:
    seen: Counter[str] = Counter()
    good_done = asyncio.Event()

    class Picky(Service):
        name = "f9_picky"

        @event_handler("f9.order", max_attempts=3)
        async def on_order(self, order: dict[str, Any]) -> None:
            seen[order["id"]] += 1
            if order["id"] == "poison":
                raise ValueError("order poison is not acceptable")
            if sum(1 for key in seen if key != "poison") == 1000:
                good_done.set()

    async with ServiceRunner([Picky], broker=broker(rabbit.url)) as runner:
        started = time.monotonic()
        for number in range(1000):
            if number == 500:
                await runner.dispatch("f9.order", {"id": "poison"}, idempotency_key="poison-key")
            await runner.dispatch("f9.order", {"id": f"good-{number}"})
        await asyncio.wait_for(good_done.wait(), 60)
        await until(lambda: seen["poison"] == 3, 20, "three attempts at the poison event")
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.0)  # no fourth attempt, no loop
    assert seen["poison"] == 3
    assert all(count == 1 for key, count in seen.items() if key != "poison")
    assert elapsed < 60
    letters = await _dead_letters(rabbit.url, "basidia.events.f9_picky.on_order.dlq")
    assert len(letters) == 1
    headers = letters[0].header.properties.headers or {}
    assert headers["x-basidia-reason"] == "ValueError: order poison is not acceptable"
    assert headers["x-basidia-attempt"] == 3
    assert headers["x-basidia-event"] == "f9.order"
    assert letters[0].header.properties.message_id == "poison-key"


async def _never(delivery: Delivery) -> None:
    raise AssertionError("no event was expected here")


# -- F11 ------------------------------------------------------------------------------------------


async def test_f11_sigterm_with_200_handlers_in_flight(rabbit: SentinelRabbit) -> None:
    """SIGTERM: consuming stops at once, the 200 handlers in flight finish and ack within the
    grace period, the 200 events still queued stay for the next instance, exit <= grace + 1 s."""
    grace = 5.0
    total, in_flight = 400, 200
    group = EventSubscription("f11.job", "f11_worker.on_work")
    # Queue every event before the worker starts, so that it takes a full window at once.
    async with connect(broker(rabbit.url)) as cluster:
        subscription = await cluster.broker.subscribe_events(group, _never, concurrency=1)
        await subscription.cancel()  # the group's durable queue stays and collects the events
        limit = asyncio.Semaphore(50)

        async def publish(number: int) -> None:
            async with limit:
                await cluster.dispatch("f11.job", {"id": number, "seconds": 2.0})

        await asyncio.gather(*(publish(number) for number in range(total)))
    async with worker_process(
        rabbit.url, "f11_worker", "f11.job", workers=in_flight, grace=grace
    ) as worker:
        await until(lambda: len(worker.started) == in_flight, 30, "200 handlers in flight")
        terminated = time.monotonic()
        worker.signal(signal.SIGTERM)
        code = await worker.wait(grace + 5)
        exit_took = time.monotonic() - terminated
    assert code == 0 and worker.exited
    assert exit_took <= grace + 1, f"exited {exit_took:.2f} s after SIGTERM"
    assert len(worker.started) == in_flight  # nothing new was taken after SIGTERM
    assert sorted(worker.done) == sorted(worker.started)  # every one finished
    stderr = worker.stderr.decode(errors="replace")
    assert "Task was destroyed" not in stderr and "Traceback" not in stderr, stderr[-2000:]

    rest: list[int] = []
    next_instance = broker(rabbit.url)
    await next_instance.connect()
    try:

        async def take(delivery: Delivery) -> None:
            rest.append(1)
            await delivery.ack()

        await next_instance.subscribe_events(group, take, concurrency=50)
        await until(lambda: len(rest) == total - in_flight, 20, "the rest of the events")
        await asyncio.sleep(0.3)
    finally:
        await next_instance.close()
    assert len(rest) == total - in_flight  # the finished ones were acked: none comes back

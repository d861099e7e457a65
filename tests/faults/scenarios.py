"""Fault scenarios written once, run on every broker (docs/reliability.md F1-F3 and F6-F12,
docs/resilience.md F13).

Each takes a ``BrokerKit`` (the throw-away server's URL, the broker's short test timers and
what differs between brokers) or the brokers to test with, and the means to break the link
or the server; each broker's test module supplies them, with its own throw-away server, and
adds only what is specific to its broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
import pytest

from basidia import (
    BasidiaError,
    Retry,
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
from basidia.brokers import Broker, Delivery, EventSubscription, broker_from_url
from basidia.brokers.base import DeadLetter
from basidia.context import IDEMPOTENCY_HEADER
from basidia.errors import BrokerError, ConnectionLost

from .ledger import Ledger, publish_until_confirmed
from .proxy import FaultProxy
from .workers import WorkerProcess, worker_process

#: Every call's deadline in these scenarios, in seconds.
CALL_TIMEOUT = 2.0
#: F1/F2: events published while the broker is killed and restarted.
LOAD = 10_000
#: F3: how long each handler works, and the callers' deadline while the link comes back.
F3_HANDLER = 2.0
F3_DEADLINE = 5.0
#: F3: the callers' deadline while the link stays down.
F3_SHORT_DEADLINE = 1.5
#: F10: how long the server stays stopped.
PAUSE = 20.0
#: F10: the calls' deadline.  Shorter than the quickest a stopped server is noticed
#: (RabbitMQ: 3 missed heartbeats; NATS: 2 unanswered pings at 1 s, so 2 s at the
#: earliest), so calls sent as it stops wait for replies until their deadline.
PAUSED_CALL_TIMEOUT = 1.0
#: F13: events that arrive while the handler's downstream is down, and for how long it is.
F13_EVENTS = 1000
F13_OUTAGE = 5.0
#: F12: how long the broker stays down (``BASIDIA_F12_OUTAGE`` shortens it for a local run).
OUTAGE = float(os.environ.get("BASIDIA_F12_OUTAGE", "180"))


@dataclass(frozen=True)
class BrokerKit:
    """What a scenario needs of one broker under test, beside the faults themselves."""

    #: The throw-away server, credentials included.
    url: str
    #: The short test timers, for every broker a scenario makes (``broker_from_url``).
    options: Mapping[str, Any]
    #: Seconds within which a client declares a silent (blackholed) link dead.
    detection_bound: float
    #: Seconds after which an unsettled delivery of a dead consumer goes to another one
    #: (0: as soon as its connection closes).
    redelivery_after: float
    #: A string no worker process may log (the broker's password, B3); "" for none.
    secret: str = field(default="", repr=False)

    def broker(self, url: str | None = None, **options: Any) -> Broker:
        """A new broker for ``url`` (default: the server) with the test timers."""
        return broker_from_url(url or self.url, {**self.options, **options})

    async def dead_letters(self, group: str) -> list[DeadLetter]:
        """Every dead letter of consumer group ``group``, read through the broker's own API
        (``Broker.dead_letters``), which leaves them where they are."""
        broker = self.broker()
        await broker.connect()
        try:
            return await broker.dead_letters(group, limit=1000)
        finally:
            await broker.close()

    def via(self, proxy: FaultProxy) -> str:
        """The server's URL with ``proxy`` in the server's place."""
        parts = urlsplit(self.url)
        credentials, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{credentials}{at}127.0.0.1:{proxy.port}"))

    @property
    def port(self) -> int:
        """The server's port, for a ``FaultProxy`` in front of it."""
        port = urlsplit(self.url).port
        assert port is not None
        return port

    def worker(
        self, name: str, event: str = "none", *, workers: int = 10, grace: float = 5.0
    ) -> contextlib.AbstractAsyncContextManager[WorkerProcess]:
        """A worker process on this broker, serving ``event`` as service ``name``."""
        return worker_process(
            self.url, self.options, name, event, workers=workers, grace=grace, secret=self.secret
        )

    @property
    def quiet(self) -> float:
        """Seconds to watch for a delivery that should not come (a redelivery, say)."""
        return self.redelivery_after + 1.0


async def until(predicate: Any, timeout: float, what: str) -> float:
    """Wait for ``predicate()``; return the seconds it took, fail after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def until_answered(call: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    """``await call()`` until it answers, retrying typed errors for ``timeout`` seconds."""
    started = time.monotonic()
    while True:
        try:
            return await call()
        except BasidiaError:
            if time.monotonic() - started > timeout:
                raise
            await asyncio.sleep(0.05)


async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
    """``call``'s result or typed error, and the seconds it took."""
    started = time.monotonic()
    try:
        outcome = await call
    except BasidiaError as exc:
        outcome = exc
    return outcome, time.monotonic() - started


def _digest(blob: bytes) -> bytes:
    return hashlib.sha256(blob).digest()


async def _never(delivery: Delivery) -> None:
    raise AssertionError("no event was expected here")


def _reconnect_attempts(broker: Broker) -> int:
    """Reconnection attempts so far (each adapter counts them; the interface does not)."""
    attempts: int = broker.reconnect_attempts  # type: ignore[attr-defined]
    return attempts


async def _declare_group(kit: BrokerKit, group: EventSubscription) -> None:
    """Make the broker keep ``group``'s events from now on, with no member running."""
    async with connect(kit.broker()) as cluster:
        subscription = await cluster.broker.subscribe_events(group, _never, concurrency=1)
        await subscription.cancel()


# -- F1, F2 ---------------------------------------------------------------------------------------


async def f1_f2_killed_and_restarted_under_load(
    kit: BrokerKit, kill: Callable[[], None], start: Callable[[], Awaitable[None]], ledger: Ledger
) -> float:
    """F1 (RabbitMQ), F2 (NATS JetStream): ``LOAD`` events from 32 publishers to two
    competing service instances, with a caller calling all through; the broker is SIGKILLed
    (``kill()``) at 30 % and started again (``start()``) 2 s later.

    Nothing confirmed is lost, no side effect happens twice, no publish or call hangs (each
    call ends in its result or a typed error), every connection comes back, and consumers
    resume within 10 s of the broker.  Returns how soon they resumed.
    """
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

    brokers = [kit.broker() for _ in range(3)]
    # Two instances compete for the group's events, as two processes would.
    first = ServiceRunner([Sink], broker=brokers[0])
    second = ServiceRunner([Sink], broker=brokers[1])
    await first.start()
    await second.start()
    cluster = await connect(brokers[2], timeout=CALL_TIMEOUT).start()
    back_at = 0.0
    calls: Counter[str] = Counter()
    try:
        ids = iter(range(LOAD))
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
                    timeout=kit.options["publish_timeout"] + 2,
                    attempts=50,
                    retry_on=(BrokerError,),
                )
                published += 1

        async def crash() -> None:
            nonlocal back_at
            await until(lambda: published >= LOAD * 0.3, 120, "30% published")
            kill()
            await asyncio.sleep(2.0)
            await start()
            back_at = time.monotonic()

        async def caller() -> None:
            for number in itertools.count():
                if published >= LOAD:
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
        reconnects = [getattr(broker, "reconnects", None) for broker in brokers]
        print(f"consumers resumed {resumed:.2f} s after the broker; {publish_errors} "
              f"publish attempts raised and were retried; calls: {dict(calls)}; "
              f"reconnections: {reconnects}")  # fmt: skip
        assert calls["ok"] > 0 and calls["wrong"] == 0, calls
        assert all(count is None or count >= 1 for count in reconnects), reconnects
        assert resumed <= 10, f"consumers resumed {resumed:.1f} s after the broker"
        # Every subscription delivers again: a probe published now arrives.
        ledger.record_sent("probe")
        await cluster.dispatch("f1.placed", {"id": "probe"}, idempotency_key="probe")
        ledger.record_confirmed("probe")
        await until(lambda: "probe" in applied, 10, "the probe event")
    finally:
        await cluster.close()
        await first.stop()
        await second.stop()
    report = ledger.report()
    print(report)  # the Jepsen-style summary, for the CI log
    assert report.confirmed == LOAD + 1, str(report)  # and the probe
    ledger.assert_clean()
    return resumed


# -- F3 -------------------------------------------------------------------------------------------


async def f3_service_link_dropped_mid_handler(
    proxy: FaultProxy, server: Broker, client: Broker
) -> int:
    """F3: the service reaches the broker through ``proxy``, the caller (``client``) directly;
    the service's link is dropped (``proxy.down()``) while its handlers run.

    While the link comes back before the handlers end, each caller gets its own result,
    before its deadline.  While it stays down past the deadline, each caller gets one
    ``RpcTimeout``, at its deadline: a reply the service sends once it is back is late,
    dropped and counted, and reaches no other call.  Returns the late replies.
    """
    runs: Counter[int] = Counter()

    class Worker(Service):
        name = "f3_worker"

        @rpc
        async def work(self, n: int, seconds: float) -> int:
            runs[n] += 1
            await asyncio.sleep(seconds)
            return n

    async with (
        ServiceRunner([Worker], broker=server),
        connect(client, timeout=F3_DEADLINE) as cluster,
    ):
        work = cluster.rpc.f3_worker.work
        # The RPC client's reply router: it counts replies that came too late.
        router = cluster._connection.client.router
        assert await work(-1, 0) == -1

        # Dropped for a moment: the handlers reply over the service's new connection.
        numbers = range(20)
        calls = [asyncio.ensure_future(timed(work(n, F3_HANDLER))) for n in numbers]
        await until(lambda: all(runs[n] for n in numbers), 5, "every call in a handler")
        proxy.down()
        await until(lambda: not server.connected, 2, "the service noticing")
        await asyncio.sleep(0.3)
        proxy.pass_through()
        for n, (outcome, took) in zip(numbers, await asyncio.gather(*calls), strict=True):
            assert outcome == n, (n, outcome)
            assert took < F3_DEADLINE, (n, took)
        assert server.connected

        # Dropped past the callers' deadline: a timeout each, then nothing more.
        late_before = router.late_replies
        short = work.with_timeout(F3_SHORT_DEADLINE)
        numbers = range(100, 110)
        calls = [asyncio.ensure_future(timed(short(n, 0.5))) for n in numbers]
        await until(lambda: all(runs[n] for n in numbers), 5, "every call in a handler")
        proxy.down()
        for outcome, took in await asyncio.gather(*calls):
            assert isinstance(outcome, RpcTimeout), outcome
            assert F3_SHORT_DEADLINE * 0.9 <= took <= F3_SHORT_DEADLINE * 1.1, took
        proxy.pass_through()
        await until(lambda: server.connected, 10, "the service reconnecting")
        # Replies the service held while its link was down arrive now: none reaches these.
        fresh = range(200, 220)
        answers = await asyncio.gather(*(until_answered(partial(work, n, 0.2), 5) for n in fresh))
        assert answers == list(fresh)
        await asyncio.sleep(0.5)
        assert router.pending == 0
        late = router.late_replies - late_before
        assert late <= len(numbers), late
    # A call is never answered by a handler run twice (nothing redelivers a request here).
    assert set(runs.values()) == {1}, runs
    return late


# -- F4, F5 ---------------------------------------------------------------------------------------


def slow_service(delay: float, name: str = "slow") -> type[Service]:
    """A service called ``name`` whose ``work(n)`` answers ``n`` after ``delay`` seconds."""

    class Slow(Service):
        @rpc
        async def work(self, n: int) -> int:
            await asyncio.sleep(delay)
            return n

    Slow.name = name
    return Slow


async def f4_caller_link_dropped_with_calls_in_flight(
    proxy: FaultProxy,
    server: Broker,
    client: Broker,
    *,
    bound: float,
    cut: Callable[[], None] | None = None,
    connect_timeout: float = 10.0,
    reconnect_timeout: float = 10.0,
) -> float:
    """F4: the caller (``client``) reaches the broker through ``proxy``, whose link is cut
    (``cut()``, ``proxy.down()`` by default) with 20 calls in flight to a slow service.

    Every call in flight fails with ``ConnectionLost`` within ``bound`` seconds; once the
    link is back the caller reconnects, and late replies of the old calls never reach the
    new ones.  Returns the seconds the calls took to fail.
    """
    async with ServiceRunner([slow_service(1.5)], broker=server):
        async with connect(client, timeout=connect_timeout) as cluster:
            work = cluster.rpc.slow.work
            assert await work(-1) == -1
            in_flight = [asyncio.ensure_future(work(n)) for n in range(20)]
            await asyncio.sleep(0.3)
            dropped = time.monotonic()
            (cut or proxy.down)()
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
            took = time.monotonic() - dropped
            assert took < bound, f"failed after {took:.2f} s (bound {bound} s)"
            assert all(isinstance(outcome, ConnectionLost) for outcome in outcomes), outcomes
            proxy.pass_through()
            await until(lambda: client.connected, reconnect_timeout, "reconnection")
            # The old calls' replies may come back to the same inbox while these wait.
            fresh = await asyncio.gather(*(work(n) for n in range(100, 120)))
            assert fresh == list(range(100, 120))
    return took


async def f5_no_instances_is_service_unavailable(
    server: Broker, client: Broker, *, name: str = "slow", presence_ttl: float | None = None
) -> None:
    """F5: calling a service with no instance fails with ``ServiceUnavailable`` at once
    (within 1 s), not with a timeout, before its first instance starts and after its last
    one stops; a slow instance is an ``RpcTimeout``.

    Brokers that believe a service alive for ``presence_ttl`` seconds after it leaves (Kafka)
    pass it: the call made meanwhile may time out instead.
    """
    runner = ServiceRunner([slow_service(1.0, name)], broker=server)
    async with connect(client, timeout=5) as cluster:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await cluster.rpc.never_started.anything()
        assert time.monotonic() - started < 1.0
        work = getattr(cluster.rpc, name).work
        await runner.start()
        with pytest.raises(RpcTimeout):  # a slow instance is a timeout, and says so
            await work.with_timeout(0.2)(1)
        await runner.stop()
        if presence_ttl is not None:
            # The last instance left its group; the client believed it alive for presence_ttl.
            await asyncio.sleep(presence_ttl + 0.1)
            with pytest.raises((ServiceUnavailable, RpcTimeout)):
                await work.with_timeout(0.5)(1)  # and asks again meanwhile
            await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await work(1)
        assert time.monotonic() - started < 1.0


# -- F6 -------------------------------------------------------------------------------------------


async def f6_half_open_link(
    proxy: FaultProxy,
    server: Broker,
    client: Broker,
    direction: Literal["up", "down"],
    bound: float,
) -> float:
    """F6: the caller (``client``) reaches the broker through ``proxy``, which blackholes
    one ``direction`` of its link, keeping both sockets open.

    The dead link is noticed within ``bound`` seconds: the call in flight fails with
    ``ConnectionLost``, the event publish in flight with a ``BrokerError``, neither hangs;
    once the link flows again the caller reconnects and calls go through.  Returns the
    seconds the failure took to notice.
    """

    class Slow(Service):
        name = "f6_slow"

        @rpc
        async def work(self, n: int) -> int:
            await asyncio.sleep(0.5)
            return n

    async with ServiceRunner([Slow], broker=server), connect(client, timeout=30) as cluster:
        work = cluster.rpc.f6_slow.work
        assert await work(0) == 0
        await cluster.dispatch("f6.warmup", {})  # the streams and exchanges exist from here on
        proxy.blackhole(direction)
        holed = time.monotonic()
        call = asyncio.ensure_future(work(1))
        publish = asyncio.ensure_future(cluster.dispatch("f6.during", {}))
        with pytest.raises(ConnectionLost):
            await call
        detected = time.monotonic() - holed
        assert detected < bound, f"detected after {detected:.2f} s, bound {bound} s"
        with pytest.raises(BrokerError):
            await asyncio.wait_for(publish, CALL_TIMEOUT + 1)  # publish_timeout is 2 s
        # Held a little longer, so reconnection attempts meet the blackhole too.
        await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - holed)))
        proxy.pass_through()
        await until(lambda: client.connected, 10, "reconnection")
        assert await until_answered(lambda: work(2), 5) == 2
        assert await asyncio.gather(*(work(n) for n in range(10))) == list(range(10))
    return detected


# -- F7 -------------------------------------------------------------------------------------------


async def f7_links_cut_after_2_to_the_k_bytes(
    proxy: FaultProxy, server: Broker, client: Broker
) -> dict[int, int]:
    """F7: ``server`` and ``client`` both reach the broker through ``proxy``, which cuts their
    links after 2, 4, ... 4096 bytes, so mid-handshake, mid-frame or between frames.

    Every call ends in its result or a typed error well within 30 s, no handler ever sees
    a corrupt payload, and once the links are whole the service answers.  Returns, per cut,
    the calls answered before the first failure.
    """
    corrupt: list[bytes] = []

    class Checked(Service):
        name = "f7_checked"

        @rpc
        async def echo(self, blob: bytes, digest: bytes) -> bytes:
            if _digest(blob) != digest:
                corrupt.append(blob)
            return blob

    answered: dict[int, int] = {}
    async with (
        ServiceRunner([Checked], broker=server),
        connect(client, timeout=CALL_TIMEOUT) as cluster,
    ):
        echo = cluster.rpc.f7_checked.echo
        for cut in (2**k for k in range(1, 13)):
            proxy.cut_after(cut)
            answered[cut] = 0
            started = time.monotonic()
            for n in range(64):
                blob = os.urandom(1 + 37 * n)
                try:
                    assert await echo(blob, _digest(blob)) == blob
                except BasidiaError:
                    break
                answered[cut] += 1
            took = time.monotonic() - started
            assert took < 30, f"cut after {cut} bytes: the calls took {took:.1f} s"
            proxy.pass_through()
            await until(lambda: server.connected and client.connected, 15, f"after a cut at {cut}")
            # A subscription can reach the server a moment after its connection does.
            assert await until_answered(lambda: echo(b"whole", _digest(b"whole")), 5) == b"whole"
    assert corrupt == []
    # The cuts fell at different places: small ones before any call, large ones after some.
    assert answered[2] == 0 and answered[4096] > 0, answered
    return answered


# -- F8 -------------------------------------------------------------------------------------------


async def f8_killed_worker_events_are_all_redelivered(
    kit: BrokerKit,
    ledger: Ledger,
    *,
    redelivered_as: int = 2,
    hold_timeout: float = 20.0,
    redelivery_slack: float = 20.0,
    quiet: float | None = None,
) -> None:
    """F8: a worker process holding a full window of unacked events is SIGKILLed.

    Every one of them comes back, to the next member of the group, marked as attempt
    ``redelivered_as`` (1 on brokers that keep no delivery count); none is lost, none comes
    twice.  The worker must hold every event within ``hold_timeout`` seconds, and they must
    come back within ``kit.redelivery_after + redelivery_slack``; then none more comes for
    ``quiet`` seconds (default ``kit.quiet``).
    """
    workers = 10
    async with kit.worker("f8_worker", "f8.job", workers=workers) as worker:
        async with connect(kit.broker()) as cluster:
            for number in range(workers):
                ledger.record_sent(str(number))
                await cluster.dispatch("f8.job", {"id": number, "seconds": 60})
                ledger.record_confirmed(str(number))
        await until(
            lambda: len(worker.started) == workers, hold_timeout, "the worker holds every event"
        )
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
        await until(
            lambda: sum(attempts.values()) == workers,
            kit.redelivery_after + redelivery_slack,
            "every event again",
        )
        await asyncio.sleep(kit.quiet if quiet is None else quiet)  # and none more
    finally:
        await survivor.close()
    assert attempts == {redelivered_as: workers}
    ledger.assert_clean(allow_duplicates_delivered=False)


# -- F9 -------------------------------------------------------------------------------------------


async def f9_poison_event_among_1000_good_ones(kit: BrokerKit) -> float:
    """F9: one event among 1,000 always fails its handler (``max_attempts=3``).

    The 1,000 good ones are each handled once; the poison event is tried three times, then
    dead-lettered with the reason, the original frame and the attempts, and never tried
    again.  Returns the seconds everything took.
    """
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

    async with ServiceRunner([Picky], broker=kit.broker()) as runner:
        started = time.monotonic()
        for number in range(1000):
            if number == 500:
                await runner.dispatch("f9.order", {"id": "poison"}, idempotency_key="poison-key")
            await runner.dispatch("f9.order", {"id": f"good-{number}"})
        await asyncio.wait_for(good_done.wait(), 60)
        await until(lambda: seen["poison"] == 3, 20, "three attempts at the poison event")
        elapsed = time.monotonic() - started
        await asyncio.sleep(kit.quiet)  # no fourth attempt, no loop
    assert seen["poison"] == 3
    assert all(count == 1 for key, count in seen.items() if key != "poison")
    assert elapsed < 60
    letters = await kit.dead_letters("f9_picky.on_order")
    assert len(letters) == 1, letters
    letter = letters[0]
    assert letter.reason == "ValueError: order poison is not acceptable"
    assert letter.exception == "ValueError"
    assert letter.attempts == 3
    assert (letter.event, letter.group) == ("f9.order", "f9_picky.on_order")
    assert (letter.service, letter.handler) == ("f9_picky", "on_order")
    assert letter.first_failure <= letter.last_failure
    assert letter.truncated_from == 0
    frame = decode_frame(letter.frame)  # the original event, whole
    assert frame.headers[IDEMPOTENCY_HEADER] == "poison-key"
    assert msgspec.msgpack.decode(frame.payload) == {"id": "poison"}
    return elapsed


# -- F10 ------------------------------------------------------------------------------------------


async def f10_server_paused(
    pause: Callable[[], None], resume: Callable[[], None], server: Broker, client: Broker
) -> None:
    """F10: ``pause()`` stops the broker (SIGSTOP) for ``PAUSE`` seconds, then ``resume()``.

    Meanwhile every call fails with a typed error: those left waiting for a reply at their
    deadline (within 10 %), none later.  After SIGCONT the service is whole within 10 s.
    """

    class Echo(Service):
        name = "f10_echo"

        @rpc
        async def work(self, n: int) -> int:
            return n

    async with (
        ServiceRunner([Echo], broker=server),
        connect(client, timeout=PAUSED_CALL_TIMEOUT) as cluster,
    ):
        work = cluster.rpc.f10_echo.work
        assert await work(0) == 0

        async def timed(n: int) -> tuple[BaseException | int, float]:
            started = time.monotonic()
            try:
                outcome: BaseException | int = await work(n)
            except BasidiaError as exc:
                outcome = exc
            return outcome, time.monotonic() - started

        pause()
        paused = time.monotonic()
        try:
            outcomes = list(await asyncio.gather(*(timed(n) for n in range(1, 11))))
            while time.monotonic() - paused < PAUSE:
                outcomes.append(await timed(11))
                await asyncio.sleep(0.25)
        finally:
            resume()
        resumed = time.monotonic()
        for outcome, took in outcomes:
            assert isinstance(outcome, RpcTimeout | ConnectionLost), outcome
            assert took <= PAUSED_CALL_TIMEOUT * 1.1, (outcome, took)
            if isinstance(outcome, RpcTimeout):
                assert took >= PAUSED_CALL_TIMEOUT * 0.9, took
        # The first calls were sent before the link was known dead: they waited for replies.
        assert all(isinstance(outcome, RpcTimeout) for outcome, _ in outcomes[:10])

        assert await until_answered(lambda: work(12), 10) == 12
        assert time.monotonic() - resumed < 10, "not whole again within 10 s of SIGCONT"
        assert await asyncio.gather(*(work(n) for n in range(100))) == list(range(100))


# -- F11 ------------------------------------------------------------------------------------------


async def f11_sigterm_with_200_handlers_in_flight(kit: BrokerKit) -> float:
    """F11: a worker process with 200 event handlers in flight and 200 events still queued
    gets SIGTERM, while the next instance of the group starts, as in a rolling restart.

    Consuming stops at once; the 200 handlers finish and ack within the grace period, and
    none of their events reaches the next instance meanwhile, although each handler works
    for twice the broker's redelivery timer (JetStream's ack wait), as a slow handler may;
    the process exits cleanly within grace + 1 s; the next instance gets exactly the 200
    events the worker never took, once each.  Returns the seconds to exit.
    """
    grace = 5.0
    seconds = max(2.0, 2 * kit.redelivery_after)
    assert seconds < grace
    total, in_flight = 400, 200
    group = EventSubscription("f11.job", "f11_worker.on_work")
    # Queue every event before the worker starts, so that it takes a full window at once.
    await _declare_group(kit, group)
    async with connect(kit.broker()) as cluster:
        limit = asyncio.Semaphore(50)

        async def publish(number: int) -> None:
            async with limit:
                await cluster.dispatch("f11.job", {"id": number, "seconds": seconds})

        await asyncio.gather(*(publish(number) for number in range(total)))

    rest: Counter[int] = Counter()

    async def take(delivery: Delivery) -> None:
        job = msgspec.msgpack.decode(decode_frame(delivery.body).payload)
        rest[job["id"]] += 1
        await delivery.ack()

    next_instance = kit.broker()
    try:
        async with kit.worker("f11_worker", "f11.job", workers=in_flight, grace=grace) as worker:
            await until(lambda: len(worker.started) == in_flight, 30, "200 handlers in flight")
            terminated = time.monotonic()
            worker.signal(signal.SIGTERM)

            async def exit_code() -> tuple[int, float]:
                code = await worker.wait(grace + 5)
                return code, time.monotonic() - terminated

            exited = asyncio.ensure_future(exit_code())
            await next_instance.connect()
            await next_instance.subscribe_events(group, take, concurrency=50)
            code, exit_took = await exited
        await until(lambda: sum(rest.values()) >= total - in_flight, 20, "the rest of the events")
        await asyncio.sleep(kit.quiet)  # and no more: the acked ones do not come back
    finally:
        await next_instance.close()
    stderr = worker.stderr.decode(errors="replace")
    assert code == 0 and worker.exited, stderr[-3000:]
    assert exit_took <= grace + 1, f"exited {exit_took:.2f} s after SIGTERM"
    assert len(worker.started) == in_flight  # nothing new was taken after SIGTERM
    assert sorted(worker.done) == sorted(worker.started)  # every one finished
    assert "Task was destroyed" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    taken = {int(job) for job in worker.started}
    twice = sorted(taken & set(rest))
    assert not twice, f"{len(twice)} events in flight at SIGTERM also went to the next instance"
    assert set(rest) | taken == set(range(total))
    assert sum(rest.values()) == total - in_flight, rest.most_common(3)
    return exit_took


# -- F12 ------------------------------------------------------------------------------------------


async def f12_long_outage(
    service: Broker,
    client: Broker,
    kill: Callable[[], None],
    start: Callable[[], Awaitable[None]],
    *,
    buffer_full: str | None,
    reconnect_wait: float,
    reconnect_wait_max: float,
) -> float:
    """F12: the broker is SIGKILLed (``kill()``) and started again (``start()``) ``OUTAGE``
    seconds later.

    While it is down, calls fail at once with ``ConnectionLost``, and publishes do not pile
    up: 12 events of 16 kB each fail with a ``BrokerError`` within the publish timeout,
    those over the outbound buffer at once, saying ``buffer_full`` (brokers that hold no
    publish while down pass None).  Reconnection attempts keep to the capped backoff
    (``reconnect_wait`` doubling up to ``reconnect_wait_max``, with jitter).  Once the broker
    is back, every subscription (requests, durable, broadcast and at-most-once events)
    delivers again, within 10 s of the broker.  Returns the seconds that took.
    """
    received: dict[str, list[Any]] = {"durable": [], "broadcast": [], "core": []}

    class Probe(Service):
        name = "f12_probe"

        @rpc
        async def ping(self, n: int) -> int:
            return n

        @event_handler("f12.durable")
        async def on_durable(self, data: int | str) -> None:
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
        assert await cluster.rpc.f12_probe.ping(round_) == round_
        for kind in received:
            await cluster.dispatch(f"f12.{kind}", round_)
        await until(lambda: all(round_ in got for got in received.values()), 10, "probes")
        return time.monotonic() - started

    async with ServiceRunner([Probe], broker=service), connect(client) as cluster:
        await probe_everything(1)
        attempts_before = _reconnect_attempts(client)
        kill()
        down = time.monotonic()
        await until(lambda: not client.connected, 5, "noticing the outage")

        # While down: calls fail fast, and publishes fail rather than pile up.
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            await cluster.rpc.f12_probe.ping(0)
        assert time.monotonic() - started < 0.5
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(cluster.dispatch("f12.durable", "x" * 16_000) for _ in range(12)),
                return_exceptions=True,
            ),
            CALL_TIMEOUT + 2,  # publish_timeout is 2 s
        )
        assert all(isinstance(outcome, BrokerError) for outcome in outcomes), outcomes
        if buffer_full is not None:
            assert any(buffer_full in str(outcome) for outcome in outcomes), outcomes

        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down)))
        await start()
        outage = time.monotonic() - down
        resumed = await until(lambda: client.connected and service.connected, 10, "reconnection")
        # Capped exponential backoff with jitter: between cap/2 and cap after the ramp.
        base, cap = reconnect_wait, reconnect_wait_max
        ramp = math.ceil(math.log2(cap / base)) + 1
        attempts = _reconnect_attempts(client) - attempts_before
        assert outage / cap - 1 <= attempts <= ramp + outage / (cap / 2) + 2, (attempts, outage)
        handled_within = await probe_everything(2)
        print(f"outage {outage:.1f} s, {attempts} reconnection attempts; connected again "
              f"{resumed:.2f} s and every subscription delivering {resumed + handled_within:.2f} s "
              "after the broker")  # fmt: skip
        assert resumed + handled_within <= 10
    return resumed + handled_within


# -- F13 ------------------------------------------------------------------------------------------


async def f13_downstream_down_during_the_backoff(kit: BrokerKit) -> dict[str, float]:
    """F13: a handler's downstream fails for ``F13_OUTAGE`` seconds while ``F13_EVENTS``
    events arrive, with the default retry policy; the service is restarted during the backoff.

    Every event is handled once after the downstream recovers and none is dead-lettered; the
    service's other handler handles its events while orders wait for their retries; the
    attempts an event
    makes are spaced as the policy says (each wait at least its base delay less the jitter);
    no retry pending at the restart is lost.  Returns figures for the report.
    """
    from basidia.config import Settings

    policy = Retry().resolve(Settings(), None)
    attempts: dict[int, list[tuple[int, float]]] = {}
    handled: Counter[int] = Counter()
    pings: list[float] = []
    clock = {"down_until": math.inf}

    class Shop(Service):
        name = "f13_shop"
        max_workers = 16  # few slots: retries that waited in them would stop everything

        @event_handler("f13.order")
        async def on_order(self, order: dict[str, int]) -> None:
            ctx = current_context()
            assert ctx is not None
            now = time.monotonic()
            attempts.setdefault(order["id"], []).append((ctx.attempt, now))
            if now < clock["down_until"]:
                raise ConnectionError("the downstream is down")
            handled[order["id"]] += 1

        @event_handler("f13.ping")
        async def on_ping(self, ping: int) -> None:
            pings.append(time.monotonic())

    async def publish_all(runner: ServiceRunner) -> None:
        for start in range(0, F13_EVENTS, 100):
            await asyncio.gather(
                *(
                    runner.dispatch("f13.order", {"id": n}, idempotency_key=f"f13-{n}")
                    for n in range(start, start + 100)
                )
            )

    first = ServiceRunner([Shop], broker=kit.broker())
    await first.start()
    stopped = False
    try:
        clock["down_until"] = time.monotonic() + F13_OUTAGE
        await publish_all(first)
        # The other handler, while events wait for their retries.
        for n in range(20):
            await first.dispatch("f13.ping", n)
        await until(lambda: len(pings) == 20, 20, "the other handler during the backoff")
        waiting = sum(1 for n, seen in attempts.items() if not handled[n] and len(seen) >= 1)
        assert waiting > 0, "no event was waiting for a retry while the pings went through"
        # Restart the service while events wait for a retry (in the broker, not here).
        pending = sum(1 for n in range(F13_EVENTS) if not handled[n])
        await first.stop()
        stopped = True
    finally:
        if not stopped:
            await first.stop()
    async with ServiceRunner([Shop], broker=kit.broker()):
        await until(lambda: len(handled) == F13_EVENTS, 90, "every event handled")
        await asyncio.sleep(kit.quiet)
    assert set(handled.values()) == {1}, "an event was handled twice"
    assert await kit.dead_letters("f13_shop.on_order") == []
    # The attempts follow the backoff: between two attempts the handler saw in a row, at
    # least the policy's wait less its jitter (a restart may skip a number: not compared).
    gaps: list[float] = []
    for seen in attempts.values():
        assert all(at >= clock["down_until"] for _, at in seen[-1:])
        for (number, at), (following, later) in itertools.pairwise(seen):
            if following == number + 1:
                least = policy.base_delay(number) * (1 - policy.jitter) - 0.05
                assert later - at >= least, (number, later - at)
                if number == 1:
                    gaps.append(later - at)
    gaps.sort()
    median = gaps[len(gaps) // 2]
    # The median first wait: the policy's, plus the time a retry queues behind the backlog
    # of 1,000 events on a loaded machine (bounded loosely: the lower bound is the point).
    assert policy.delay * 0.8 <= median <= policy.delay * 1.2 + 4.0, median
    return {
        "waiting_during_pings": waiting,
        "pending_at_restart": pending,
        "median_first_wait": median,
        "max_attempts_used": max(number for seen in attempts.values() for number, _ in seen),
    }

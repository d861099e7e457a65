"""Hostile inputs, per broker: what a client with nothing but the right to publish on a
service's request queue or subject (or on the events exchange / stream) can send, and
what the service must do about it.

Every case sends its hostile input to a RUNNING service (a ``ServiceRunner`` on the
broker) with the broker's own client library (aiormq, nats-py; ``MemoryBroker`` for the
memory broker, which has no other client), frames built with ``encode_frame``.  Then a
NORMAL call through the framework (``connect(url)``, ``cluster.rpc.<svc>.ping()``) must
answer in time, and the offending message must be settled and not come back.

The cases, by the bug report they come from:

1. NATS, a reply subject over the server's control-line limit, and reply subjects with
   blanks or CRLF: dropped and counted as malformed; the service keeps its connection.
2. NATS, an event near ``max_payload`` whose dead letter's headers push it over, and a
   ``dispatch`` just under ``max_payload``: dead-lettered (or a typed ``BrokerError``),
   the connection stays.
3. RabbitMQ, an event whose AMQP headers nearly fill a frame, so that the retry's or the
   dead letter's extra headers overflow ``frame_max``: no reconnect loop, one dead letter.
4. Every broker, error replies over the frame limit (an unknown keyword argument with a
   huge name; an exception with a 2 MiB message): a typed error, not ``RpcTimeout``, and
   the service keeps serving after more of them than it has workers.
5. Every broker, 10,000 garbage frames: counted, a bounded number of log lines.
6. RabbitMQ and NATS, a connection the server closes: the service is back within 10 s.

``HostileInputs`` holds the cases every broker shares, written once; ``TestMemoryHostile``,
``TestAmqpHostile`` and ``TestNatsHostile`` give it a broker and add their own cases.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiormq
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp.header import ContentHeader

from basidia import Retry, Service, ServiceRunner, connect, event_handler, rpc
from basidia._speedups import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_KWARGS,
    HARD_MAX_FRAME_SIZE,
    Frame,
    Kind,
    decode_frame,
    encode_frame,
)
from basidia.brokers._nats_jetstream import consumer_name
from basidia.brokers.amqp import DIRECT_REPLY_TO
from basidia.brokers.base import REASON_HEADER, read_dead_letter
from basidia.brokers.memory import MemoryBroker
from basidia.brokers.nats import DLQ_STREAM, EVENTS_STREAM
from basidia.context import current_call
from basidia.errors import BasidiaError, BrokerError, FrameError, RpcError, RpcTimeout
from basidia.rpc import error_from_frame
from basidia.runner import Cluster

from ..conftest import REQUIRE_BROKERS
from .cleanup import delete_amqp, delete_nats_consumers

pytestmark = pytest.mark.timeout(120)

#: The frame limit every service and caller here runs with (the default, 1 MiB).
FRAME_LIMIT = DEFAULT_MAX_FRAME_SIZE
#: A normal call after a hostile input must answer within this many seconds...
ANSWER_WITHIN = 5.0
#: ... or this many when the server closed the service's connection.
RECONNECT_WITHIN = 10.0
#: Workers of the services under attack; the hostile requests outnumber them.
WORKERS = 8
HOSTILE_REQUESTS = 40
GARBAGE_FRAMES = 10_000
#: "A few dozen" log lines at WARNING or above for all the garbage together.
MAX_LOUD_LOG_LINES = 36
#: The message of a handler that always fails: long, like a traceback, so that a dead
#: letter's reason header is large.
LONG_REASON = "refused: " + "r" * 2000

NATS_RPC_PREFIX = "basidia.rpc."
NATS_EVENT_PREFIX = "basidia.events."
NATS_DLQ_PREFIX = "basidia.dlq."
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


# -- services under attack ----------------------------------------------------------------------


def target_service(name: str) -> type[Service]:
    """A service with ``WORKERS`` workers: ``ping`` for the normal calls, ``greet`` to be
    called with a hostile keyword argument, ``explode`` to raise a huge error."""

    class Target(Service):
        @rpc
        async def ping(self) -> str:
            return "pong"

        @rpc
        async def greet(self, who: str = "world") -> str:
            return f"hello {who}"

        @rpc
        async def explode(self, size: int) -> None:
            raise RuntimeError("x" * size)

    Target.name = name
    Target.max_workers = WORKERS
    return Target


def event_service(name: str, event: str, attempts: list[int]) -> type[Service]:
    """``ping``, and a handler of ``event`` that always raises (recording each attempt),
    with two attempts before the event is dead-lettered."""

    class Target(Service):
        @rpc
        async def ping(self) -> str:
            return "pong"

        @event_handler(event, max_attempts=2, retry=Retry(delay=0.01))
        async def on_big(self, data: Any) -> None:
            ctx = current_call.get()
            attempts.append(ctx.attempt if ctx is not None else 0)
            raise ValueError(LONG_REASON)

    Target.name = name
    Target.max_workers = WORKERS
    return Target


# -- frames -------------------------------------------------------------------------------------


def _deadline_ms(seconds: float = 30.0) -> int:
    return int((time.time() + seconds) * 1000)


def request_frame(service: str, method: str, reply_to: str, correlation_id: int = 1) -> bytes:
    """A well-formed request for ``service.method()`` without arguments."""
    payload = msgspec.msgpack.encode([])
    frame = Frame(
        Kind.REQUEST, correlation_id, f"{service}.{method}", payload, reply_to, _deadline_ms()
    )
    return encode_frame(frame, HARD_MAX_FRAME_SIZE)


def fill(build: Callable[[int], bytes], size: int) -> int:
    """The ``n`` for which ``build(n)`` is exactly ``size`` bytes long (``build`` grows by a
    byte per unit of ``n``, plus MessagePack's length header, which grows in steps)."""
    n = max(size - len(build(0)), 0)
    for _ in range(4):
        missing = size - len(build(n))
        if not missing:
            return n
        n += missing
    raise AssertionError(f"cannot build exactly {size} bytes")


def huge_kwarg_request(
    service: str, method: str, reply_to: str, correlation_id: int, size: int
) -> bytes:
    """A request frame of exactly ``size`` bytes calling ``service.method`` with one unknown
    keyword argument whose name fills the frame.

    The payload is what ``RpcClient`` sends for keyword arguments
    (``Serializer.encode_args``): MessagePack ``[args, kwargs]`` with ``FLAG_KWARGS``.
    The service's validation error repeats the name, so the error reply is larger than
    the request, and over the frame limit when the request is just under it.
    """

    def build(name_length: int) -> bytes:
        payload = msgspec.msgpack.encode([[], {"k" * name_length: 1}])
        frame = Frame(
            Kind.REQUEST,
            correlation_id,
            f"{service}.{method}",
            payload,
            reply_to,
            _deadline_ms(),
            {},
            FLAG_KWARGS,
        )
        return encode_frame(frame, HARD_MAX_FRAME_SIZE)

    return build(fill(build, size))


def event_frame(event: str, size: int, idempotency_key: str = "k" * 32) -> bytes:
    """A valid event frame of exactly ``size`` bytes, as ``EventPublisher`` builds it: the
    data a string of ``e``s, MessagePack, the idempotency key in the ``idem`` header."""
    return event_frame_builder(event, idempotency_key)(event_data_length(event, size))


def event_frame_builder(event: str, idempotency_key: str) -> Callable[[int], bytes]:
    def build(length: int) -> bytes:
        payload = msgspec.msgpack.encode("e" * length)
        frame = Frame(Kind.EVENT, 0, event, payload, "", 0, {"idem": idempotency_key})
        return encode_frame(frame, HARD_MAX_FRAME_SIZE)

    return build


def event_data_length(event: str, size: int, idempotency_key: str = "k" * 32) -> int:
    """The length of the string of ``e``s whose event frame is ``size`` bytes."""
    return fill(event_frame_builder(event, idempotency_key), size)


def garbage(size: int, seed: int = 0) -> bytes:
    """``size`` random bytes that are not a frame (the first byte is no frame version)."""
    return b"\xff" + random.Random(seed).randbytes(size - 1)


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


# -- waiting and checking -----------------------------------------------------------------------


async def until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Wait until ``predicate()`` holds, at most ``timeout`` seconds; whether it did."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def answers_within(cluster: Cluster, service: str, seconds: float) -> str | None:
    """None if a normal call to ``service.ping()`` answers within ``seconds``, calling again
    when one fails fast (as calls do while a connection is re-established); otherwise
    what the last call saw."""
    deadline = time.monotonic() + seconds
    last = "no call was made"
    while (remaining := deadline - time.monotonic()) > 0:
        call = cluster.rpc[service].ping.with_timeout(remaining)
        try:
            result = await asyncio.wait_for(call(), remaining + 1.0)
        except (BasidiaError, TimeoutError) as exc:
            last = describe_error(exc)
            await asyncio.sleep(0.1)
            continue
        return None if result == "pong" else f"wrong answer {result!r}"
    return f"no answer within {seconds:g} s; the last call got {last}"


def broker_state(broker: Any) -> str:
    """What a failure message should say about the service's connection."""
    state = f"connected={broker.connected}"
    for counter in ("reconnect_attempts", "reconnects"):
        if hasattr(broker, counter):
            state += f", {counter}={getattr(broker, counter)}"
    return state


def loud_basidia_records(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.name.startswith("basidia") and r.levelno >= logging.WARNING]


# -- RabbitMQ and NATS plumbing -----------------------------------------------------------------


async def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q <args>`` (it must be allowed to reach the node: run as root)."""
    if not shutil.which(RABBITMQCTL):
        reason = f"needs {RABBITMQCTL} (apt-get install rabbitmq-server)"
        if REQUIRE_BROKERS:
            pytest.fail(f"{reason} and BASIDIA_REQUIRE_BROKERS=1 is set")
        pytest.skip(reason)
    process = await asyncio.create_subprocess_exec(
        RABBITMQCTL,
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {err.decode()[:500]}")
    return out.decode()


async def rabbit_queue_counts(queue: str) -> tuple[int, int] | None:
    """(ready, unacknowledged) messages of ``queue``, or None when it does not exist."""
    out = await rabbitmqctl(
        "list_queues", "name", "messages_ready", "messages_unacknowledged", "--no-table-headers"
    )
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    return None


async def amqp_passive_count(url: str, queue: str) -> int | None:
    """Ready messages of ``queue`` (all of them, when nothing consumes it); None if absent."""
    connection = await asyncio.wait_for(aiormq.connect(url), 10)
    try:
        channel = await connection.channel(timeout=5)
        try:
            ok = await channel.queue_declare(queue, passive=True, timeout=5)
        except aiormq.ChannelNotFoundEntity:
            return None
        return int(ok.message_count or 0)
    finally:
        await connection.close(timeout=5)


# -- raw publishers -----------------------------------------------------------------------------


class RawClient:
    """A client that can publish on a service's request queue or subject, and read its
    own reply inbox (``reply_to`` is the address to put in request frames); nothing else."""

    reply_to: str

    def __init__(self) -> None:
        self.replies: list[bytes] = []

    async def request(self, service: str, body: bytes) -> None:
        """Publish ``body`` as is on ``service``'s request queue or subject."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Return once everything published so far has reached the broker."""
        return None

    async def leftovers(self, service: str) -> str | None:
        """What the broker still holds of the requests sent to ``service`` (unsettled or
        waiting), or None if nothing: requests on NATS and in memory are never held."""
        return None

    async def close(self) -> None:
        raise NotImplementedError


class MemoryRaw(RawClient):
    """The memory broker has no client but ``MemoryBroker``: its send_request takes any bytes."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.broker = MemoryBroker(url)

    async def open(self) -> None:
        await self.broker.connect()
        self.reply_to = await self.broker.open_inbox(self.replies.append)

    async def request(self, service: str, body: bytes) -> None:
        await self.broker.send_request(service, body, correlation_id=0)

    async def close(self) -> None:
        await self.broker.close()


class AmqpRaw(RawClient):
    """aiormq: publishes to ``<prefix>.rpc.<service>`` on the default exchange; replies come
    through direct reply-to, as for any RabbitMQ caller."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.reply_to = DIRECT_REPLY_TO

    async def open(self) -> None:
        self.connection = await asyncio.wait_for(aiormq.connect(self.url), 10)
        self.channel = await self.connection.channel(timeout=5)

        async def on_reply(message: aiormq.abc.DeliveredMessage) -> None:
            self.replies.append(message.body)

        await self.channel.basic_consume(DIRECT_REPLY_TO, on_reply, no_ack=True, timeout=5)
        self._properties = spec.Basic.Properties(reply_to=DIRECT_REPLY_TO)

    async def request(self, service: str, body: bytes) -> None:
        await self.channel.basic_publish(
            body, routing_key=f"{self.prefix}.rpc.{service}", properties=self._properties
        )

    async def leftovers(self, service: str) -> str | None:
        queue = f"{self.prefix}.rpc.{service}"
        counts = await rabbit_queue_counts(queue)
        if counts is None:
            return f"the request queue {queue} is gone while the service runs"
        ready, unacked = counts
        if ready or unacked:
            return f"the request queue {queue} still has {ready} ready, {unacked} unacked"
        return None

    async def close(self) -> None:
        await self.connection.close(timeout=5)


class NatsRaw(RawClient):
    """nats-py: publishes to ``basidia.rpc.<service>``; replies on an inbox of its own."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    async def open(self) -> None:
        self.nc = await nats.connect(self.url, connect_timeout=5, allow_reconnect=False)
        inbox = self.nc.new_inbox()

        async def on_reply(msg: Any) -> None:
            self.replies.append(msg.data)

        await self.nc.subscribe(f"{inbox}.>", cb=on_reply)
        await self.nc.flush(timeout=5)
        self.reply_to = f"{inbox}.r"

    async def request(self, service: str, body: bytes) -> None:
        await self.nc.publish(NATS_RPC_PREFIX + service, body)

    async def flush(self) -> None:
        await self.nc.flush(timeout=30)

    async def close(self) -> None:
        await self.nc.close()


# -- the cases every broker shares --------------------------------------------------------------


class HostileInputs:
    """Subclasses provide ``broker_url`` and ``raw`` (a connected ``RawClient``), and may
    override ``config`` (the services') and ``caller_config`` (the normal caller's)."""

    @pytest.fixture
    def config(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def caller_config(self) -> dict[str, Any]:
        return {}

    async def test_an_unknown_keyword_with_a_huge_name_gets_a_typed_error(
        self,
        broker_url: str,
        config: dict[str, Any],
        caller_config: dict[str, Any],
        raw: RawClient,
        unique: str,
    ) -> None:
        """Case 4a: requests just under the frame limit whose validation error, which
        repeats the argument's name, is over it.  Each caller must get a typed error
        with a cut-down message, and the service must keep serving after more of them
        than it has workers."""
        service = f"hostile_{unique}"
        size = FRAME_LIMIT - 16
        async with ServiceRunner([target_service(service)], broker=broker_url, config=config):
            async with connect(broker_url, config=caller_config) as cluster:
                for correlation_id in range(1, HOSTILE_REQUESTS + 1):
                    body = huge_kwarg_request(service, "greet", raw.reply_to, correlation_id, size)
                    await raw.request(service, body)
                await raw.flush()
                await until(lambda: len(raw.replies) >= HOSTILE_REQUESTS, 15)
                verdict = await answers_within(cluster, service, ANSWER_WITHIN)
                await asyncio.sleep(0.5)  # room for a duplicate reply, which must not come
                leftovers = await raw.leftovers(service)
        errors: dict[int, BaseException] = {}
        others: list[str] = []
        for body in raw.replies:
            try:
                frame = decode_frame(body, FRAME_LIMIT)
            except FrameError as exc:
                others.append(f"an unreadable reply ({exc})")
                continue
            if frame.kind != Kind.ERROR:
                others.append(f"a {Kind(frame.kind).name} frame")
            elif frame.correlation_id in errors:
                others.append(f"a second reply to request {frame.correlation_id}")
            else:
                errors[frame.correlation_id] = error_from_frame(frame)
        kinds = Counter(type(exc).__name__ for exc in errors.values())
        assert len(errors) == HOSTILE_REQUESTS, (
            f"{len(errors)} of {HOSTILE_REQUESTS} requests with a {size}-byte frame got an "
            f"error reply within 15 s ({dict(kinds)}); the others' callers only get "
            f"RpcTimeout at their deadline. Other replies: {others[:3]}"
        )
        assert not others, f"unexpected replies: {others[:5]}"
        untyped = [
            describe_error(e)
            for e in errors.values()
            if not isinstance(e, RpcError) or isinstance(e, RpcTimeout)
        ]
        assert not untyped, f"expected typed RPC errors, not timeouts; got {untyped[:3]}"
        long_messages = [len(str(e)) for e in errors.values() if len(str(e)) >= FRAME_LIMIT]
        assert not long_messages, f"error messages not cut down: {long_messages[:3]} characters"
        assert verdict is None, (
            f"after {HOSTILE_REQUESTS} such requests to a service with {WORKERS} workers, "
            f"a normal call failed: {verdict}"
        )
        assert leftovers is None, leftovers

    async def test_an_exception_message_over_the_frame_limit_gets_a_typed_error(
        self,
        broker_url: str,
        config: dict[str, Any],
        caller_config: dict[str, Any],
        raw: RawClient,
        unique: str,
    ) -> None:
        """Case 4b: a handler raises with a 2 MiB message, through the normal client.
        Each call must fail with ``RemoteError`` and a cut-down message (not
        ``RpcTimeout``), and the service must keep serving after more such calls than it
        has workers."""
        service = f"hostile_{unique}"
        size = 2 * 1024 * 1024
        async with ServiceRunner([target_service(service)], broker=broker_url, config=config):
            async with connect(broker_url, config=caller_config, timeout=10) as cluster:
                started = time.monotonic()
                outcomes = await asyncio.gather(
                    *(cluster.rpc[service].explode(size) for _ in range(HOSTILE_REQUESTS)),
                    return_exceptions=True,
                )
                elapsed = time.monotonic() - started
                verdict = await answers_within(cluster, service, ANSWER_WITHIN)
                leftovers = await raw.leftovers(service)
        kinds = Counter(type(outcome).__name__ for outcome in outcomes)
        wrong = [o for o in outcomes if not isinstance(o, RpcError) or isinstance(o, RpcTimeout)]
        assert not wrong, (
            f"calls whose handler raised RuntimeError with a {size}-byte message ended in "
            f"{dict(kinds)} after {elapsed:.1f} s; expected a typed error, not a timeout"
        )
        for outcome in outcomes:
            assert isinstance(outcome, RpcError)
            message = outcome.message
            assert len(message) < FRAME_LIMIT, f"a message of {len(message)} characters came back"
            assert message.startswith("x" * 64), (
                f"the message should be the original's beginning, cut down; got {message[:100]!r}"
            )
            assert getattr(outcome, "exc_type", None) == "RuntimeError", describe_error(outcome)
        assert verdict is None, (
            f"after {HOSTILE_REQUESTS} such calls to a service with {WORKERS} workers, "
            f"a normal call failed: {verdict}"
        )
        assert leftovers is None, leftovers

    async def test_garbage_frames_are_counted_without_a_log_line_each(
        self,
        broker_url: str,
        config: dict[str, Any],
        caller_config: dict[str, Any],
        raw: RawClient,
        unique: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Case 5: 10,000 random byte strings on the request queue: all counted as
        malformed, at most a few dozen log lines for all of them, the service answers."""
        caplog.set_level(logging.DEBUG, logger="basidia")
        service = f"hostile_{unique}"
        rng = random.Random(5)
        async with ServiceRunner(
            [target_service(service)], broker=broker_url, config=config
        ) as runner:
            container = runner.containers[service]
            async with connect(broker_url, config=caller_config) as cluster:
                for _ in range(GARBAGE_FRAMES):
                    await raw.request(service, rng.randbytes(rng.randint(1, 200)))
                await raw.flush()
                await until(lambda: container.stats.malformed >= GARBAGE_FRAMES, 60)
                await asyncio.sleep(0.5)  # room for more, or for log lines that come late
                malformed = container.stats.malformed
                verdict = await answers_within(cluster, service, ANSWER_WITHIN)
                leftovers = await raw.leftovers(service)
        loud = loud_basidia_records(caplog.records)
        assert malformed == GARBAGE_FRAMES, (
            f"{GARBAGE_FRAMES} garbage frames, but the container counted {malformed} malformed"
        )
        assert len(loud) <= MAX_LOUD_LOG_LINES, (
            f"{len(loud)} log lines at WARNING or above for {GARBAGE_FRAMES} garbage frames "
            f"(at most {MAX_LOUD_LOG_LINES} wanted); the first: "
            f"{loud[0].name} {loud[0].levelname} {loud[0].getMessage()[:200]!r}"
        )
        assert verdict is None, f"after the garbage, a normal call failed: {verdict}"
        assert leftovers is None, leftovers


# -- the memory broker --------------------------------------------------------------------------


class TestMemoryHostile(HostileInputs):
    @pytest.fixture
    def broker_url(self, memory_url: str) -> str:
        return memory_url

    @pytest.fixture
    async def raw(self, memory_url: str) -> AsyncIterator[RawClient]:
        client = MemoryRaw(memory_url)
        await client.open()
        yield client
        await client.close()


# -- RabbitMQ -----------------------------------------------------------------------------------


def amqp_padded_properties(frame_max: int, spare: int, body: bytes, message_id: str) -> Any:
    """Message properties whose content-header frame is ``frame_max - spare`` bytes long:
    one application header ``x-hostile-padding`` of about ``frame_max`` bytes.

    A content header cannot be split over frames: a republish that adds headers (a retry's
    attempt number, a dead letter's reason) no longer fits, and RabbitMQ closes the
    connection that sends it (FRAME_ERROR)."""

    def properties(length: int) -> Any:
        return spec.Basic.Properties(
            delivery_mode=2, message_id=message_id, headers={"x-hostile-padding": "p" * length}
        )

    def header_frame(length: int) -> int:
        # message_id is set, so aiormq adds nothing: this is the frame it sends.
        return len(amqp_frame.marshal(ContentHeader(0, len(body), properties(length)), 1))

    length = frame_max - spare - header_frame(0)
    assert header_frame(length) == frame_max - spare
    return properties(length)


@pytest.mark.amqp
class TestAmqpHostile(HostileInputs):
    @pytest.fixture
    def broker_url(self, amqp_url: str) -> str:
        return amqp_url

    @pytest.fixture
    def prefix(self, unique: str) -> str:
        return f"basidia-hostile-{unique}"

    @pytest.fixture
    def connection_name(self, unique: str) -> str:
        return f"basidia-hostile-service-{unique}"

    @pytest.fixture
    def config(self, prefix: str, connection_name: str) -> dict[str, Any]:
        options = {
            "prefix": prefix,
            "name": connection_name,
            "reconnect_wait": 0.05,
            "reconnect_wait_max": 0.5,
        }
        return {"broker_options": options}

    @pytest.fixture
    def caller_config(self, prefix: str, unique: str) -> dict[str, Any]:
        return {"broker_options": {"prefix": prefix, "name": f"basidia-hostile-caller-{unique}"}}

    @pytest.fixture
    def amqp_queues(self) -> list[str]:
        """Queues the test declared; deleted after it, with the test's exchange."""
        return []

    @pytest.fixture(autouse=True)
    async def _clean_up(
        self, amqp_url: str, prefix: str, amqp_queues: list[str]
    ) -> AsyncIterator[None]:
        yield
        await delete_amqp(amqp_url, amqp_queues, [f"{prefix}.events"])

    @pytest.fixture
    async def raw(self, amqp_url: str, prefix: str) -> AsyncIterator[RawClient]:
        client = AmqpRaw(amqp_url, prefix)
        await client.open()
        yield client
        await client.close()

    @pytest.mark.timeout(90)
    @pytest.mark.parametrize("body_kind", ["failing handler", "garbage body"])
    async def test_an_event_whose_headers_fill_a_frame_is_dead_lettered_once(
        self,
        amqp_url: str,
        config: dict[str, Any],
        caller_config: dict[str, Any],
        prefix: str,
        amqp_queues: list[str],
        unique: str,
        body_kind: str,
    ) -> None:
        """Case 3: an event whose AMQP headers leave 40 bytes of RabbitMQ's frame_max, so
        that the retry's (attempt, event) and the dead letter's (reason, group, ...) extra
        headers overflow it.  A valid frame whose handler raises is retried and
        dead-lettered; a garbage body is dead-lettered at once.  Expected: no reconnect
        loop, RPC still served, exactly one dead letter with its reason, the group's
        queue empty, the handler not called again."""
        service = f"hostile_{unique}"
        event = f"hostile_{unique}.big"
        group_queue = f"{prefix}.events.{service}.on_big"
        dead_letter_queue = f"{group_queue}.dlq"
        amqp_queues += [group_queue, dead_letter_queue]
        attempts: list[int] = []
        body = event_frame(event, 200) if body_kind == "failing handler" else garbage(200)
        services = [event_service(service, event, attempts)]
        async with ServiceRunner(services, broker=amqp_url, config=config) as runner:
            broker = runner.broker
            async with connect(amqp_url, config=caller_config) as cluster:
                assert await answers_within(cluster, service, ANSWER_WITHIN) is None
                connection = await asyncio.wait_for(aiormq.connect(amqp_url), 10)
                try:
                    frame_max = connection.connection_tune.frame_max
                    properties = amqp_padded_properties(frame_max, 40, body, f"hostile-{unique}")
                    padding = len(properties.headers["x-hostile-padding"])
                    channel = await connection.channel(publisher_confirms=True, timeout=5)
                    confirm = await channel.basic_publish(
                        body,
                        exchange=f"{prefix}.events",
                        routing_key=event,
                        properties=properties,
                        timeout=10,
                    )
                finally:
                    await connection.close(timeout=5)
                assert isinstance(confirm, spec.Basic.Ack), (
                    f"precondition: RabbitMQ refused the hostile event itself: {confirm!r}"
                )
                # The dead letter, then a few seconds for a reconnect loop to show itself.
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    if (await amqp_passive_count(amqp_url, dead_letter_queue) or 0) >= 1:
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(3)
                state = broker_state(broker)
                reconnect_attempts = getattr(broker, "reconnect_attempts", 0)
                verdict = await answers_within(cluster, service, ANSWER_WITHIN)
                group_counts = await rabbit_queue_counts(group_queue)
                seen = list(attempts)
                await asyncio.sleep(1)
                seen_later = list(attempts)
        dead_letters = await amqp_passive_count(amqp_url, dead_letter_queue)
        letter = None
        if dead_letters:
            connection = await asyncio.wait_for(aiormq.connect(amqp_url), 10)
            try:
                channel = await connection.channel(timeout=5)
                got = await channel.basic_get(dead_letter_queue, no_ack=True, timeout=5)
                if isinstance(got.delivery, spec.Basic.GetOk):
                    letter = got
            finally:
                await connection.close(timeout=5)
        where = f"an event with {padding} bytes of padding headers ({body_kind})"
        assert reconnect_attempts == 0, (
            f"{where}: the service's connection was lost and reopened ({state}): "
            "a reconnect loop, RabbitMQ closing the connection on each republish"
        )
        assert verdict is None, f"{where}: a normal call failed: {verdict} ({state})"
        assert dead_letters == 1, (
            f"{where}: {dead_letters} copies in the dead-letter queue, 1 expected"
        )
        assert letter is not None, "the dead letter could not be read back"
        headers = letter.header.properties.headers or {}
        reason = headers.get(REASON_HEADER)
        assert isinstance(reason, str | bytes) and reason, (
            f"the dead letter has no {REASON_HEADER} header: {sorted(headers)}"
        )
        assert group_counts == (0, 0), (
            f"{where}: the group's queue still holds (ready, unacked) = {group_counts}"
        )
        assert seen == seen_later, f"the handler is still being called: {seen} then {seen_later}"
        if body_kind == "failing handler":
            assert 1 <= len(seen) <= 2, f"handler attempts {seen}; the event allows 2"
        else:
            assert seen == [], f"the handler was called with a garbage body: {seen}"

    @pytest.mark.timeout(60)
    async def test_a_connection_the_server_closes_comes_back(
        self,
        amqp_url: str,
        config: dict[str, Any],
        caller_config: dict[str, Any],
        connection_name: str,
        unique: str,
    ) -> None:
        """Case 6: ``rabbitmqctl close_connection`` on the service's connection (found by
        its client-provided name); the service must serve again within 10 s."""
        service = f"hostile_{unique}"
        async with ServiceRunner(
            [target_service(service)], broker=amqp_url, config=config
        ) as runner:
            async with connect(amqp_url, config=caller_config) as cluster:
                assert await answers_within(cluster, service, ANSWER_WITHIN) is None
                listing = await rabbitmqctl(
                    "list_connections", "pid", "client_properties", "--no-table-headers"
                )
                pids = [
                    line.split("\t")[0]
                    for line in listing.splitlines()
                    if f'{{"connection_name","{connection_name}"}}' in line
                ]
                assert len(pids) == 1, (
                    f"precondition: one connection named {connection_name} expected: {listing}"
                )
                broker: Any = runner.broker
                attempts = broker.reconnect_attempts
                await rabbitmqctl("close_connection", pids[0], "basidia hostile-input test")
                # Lost (possibly reconnected already: the backoff starts at 25 ms).
                closed = await until(
                    lambda: not broker.connected or broker.reconnect_attempts > attempts,
                    5,
                )
                verdict = await answers_within(cluster, service, RECONNECT_WITHIN)
                state = broker_state(runner.broker)
        assert closed, f"precondition: the server did not close the connection ({state})"
        assert verdict is None, f"after the server closed its connection: {verdict} ({state})"


# -- NATS ---------------------------------------------------------------------------------------


@pytest.mark.nats
class TestNatsHostile(HostileInputs):
    @pytest.fixture
    def broker_url(self, nats_url: str) -> str:
        return nats_url

    @pytest.fixture(autouse=True)
    async def _clean_up(self, nats_url: str, unique: str) -> AsyncIterator[None]:
        yield
        await delete_nats_consumers(
            nats_url, unique, purge_dlq=f"{NATS_DLQ_PREFIX}hostile_{unique}.>"
        )

    @pytest.fixture
    async def raw(self, nats_url: str) -> AsyncIterator[NatsRaw]:
        client = NatsRaw(nats_url)
        await client.open()
        yield client
        await client.close()

    @pytest.mark.timeout(60)
    async def test_a_reply_subject_over_the_control_line_limit_is_dropped(
        self, nats_url: str, raw: NatsRaw, unique: str
    ) -> None:
        """Case 1: ``reply_to`` = ``_INBOX.`` + 5,000 bytes.  Publishing the reply would
        send a control line over nats-server's limit (4 KiB): the server answers -ERR and
        nats-py closes the connection for good.  The request must be dropped and counted
        as malformed, and the service must keep answering."""
        service = f"hostile_{unique}"
        reply_to = "_INBOX." + "x" * 5000
        async with ServiceRunner([target_service(service)], broker=nats_url) as runner:
            container = runner.containers[service]
            async with connect(nats_url) as cluster:
                assert await answers_within(cluster, service, ANSWER_WITHIN) is None
                await raw.request(service, request_frame(service, "ping", reply_to))
                await raw.flush()
                await until(lambda: container.stats.malformed >= 1, 2)
                await asyncio.sleep(0.3)  # the server's -ERR, if the reply went out
                verdict = await answers_within(cluster, service, ANSWER_WITHIN)
                state = broker_state(runner.broker)
                malformed = container.stats.malformed
        assert verdict is None, (
            f"after a request with a {len(reply_to)}-byte reply subject, a normal call "
            f"failed: {verdict} (the service's connection: {state})"
        )
        assert malformed == 1, f"the request should count as malformed: malformed={malformed}"

    @pytest.mark.timeout(60)
    async def test_reply_subjects_with_blanks_or_crlf_are_dropped(
        self, nats_url: str, raw: NatsRaw, unique: str
    ) -> None:
        """Case 1: reply subjects with a blank, a tab, and CRLF carrying a whole PUB of
        their own (protocol injection).  Nothing may be published, on the inbox or on the
        injected subject; each request is dropped and counted as malformed."""
        service = f"hostile_{unique}"
        victim = f"hostile.victim.{unique}"
        inbox = f"_INBOX.hostile_{unique}"
        reply_subjects = [
            f"{inbox}.a b",
            f"{inbox}.a\tb",
            f"{inbox} 0\r\n\r\nPUB {victim} 6\r\nforged\r\nPUB {inbox}.tail",
        ]
        seen: list[str] = []

        async def spy(msg: Any) -> None:
            seen.append(f"{msg.subject}: {msg.data[:40]!r}")

        await raw.nc.subscribe(victim, cb=spy)
        await raw.nc.subscribe(inbox, cb=spy)
        await raw.nc.subscribe(f"{inbox}.>", cb=spy)
        await raw.flush()
        async with ServiceRunner([target_service(service)], broker=nats_url) as runner:
            container = runner.containers[service]
            async with connect(nats_url) as cluster:
                assert await answers_within(cluster, service, ANSWER_WITHIN) is None
                for index, reply_to in enumerate(reply_subjects, 1):
                    await raw.request(service, request_frame(service, "ping", reply_to, index))
                await raw.flush()
                await until(lambda: container.stats.malformed >= len(reply_subjects), 2)
                await asyncio.sleep(0.5)
                verdict = await answers_within(cluster, service, ANSWER_WITHIN)
                state = broker_state(runner.broker)
                malformed = container.stats.malformed
        await raw.flush()
        assert seen == [], f"hostile reply subjects made the service publish: {seen}"
        assert verdict is None, f"a normal call failed: {verdict} ({state})"
        assert malformed == len(reply_subjects), (
            f"{len(reply_subjects)} requests with blanks or CRLF in reply_to should count "
            f"as malformed: malformed={malformed}"
        )

    @pytest.mark.timeout(90)
    @pytest.mark.parametrize(
        ("body_kind", "margin"), [("failing handler", 500), ("garbage body", 100)]
    )
    async def test_an_event_whose_dead_letter_exceeds_max_payload_is_dead_lettered(
        self, nats_url: str, unique: str, body_kind: str, margin: int
    ) -> None:
        """Case 2: a JetStream event ``margin`` bytes under the server's max_payload.  A
        valid frame whose handler always raises (with a 2,000-character message) is
        retried, then dead-lettered; garbage is dead-lettered at once, with a short
        reason, hence the smaller margin.  The dead letter's headers push it over
        max_payload: today the server answers -ERR and the service's connection is
        closed for good.  Expected: the service keeps its connection and answers, the
        event is in the dead-letter stream (possibly cut down) with a reason, settled,
        and not redelivered."""
        service = f"hostile_{unique}"
        event = f"hostile_{unique}.big"
        subject = NATS_EVENT_PREFIX + event
        dlq_subject = NATS_DLQ_PREFIX + event
        attempts: list[int] = []
        services = [event_service(service, event, attempts)]
        nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=10)
            jsm = nc.jsm()
            size = nc.max_payload - margin
            body = event_frame(event, size) if body_kind == "failing handler" else garbage(size)
            async with ServiceRunner(services, broker=nats_url) as runner:
                broker = runner.broker
                reconnects = getattr(broker, "reconnects", 0)
                async with connect(nats_url) as cluster:
                    assert await answers_within(cluster, service, ANSWER_WITHIN) is None
                    await js.publish(subject, body)
                    letter = None
                    deadline = time.monotonic() + 10
                    while letter is None and time.monotonic() < deadline:
                        try:
                            letter = await jsm.get_last_msg(DLQ_STREAM, dlq_subject)
                        except nats.js.errors.NotFoundError:
                            await asyncio.sleep(0.1)
                    await asyncio.sleep(1)
                    verdict = await answers_within(cluster, service, ANSWER_WITHIN)
                    state = broker_state(broker)
                    reconnected = getattr(broker, "reconnects", 0) - reconnects
                    seen = list(attempts)
                    await asyncio.sleep(1)
                    seen_later = list(attempts)
                    info = await jsm.consumer_info(
                        EVENTS_STREAM, consumer_name(f"{service}.on_big", subject)
                    )
            stream = await jsm.stream_info(DLQ_STREAM, subjects_filter=dlq_subject)
            dead_letters = (stream.state.subjects or {}).get(dlq_subject, 0)
        finally:
            await nc.close()
        where = f"an event of {size} bytes, {margin} under max_payload ({body_kind})"
        assert verdict is None, (
            f"{where}: a normal call failed: {verdict} (the service's connection: {state})"
        )
        assert letter is not None, f"{where}: no dead letter within 10 s ({state})"
        assert dead_letters == 1, f"{where}: {dead_letters} dead letters, 1 expected"
        record = read_dead_letter(letter.headers or {}, letter.data or b"")
        assert record.reason, f"the dead letter has no reason: {letter.headers}"
        assert body.startswith(record.frame), (
            "the dead letter's body is not the event's (or its beginning)"
        )
        if len(record.frame) < len(body):
            assert record.truncated_from == len(body), letter.headers
        assert (info.num_ack_pending, info.num_pending) == (0, 0), (
            f"{where}: the event is not settled: {info.num_ack_pending} unacknowledged, "
            f"{info.num_pending} pending"
        )
        assert seen == seen_later, f"the event is redelivered: attempts {seen} then {seen_later}"
        if body_kind == "failing handler":
            assert seen == [1, 2], f"handler attempts {seen}, expected [1, 2]"
        else:
            assert seen == [], f"the handler was called with garbage: {seen}"
        assert reconnected == 0, f"{where}: the service's connection was replaced ({state})"

    @pytest.mark.timeout(60)
    async def test_a_dispatch_just_under_max_payload_raises_a_typed_error(
        self, nats_url: str, unique: str
    ) -> None:
        """Case 2: ``cluster.dispatch`` of an event whose frame is 8 bytes under the
        server's max_payload: nats-py checks the payload alone, but JetStream's
        ``Nats-Msg-Id`` header pushes the message over, and the server closes the
        connection.  Expected: ``BrokerError``, and the caller's connection still works
        (same connection: no reconnection)."""
        service = f"hostile_{unique}"
        event = f"hostile_{unique}.dispatched"
        attempts: list[int] = []
        services = [event_service(service, event, attempts)]
        async with ServiceRunner(services, broker=nats_url):
            async with connect(nats_url) as cluster:
                broker: Any = cluster.broker
                max_payload = broker._nc.max_payload
                if max_payload > FRAME_LIMIT:
                    pytest.skip(f"max_payload {max_payload} is over the frame limit")
                # The frame EventPublisher builds, 8 bytes under max_payload.
                key = "d" * 32
                length = event_data_length(event, max_payload - 8, key)
                data = "e" * length
                reconnects = broker.reconnects
                started = time.monotonic()
                outcome: BaseException | None = None
                try:
                    await cluster.dispatch(event, data, idempotency_key=key)
                except BaseException as exc:
                    outcome = exc
                elapsed = time.monotonic() - started
                await asyncio.sleep(0.5)  # the server's -ERR, if the publish went out
                state = broker_state(broker)
                small: BaseException | None = None
                try:
                    await cluster.dispatch(event, {"small": True})
                except BaseException as exc:
                    small = exc
                verdict = await answers_within(cluster, service, ANSWER_WITHIN)
                reconnected = broker.reconnects - reconnects
        assert isinstance(outcome, BrokerError), (
            f"dispatching {length} bytes of data ({max_payload - 8}-byte frame, max_payload "
            f"{max_payload}) ended in "
            f"{describe_error(outcome) if outcome else 'success'} after {elapsed:.1f} s; "
            "expected BrokerError"
        )
        assert small is None, (
            f"a small dispatch afterwards failed: {describe_error(small)} (the caller's "
            f"connection: {state})"
        )
        assert verdict is None, f"a call afterwards failed: {verdict} ({state})"
        assert reconnected == 0, f"the caller's connection was replaced ({state})"

    @pytest.mark.timeout(60)
    async def test_a_server_err_that_closes_the_service_connection_is_survived(
        self, nats_url: str, unique: str
    ) -> None:
        """Case 6: the service's own connection publishes on a 5,000-byte subject; the
        server answers -ERR (control line too long) and closes it.  nats-py treats that
        as closed for good; Basidia must treat it as a lost connection, reconnect, and
        serve again within 10 s."""
        service = f"hostile_{unique}"
        async with ServiceRunner([target_service(service)], broker=nats_url) as runner:
            async with connect(nats_url) as cluster:
                assert await answers_within(cluster, service, ANSWER_WITHIN) is None
                broker: Any = runner.broker
                attempts = broker.reconnect_attempts
                nc = broker._nc
                await nc.publish("x" * 5000, b"")
                # Lost (possibly reconnected already: the backoff starts at 50 ms).
                closed = await until(
                    lambda: (
                        not broker.connected or broker.reconnect_attempts > attempts or nc.is_closed
                    ),
                    5,
                )
                verdict = await answers_within(cluster, service, RECONNECT_WITHIN)
                state = broker_state(runner.broker)
        assert closed, f"precondition: the server did not close the connection ({state})"
        assert verdict is None, f"after the server's -ERR: {verdict} ({state})"

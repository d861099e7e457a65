"""The Redis broker, through redis-py's asyncio client: streams for requests and events,
pub/sub for replies (``docs/redis.md`` has the full picture).

Keys (``<p>`` is the ``prefix`` option, ``basidia`` by default):

* requests for a service go to the stream ``<p>:rpc:<service>``, read by its instances
  as competing consumers of the group ``rpc`` (``XREADGROUP ... NOACK``: at most once,
  as on core NATS); each instance keeps itself in the sorted set ``<p>:up:<service>``
  (member: its id, score: when its announcement expires), and a request to a service
  with no live member fails at once with ``ServiceUnavailable``;
* each process has one reply channel, the pub/sub channel ``<p>:inbox:<id>``;
* events go to the stream ``<p>:ev:<event>`` (bounded by ``MAXLEN ~``), one consumer
  group per (service, handler), acknowledged (``XACK``) after handling; a dead consumer's
  pending entries are taken over with ``XAUTOCLAIM`` after ``claim_idle`` seconds;
* a retry goes to the group's own stream ``<p>:retry:<group>`` (read with the event
  stream), at once or, after a delay, through the sorted set ``<p>:delay:<group>``: both
  are kept by Redis, so a pending retry survives a restart of its consumer;
* dead letters go to the stream ``<p>:dlq:<group>``, the groups that have some to the
  set ``<p>:dlq-groups``;
* the idempotency key of an event is kept as ``<p>:idem:<key>`` for ``duplicate_window``
  seconds: a repeat publish of it is dropped by Redis, whoever sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from basidia.brokers._common import Backoff, Names, Secrets, WorkerPool, parse_url
from basidia.brokers._redis_pipe import Pipe
from basidia.brokers.base import (
    Broker,
    DeadLetter,
    Delivery,
    DeliveryHandler,
    EventSubscription,
    Failure,
    InboxHandler,
    ServiceInfo,
    Subscription,
    dead_letter_headers,
    make_dead_letter,
    read_dead_letter,
)
from basidia.errors import BrokerError, ConfigError, ConnectionLost, ServiceUnavailable
from basidia.log import ThrottledLog

__all__ = ["RedisBroker"]

logger = logging.getLogger("basidia.brokers.redis")

T = TypeVar("T")

#: The consumer group of every request stream.
RPC_GROUP = "rpc"
_MAX_NAME_BYTES = 1024
_FRAME_FIELD = b"basidia-frame"
_LINK_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

# KEYS: presence, request stream; ARGV: now (ms), body, max length.
_SEND_REQUEST = """
if redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf') == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'b', ARGV[2])
return 1
"""
# KEYS: event stream, idempotency key; ARGV: body, max length, window (ms, 0: none).
_PUBLISH_EVENT = """
if ARGV[3] ~= '0' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'b', ARGV[1])
if ARGV[3] ~= '0' then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) end
return 1
"""
# KEYS: delay set, retry stream; ARGV: now (ms), batch.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'm', member)
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

_retry_encoder = msgspec.msgpack.Encoder()
_retry_decoder = msgspec.msgpack.Decoder(tuple[int, int, bytes, str])


def _new_id() -> str:
    return os.urandom(9).hex()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fields(raw: Any) -> dict[bytes, bytes]:
    """A stream entry's field list (``[f1, v1, f2, v2, ...]``) as a dict."""
    if isinstance(raw, dict):
        return raw
    it = iter(raw)
    return dict(zip(it, it, strict=True))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- deliveries ---------------------------------------------------------------------------------


class _RequestDelivery(Delivery):
    """A request, read with NOACK: nothing to settle but a requeue at shutdown."""

    __slots__ = ("_consumer",)

    def __init__(self, body: bytes, consumer: _RequestConsumer) -> None:
        self.body = body
        self._consumer = consumer

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        if requeue:
            # Shutting down: another instance takes it.
            await self._consumer.requeue(self.body)


class _EventDelivery(Delivery):
    """An event entry of the event stream or of the group's retry stream."""

    __slots__ = ("_attempt", "_consumer", "_first_failure", "_id", "_key", "_settled")

    def __init__(
        self,
        body: bytes,
        consumer: _EventConsumer,
        key: str,
        entry_id: bytes,
        attempt: int,
        first_failure: int,
    ) -> None:
        self.body = body
        self._consumer = consumer
        self._key = key
        self._id = entry_id
        self._attempt = attempt
        self._first_failure = first_failure
        self._settled = False

    @property
    def attempt(self) -> int:
        return self._attempt

    async def ack(self) -> None:
        if not self._settled:
            self._settled = True
            await self._consumer.settle(self._key, self._id)

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        if self._settled:
            return
        self._settled = True
        if not requeue:
            await self._consumer.settle(self._key, self._id)
            return
        retry = _retry_encoder.encode(
            (self._attempt + 1, self._first_failure or _now_ms(), self.body, _new_id())
        )
        await self._consumer.settle(self._key, self._id, retry=retry, delay=delay)

    async def dead_letter(self, failure: Failure) -> None:
        if self._settled:
            return
        self._settled = True
        consumer = self._consumer
        letter = make_dead_letter(
            failure,
            event=consumer.subscription.event,
            group=consumer.subscription.group,
            attempts=self._attempt,
            frame=self.body,
            first_failure=self._first_failure / 1000 if self._first_failure else None,
        )
        await consumer.settle(self._key, self._id, letter=letter)


# -- consumers ----------------------------------------------------------------------------------


class _Reader(WorkerPool[Delivery]):
    """``concurrency`` workers fed by one reader task that blocks on ``XREADGROUP`` on a
    connection of its own, asking for no more entries than there are idle workers.

    ``cancel`` unblocks the reader (``CLIENT UNBLOCK``), handles what it was handed, and
    lets the busy workers finish.
    """

    def __init__(
        self, broker: RedisBroker, handler: DeliveryHandler, concurrency: int, where: str
    ) -> None:
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        super().__init__(
            self._queue, self._serve, concurrency, drain=True, logger=logger, where=where
        )
        self.broker = broker
        self._handler = handler
        self.consumer = _new_id()
        self._busy = 0
        self._room = asyncio.Event()
        self._room.set()
        self._conn: AbstractConnection | None = None
        self._client_id: int | None = None
        self._reading = False
        self._halted = False
        self._tasks: list[asyncio.Task[None]] = []

    async def _serve(self, delivery: Delivery) -> None:
        try:
            await self._handler(delivery)
        finally:
            self._busy -= 1
            self._room.set()

    def start(self) -> None:
        self.start_workers()
        self._tasks.append(asyncio.ensure_future(self._read_loop()))

    async def prepare(self) -> None:
        """Create the consumer groups (before the subscription is returned)."""

    def command(self, count: int) -> list[Any]:
        raise NotImplementedError

    def accept(self, reply: Any) -> None:
        raise NotImplementedError

    async def _read_loop(self) -> None:
        broker = self.broker
        failures = 0
        while not self._halted:
            free = self.concurrency - self._busy
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                conn = self._conn
                if conn is None:
                    conn = self._conn = broker.new_connection(broker.block)
                    await conn.connect()  # type: ignore[no-untyped-call]
                    await conn.send_command("CLIENT", "ID")
                    self._client_id = int(await conn.read_response())
                    await self.prepare()
                if self.halted:
                    break
                self._reading = True
                try:
                    await conn.send_command(*self.command(free))
                    reply = await conn.read_response()
                finally:
                    self._reading = False
                failures = 0
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The server lost the group (restarted without persistence): make it again.
                    with contextlib.suppress(RedisError, *_LINK_ERRORS):
                        await self.prepare()
                    continue
                failures += 1
                broker.throttled(f"reading {self.where}", exc)
                await asyncio.sleep(broker.backoff.delay(failures))
                continue
            except (RedisError, *_LINK_ERRORS) as exc:
                failures += 1
                await self._drop_connection()
                broker.link_trouble(exc)
                await asyncio.sleep(broker.backoff.delay(failures))
                continue
            if reply:
                self.accept(reply)
                # Let the workers start on what came (their replies go out first) before
                # the next read is written.
                await asyncio.sleep(0)

    @property
    def halted(self) -> bool:
        """True once ``cancel`` began: no new read is sent."""
        return self._halted

    def hand_over(self, delivery: Delivery) -> None:
        self._busy += 1
        self._queue.put_nowait(delivery)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def cancel(self) -> None:
        if self._halted:
            return
        self._halted = True  # the reader sends no new read
        self._room.set()
        reader = self._tasks[0]
        if self._reading and self._client_id is not None:
            # Unblock the read under way; whatever it was handed still comes back to it.
            with contextlib.suppress(TimeoutError, RedisError, *_LINK_ERRORS):
                unblock = self.broker.run("CLIENT", "UNBLOCK", self._client_id)
                await asyncio.wait_for(unblock, self.broker.socket_timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(reader), self.broker.socket_timeout)
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            ended = asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.wait_for(ended, self.broker.socket_timeout)
        await self._drop_connection()
        await self._stop()
        await self.withdraw()

    async def withdraw(self) -> None:
        """What a stopped consumer removes from Redis."""

    async def aclose(self) -> None:
        await self.cancel()
        await super().aclose()


class _RequestConsumer(_Reader):
    """An instance of a service, competing for its request stream."""

    def __init__(
        self, broker: RedisBroker, service: str, handler: DeliveryHandler, concurrency: int
    ) -> None:
        self.stream = broker.request_streams[service]
        super().__init__(broker, handler, concurrency, f"stream {self.stream}")
        self.presence = broker.presence_keys[service]

    async def prepare(self) -> None:
        await self.broker.create_group(self.stream, RPC_GROUP, "$")
        await self.announce()

    async def announce(self) -> None:
        expires = _now_ms() + int(self.broker.presence_ttl * 1000)
        await self.broker.run("ZADD", self.presence, expires, self.consumer)

    def start(self) -> None:
        super().start()
        self._tasks.append(asyncio.ensure_future(self._keep_announcing()))

    async def _keep_announcing(self) -> None:
        broker = self.broker
        while True:
            await asyncio.sleep(broker.presence_ttl / 3)
            try:
                await self.announce()
                await broker.run("ZREMRANGEBYSCORE", self.presence, "-inf", _now_ms())
            except (RedisError, *_LINK_ERRORS) as exc:
                broker.link_trouble(exc)

    def command(self, count: int) -> list[Any]:
        return [
            "XREADGROUP", "GROUP", RPC_GROUP, self.consumer, "COUNT", count,
            "BLOCK", self.broker.block_ms, "NOACK", "STREAMS", self.stream, ">",
        ]  # fmt: skip

    def accept(self, reply: Any) -> None:
        for _stream, entries in _streams(reply):
            for _entry_id, raw in entries:
                if raw is None:
                    continue
                body = _fields(raw).get(b"b")
                if body is not None:
                    self.hand_over(_RequestDelivery(body, self))

    async def requeue(self, body: bytes) -> None:
        with contextlib.suppress(RedisError, *_LINK_ERRORS):
            await self.broker.run(
                "XADD", self.stream, "MAXLEN", "~", self.broker.request_max_len, "*", "b", body
            )

    async def withdraw(self) -> None:
        with contextlib.suppress(RedisError, *_LINK_ERRORS):
            await self.broker.run("ZREM", self.presence, self.consumer)


class _EventConsumer(_Reader):
    """A member of an event's consumer group: reads the event stream and the group's retry
    stream, moves due delayed retries, and takes over the entries of dead members."""

    def __init__(
        self,
        broker: RedisBroker,
        subscription: EventSubscription,
        handler: DeliveryHandler,
        concurrency: int,
    ) -> None:
        self.subscription = subscription
        self.stream = broker.event_streams[subscription.event]
        # A broadcast handler: a group of its own per instance.
        self.group = subscription.group
        if subscription.broadcast:
            self.group = f"{subscription.group}.{_new_id()}"
        prefix = broker.prefix
        self.retry_stream = f"{prefix}:retry:{self.group}"
        self.delay_set = f"{prefix}:delay:{self.group}"
        self.dlq = broker.dlq_streams[subscription.group]
        super().__init__(broker, handler, concurrency, f"stream {self.stream}")

    async def prepare(self) -> None:
        await self.broker.create_group(self.stream, self.group, "$")
        # Retries and replays written before any member ran are read too.
        await self.broker.create_group(self.retry_stream, self.group, "0")

    def start(self) -> None:
        super().start()
        self._tasks.append(asyncio.ensure_future(self._keep_up()))

    def command(self, count: int) -> list[Any]:
        return [
            "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count,
            "BLOCK", self.broker.block_ms, "STREAMS", self.stream, self.retry_stream, ">", ">",
        ]  # fmt: skip

    def accept(self, reply: Any, counts: dict[bytes, int] | None = None) -> None:
        for stream, entries in _streams(reply):
            key = _text(stream)
            self.accept_entries(key, entries, counts)

    def accept_entries(
        self, key: str, entries: Any, counts: dict[bytes, int] | None = None
    ) -> None:
        retry = key == self.retry_stream
        for entry_id, raw in entries:
            if raw is None:  # trimmed away while pending
                continue
            fields = _fields(raw)
            redeliveries = (counts.get(entry_id, 1) - 1) if counts else 0
            if retry:
                try:
                    attempt, first, body, _ = _retry_decoder.decode(fields.get(b"m", b""))
                except (msgspec.DecodeError, ValueError):
                    attempt, first, body = 1, 0, fields.get(b"m", b"")
            else:
                attempt, first, body = 1, 0, fields.get(b"b", b"")
            self.hand_over(_EventDelivery(body, self, key, entry_id, attempt + redeliveries, first))

    async def _keep_up(self) -> None:
        """Move due delayed retries, and take over the entries of members gone silent."""
        broker = self.broker
        last_claim = time.monotonic()
        while True:
            await asyncio.sleep(broker.retry_poll)
            try:
                await broker.run_script(
                    "move_due", 2, self.delay_set, self.retry_stream, _now_ms(), 100
                )
                if time.monotonic() - last_claim >= broker.claim_interval:
                    last_claim = time.monotonic()
                    for stream in (self.stream, self.retry_stream):
                        await self._claim(stream)
            except (RedisError, *_LINK_ERRORS) as exc:
                broker.link_trouble(exc)

    async def _claim(self, stream: str) -> None:
        broker = self.broker
        free = self.concurrency - self._busy
        if free <= 0 or self.stopping:
            return
        idle = int(broker.claim_idle * 1000)
        client = broker.client()
        reply = await client.xautoclaim(stream, self.group, self.consumer, idle, "0-0", count=free)
        entries = [entry for entry in reply[1] if entry[0] is not None and entry[1] is not None]
        if not entries or self.stopping:
            return
        # How often each was delivered already: the attempt number counts the deliveries.
        pending = await client.xpending_range(
            stream, self.group, entries[0][0], entries[-1][0], len(entries) * 2, self.consumer
        )
        rows: list[dict[str, Any]] = list(pending)
        counts: dict[bytes, int] = {row["message_id"]: int(row["times_delivered"]) for row in rows}
        logger.info("took over %d pending entries of %s", len(entries), stream)
        self.accept_entries(stream, entries, counts)

    async def settle(
        self,
        key: str,
        entry_id: bytes,
        *,
        retry: bytes | None = None,
        delay: float = 0.0,
        letter: DeadLetter | None = None,
    ) -> None:
        """Acknowledge an entry, writing its retry or dead letter in the same transaction.
        Never raises: an entry left unacknowledged is delivered again."""
        broker = self.broker
        commands: list[tuple[Any, ...]] = []
        if retry is not None:
            if delay > 0:
                due = _now_ms() + int(delay * 1000)
                commands.append(("ZADD", self.delay_set, due, retry))
            else:
                commands.append(("XADD", self.retry_stream, "*", "m", retry))
        if letter is not None:
            fields: list[Any] = []
            for name, value in dead_letter_headers(letter).items():
                fields += [name, value]
            fields += [_FRAME_FIELD, letter.frame]
            commands.append(
                ("XADD", self.dlq, "MAXLEN", "~", broker.dead_letter_max_len, "*", *fields)
            )
            commands.append(("SADD", broker.dlq_groups_key, self.subscription.group))
        commands.append(("XACK", key, self.group, entry_id))
        if key == self.retry_stream:
            commands.append(("XDEL", key, entry_id))
        try:
            await broker.transaction(commands)
        except (RedisError, *_LINK_ERRORS) as exc:
            broker.link_trouble(exc)

    async def withdraw(self) -> None:
        if self.subscription.broadcast:
            with contextlib.suppress(RedisError, *_LINK_ERRORS):
                await self.broker.run("XGROUP", "DESTROY", self.stream, self.group)
                await self.broker.run("DEL", self.retry_stream, self.delay_set)


def _streams(reply: Any) -> list[tuple[Any, Any]]:
    """``XREADGROUP``'s reply as (stream, entries) pairs (RESP2 list or RESP3 map)."""
    if isinstance(reply, dict):
        return list(reply.items())
    return [(item[0], item[1]) for item in reply]


# -- the broker ---------------------------------------------------------------------------------


class RedisBroker(Broker):
    """A connection to Redis (``redis://`` or ``rediss://``, ``/<db>`` for a database
    other than 0).

    Options (keyword arguments, also accepted as ``broker_options`` in the config):

    * ``connect_timeout``: seconds to open a connection;
    * ``socket_timeout``: seconds any command may take (blocking reads: that beyond their
      block time); a silent link is declared dead after it;
    * ``ping_interval``: seconds between the health checks of the connection;
    * ``publish_timeout``: seconds an event publish may take, waiting for a connection
      included (``BrokerError`` after it: publish again, the idempotency key keeps it
      from being stored twice);
    * ``block``: seconds a read blocks waiting for entries before asking again;
    * ``max_connections``: connections for commands (readers have one each);
    * ``reconnect_wait``, ``reconnect_wait_max``: capped exponential backoff, with jitter,
      between reconnection attempts;
    * ``prefix``: first word of every key;
    * ``presence_ttl``: seconds an instance's announcement lasts (renewed every third of
      it): how long after a crash calls to a service still queue for it;
    * ``claim_idle``: seconds an event entry stays with a silent member before another
      takes it over (``XAUTOCLAIM``); keep it above the longest handler;
    * ``retry_poll``: seconds between the checks for due delayed retries;
    * ``stream_max_len``, ``request_max_len``, ``dead_letter_max_len``: approximate
      length bound (``MAXLEN ~``) of each event, request and dead-letter stream;
    * ``duplicate_window``: seconds Redis remembers an event's idempotency key (0: never);
    * ``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``: TLS trust and client
      certificate for ``rediss://``; the server certificate and host name are always
      verified.
    """

    # A request to a service without a live consumer is refused by the send script
    # (presence keys): the broker says "no responders" itself.
    reports_no_responders = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        connect_timeout: float = 5.0,
        socket_timeout: float = 5.0,
        ping_interval: float = 2.0,
        publish_timeout: float = 5.0,
        block: float = 2.0,
        max_connections: int = 64,
        reconnect_wait: float = 0.1,
        reconnect_wait_max: float = 5.0,
        prefix: str = "basidia",
        presence_ttl: float = 15.0,
        claim_idle: float = 60.0,
        retry_poll: float = 0.25,
        stream_max_len: int = 1_000_000,
        request_max_len: int = 100_000,
        dead_letter_max_len: int = 100_000,
        duplicate_window: float = 120.0,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
    ) -> None:
        super().__init__()
        parsed = parse_url(url, "Redis", ("redis", "rediss"))
        parts = parsed.parts
        self.safe_url = parsed.safe
        self._secrets = Secrets(parsed.secrets)
        db_text = parts.path.strip("/") or "0"
        if not db_text.isdigit():
            raise ConfigError(f"invalid Redis URL {parsed.safe!r}: the path must be a db number")
        tls = parts.scheme == "rediss"
        if not tls and any((tls_ca_file, tls_cert_file, tls_key_file)):
            raise ConfigError("TLS options need a rediss:// URL")
        if not prefix or any(ch in prefix for ch in " \r\n"):
            raise ConfigError(f"invalid Redis key prefix {prefix!r}")
        self._options: dict[str, Any] = {
            "host": parsed.parts.hostname or "127.0.0.1",
            "port": parsed.port or 6379,
            "db": int(db_text),
            "username": parsed.user or None,
            "password": parsed.password,
            "socket_connect_timeout": float(connect_timeout),
            "socket_timeout": float(socket_timeout),
            "retry": Retry(NoBackoff(), 0),
        }
        if tls:
            self._options.update(
                ssl=True,
                ssl_ca_certs=tls_ca_file,
                ssl_certfile=tls_cert_file,
                ssl_keyfile=tls_key_file,
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
            )
        self.socket_timeout = float(socket_timeout)
        self._connect_timeout = float(connect_timeout)
        self._ping_interval = float(ping_interval)
        self._publish_timeout = float(publish_timeout)
        self.block = float(block)
        self.block_ms = max(1, int(self.block * 1000))
        self._max_connections = int(max_connections)
        self.backoff = Backoff(float(reconnect_wait), float(reconnect_wait_max))
        self.prefix = prefix
        self.presence_ttl = float(presence_ttl)
        self.claim_idle = float(claim_idle)
        self.claim_interval = max(0.05, self.claim_idle / 2)
        self.retry_poll = float(retry_poll)
        self.stream_max_len = int(stream_max_len)
        self.request_max_len = int(request_max_len)
        self.dead_letter_max_len = int(dead_letter_max_len)
        self._window_ms = str(int(float(duplicate_window) * 1000))
        self.dlq_groups_key = f"{prefix}:dlq-groups"
        self._inbox_prefix = f"{prefix}:inbox:"
        self.request_streams = Names(lambda s: f"{prefix}:rpc:{_checked(s, 'service name')}")
        self.presence_keys = Names(lambda s: f"{prefix}:up:{_checked(s, 'service name')}")
        self.event_streams = Names(lambda e: f"{prefix}:ev:{_checked(e, 'event name')}")
        self.dlq_streams = Names(lambda g: f"{prefix}:dlq:{_checked(g, 'group name')}")

        self._client: aioredis.Redis | None = None
        self._pipe: Pipe | None = None
        self._scripts: dict[str, tuple[str, str]] = {}
        self._consumers: list[_Reader] = []
        self._inbox = ""
        self._inbox_handlers: dict[bytes, InboxHandler] = {}
        self._inbox_conn: AbstractConnection | None = None
        self._inbox_task: asyncio.Task[None] | None = None
        self._inbox_subscribed: set[bytes] = set()
        self._inbox_changed = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self._connected = False
        self._check_now: asyncio.Event | None = None
        self._throttled_log = ThrottledLog(logger)
        #: Failed health checks while down (each one waited its backoff first).
        self.reconnect_attempts = 0
        #: Times the connection came back.
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"RedisBroker({self.safe_url!r})"

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def reply_to_problem(self, reply_to: str) -> str | None:
        if len(reply_to) > 256:
            return f"reply address of {len(reply_to)} characters (at most 256)"
        if not reply_to.startswith(self._inbox_prefix):
            return f"reply address {reply_to[:64]!r} is not a {self._inbox_prefix}* channel"
        return None

    def client(self) -> aioredis.Redis:
        """The client of the shared pool."""
        return self._redis()

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise BrokerError(f"{self!r} is not connected")
        return self._client

    def new_connection(self, block: float = 0.0) -> AbstractConnection:
        """A connection of its own, for reads that block up to ``block`` seconds."""
        pool = self._redis().connection_pool
        options = dict(pool.connection_kwargs)
        options["socket_timeout"] = self.socket_timeout + block
        return pool.connection_class(**options)

    def _error(self, what: str, exc: BaseException) -> BrokerError:
        text = f"{what} on {self.safe_url}: {self._secrets.describe(exc)}"
        if isinstance(exc, ResponseError):
            return BrokerError(text)
        return ConnectionLost(text)

    async def run(self, *args: Any) -> Any:
        """One command on the shared pool (errors are redis-py's)."""
        return await self._redis().execute_command(*args)  # type: ignore[no-untyped-call]

    async def run_script(self, name: str, numkeys: int, *args: Any) -> Any:
        """One of the broker's scripts, on the pipelined connection (errors are redis-py's)."""
        sha, source = self._scripts[name]
        execute = self._pipe_or_raise().execute
        try:
            return await execute("EVALSHA", sha, numkeys, *args)
        except NoScriptError:
            # The server lost its script cache (a restart): EVAL runs and caches it again.
            return await execute("EVAL", source, numkeys, *args)

    def _pipe_or_raise(self) -> Pipe:
        if self._pipe is None:
            raise BrokerError(f"{self!r} is not connected")
        return self._pipe

    async def transaction(self, commands: Sequence[Sequence[Any]]) -> None:
        async with self._redis().pipeline(transaction=True) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()

    async def create_group(self, stream: str, group: str, start: str) -> None:
        try:
            await self.run("XGROUP", "CREATE", stream, group, start, "MKSTREAM")
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def throttled(self, what: str, exc: BaseException) -> None:
        self._throttled_log.log(
            logging.WARNING, what, "Redis error %s: %s", what, self._secrets.describe(exc)
        )

    def link_trouble(self, exc: BaseException) -> None:
        """A command failed on the link: check the connection now."""
        logger.debug("Redis link trouble: %s", self._secrets.describe(exc))
        if self._check_now is not None:
            self._check_now.set()

    # -- connection ----------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client is not None:
            return
        # Commands wait for a free connection of the pool (up to the socket timeout).
        pool = aioredis.BlockingConnectionPool(
            max_connections=self._max_connections,
            timeout=self.socket_timeout,
            protocol=2,
            **self._options,
        )
        client = aioredis.Redis(connection_pool=pool)
        try:
            await asyncio.wait_for(client.ping(), self._connect_timeout + self.socket_timeout)
            for name, source in (
                ("send_request", _SEND_REQUEST),
                ("publish_event", _PUBLISH_EVENT),
                ("move_due", _MOVE_DUE),
            ):
                sha = await client.script_load(source)
                self._scripts[name] = (str(sha), source)
        except (TimeoutError, RedisError, *_LINK_ERRORS) as exc:
            with contextlib.suppress(Exception):
                await client.aclose(close_connection_pool=True)
            raise self._error("could not connect", exc) from None
        self._client = client
        self._pipe = Pipe(self.new_connection, self.link_trouble)
        self._connected = True
        self._check_now = asyncio.Event()
        self._inbox = f"{self._inbox_prefix}{_new_id()}"
        self._monitor = asyncio.ensure_future(self._watch())
        logger.info("connected to %s", self.safe_url)

    async def _watch(self) -> None:
        """Ping every ``ping_interval`` (at once after a failed command): tell the framework
        when the link is lost, and when it is back."""
        assert self._check_now is not None
        check_now = self._check_now
        failures = 0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(check_now.wait(), self._ping_interval)
            check_now.clear()
            try:
                await asyncio.wait_for(self._redis().ping(), self.socket_timeout)
            except (TimeoutError, RedisError, *_LINK_ERRORS) as exc:
                failures += 1
                self.reconnect_attempts += 1
                if self._connected:
                    self._connected = False
                    logger.warning("lost the connection to %s; reconnecting", self.safe_url)
                    self._notify_disconnect(
                        ConnectionLost(f"lost the connection to {self.safe_url}: "
                                       f"{self._secrets.describe(exc)}")
                    )  # fmt: skip
                await asyncio.sleep(self.backoff.delay(failures))
                check_now.set()
                continue
            failures = 0
            if not self._connected:
                self._connected = True
                self.reconnects += 1
                logger.info("reconnected to %s", self.safe_url)

    async def close(self) -> None:
        client = self._client
        if client is None:
            return
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            try:
                await asyncio.wait_for(consumer.aclose(), self.socket_timeout * 2)
            except Exception:
                logger.exception("could not stop a consumer")
        for task in (self._monitor, self._inbox_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._monitor = self._inbox_task = None
        if self._inbox_conn is not None:
            with contextlib.suppress(Exception):
                await self._inbox_conn.disconnect()
            self._inbox_conn = None
        self._inbox_handlers.clear()
        self._inbox_subscribed.clear()
        self._connected = False
        self._client = None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await pipe.aclose()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.aclose(close_connection_pool=True), self.socket_timeout)
        logger.info("closed the connection to %s", self.safe_url)

    # -- RPC -----------------------------------------------------------------------------------

    async def serve_requests(
        self, service: str, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        consumer = _RequestConsumer(self, service, handler, concurrency)
        await self._start(consumer, f"serve {service!r}")
        return consumer

    async def _start(self, consumer: _Reader, what: str) -> None:
        try:
            await consumer.prepare()
        except (RedisError, *_LINK_ERRORS) as exc:
            raise self._error(f"could not {what}", exc) from None
        consumer.start()
        self._consumers.append(consumer)

    async def send_request(self, service: str, body: bytes, *, correlation_id: int) -> None:
        if not self._connected:
            # Fail fast instead of a call that would wait for its deadline.
            raise ConnectionLost(f"not connected to {self.safe_url}")
        try:
            sent = await self.run_script(
                "send_request",
                2,
                self.presence_keys[service],
                self.request_streams[service],
                _now_ms(),
                body,
                self.request_max_len,
            )
        except (RedisError, *_LINK_ERRORS) as exc:
            self.link_trouble(exc)
            raise self._error(f"could not send a request to {service!r}", exc) from None
        if not sent:
            raise ServiceUnavailable(f"no instance of service {service!r} is running")

    async def open_inbox(self, handler: InboxHandler) -> str:
        channel = f"{self._inbox}.{len(self._inbox_handlers)}"
        name = channel.encode()
        self._inbox_handlers[name] = handler
        if self._inbox_task is None:
            self._inbox_task = asyncio.ensure_future(self._read_inbox())
        elif self._inbox_conn is not None:
            with contextlib.suppress(RedisError, *_LINK_ERRORS):
                await self._inbox_conn.send_command("SUBSCRIBE", channel)
        deadline = time.monotonic() + self._connect_timeout + self.socket_timeout
        while name not in self._inbox_subscribed:
            if time.monotonic() > deadline:
                raise ConnectionLost(f"could not open a reply channel on {self.safe_url}")
            self._inbox_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._inbox_changed.wait(), 0.1)
        return channel

    async def _read_inbox(self) -> None:
        """The reply channel: pub/sub messages routed synchronously to their handler; a
        silent link is pinged, and dropped after two unanswered pings."""
        handlers = self._inbox_handlers
        subscribed = self._inbox_subscribed
        failures = 0
        while True:
            conn = self.new_connection()
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command("SUBSCRIBE", *handlers)
                self._inbox_conn = conn
                unanswered = 0
                while True:
                    message = await conn.read_response(timeout=self._ping_interval)
                    if message is None:
                        if unanswered >= 2:
                            raise RedisTimeoutError("the reply channel's pings went unanswered")
                        unanswered += 1
                        await conn.send_command("PING")
                        continue
                    kind = message[0]
                    if kind == b"message":
                        handler = handlers.get(message[1])
                        if handler is not None:
                            try:
                                handler(message[2])
                            except Exception:
                                logger.exception("the reply handler failed")
                    elif kind == b"pong":
                        unanswered = 0
                    elif kind == b"subscribe":
                        failures = 0
                        subscribed.add(message[1])
                        self._inbox_changed.set()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                raise
            except (RedisError, *_LINK_ERRORS) as exc:
                self._inbox_conn = None
                subscribed.clear()
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                self.link_trouble(exc)
                failures += 1
                await asyncio.sleep(self.backoff.delay(failures))

    async def send_reply(self, reply_to: str, body: bytes) -> None:
        if not reply_to.startswith(self._inbox_prefix):
            logger.debug("dropped a reply to a non-inbox channel")
            return
        try:
            # Nobody listening is not an error.
            await self._pipe_or_raise().execute("PUBLISH", reply_to, body)
        except (RedisError, *_LINK_ERRORS) as exc:
            self.link_trouble(exc)
            raise self._error("could not send a reply", exc) from None

    async def register_service(self, info: ServiceInfo) -> None:
        """Nothing to add: every instance serving requests is in ``<p>:up:<service>``."""

    # -- events --------------------------------------------------------------------------------

    async def publish_event(
        self, event: str, body: bytes, *, idempotency_key: str, key: str | None = None
    ) -> None:
        # One stream per event, read in order by each group: ``key`` needs no routing.
        stream = self.event_streams[event]
        window = self._window_ms if idempotency_key else "0"
        try:
            await asyncio.wait_for(
                self.run_script(
                    "publish_event",
                    2,
                    stream,
                    f"{self.prefix}:idem:{idempotency_key}",
                    body,
                    self.stream_max_len,
                    window,
                ),
                self._publish_timeout,
            )
        except (TimeoutError, RedisError, *_LINK_ERRORS) as exc:
            self.link_trouble(exc)
            raise self._error(f"could not publish event {event!r}", exc) from None

    async def subscribe_events(
        self, subscription: EventSubscription, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        consumer = _EventConsumer(self, subscription, handler, concurrency)
        await self._start(consumer, f"subscribe to {subscription.event!r}")
        return consumer

    # -- dead letters --------------------------------------------------------------------------

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except (RedisError, *_LINK_ERRORS) as exc:
            raise self._error(what, exc) from None

    async def _letters(
        self, group: str, ids: Sequence[str] | None, limit: int | None
    ) -> list[DeadLetter]:
        stream = self.dlq_streams[group]
        entries: list[Any] = []
        if ids is None:
            start = "-"
            while limit is None or len(entries) < limit:
                want = 1000 if limit is None else min(1000, limit - len(entries))
                batch = await self.run("XRANGE", stream, start, "+", "COUNT", want)
                entries += batch
                if len(batch) < want:
                    break
                start = "(" + _text(batch[-1][0])
        else:
            for entry_id in dict.fromkeys(ids):
                with contextlib.suppress(ResponseError):  # not an entry id
                    entries += await self.run("XRANGE", stream, entry_id, entry_id)
        letters = []
        for entry_id, raw in entries:
            fields = {_text(name): value for name, value in _fields(raw).items()}
            frame = fields.pop(_FRAME_FIELD.decode(), b"")
            letter = read_dead_letter(fields, frame)
            letters.append(dataclasses.replace(letter, id=_text(entry_id)))
        return letters

    async def dead_letters(self, group: str, *, limit: int = 100) -> list[DeadLetter]:
        """Read ``group``'s dead letters from ``<p>:dlq:<group>`` (nothing is removed)."""
        if limit <= 0:
            return []
        return await self._call(
            "could not read dead letters", lambda: self._letters(group, None, limit)
        )

    async def dead_letter_groups(self) -> list[str]:
        async def groups() -> list[str]:
            names = sorted(_text(name) for name in await self.run("SMEMBERS", self.dlq_groups_key))
            kept = []
            for name in names:
                if await self.run("XLEN", self.dlq_streams[name]):
                    kept.append(name)
            return kept

        return await self._call("could not list dead-letter groups", groups)

    async def replay_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        """Move dead letters back to ``group``'s retry stream, as first attempts."""

        async def replay() -> int:
            letters = await self._letters(group, ids, None)
            stream = self.dlq_streams[group]
            retry_stream = f"{self.prefix}:retry:{group}"
            replayed = 0
            for letter in letters:
                member = _retry_encoder.encode((1, 0, letter.frame, _new_id()))
                async with self._redis().pipeline(transaction=True) as pipe:
                    pipe.execute_command("XADD", retry_stream, "*", "m", member)
                    pipe.execute_command("XDEL", stream, letter.id)
                    _, removed = await pipe.execute()
                replayed += int(removed)
            return replayed

        return await self._call("could not replay dead letters", replay)

    async def purge_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        stream = self.dlq_streams[group]

        async def purge() -> int:
            if ids is None:
                async with self._redis().pipeline(transaction=True) as pipe:
                    pipe.execute_command("XLEN", stream)
                    pipe.execute_command("DEL", stream)
                    count, _ = await pipe.execute()
                return int(count)
            if not ids:
                return 0
            removed = 0
            for entry_id in dict.fromkeys(ids):
                with contextlib.suppress(ResponseError):
                    removed += int(await self.run("XDEL", stream, entry_id))
            return removed

        return await self._call("could not purge dead letters", purge)


def _checked(name: str, what: str) -> str:
    size = len(name.encode())
    if not name or size > _MAX_NAME_BYTES:
        raise ValueError(
            f"{what} {name[:64]!r} is {size} bytes long; from 1 to {_MAX_NAME_BYTES} fit a "
            "Redis key here"
        )
    return name

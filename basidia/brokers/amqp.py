"""The RabbitMQ broker, through aiormq (``amqp://`` and ``amqps://`` URLs).

Topology (``prefix`` defaults to ``basidia``; docs/rabbitmq.md has the details):

* requests: one queue per service, ``<prefix>.rpc.<service>``, non-durable and
  auto-delete, so it exists exactly while some instance consumes it.  Requests
  are published with ``mandatory``: one that no queue takes comes back as
  ``basic.return`` and becomes a ``ServiceUnavailable`` error frame at once;
* replies: RabbitMQ's direct reply-to, consumed no-ack on the channel that
  publishes the requests.  A frame's reply address is the placeholder
  ``amq.rabbitmq.reply-to``; the service answers to the address RabbitMQ wrote
  into the request's AMQP ``reply_to`` property;
* events: a durable topic exchange ``<prefix>.events``; one durable queue per
  consumer group, ``<prefix>.events.<group>``, bound to the event name;
  persistent messages, publisher confirms, ack after the handler.  A retry is
  a confirmed republish to the group's queue with the attempts made so far and the
  first failure's time in headers, then an ack; a dead letter goes to
  ``<prefix>.events.<group>.dlq`` with the dead-letter headers every broker writes
  (docs/dead-letters.md), and ``dead_letters`` reads them back without taking them.
  A repeat publish of an idempotency key within ``duplicate_window`` is dropped.

aiormq has no reconnection of its own and can hang while the broker is down, so
every network await here has a deadline, and a lost connection is opened again
in the background with capped, jittered exponential backoff, every consumer restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlunsplit

import aiormq
from aiormq import Channel, Connection
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from basidia._speedups import HARD_MAX_FRAME_SIZE
from basidia._wire import no_responders
from basidia.brokers._amqp_consumers import (
    _BROKER_HEADERS,
    _LINK_ERRORS,
    _OUR_HEADERS,
    _PERSISTENT,
    DEAD_LETTER_ID_HEADER,
    DIRECTORY_SUFFIX,
    _check_name,
    _close_channel,
    _Consumer,
    _EventConsumer,
    _really_cancelled,
    _RequestConsumer,
    _serving,
)
from basidia.brokers._amqp_fast import Sink, direct_deliveries, publish_nowait
from basidia.brokers._common import Backoff, Names, RecentKeys, Secrets, parse_url, tls_context
from basidia.brokers.base import (
    EVENT_HEADER,
    Broker,
    DeadLetter,
    DeliveryHandler,
    EventSubscription,
    InboxHandler,
    Subscription,
    read_dead_letter,
)
from basidia.errors import BrokerError, ConfigError, ConnectionLost

__all__ = ["DIRECT_REPLY_TO", "AmqpBroker"]

logger = logging.getLogger("basidia.brokers.amqp")

T = TypeVar("T")

#: The reply address of every request frame sent through this adapter.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_REPLY_ADDRESS_PREFIX = DIRECT_REPLY_TO + "."

_CONTENT_TYPE = "application/vnd.basidia.frame"
_MAX_ROUTING_KEY = 255  # bytes: an AMQP short string


class AmqpBroker(Broker):
    """A connection to RabbitMQ (``amqp://`` or ``amqps://``), shared by a process's services.

    Options (keyword arguments, also accepted as ``broker_options`` in the config):

    * ``name``: connection name shown in the management UI;
    * ``connect_timeout``: seconds to open the connection;
    * ``heartbeat``: AMQP heartbeat in seconds (the URL's ``?heartbeat=`` if not given,
      else 5); a silent link is declared dead after about ``3 * (heartbeat + 1)`` s;
    * ``operation_timeout``: seconds for channel opens, declares, consumes, cancels,
      settlements, and for handing a request or reply to the connection;
    * ``publish_timeout``: seconds an event publish may take, waiting for a reconnection
      and the publisher confirm included;
    * ``prefetch``: unacknowledged deliveries per consumer (default: its concurrency);
    * ``reconnect_wait``, ``reconnect_wait_max``: capped exponential backoff, with
      jitter, between reconnection attempts;
    * ``prefix``: first word of every exchange and queue name;
    * ``duplicate_window``: seconds this connection remembers the idempotency keys of the
      events it published, dropping a repeat publish of one (0: never);
    * ``max_message_size``: bytes of a delivered message's body, at most; a larger one
      is not read into memory: a request is rejected (its caller gets
      ``MessageTooLarge``), an event dead-lettered without its body.  Default: the
      hard ceiling of a frame, 16 MiB;
    * ``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``: TLS trust and client
      certificate for ``amqps://`` (the URL's ``cafile``, ``certfile``, ``keyfile``
      work too); the server certificate and host name are always verified.
    """

    reports_no_responders = True

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        name: str = "basidia",
        connect_timeout: float = 5.0,
        heartbeat: int | None = None,
        operation_timeout: float = 5.0,
        publish_timeout: float = 5.0,
        prefetch: int | None = None,
        reconnect_wait: float = 0.1,
        reconnect_wait_max: float = 5.0,
        prefix: str = "basidia",
        duplicate_window: float = 120.0,
        max_message_size: int = HARD_MAX_FRAME_SIZE,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
    ) -> None:
        super().__init__()
        parsed = parse_url(url, "AMQP", ("amqp", "amqps"))
        parts = parsed.parts
        self.safe_url = parsed.safe
        self._secrets = Secrets(parsed.secrets)
        query = dict(parse_qsl(parts.query))
        if "no_verify_ssl" in query:
            raise ConfigError("no_verify_ssl is refused: TLS certificates are always verified")
        tls = (
            tls_ca_file or query.pop("cafile", None),
            tls_cert_file or query.pop("certfile", None),
            tls_key_file or query.pop("keyfile", None),
        )
        if parts.scheme == "amqp" and any(tls):
            raise ConfigError("TLS options need an amqps:// URL")
        self._tls = tls if parts.scheme == "amqps" else None
        self._context: ssl.SSLContext | None = None
        query["heartbeat"] = str(int(query.get("heartbeat", 5) if heartbeat is None else heartbeat))
        query["name"] = name
        # The URL aiormq gets keeps the credentials; no log line or error of ours shows it.
        self._url = urlunsplit(parts._replace(query=urlencode(query)))
        self._connect_timeout = float(connect_timeout)
        self._timeout = float(operation_timeout)
        self._publish_timeout = float(publish_timeout)
        self._prefetch = int(prefetch) if prefetch else None
        #: Delays between reconnection attempts, and between a consumer's restarts.
        self._backoff = Backoff(float(reconnect_wait), float(reconnect_wait_max))
        self._prefix = prefix
        #: The queue naming the groups with dead letters (``dead_letter_groups``).
        self.directory_queue = _check_name(f"{prefix}.{DIRECTORY_SUFFIX}", "queue name")
        #: Idempotency keys of the events published lately (RabbitMQ keeps none).
        self.recent_keys = RecentKeys(float(duplicate_window))
        self.max_message_size = int(max_message_size)
        self.exchange = _check_name(f"{prefix}.events", "exchange name")

        self._connection: Connection | None = None
        self._rpc: Channel | None = None  # publishes requests and replies, consumes replies
        self._confirms: Channel | None = None  # confirmed publishes: events, retries
        self._inbox: InboxHandler | None = None
        self._consumers: list[_Consumer] = []
        #: The request queue of each service, by service name.
        self._request_queues = Names(
            lambda service: _check_name(f"{prefix}.rpc.{service}", "request queue name")
        )
        self._reconnecting: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._up = asyncio.Event()
        self._reopening = asyncio.Lock()
        self._closed = True
        #: Reconnection attempts, and those that succeeded (for health checks and tests).
        self.reconnect_attempts = 0
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"AmqpBroker({self.safe_url!r})"

    # -- helpers ------------------------------------------------------------------------

    async def _deadline(self, awaitable: Awaitable[T], what: str, timeout: float = 0.0) -> T:
        """Await ``awaitable`` for at most ``timeout`` s (default: the operation timeout);
        a refusal becomes ``BrokerError``, anything else ``ConnectionLost``."""
        timeout = timeout or self._timeout
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
            raise ConnectionLost(f"{what}: the connection to {self.safe_url} closed") from None
        except TimeoutError:
            raise ConnectionLost(
                f"{what}: no answer from {self.safe_url} in {timeout:g} s"
            ) from None
        except aiormq.AMQPChannelError as exc:
            raise BrokerError(f"{what}: {self._secrets.describe(exc)}") from None
        except _LINK_ERRORS as exc:
            raise ConnectionLost(f"{what}: {self._secrets.describe(exc)}") from None

    async def _channel(self, connection: Connection, *, confirms: bool = False) -> Channel:
        channel = connection.channel(publisher_confirms=confirms)
        return cast(Channel, await self._deadline(channel, "open a channel"))

    @contextlib.asynccontextmanager
    async def _own_channel(self) -> AsyncIterator[Channel]:
        """A channel of its own for one management operation (a refused command closes
        it, not a consumer's), closed after."""
        connection = self._connection
        if connection is None or self._closed:
            raise ConnectionLost(f"not connected to {self.safe_url}")
        channel = await self._channel(connection)
        try:
            yield channel
        finally:
            await _close_channel(channel, self._timeout)

    async def _publish(
        self,
        channel: Channel,
        body: bytes,
        routing_key: str,
        properties: spec.Basic.Properties,
        what: str,
        mandatory: bool = False,
    ) -> None:
        """Hand a message to the connection without waiting for the broker (no confirm)."""
        if publish_nowait(channel, body, routing_key, properties, mandatory=mandatory):
            return
        try:
            await channel.basic_publish(
                body,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                wait=False,
                timeout=self._timeout,
            )
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
            raise ConnectionLost(f"could not {what} to {routing_key}: channel closed") from None
        except _LINK_ERRORS as exc:
            error = self._secrets.describe(exc)
            raise ConnectionLost(f"could not {what} to {routing_key}: {error}") from None

    async def _consume(
        self,
        channel: Channel,
        queue: str,
        sink: Sink,
        what: str,
        *,
        no_ack: bool = False,
        max_body: int = 0,
    ) -> str:
        """Consume ``queue`` on ``channel``, each message to ``sink`` (synchronously, in
        the channel's reader); returns the consumer tag.  A message over ``max_body``
        bytes reaches ``sink`` without its body (``_amqp_fast.oversized``)."""
        tag = f"basidia.{uuid.uuid4().hex}"
        direct = direct_deliveries(channel)
        if direct is not None:
            direct.add(tag, sink, max_body)

        async def callback(message: DeliveredMessage) -> None:  # without direct deliveries
            if max_body and len(message.body) > max_body:
                message = dataclasses.replace(message, body=b"")
            sink(message)

        try:
            consume = channel.basic_consume(queue, callback, no_ack=no_ack, consumer_tag=tag)
            await self._deadline(consume, what)
        except BaseException:
            if direct is not None:
                direct.discard(tag)
            raise
        return tag

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._up.is_set()

    async def connect(self) -> None:
        if not self._closed:
            return
        self._closed = False
        try:
            await self._open()
        except BaseException:
            self._closed = True
            raise
        logger.info("connected to %s", self.safe_url)

    async def _open(self) -> None:
        """Connect, open the shared channels, declare the exchange, restore consumers."""
        if self._tls is not None and self._context is None:
            self._context = tls_context(*self._tls)
        connection = aiormq.Connection(self._url, context=self._context)
        try:
            await self._deadline(connection.connect(), "connect", self._connect_timeout)
            self._confirms = await self._channel(connection, confirms=True)
            declare = self._confirms.exchange_declare(
                self.exchange, exchange_type="topic", durable=True
            )
            await self._deadline(declare, f"declare exchange {self.exchange!r}")
            self._rpc = await self._open_rpc_channel(connection)
            for consumer in list(self._consumers):
                try:
                    await consumer.attach(connection)
                except ConnectionLost:
                    raise
                except BrokerError as exc:
                    # One queue the broker refuses (declared elsewhere with other arguments,
                    # say) must not keep every other consumer from coming back.
                    logger.error("could not consume %s: %s", consumer.queue, exc)
                    consumer.restart_soon()
        except BaseException:
            self._rpc = self._confirms = None
            await self._discard(connection)
            raise
        self._connection = connection
        connection.closing.add_done_callback(lambda done: self._on_lost(connection, done))
        for consumer in self._consumers:
            if consumer.channel is None:
                consumer.restart_soon()  # added while this connection was being set up
        self._up.set()

    async def _open_rpc_channel(self, connection: Connection) -> Channel:
        channel = await self._channel(connection)
        _on_returns(channel, self._on_return)
        if self._inbox is not None:
            await self._consume(
                channel, DIRECT_REPLY_TO, self._on_reply, "consume replies", no_ack=True
            )

        def on_closed(_: object) -> None:
            # Direct reply-to is bound to this channel: without it no reply can arrive, so
            # treat its loss as the connection's (fail the calls waiting, then start over).
            if channel is self._rpc and connection is self._connection and connection.is_opened:
                logger.warning("the RPC channel to %s closed; reconnecting", self.safe_url)
                self._spawn(self._discard(connection, BrokerError("the RPC channel closed")))

        channel.closing.add_done_callback(on_closed)
        return channel

    async def _discard(self, connection: Connection, reason: Exception | None = None) -> None:
        try:
            await asyncio.wait_for(
                connection.close(reason or asyncio.CancelledError), self._timeout
            )
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
        except Exception:  # it is being thrown away: how it ends does not matter
            pass

    def _on_lost(self, connection: Connection, closing: asyncio.Future[Any]) -> None:
        if connection is not self._connection or self._closed:
            return  # closed by us
        exc = None if closing.cancelled() else closing.exception()
        if exc is None:
            reason = "closed"
        elif isinstance(exc, asyncio.CancelledError):
            # aiormq cancels its reader when no frame arrived within the heartbeat grace.
            reason = "no frame from the broker within the heartbeat grace"
        else:
            reason = self._secrets.describe(exc)
        self._connection = self._rpc = self._confirms = None
        self._up.clear()
        logger.warning("lost the connection to %s (%s); reconnecting", self.safe_url, reason)
        self._notify_disconnect(ConnectionLost(f"lost the connection to {self.safe_url}: {reason}"))
        if not self._closed and self._reconnecting is None:
            self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        try:
            while not self._closed:
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
                self.reconnect_attempts += 1
                try:
                    await self._open()
                except Exception as exc:  # whatever it was, the next attempt may succeed
                    known = isinstance(exc, (BrokerError, ConfigError))
                    reason = str(exc) if known else self._secrets.describe(exc)
                    logger.warning(
                        "reconnection %d to %s failed: %s", attempt, self.safe_url, reason
                    )
                    continue
                self.reconnects += 1
                logger.info("reconnected to %s after %d attempt(s)", self.safe_url, attempt)
                return
        finally:
            self._reconnecting = None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        reconnecting, self._reconnecting = self._reconnecting, None
        if reconnecting is not None:
            reconnecting.cancel()
            await asyncio.gather(reconnecting, return_exceptions=True)
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.aclose()
        self._inbox = None
        connection, self._connection = self._connection, None
        self._rpc = self._confirms = None
        self._up.clear()
        if connection is not None:
            await self._discard(connection)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        logger.info("closed the connection to %s", self.safe_url)

    # -- requests and replies -------------------------------------------------------------

    async def serve_requests(
        self, service: str, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        queue = self._request_queues[service]
        return await self._add(_RequestConsumer(self, queue, handler, concurrency))

    async def send_request(self, service: str, body: bytes, *, correlation_id: int) -> None:
        channel = self._rpc
        if channel is None:
            # Fail fast instead of holding a call that would wait for its deadline.
            raise ConnectionLost(f"not connected to {self.safe_url}")
        # Few properties, each costs encoding time: the message id names the call (it comes
        # back with a returned request), no delivery mode means transient.
        properties = spec.Basic.Properties(
            message_id=str(correlation_id),
            reply_to=DIRECT_REPLY_TO if self._inbox is not None else None,
        )
        queue = self._request_queues[service]
        # mandatory: a request that no queue takes comes back (see _on_return).
        await self._publish(channel, body, queue, properties, "send a request", mandatory=True)

    def _on_return(self, message: DeliveredMessage) -> None:
        """A request that no queue took: no instance of its service runs."""
        inbox = self._inbox
        correlation_id = message.header.properties.message_id or ""
        service = (message.routing_key or "").partition(f"{self._prefix}.rpc.")[2]
        if inbox is not None and correlation_id.isdigit() and service:
            inbox(no_responders(int(correlation_id), service))

    def _on_reply(self, message: DeliveredMessage) -> None:
        inbox = self._inbox
        if inbox is not None:
            try:
                inbox(message.body)
            except Exception:
                logger.exception("the reply handler failed")

    async def open_inbox(self, handler: InboxHandler) -> str:
        if self._inbox is not None:
            # Direct reply-to answers the channel that sent the request, and a request
            # names no inbox of its own: a second inbox could get the first one's replies.
            raise BrokerError(f"{self!r} already has a reply inbox; open another connection")
        channel = self._rpc
        if channel is None:
            raise ConnectionLost(f"not connected to {self.safe_url}")
        # Consume first: a request naming direct reply-to on a channel that does not
        # consume it yet would close the channel.
        await self._consume(
            channel, DIRECT_REPLY_TO, self._on_reply, "consume replies", no_ack=True
        )
        self._inbox = handler
        return DIRECT_REPLY_TO

    def reply_to_problem(self, reply_to: str) -> str | None:
        # Requests name the placeholder; RabbitMQ writes the real address into the AMQP
        # property.  Anything else must be a direct reply-to address, an AMQP short string.
        if reply_to == DIRECT_REPLY_TO:
            return None
        if not reply_to.startswith(_REPLY_ADDRESS_PREFIX):
            return f"reply address {reply_to[:64]!r} is not a direct reply-to address"
        if len(reply_to.encode()) > _MAX_ROUTING_KEY:
            return f"reply address of {len(reply_to.encode())} bytes (at most {_MAX_ROUTING_KEY})"
        return None

    async def send_reply(self, reply_to: str, body: bytes) -> None:
        address: str | None = reply_to
        if reply_to == DIRECT_REPLY_TO:
            address = _serving.get()
        # Only ever answer into a direct reply-to inbox: a forged request must not make a
        # service publish into a queue of its choosing.
        if not address or not address.startswith(_REPLY_ADDRESS_PREFIX):
            return
        channel = self._rpc
        if channel is None:
            raise ConnectionLost(f"could not send a reply: not connected to {self.safe_url}")
        await self._publish(channel, body, address, _REPLY_PROPERTIES, "send a reply")

    # -- events -------------------------------------------------------------------------

    async def publish_event(
        self, event: str, body: bytes, *, idempotency_key: str, key: str | None = None
    ) -> None:
        properties = spec.Basic.Properties(
            delivery_mode=_PERSISTENT, message_id=idempotency_key, content_type=_CONTENT_TYPE
        )
        what = f"publish event {_check_name(event, 'event name')!r}"
        await self.recent_keys.publish_once(
            idempotency_key,
            lambda: self._publish_confirmed(body, self.exchange, event, properties, what),
        )

    async def dead_letters(self, group: str, *, limit: int = 100) -> list[DeadLetter]:
        """Read ``<prefix>.events.<group>.dlq`` with ``basic.get`` on a channel of its own,
        acknowledging nothing, then close the channel: RabbitMQ puts every message back
        where it was.  A reader running at the same time sees fewer of them meanwhile."""
        letters: list[DeadLetter] = []
        async with self._dead_letter_reader(group) as read:
            while len(letters) < limit:
                got = await read()
                if got is None:
                    break
                letters.append(_letter(got))
        return letters

    def _dead_letter_queue(self, group: str) -> str:
        return _check_name(f"{self._prefix}.events.{group}.dlq", "dead-letter queue name")

    @contextlib.asynccontextmanager
    async def _dead_letter_reader(
        self, group: str
    ) -> AsyncIterator[Callable[[], Awaitable[DeliveredMessage | None]]]:
        """``read()`` gives ``group``'s dead letters one by one (None at the end) on a
        channel of its own; what is not acked goes back when the channel closes."""
        queue = self._dead_letter_queue(group)
        async with self._own_channel() as channel:

            async def get() -> DeliveredMessage | None:
                try:
                    return await channel.basic_get(queue, no_ack=False)
                except aiormq.ChannelNotFoundEntity:
                    return None  # no such queue: the group never had a consumer here

            async def read() -> DeliveredMessage | None:
                got = await self._deadline(get(), f"read the dead letters of {group!r}")
                if got is None or not isinstance(got.delivery, spec.Basic.GetOk):
                    return None
                return got

            yield read

    async def dead_letter_groups(self) -> list[str]:
        """The groups named in the directory queue whose dead-letter queue holds messages."""
        named: set[str] = set()
        async with self._own_channel() as channel:
            while True:
                try:
                    get = channel.basic_get(self.directory_queue, no_ack=False)
                    got = await self._deadline(get, "read the groups with dead letters")
                except BrokerError:
                    break  # no directory yet: no consumer ever ran here
                if not isinstance(got.delivery, spec.Basic.GetOk):
                    break
                named.add(got.body.decode("utf-8", "replace"))
        groups = []
        for group in sorted(named):
            async with self._own_channel() as channel:
                try:
                    declare = channel.queue_declare(self._dead_letter_queue(group), passive=True)
                    declared = await self._deadline(declare, "count dead letters")
                except (BrokerError, ValueError):
                    continue  # its dead-letter queue was deleted
            if declared.message_count:
                groups.append(group)
        return groups

    async def replay_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        """Publish the chosen dead letters to the group's queue (confirmed) without their
        dead-letter headers, so each is a first attempt again, then ack them; the others go
        back where they were."""
        target = _check_name(f"{self._prefix}.events.{group}", "queue name")
        await self._check_queue(target, f"{group!r} has no queue to replay to")
        wanted = None if ids is None else set(ids)
        replayed = 0
        async with self._dead_letter_reader(group) as read:
            while True:
                got = await read()
                if got is None:
                    break
                letter = _letter(got)
                if wanted is not None and letter.id not in wanted:
                    continue
                original = got.header.properties
                headers = {
                    name: value
                    for name, value in (original.headers or {}).items()
                    if not name.startswith(_OUR_HEADERS + _BROKER_HEADERS)
                }
                headers[EVENT_HEADER] = letter.event
                properties = spec.Basic.Properties(
                    delivery_mode=_PERSISTENT,
                    message_id=original.message_id,
                    content_type=original.content_type,
                    headers=headers,
                )
                what = f"replay a dead letter of {group!r}"
                await self._publish_confirmed(got.body, "", target, properties, what)
                await self._deadline(
                    got.channel.basic_ack(got.delivery_tag or 0), "ack a replayed dead letter"
                )
                replayed += 1
        return replayed

    async def _check_queue(self, queue: str, problem: str) -> None:
        """Raise ``BrokerError`` with ``problem`` unless ``queue`` exists (a publish to a
        missing queue through the default exchange is dropped without a word)."""
        async with self._own_channel() as channel:
            try:
                declare = channel.queue_declare(queue, passive=True)
                await self._deadline(declare, f"find queue {queue!r}")
            except BrokerError:
                raise BrokerError(
                    f"{problem} (a broadcast group's instances have queues of their own; "
                    "replay it while they run, or publish the event again)"
                ) from None

    async def purge_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        if ids is None:
            async with self._own_channel() as channel:
                try:
                    purge = channel.queue_purge(self._dead_letter_queue(group))
                    purged = await self._deadline(purge, f"purge the dead letters of {group!r}")
                except BrokerError:
                    return 0  # no such queue
                return int(purged.message_count or 0)
        wanted, purged_count = set(ids), 0
        async with self._dead_letter_reader(group) as read:
            while True:
                got = await read()
                if got is None:
                    break
                if _letter(got).id in wanted:
                    ack = got.channel.basic_ack(got.delivery_tag or 0)
                    await self._deadline(ack, "remove a dead letter")
                    purged_count += 1
        return purged_count

    async def _publish_confirmed(
        self,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: spec.Basic.Properties,
        what: str,
        *,
        reconnect: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm, within ``publish_timeout``.

        With ``reconnect``, a connection lost before the confirm is waited for and the
        message published again: a copy at worst, which its idempotency key gives away.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._publish_timeout
        while True:
            if reconnect and not self._up.is_set() and not self._closed:
                try:
                    await asyncio.wait_for(self._up.wait(), max(deadline - loop.time(), 0))
                except TimeoutError:
                    raise ConnectionLost(f"{what}: not connected to {self.safe_url}") from None
            channel, connection = self._confirms, self._connection
            if connection is None or self._closed:
                raise ConnectionLost(f"{what}: not connected to {self.safe_url}")
            if channel is None or channel.is_closed:
                async with self._reopening:  # one new channel for all the publishers waiting
                    channel = self._confirms
                    if channel is None or channel.is_closed:
                        channel = self._confirms = await self._channel(connection, confirms=True)
            try:
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    wait=False,
                    timeout=max(deadline - loop.time(), 0.001),
                )
                return
            except aiormq.DeliveryError:
                raise BrokerError(f"{what}: the broker refused it (basic.nack)") from None
            except TimeoutError:
                raise ConnectionLost(
                    f"{what}: no confirm within {self._publish_timeout:g} s; "
                    "it may or may not have been stored"
                ) from None
            except asyncio.CancelledError:
                if _really_cancelled():
                    raise
                error = "the channel closed before the confirm"
            except _LINK_ERRORS as exc:
                error = self._secrets.describe(exc)
            if not reconnect or loop.time() >= deadline:
                raise ConnectionLost(f"{what}: {error}")
            await asyncio.sleep(0.05)  # the connection or the channel went: try again

    async def subscribe_events(
        self, subscription: EventSubscription, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        event = _check_name(subscription.event, "event name")
        if "*" in event or "#" in event:
            raise ValueError(f"event name {event!r} cannot contain '*' or '#'")
        group = f"{self._prefix}.events.{subscription.group}"
        _check_name(f"{group}.dlq", "dead-letter queue name")
        return await self._add(_EventConsumer(self, subscription, group, handler, concurrency))

    async def _add(self, consumer: _Consumer) -> _Consumer:
        if self._closed:
            raise BrokerError(f"{self!r} is not connected")
        if self._connection is not None:
            await consumer.attach(self._connection)
        # While reconnecting, it starts with the other consumers once the connection is back.
        self._consumers.append(consumer)
        return consumer


def _letter(message: DeliveredMessage) -> DeadLetter:
    headers = message.header.properties.headers or {}
    letter = read_dead_letter(headers, message.body)
    handle = headers.get(DEAD_LETTER_ID_HEADER)
    if isinstance(handle, bytes | bytearray):
        handle = bytes(handle).decode("ascii", "replace")
    return dataclasses.replace(letter, id=handle if isinstance(handle, str) else "")


# A message id of our own spares aiormq making up a random one for every reply.
_REPLY_PROPERTIES = spec.Basic.Properties(message_id="reply")


def _on_returns(channel: Channel, callback: Callable[[DeliveredMessage], None]) -> None:
    """Hand every ``basic.return`` on ``channel`` to ``callback``.

    aiormq reports returns only on channels with publisher confirms, matched to the
    publish's confirm; requests go without confirms (the reply is their acknowledgement),
    so the channel's return handler is replaced.  It reads the content frames after
    ``basic.return`` with aiormq's own helpers, as aiormq's handler does.
    """
    impl: Any = channel
    if not all(hasattr(impl, name) for name in ("_get_frame", "_read_content", "_on_return_frame")):
        logger.warning(
            "this aiormq version hides returned requests: calls to a service without "
            "instances will end in RpcTimeout instead of ServiceUnavailable"
        )
        return

    async def on_return(frame: spec.Basic.Return) -> None:
        header = await impl._get_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"unexpected frame {header!r} after basic.return")
        callback(await impl._read_content(frame, header))

    impl._on_return_frame = on_return

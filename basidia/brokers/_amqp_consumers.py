"""Consumers and deliveries of the RabbitMQ broker (``basidia.brokers.amqp``).

A consumer declares one queue (a service's request queue, or an event group's queue
and its dead-letter queue) and consumes it on a channel of its own, with a pool of
workers that run the handlers; it consumes again after every reconnection.  A
delivery settles one message: ack, reject, or for an event a confirmed republish
with the attempts made so far, or a move to the group's dead-letter queue with the
dead-letter headers of ``basidia.brokers.base`` (docs/dead-letters.md).

The small helpers and constants the broker shares with them live here too, so this
module imports ``basidia.brokers.amqp`` for type checking only.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

import aiormq
from aiormq import Channel, Connection
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from basidia._wire import error_reply
from basidia.brokers._amqp_fast import oversized
from basidia.brokers._common import WorkerPool
from basidia.brokers.base import (
    ATTEMPTS_HEADER,
    EVENT_HEADER,
    FIRST_FAILURE_HEADER,
    GROUP_HEADER,
    REASON_HEADER,
    Delivery,
    DeliveryHandler,
    EventSubscription,
    Failure,
    dead_letter_headers,
    make_dead_letter,
)
from basidia.errors import BrokerError, MessageTooLarge
from basidia.log import ThrottledLog

if TYPE_CHECKING:
    from basidia.brokers.amqp import AmqpBroker

__all__ = [
    "ATTEMPTS_HEADER",
    "EVENT_HEADER",
    "FIRST_FAILURE_HEADER",
    "GROUP_HEADER",
    "HEADERS_DROPPED_HEADER",
    "REASON_HEADER",
]

# The broker's logger: one name configures the whole adapter.
logger = logging.getLogger("basidia.brokers.amqp")
# Bad input from publishers (oversized headers, say): a line per kind per interval.
bad_input = ThrottledLog(logger)

# Message headers Basidia writes: a dead letter's are ``basidia.brokers.base``'s, the same on
# every broker (docs/dead-letters.md); a retry carries ``basidia-attempts`` (attempts made so
# far), ``basidia-first-failure`` and ``basidia-event`` (docs/rabbitmq.md).
#: On a retried or dead-lettered event whose own headers could not be carried over
#: (they left no room in the broker's frame size): the bytes of the content header
#: they made.
HEADERS_DROPPED_HEADER = "basidia-headers-dropped"
# Headers of ours on a message are never copied onto its retry or dead letter: they are
# written afresh.  The names of earlier releases (``x-basidia-*``) go too.
_OUR_HEADERS = ("basidia-", "x-basidia-")
# RabbitMQ's own dead-lettering records (a retry that waited in a delay queue has them):
# not carried over onto a copy either.
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-")
#: A dead letter's own handle on RabbitMQ (``DeadLetter.id``), to show, replay or purge it.
DEAD_LETTER_ID_HEADER = "basidia-dead-letter-id"
#: The durable queue that names the groups with dead letters (``dead_letter_groups``):
#: each consumer writes its group there once, when it first parks an event.
DIRECTORY_SUFFIX = "dlq.groups"
_DIRECTORY_LENGTH = 10_000  # names kept; the oldest go first
# Seconds an unused delay queue outlives its TTL before RabbitMQ deletes it, and how often a
# consumer declares it again (which counts as use) while it retries through it.
_DELAY_QUEUE_SLACK = 3600.0
_DELAY_QUEUE_REDECLARE = 60.0
# The retry header of earlier releases: the attempt number of the next delivery.
_LEGACY_ATTEMPT_HEADER = "x-basidia-attempt"
_LEGACY_REASON_HEADER = "x-basidia-reason"

_MAX_NAME_BYTES = 255  # AMQP short strings: queue names and routing keys
_PERSISTENT = 2  # AMQP delivery mode: written to disk by durable queues
_GIVE_BACK_PAUSE = 0.5  # seconds before requeueing an event whose retry could not be published
_HEADER_HEADROOM = 1024  # bytes of a frame left free when republishing a content header

# How an AMQP operation fails when its link or channel goes away.
_LINK_ERRORS = (aiormq.AMQPError, ConnectionError, OSError, RuntimeError, asyncio.TimeoutError)


# The AMQP reply address of the request being handled, set by the request workers for
# each delivery: the framework replies from inside the delivery handler (or a task it
# starts, which keeps the value it had then), so ``send_reply`` finds the right caller.
_serving: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "basidia_amqp_serving", default=None
)


def _really_cancelled() -> bool:
    """Whether this task is being cancelled, rather than awaiting a future that aiormq
    failed with ``CancelledError`` when it closed a channel."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is None or bool(cancelling())


def _check_name(name: str, what: str) -> str:
    if not name or len(name.encode()) > _MAX_NAME_BYTES:
        raise ValueError(f"{what} {name!r} must be 1 to {_MAX_NAME_BYTES} bytes long")
    return name


async def _close_channel(channel: Channel, timeout: float) -> None:
    try:
        await asyncio.wait_for(channel.close(), timeout)
    except asyncio.CancelledError:
        if _really_cancelled():
            raise
    except Exception:  # closed by the broker or with the connection already
        pass


# -- consumers --------------------------------------------------------------------------------


class _Consumer(WorkerPool[DeliveredMessage]):
    """One queue consumed on a channel of its own by a pool of ``concurrency`` workers.

    ``attach`` declares the queue and consumes it, again after every reconnection.
    Deliveries go from the channel's reader straight to the workers' queue
    (``_amqp_fast.DirectDeliveries``): no task per message, and nothing a closing
    channel cancels, for a lost link must not interrupt a handler.
    """

    def __init__(
        self, broker: AmqpBroker, queue: str, handler: DeliveryHandler, concurrency: int
    ) -> None:
        # Deliveries for the workers, put there by the channel's reader.
        self._pending: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        pending, where = self._pending, f"queue {queue}"
        super().__init__(
            pending, self._dispatch, concurrency, drain=True, logger=logger, where=where
        )
        self.broker = broker
        self.handler = handler
        self.queue = queue
        self.channel: Channel | None = None
        self._tag = ""
        self._cancelled = False
        self._restarting = False
        self._attaching = asyncio.Lock()

    async def _declare(self, channel: Channel) -> None:
        raise NotImplementedError

    async def _dispatch(self, message: DeliveredMessage) -> None:
        raise NotImplementedError

    async def attach(self, connection: Connection) -> None:
        """Open a channel on ``connection``, declare the queue and consume it (once: the
        reconnection and a consumer's own restart may both try)."""
        async with self._attaching:
            if self.channel is None or self.channel.is_closed:
                await self._attach(connection)

    async def _attach(self, connection: Connection) -> None:
        broker = self.broker
        channel = await broker._channel(connection)
        try:
            qos = channel.basic_qos(prefetch_count=broker._prefetch or self.concurrency)
            await broker._deadline(qos, "set the prefetch")
            await self._declare(channel)
            channel.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            sink = self._pending.put_nowait
            what = f"consume queue {self.queue!r}"
            tag = await broker._consume(
                channel, self.queue, sink, what, max_body=broker.max_message_size
            )
        except BaseException:
            await _close_channel(channel, broker._timeout)
            raise
        self.channel, self._tag = channel, tag
        channel.closing.add_done_callback(lambda _: self._on_channel_closed(channel))
        self.start_workers()

    def _release_channel(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None and not channel.is_closed:
            self.broker._spawn(_close_channel(channel, self.broker._timeout))

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        super()._worker_done(worker)
        if not (self.stopping or self.broker._closed):
            self.start_workers()  # a handler cancelled its worker's task: keep the pool full

    def _stopped(self) -> None:
        self._release_channel()  # the last handler has settled: nothing is left to do

    def _on_channel_closed(self, channel: Channel) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        if self._cancelled:
            return  # the workers finish what they hold, then stop
        # Deliveries no worker took yet come back from the broker anyway.
        while not self._pending.empty():
            self._pending.get_nowait()
        connection = self.broker._connection
        if connection is not None and connection.is_opened:
            logger.warning("the channel of queue %s closed; consuming it again", self.queue)
            self.restart_soon()
        # Otherwise the whole connection went, and the reconnection attaches us again.

    async def _on_broker_cancel(self, frame: spec.Basic.Cancel) -> None:
        # The broker cancelled the consumer (its queue was deleted): declare it again.
        if frame.consumer_tag == self._tag and not self._cancelled:
            logger.warning("the broker cancelled the consumer of %s; consuming again", self.queue)
            self._release_channel()
            self.restart_soon()

    def restart_soon(self) -> None:
        """Attach again after a backoff delay, in the background."""
        if not self._restarting:
            self._restarting = True
            self.broker._spawn(self._restart())

    async def _restart(self) -> None:
        broker = self.broker
        attempt = 0
        try:
            while not self._cancelled and not broker._closed:
                await asyncio.sleep(broker._backoff.delay(attempt))
                attempt += 1
                connection = broker._connection
                if connection is None:
                    return  # the reconnection attaches us
                try:
                    return await self.attach(connection)
                except BrokerError as exc:
                    logger.warning("could not consume %s again: %s", self.queue, exc)
        finally:
            self._restarting = False

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self in self.broker._consumers:
            self.broker._consumers.remove(self)
        channel = self.channel
        if channel is not None and not channel.is_closed:
            try:
                await asyncio.wait_for(channel.basic_cancel(self._tag), self.broker._timeout)
            except asyncio.CancelledError:
                if _really_cancelled():
                    raise
            except _LINK_ERRORS:
                pass  # the channel is going anyway: the broker requeues what it holds
        # Deliveries that came before the cancel took effect are still handled; then the
        # workers stop, and the last one releases the channel.
        await self._stop()

    async def aclose(self) -> None:
        """Cancel, then stop every worker, busy or not (broker close)."""
        await super().aclose()
        channel, self.channel = self.channel, None
        if channel is not None:
            await _close_channel(channel, self.broker._timeout)


class _Delivery(Delivery):
    """A message on a channel; settling it never raises (unsettled, it goes back)."""

    __slots__ = ("_message", "_settled", "_timeout")

    def __init__(self, message: DeliveredMessage, timeout: float) -> None:
        self.body = message.body
        self._message = message
        self._timeout = timeout
        self._settled = False

    @property
    def attempt(self) -> int:
        return 2 if self._message.redelivered else 1

    async def _settle(self, *, ack: bool, requeue: bool = False) -> None:
        if self._settled:
            return
        self._settled = True
        channel = cast(Channel, self._message.channel)
        if channel.is_closed:
            return  # the broker has requeued it with the channel
        tag = self._message.delivery_tag or 0
        if ack:
            send = channel.basic_ack(tag, wait=False)
        else:
            send = channel.basic_reject(tag, requeue=requeue, wait=False)
        try:
            if channel.connection.write_queue.full():
                await asyncio.wait_for(send, self._timeout)
            else:
                await send  # room in aiormq's write queue: queued without suspending
        except asyncio.CancelledError:
            if _really_cancelled():
                raise
        except _LINK_ERRORS:
            pass

    async def ack(self) -> None:
        await self._settle(ack=True)

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        await self._settle(ack=False, requeue=requeue)

    async def dead_letter(self, failure: Failure) -> None:
        await self._settle(ack=False)


class _RequestConsumer(_Consumer):
    async def _declare(self, channel: Channel) -> None:
        # Not durable, auto-delete: the queue lives exactly while an instance consumes it,
        # so a request for a service without instances comes back at once (mandatory).
        declare = channel.queue_declare(self.queue, auto_delete=True)
        await self.broker._deadline(declare, f"declare queue {self.queue!r}")

    async def _dispatch(self, message: DeliveredMessage) -> None:
        if oversized(message):
            await self._refuse(message)
            return
        _serving.set(message.header.properties.reply_to)
        await self.handler(_Delivery(message, self.broker._timeout))

    async def _refuse(self, message: DeliveredMessage) -> None:
        """Reject a request too large to read, and tell its caller why."""
        broker = self.broker
        size, limit = message.header.body_size, broker.max_message_size
        bad_input.log(
            logging.ERROR,
            "oversized request",
            "rejected a request of %d bytes on %s (max_message_size %d)",
            size,
            self.queue,
            limit,
        )
        await _Delivery(message, broker._timeout).nack(requeue=False)
        properties = message.header.properties
        reply_to, correlation_id = properties.reply_to or "", properties.message_id or ""
        if correlation_id.isdigit() and broker.reply_to_problem(reply_to) is None:
            error = MessageTooLarge(
                f"a request of {size} bytes exceeds the broker adapter's max_message_size "
                f"of {limit} bytes"
            )
            with contextlib.suppress(BrokerError):
                await broker.send_reply(reply_to, error_reply(int(correlation_id), error))


class _EventConsumer(_Consumer):
    def __init__(
        self,
        broker: AmqpBroker,
        subscription: EventSubscription,
        group_queue: str,
        handler: DeliveryHandler,
        concurrency: int,
    ) -> None:
        queue = group_queue
        if subscription.broadcast:
            # A private queue per instance; its name stays the same across reconnections.
            queue = _check_name(f"{group_queue}.{uuid.uuid4().hex[:12]}", "queue name")
        super().__init__(broker, queue, handler, concurrency)
        self.subscription = subscription
        self.group_queue = group_queue
        self.dead_letter_queue = f"{group_queue}.dlq"
        self.directory = broker.directory_queue
        # Delay queues declared lately (name -> loop time), and whether this consumer has
        # named its group in the directory of groups with dead letters.
        self._delay_queues: dict[str, float] = {}
        self._listed = False

    async def _declare(self, channel: Channel) -> None:
        deadline = self.broker._deadline
        subscription = self.subscription
        if subscription.broadcast:
            declare = channel.queue_declare(self.queue, exclusive=True, auto_delete=True)
        elif subscription.durable:
            declare = channel.queue_declare(self.queue, durable=True)
        else:
            declare = channel.queue_declare(self.queue, auto_delete=True)
        await deadline(declare, f"declare queue {self.queue!r}")
        bind = channel.queue_bind(self.queue, self.broker.exchange, subscription.event)
        await deadline(bind, f"bind queue {self.queue!r}")
        declare = channel.queue_declare(self.dead_letter_queue, durable=True)
        await deadline(declare, f"declare queue {self.dead_letter_queue!r}")
        declare = channel.queue_declare(
            self.directory, durable=True, arguments={"x-max-length": _DIRECTORY_LENGTH}
        )
        await deadline(declare, f"declare queue {self.directory!r}")

    async def delay_queue(self, delay: float) -> str:
        """The delay queue that hands a message back to this consumer's queue after about
        ``delay`` seconds (rounded to two significant digits, so that a few queues serve
        every jittered delay): a per-queue TTL and RabbitMQ's dead-lettering to the default
        exchange, no plugin.  Durable: a pending retry survives a restart of the service."""
        millis = max(1, round(delay * 1000))
        digits = max(0, len(str(millis)) - 2)
        millis = round(millis / 10**digits) * 10**digits
        name = _check_name(f"{self.queue}.delay.{millis}", "delay queue name")
        loop = asyncio.get_running_loop()
        declared = self._delay_queues.get(name)
        if declared is None or loop.time() - declared > _DELAY_QUEUE_REDECLARE:
            broker = self.broker
            arguments: dict[str, Any] = {
                "x-message-ttl": millis,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue,
                "x-expires": millis + int(_DELAY_QUEUE_SLACK * 1000),
            }
            # On a channel of its own: a refused declare closes it, not the consumer's.
            async with broker._own_channel() as channel:
                declare = channel.queue_declare(name, durable=True, arguments=arguments)
                await broker._deadline(declare, f"declare queue {name!r}")
            self._delay_queues[name] = loop.time()
        return name

    async def list_group(self) -> None:
        """Name this group in the directory of groups with dead letters, once."""
        if self._listed:
            return
        properties = spec.Basic.Properties(delivery_mode=_PERSISTENT)
        what = f"list the group {self.subscription.group} in {self.directory}"
        try:
            await self.broker._publish_confirmed(
                self.subscription.group.encode(),
                "",
                self.directory,
                properties,
                what,
                reconnect=False,
            )
            self._listed = True
        except BrokerError as exc:
            logger.warning("could not %s: %s", what, exc)

    async def _dispatch(self, message: DeliveredMessage) -> None:
        delivery = _EventDelivery(self, message)
        if oversized(message):
            size, limit = message.header.body_size, self.broker.max_message_size
            reason = f"an event of {size} bytes exceeds max_message_size ({limit} bytes)"
            bad_input.log(logging.ERROR, "oversized event", "%s on %s", reason, self.queue)
            await delivery.dead_letter(Failure(f"{reason}; its body was not kept"))
        elif message.redelivered:
            # The broker gives it again after a lost channel or connection: that was an
            # attempt too.  Count it by republishing it with the next attempt number, so
            # the count stays right however often a worker dies on this event.
            await delivery.nack(requeue=True)
        else:
            await self.handler(delivery)


def _header_int(value: Any) -> int:
    """A header's value as a positive int, or 0 (written as text, or typed by others)."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    if isinstance(value, str):
        value = value.strip()
        value = int(value) if value.isdigit() and len(value) < 19 else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class _EventDelivery(_Delivery):
    """An event: ack, retry (republish with the attempts made so far), or dead-letter."""

    __slots__ = ("_consumer",)

    def __init__(self, consumer: _EventConsumer, message: DeliveredMessage) -> None:
        super().__init__(message, consumer.broker._timeout)
        self._consumer = consumer

    def _retry_headers(self) -> dict[str, Any]:
        """The headers of a retry Basidia republished, or {} for a first delivery.

        A message published through the events exchange is a first attempt, whatever its
        headers say: Basidia republishes retries straight to the group's queue (the default
        exchange), which publishers of events have no need to be allowed to do
        (docs/rabbitmq.md, "Permissions").  So is a dead letter moved back to the group's
        queue (it carries a reason): a replay starts a new count.
        """
        if self._message.exchange:
            return {}
        headers = self._message.header.properties.headers or {}
        if REASON_HEADER in headers or _LEGACY_REASON_HEADER in headers:
            return {}
        return headers

    @property
    def attempt(self) -> int:
        headers = self._retry_headers()
        made = _header_int(headers.get(ATTEMPTS_HEADER))
        if made:
            return made + 1
        return _header_int(headers.get(_LEGACY_ATTEMPT_HEADER)) or 1

    def _first_failure(self) -> float:
        """Seconds since the epoch of this event's first failed attempt, carried by its
        retries; 0 for a first delivery."""
        return _header_int(self._retry_headers().get(FIRST_FAILURE_HEADER)) / 1000

    @property
    def event(self) -> str:
        """The event's name, also after a republish to the group's queue."""
        headers = self._message.header.properties.headers or {}
        value = headers.get(EVENT_HEADER, headers.get("x-basidia-event"))
        return value if isinstance(value, str) else self._message.routing_key or ""

    async def _move(self, queue: str, headers: dict[str, Any], what: str) -> bool:
        """Publish a copy to ``queue`` (confirmed), then ack this one (True); or give it
        back (False)."""
        broker = self._consumer.broker
        message = self._message
        if not message.channel.is_closed and not broker._closed:
            properties = self._properties(headers)
            try:
                await broker._publish_confirmed(
                    message.body, "", queue, properties, what, reconnect=False
                )
            except BrokerError as exc:
                logger.warning("could not %s: %s", what, exc)
                await asyncio.sleep(_GIVE_BACK_PAUSE)  # no tight loop of redeliveries
            else:
                await self.ack()
                return True
        # The broker redelivers it, and the next delivery counts the attempt.
        await self._settle(ack=False, requeue=True)
        return False

    def _properties(self, headers: dict[str, Any]) -> spec.Basic.Properties:
        """The copy's properties: the original headers with ``headers`` over them, or, if
        that content header would not fit one frame (RabbitMQ closes the connection with
        FRAME_ERROR), ``headers`` alone and the size of what was left out."""
        original = self._message.header.properties
        own = {
            name: value
            for name, value in (original.headers or {}).items()
            if not name.startswith(_OUR_HEADERS) and not name.startswith(_BROKER_HEADERS)
        }
        properties = spec.Basic.Properties(
            delivery_mode=_PERSISTENT,
            message_id=original.message_id,
            content_type=original.content_type,
            headers={**own, **headers},
        )
        connection = self._message.channel.connection
        tune = getattr(connection, "connection_tune", None)
        frame_max = getattr(tune, "frame_max", 0) or 131_072
        try:
            size = len(ContentHeader(0, len(self.body), properties).marshal())
        except Exception:  # headers pamqp cannot encode again: leave them out
            size = frame_max
        # 8 bytes of frame envelope, and room for the broker's own additions.
        if size + 8 + _HEADER_HEADROOM <= frame_max:
            return properties
        dropped = {HEADERS_DROPPED_HEADER: str(size)}
        bad_input.log(
            logging.WARNING,
            "oversized headers",
            "an event on %s carries %d bytes of headers; its copy goes without them",
            self._consumer.queue,
            size,
        )
        properties.headers = {**headers, **dropped}
        return properties

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        if self._settled or not requeue:
            await self._settle(ack=False)
            return
        # The attempts made so far, this one included; the first failure's time, kept from
        # the first retry on (milliseconds since the epoch, as in a dead letter).
        first_failure = self._first_failure() or time.time()
        headers = {
            ATTEMPTS_HEADER: str(self.attempt),
            FIRST_FAILURE_HEADER: str(int(first_failure * 1000)),
            EVENT_HEADER: self.event,
        }
        queue = self._consumer.queue
        if delay > 0:
            try:
                queue = await self._consumer.delay_queue(delay)
            except BrokerError as exc:
                # Without its delay queue the retry waits here, holding its slot.
                logger.warning("could not delay a retry on %s: %s", self._consumer.queue, exc)
                await asyncio.sleep(min(delay, _GIVE_BACK_PAUSE * 10))
        await self._move(queue, headers, f"retry an event on {queue}")

    async def dead_letter(self, failure: Failure) -> None:
        if self._settled:
            return
        consumer = self._consumer
        letter = make_dead_letter(
            failure,
            event=self.event,
            group=consumer.subscription.group,
            attempts=self.attempt,
            frame=self.body,
            first_failure=self._first_failure(),
        )
        size = self._message.header.body_size or 0
        if size > len(self.body):  # over max_message_size: its body was never read
            letter = dataclasses.replace(letter, truncated_from=size)
        queue = consumer.dead_letter_queue
        headers = dead_letter_headers(letter)
        headers[DEAD_LETTER_ID_HEADER] = uuid.uuid4().hex
        if await self._move(queue, headers, f"dead-letter an event to {queue}"):
            await consumer.list_group()

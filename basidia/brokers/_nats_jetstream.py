"""Basidia events on NATS JetStream: streams, pull consumers, deliveries, dead letters.

Events go to ``basidia.events.<event>`` and are kept by the stream
``BASIDIA_EVENTS`` until every group that wants them has acked them (interest
retention).  Each (service, handler) group consumes through a durable pull
consumer; a broadcast handler through a consumer of its own instance.

nats-py's pull-consumer ``fetch`` does not resume after a server restart
(nats-io/nats.py#504) and pays a task per message, so pull requests are issued
and tracked here: one live request at a time, for as many messages as there are
free handler slots, re-issued on reconnection and whenever its idle heartbeats stop.

Dead letters go to ``basidia.dlq.<event>`` in the stream ``BASIDIA_DLQ`` with the
headers every broker writes (``basidia.brokers.base``, docs/dead-letters.md).  A NAK
carries nothing, so the time of an event's first failure is remembered by the consumer
that saw it, per stream sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext, api

from basidia.brokers._common import Backoff, WorkerPool
from basidia.brokers.base import (
    GROUP_HEADER,
    TRUNCATED_FROM_HEADER,
    DeadLetter,
    Delivery,
    DeliveryHandler,
    EventSubscription,
    Failure,
    dead_letter_headers,
    make_dead_letter,
    read_dead_letter,
)
from basidia.errors import BrokerError

if TYPE_CHECKING:
    from basidia.brokers.nats import NatsBroker

__all__ = [
    "DLQ_PREFIX",
    "DLQ_STREAM",
    "EVENTS_STREAM",
    "EVENT_PREFIX",
    "EventOrigin",
    "JetStreamEvents",
    "round_trip",
    "withdraw",
]

logger = logging.getLogger("basidia.brokers.nats")

#: The stream that stores every Basidia event.
EVENTS_STREAM = "BASIDIA_EVENTS"
#: The stream that keeps dead-lettered events for operators.
DLQ_STREAM = "BASIDIA_DLQ"
EVENT_PREFIX = "basidia.events."
DLQ_PREFIX = "basidia.dlq."

# A dead letter's headers are base.py's, the same on every broker; NATS adds the event's
# sequence in BASIDIA_EVENTS (and de-duplicates dead letters by it).
SEQUENCE_HEADER = "basidia-stream-sequence"
#: On a replayed dead letter: the one group whose handler gets it (the others ack it).
REPLAY_GROUP_HEADER = "basidia-replay-group"
# The group header of earlier releases, still read when listing a group's dead letters.
_LEGACY_GROUP_HEADER = "Basidia-Group"
#: First failures a consumer remembers (by stream sequence) for the events it retries.
MAX_REMEMBERED_FAILURES = 10_000

_HEARTBEAT = "100"
_CONSUMER_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Pauses between pull requests that failed (the connection is up, or they would wait).
_PULL_RETRY = Backoff(first=0.1, cap=5.0)
_json_encode = msgspec.json.encode


def headers_size(headers: dict[str, str]) -> int:
    """Bytes the headers take in a message (``NATS/1.0`` block), which the server counts
    against ``max_payload`` together with the body."""
    return 12 + sum(len(key.encode()) + len(value.encode()) + 4 for key, value in headers.items())


async def round_trip(nc: Client, timeout: float) -> None:
    """A PING/PONG round trip: the server has processed everything sent before it."""
    await nc.flush(timeout=timeout)  # type: ignore[arg-type]  # typed int, any number works


async def withdraw(sub: NatsSubscription, timeout: float) -> None:
    """Unsubscribe ``sub`` without losing what the server has routed to it already.

    The interest is taken back at the server first, keeping the local subscription: the
    PONG of the flush comes after every message the server routed here before the UNSUB,
    so all of them are in ``sub``'s pending queue when the local subscription goes.
    """
    nc = sub._conn
    if nc.is_connected:  # (a server gone away has forgotten the interest anyway)
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await nc._send_unsubscribe(sub._id)
            await round_trip(nc, timeout)
    with contextlib.suppress(nats.errors.Error):
        await sub.unsubscribe()


def consumer_name(group: str, subject: str) -> str:
    """A valid, stable JetStream consumer name for a (group, event subject) pair.

    Consumer names allow no dots; the hash keeps ``a.b_c`` and ``a_b.c`` apart and gives
    a group a new consumer when its handler moves to another event.
    """
    digest = hashlib.blake2b(f"{group}\0{subject}".encode(), digest_size=4).hexdigest()
    return f"{_CONSUMER_NAME_UNSAFE.sub('_', group)[:48]}_{digest}"


@dataclass(frozen=True)
class EventOrigin:
    """Where an event delivery came from, for dead letters."""

    events: JetStreamEvents
    event: str
    group: str


class JetStreamEvents:
    """The JetStream side of one ``NatsBroker``: publishing, consuming, dead-lettering."""

    def __init__(
        self,
        broker: NatsBroker,
        *,
        publish_timeout: float,
        api_timeout: float,
        ack_wait: float,
        max_deliver: int,
        pull_expires: float,
        duplicate_window: float,
        stream_max_age: float,
        max_pending: int,
        max_pending_bytes: int,
    ) -> None:
        self.broker = broker
        self.publish_timeout = publish_timeout
        self.api_timeout = api_timeout
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.pull_expires = pull_expires
        # Idle heartbeats let a consumer notice a pull request the server dropped.
        self.pull_heartbeat = min(5.0, pull_expires / 4)
        self.duplicate_window = duplicate_window
        self.stream_max_age = stream_max_age
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.consumers: set[PullConsumer] = set()
        self._streams_ready = False
        self._streams_lock = asyncio.Lock()

    def connection_changed(self) -> None:
        """The connection dropped or came back: every live pull request is gone."""
        for consumer in self.consumers:
            consumer.connection_changed()

    async def close(self) -> None:
        """Stop every consumer and its handlers; the streams are set up again on reconnect."""
        consumers, self.consumers = list(self.consumers), set()
        for consumer in consumers:
            try:
                await consumer.aclose()
            except Exception:
                logger.exception("could not stop the consumer %s", consumer.name)
        self._streams_ready = False

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, subject: str, body: bytes, headers: dict[str, str], what: str) -> None:
        """Publish to a stream and wait, at most ``publish_timeout``, for its PubAck."""
        limit = self.broker.max_body_size
        size = len(body) + headers_size(headers)
        if size > limit:
            # nats-py checks the body alone; the server, body and headers together, and it
            # answers an oversized publish with -ERR and a closed connection.
            raise BrokerError(
                f"{what} of {len(body)} bytes (with its headers {size}) exceeds the server's "
                f"limit of {limit} bytes"
            )
        await self.ensure_streams()
        js = self.broker._jetstream()
        for attempt in (1, 2):
            try:
                await js.publish(subject, body, timeout=self.publish_timeout, headers=headers)
                return
            except nats.js.errors.NoStreamResponseError:
                # The stream vanished (deleted, or a server that lost its state): recreate once.
                if attempt == 2:
                    raise BrokerError(f"no JetStream stream takes {what}") from None
                self._streams_ready = False
                await self.ensure_streams()
            except nats.errors.TimeoutError:
                raise BrokerError(
                    f"JetStream did not confirm {what} within {self.publish_timeout:g} s; "
                    "publishing it again with the same idempotency key is safe"
                ) from None
            except nats.errors.MaxPayloadError:
                raise BrokerError(
                    f"{what} of {len(body)} bytes exceeds the server's limit of "
                    f"{self.broker._client().max_payload} bytes"
                ) from None
            except nats.errors.OutboundBufferLimitError:
                raise BrokerError(
                    f"cannot publish {what}: the connection to {self.broker.safe_url} is down "
                    "and its outbound buffer is full"
                ) from None
            except nats.errors.Error as exc:
                raise BrokerError(
                    f"could not publish {what}: {self.broker._secrets.scrub(repr(exc))}"
                ) from None

    async def dead_letter(self, letter: DeadLetter, sequence: int) -> bool:
        """Keep ``letter`` in the dead-letter stream; False if that failed.  ``sequence``
        is the event's in ``BASIDIA_EVENTS`` (0 for a core-NATS event)."""
        headers = dead_letter_headers(letter)
        if sequence:
            headers[SEQUENCE_HEADER] = str(sequence)
            # Dead-lettering the same stored event twice keeps one copy.
            headers["Nats-Msg-Id"] = f"dlq:{letter.group}:{sequence}"
        # An event that filled max_payload has no room left for these headers: keep its
        # beginning, and say how long it was, rather than lose the record (docs/nats.md).
        body = letter.frame
        room = self.broker.max_body_size - headers_size(headers) - 64
        if len(body) > room:
            headers[TRUNCATED_FROM_HEADER] = str(len(body))
            body = body[: max(room, 0)]
        what = f"a dead letter of {letter.event!r}"
        try:
            await self.publish(DLQ_PREFIX + letter.event, body, headers, what)
        except BrokerError as exc:
            logger.error("could not dead-letter an event of %s: %s", letter.event, exc)
            return False
        return True

    async def dead_letters(self, group: str, limit: int) -> list[DeadLetter]:
        """``group``'s dead letters in ``BASIDIA_DLQ``, oldest first, at most ``limit``.

        The stream is kept by event, not by group: an ordered consumer reads the headers of
        every dead letter (``headers_only``, so no body travels), and the group's are then
        fetched whole by sequence.  Nothing is acknowledged or removed.
        """
        if limit <= 0:
            return []
        js = self.broker._jetstream()
        what = f"could not read the dead letters of {group!r}"
        try:
            try:
                state = (await js.stream_info(DLQ_STREAM)).state
            except nats.js.errors.NotFoundError:
                return []
            if not state.messages:
                return []
            found = await self._scan(js, group, limit, state.last_seq)
            letters = []
            for sequence, _ in found:
                try:
                    msg = await js.get_msg(DLQ_STREAM, sequence)
                except nats.js.errors.NotFoundError:
                    continue  # gone since the scan (max_age)
                letter = read_dead_letter(msg.headers or {}, msg.data or b"")
                letters.append(dataclasses.replace(letter, id=str(sequence)))
            return letters
        except (TimeoutError, nats.errors.Error) as exc:
            error = self.broker._secrets.scrub(str(exc) or type(exc).__name__)
            raise BrokerError(f"{what}: {error}") from None

    async def _scan(
        self, js: JetStreamContext, group: str | None, limit: int, last: int
    ) -> list[tuple[int, str]]:
        """Stream sequences (and groups) of ``group``'s dead letters (every group's when
        None), up to ``last``, at most ``limit``."""
        sub = await js.subscribe(
            DLQ_PREFIX + ">",
            stream=DLQ_STREAM,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
            headers_only=True,
        )
        found: list[tuple[int, str]] = []
        try:
            while len(found) < limit:
                msg = await sub.next_msg(timeout=self.api_timeout)
                metadata = msg.metadata
                headers = msg.headers or {}
                named = headers.get(GROUP_HEADER, headers.get(_LEGACY_GROUP_HEADER, ""))
                if group is None or named == group:
                    found.append((metadata.sequence.stream, named))
                if metadata.sequence.stream >= last or not metadata.num_pending:
                    break
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return found

    async def _dead_letter_sequences(self, group: str | None) -> list[tuple[int, str]]:
        js = self.broker._jetstream()
        try:
            state = (await js.stream_info(DLQ_STREAM)).state
        except nats.js.errors.NotFoundError:
            return []
        if not state.messages:
            return []
        return await self._scan(js, group, state.messages, state.last_seq)

    async def dead_letter_groups(self) -> list[str]:
        """Every group with a dead letter in ``BASIDIA_DLQ`` (a scan of their headers)."""
        try:
            found = await self._dead_letter_sequences(None)
        except (TimeoutError, nats.errors.Error) as exc:
            error = self.broker._secrets.scrub(str(exc) or type(exc).__name__)
            raise BrokerError(f"could not list the groups with dead letters: {error}") from None
        return sorted({group for _, group in found if group})

    async def replay_dead_letters(self, group: str, ids: Sequence[str] | None) -> int:
        """Publish each chosen dead letter's frame again to its event's subject, marked for
        ``group`` alone (the other groups' consumers ack it unseen), then delete it from
        ``BASIDIA_DLQ``.  The publish's ``Nats-Msg-Id`` is the letter's own, so a replay
        that is repeated after a lost answer is dropped as a duplicate."""
        return await self._take(group, ids, replay=True)

    async def purge_dead_letters(self, group: str, ids: Sequence[str] | None) -> int:
        """Delete the chosen dead letters of ``group`` from ``BASIDIA_DLQ``."""
        return await self._take(group, ids, replay=False)

    async def _take(self, group: str, ids: Sequence[str] | None, *, replay: bool) -> int:
        js = self.broker._jetstream()
        wanted = None if ids is None else set(ids)
        taken = 0
        try:
            for sequence, _ in await self._dead_letter_sequences(group):
                if wanted is not None and str(sequence) not in wanted:
                    continue
                if replay:
                    try:
                        msg = await js.get_msg(DLQ_STREAM, sequence)
                    except nats.js.errors.NotFoundError:
                        continue
                    letter = read_dead_letter(msg.headers or {}, msg.data or b"")
                    if letter.truncated_from:
                        raise BrokerError(
                            f"dead letter {sequence} of {group!r} was cut to fit the server "
                            f"({letter.truncated_from} bytes): it cannot be replayed"
                        )
                    headers = {
                        REPLAY_GROUP_HEADER: group,
                        "Nats-Msg-Id": f"replay:{group}:{sequence}",
                    }
                    what = f"a replay of {letter.event!r}"
                    await self.publish(EVENT_PREFIX + letter.event, letter.frame, headers, what)
                try:
                    await js.delete_msg(DLQ_STREAM, sequence)
                except nats.js.errors.NotFoundError:
                    continue
                taken += 1
        except (TimeoutError, nats.errors.Error) as exc:
            error = self.broker._secrets.scrub(str(exc) or type(exc).__name__)
            raise BrokerError(f"could not take the dead letters of {group!r}: {error}") from None
        return taken

    # -- streams and consumers -----------------------------------------------------------------

    async def ensure_streams(self) -> None:
        """Create or update the events and dead-letter streams, once per connection."""
        if self._streams_ready:
            return
        async with self._streams_lock:
            if not self._streams_ready:  # another publisher may have done it meanwhile
                streams = (
                    # Interest: an event is kept until every group that wants it has acked
                    # it, and not at all when no group listens, as with a queue per group
                    # on other brokers.
                    (EVENTS_STREAM, EVENT_PREFIX, api.RetentionPolicy.INTEREST),
                    (DLQ_STREAM, DLQ_PREFIX, api.RetentionPolicy.LIMITS),
                )
                for name, prefix, retention in streams:
                    config = api.StreamConfig(
                        name=name,
                        subjects=[prefix + ">"],
                        retention=retention,
                        storage=api.StorageType.FILE,
                        max_age=self.stream_max_age,
                        duplicate_window=self.duplicate_window,
                    )
                    await self._ensure_stream(config)
                self._streams_ready = True

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        js = self.broker._jetstream()
        name = config.name or ""
        try:
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                await js.add_stream(config)
                logger.info("created the JetStream stream %s", name)
                return
            # An existing stream keeps its settings (an operator may have tuned them);
            # it only has to take our subjects.
            subjects = list(info.config.subjects or [])
            missing = [subject for subject in config.subjects or [] if subject not in subjects]
            if missing:
                info.config.subjects = subjects + missing
                await js.update_stream(info.config)
        except nats.errors.NoRespondersError:
            raise BrokerError(
                f"JetStream is not enabled on {self.broker.safe_url}; durable events need it "
                "(start nats-server with -js)"
            ) from None
        except nats.errors.Error as exc:
            raise BrokerError(
                f"could not set up the JetStream stream {name}: "
                f"{self.broker._secrets.scrub(repr(exc))}"
            ) from None

    async def ensure_consumer(self, config: api.ConsumerConfig) -> None:
        """Create the consumer, or update it to ``config`` (the call is idempotent)."""
        js = self.broker._jetstream()
        name = config.name or ""
        try:
            try:
                await js.add_consumer(EVENTS_STREAM, config, timeout=self.api_timeout)
            except nats.js.errors.NotFoundError:
                # The stream itself is gone (a server that lost its state).
                self._streams_ready = False
                await self.ensure_streams()
                await js.add_consumer(EVENTS_STREAM, config, timeout=self.api_timeout)
            except nats.js.errors.BadRequestError as exc:
                # An existing durable whose settings cannot change (deliver policy, say):
                # keep consuming it as it is.
                await js.consumer_info(EVENTS_STREAM, name, timeout=self.api_timeout)
                logger.warning("consumer %s keeps its existing settings: %s", name, exc)
        except nats.errors.NoRespondersError:
            raise BrokerError(f"JetStream is not enabled on {self.broker.safe_url}") from None
        except nats.errors.Error as exc:
            raise BrokerError(
                f"could not set up the JetStream consumer {name}: "
                f"{self.broker._secrets.scrub(repr(exc))}"
            ) from None

    async def subscribe(
        self,
        subscription: EventSubscription,
        subject: str,
        handler: DeliveryHandler,
        concurrency: int,
        instance_id: str,
    ) -> PullConsumer:
        """Start consuming ``subject`` for ``subscription``'s group (or this instance)."""
        await self.ensure_streams()
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.NEW,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            filter_subject=subject,
        )
        name = consumer_name(subscription.group, subject)
        if subscription.broadcast:
            # One consumer per instance, removed by the server once nobody pulls from it.
            config.name = f"{name}_{instance_id}"
            config.inactive_threshold = max(60.0, 4 * self.pull_expires)
        else:
            config.name = config.durable_name = name
        await self.ensure_consumer(config)
        # Pull requests name a reply subject under ``deliver``; the first one goes out on
        # this connection after the SUB, so no flush is needed.
        deliver = self.broker._client().new_inbox()
        sub = await self.broker._client().subscribe(
            f"{deliver}.*",
            pending_msgs_limit=self.max_pending,
            pending_bytes_limit=self.max_pending_bytes,
        )
        origin = EventOrigin(self, subscription.event, subscription.group)
        consumer = PullConsumer(
            self,
            config,
            sub,
            deliver,
            handler,
            concurrency,
            origin,
            ephemeral=subscription.broadcast,
        )
        self.consumers.add(consumer)
        return consumer


class JetStreamDelivery(Delivery):
    """A JetStream message: settled with an ack, nak or term on its reply subject.

    Its attempt is JetStream's delivery count.  A NAK carries nothing else, so the consumer
    remembers when the event first failed, by stream sequence (``first_failures``); a
    redelivery that another instance sees, or one after a restart, has no such memory and
    its dead letter's first failure is its last.
    """

    __slots__ = ("_consumer", "_received", "_reply", "_settled")

    def __init__(self, body: bytes, reply: str, consumer: PullConsumer) -> None:
        self.body = body
        self._reply = reply
        self._consumer = consumer
        self._settled = False
        self._received = time.monotonic()

    def age(self) -> float:
        """Seconds since this delivery arrived."""
        return time.monotonic() - self._received

    async def in_progress(self) -> None:
        """Restart JetStream's ack_wait clock for this message."""
        if not self._settled:
            with contextlib.suppress(Exception):  # a lost one only risks a redelivery
                await self._consumer.events.broker._client().publish(self._reply, b"+WPI")

    def _token(self, v1: int, v2: int) -> int:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>,
        # or 12 tokens with a domain and an account hash after ACK.
        tokens = self._reply.split(".")
        try:
            return int(tokens[v1] if len(tokens) == 9 else tokens[v2])
        except (IndexError, ValueError):
            return 0

    @property
    def attempt(self) -> int:
        return self._token(4, 6) or 1

    @property
    def sequence(self) -> int:
        """The event's sequence in ``BASIDIA_EVENTS``; 0 if the reply subject hides it."""
        return self._token(5, 7)

    async def ack(self) -> None:
        if self._consumer.first_failures and not self._settled:
            self._consumer.first_failures.pop(self.sequence, None)
        await self._settle(b"+ACK")

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        if not self._settled:
            if requeue:
                self._consumer.failed(self.sequence)
            elif self._consumer.first_failures:
                self._consumer.first_failures.pop(self.sequence, None)
        if requeue and delay > 0:
            # JetStream holds the message for ``delay``: the retry survives a restart.
            await self._settle(b'-NAK {"delay": %d}' % int(delay * 1e9))
        else:
            await self._settle(b"-NAK" if requeue else b"+TERM")

    async def dead_letter(self, failure: Failure) -> None:
        if self._settled:
            return
        consumer = self._consumer
        origin = consumer.origin
        sequence = self.sequence
        letter = make_dead_letter(
            failure,
            event=origin.event,
            group=origin.group,
            attempts=self.attempt,
            frame=self.body,
            first_failure=consumer.first_failures.get(sequence),
        )
        if await origin.events.dead_letter(letter, sequence):
            consumer.first_failures.pop(sequence, None)
            await self._settle(b"+TERM")
        # Otherwise leave it unsettled: JetStream redelivers it after ack_wait, and the
        # framework, seeing the attempt count, tries the dead-letter stream again.

    async def _settle(self, verdict: bytes) -> None:
        if self._settled:
            return
        self._settled = True
        self._consumer.unsettled.discard(self)
        self._consumer.settled()
        try:
            await self._consumer.events.broker._client().publish(self._reply, verdict)
        except Exception as exc:  # JetStream redelivers what was never settled
            logger.debug("could not settle a JetStream message: %s", exc)


class PullConsumer(WorkerPool[Msg]):
    """Consumes a JetStream pull consumer with at most ``concurrency`` handlers at once.

    One pull request is live at a time, for ``concurrency - in flight`` messages, so the
    server never hands this instance more than it can run.  The request's status messages
    come back on a reply subject of its own (``<deliver>.<n>``), so a late status of an
    abandoned request is told apart.  A request is abandoned, and the consumer checked
    (created again if the server lost it), on reconnection and when its heartbeats stop.

    The workers take the messages, events and status messages alike, straight from the
    subscription's pending queue.  While a request is live, fewer handlers run than there
    are workers, so a status is read as soon as it comes.
    """

    def __init__(
        self,
        events: JetStreamEvents,
        config: api.ConsumerConfig,
        sub: NatsSubscription,
        deliver: str,
        handler: DeliveryHandler,
        concurrency: int,
        origin: EventOrigin,
        *,
        ephemeral: bool,
    ) -> None:
        self.events = events
        self.origin = origin
        self.name = config.name or ""
        queue, where = sub._pending_queue, f"consumer {self.name}"
        super().__init__(queue, self._serve, concurrency, drain=True, logger=logger, where=where)
        self._config = config
        self._sub = sub
        self._deliver = deliver
        self._handler = handler
        self._ephemeral = ephemeral
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{self.name}"
        self._wake = asyncio.Event()
        self._request_subject = ""  # reply subject of the live pull request; "" when none
        self._requested = 0  # messages the live request may still bring
        self._last_seen = 0.0  # loop time of the live request's last message or heartbeat
        self._backoff = 0.0  # pause before the next pull (after a 409, say)
        self._resync = False  # check (or create) the consumer before the next pull
        self._in_flight = 0
        #: Deliveries handed to a handler and not settled yet.
        self.unsettled: set[JetStreamDelivery] = set()
        #: When each event this consumer retried first failed (seconds since the epoch),
        #: by stream sequence; the oldest go past ``MAX_REMEMBERED_FAILURES``.
        self.first_failures: dict[int, float] = {}
        self._seq = itertools.count(1)
        self._cancelled = False
        self.start_workers()
        self._loop_task = asyncio.ensure_future(self._pull_loop())
        self._keepalive_task = asyncio.ensure_future(self._keep_alive())

    def connection_changed(self) -> None:
        """The connection dropped or came back: the live pull request is gone."""
        self._request_subject = ""
        self._resync = True
        self._wake.set()

    def failed(self, sequence: int) -> None:
        """The event at ``sequence`` failed an attempt and goes back to the stream."""
        failures = self.first_failures
        if not sequence or sequence in failures:
            return
        while len(failures) >= MAX_REMEMBERED_FAILURES:
            del failures[next(iter(failures))]
        failures[sequence] = time.time()

    async def _pull_loop(self) -> None:
        failures = 0
        while not self._cancelled:
            try:
                await self._pull_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._resync = True
                broker = self.events.broker
                broker._throttled_log.log(
                    logging.WARNING,
                    "JetStream pull failed",
                    "pulling events for %s failed, retrying: %s",
                    self.origin.group,
                    broker._secrets.scrub(str(exc) or type(exc).__name__),
                )
                await asyncio.sleep(_PULL_RETRY.delay(failures))

    async def _pull_once(self) -> None:
        events = self.events
        broker = events.broker
        await broker._until_connected()
        if self._backoff:
            await asyncio.sleep(self._backoff)
            self._backoff = 0.0
        if self._resync:
            await events.ensure_consumer(self._config)
            self._resync = False
        free = self.concurrency - self._in_flight
        if free <= 0:
            self._wake.clear()
            await self._wake.wait()  # a handler finishes, or the connection changes
            return
        subject = f"{self._deliver}.{next(self._seq)}"
        loop = asyncio.get_running_loop()
        self._request_subject = subject
        self._requested = free
        self._last_seen = loop.time()
        request = {
            "batch": free,
            "expires": int(events.pull_expires * 1e9),
            "idle_heartbeat": int(events.pull_heartbeat * 1e9),
        }
        await broker._client().publish(self._next_subject, _json_encode(request), reply=subject)
        # While the request waits, a heartbeat comes every ``pull_heartbeat``; two missed
        # mean the server dropped it (restart, consumer deleted, connection swapped).
        silence = 2 * events.pull_heartbeat + 1.0
        while self._request_subject == subject and not self._cancelled:
            remaining = self._last_seen + silence - loop.time()
            if remaining <= 0:
                self._request_subject = ""
                self._resync = True
                return
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    async def _keep_alive(self) -> None:
        """Tell JetStream that slow handlers are still at work, so that it does not hand
        their events to another instance after ``ack_wait`` (a dead instance stops this)."""
        interval = self.events.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            for delivery in list(self.unsettled):
                if delivery.age() >= interval:
                    await delivery.in_progress()

    def _end_request(self) -> None:
        self._request_subject = ""
        self._wake.set()

    async def _serve(self, msg: Msg) -> None:
        data = msg.data
        # nats-py counts queued bytes against the pending limit; its consumers subtract.
        self._sub._pending_size -= len(data)
        headers = msg.headers
        if headers is not None and not data:
            status = headers.get("Status")
            if status is not None:
                self._on_status(msg.subject, status, headers)
                return
        if self._cancelled:
            await self._give_back(msg)
            return
        if headers is not None and self.origin.group != headers.get(
            REPLAY_GROUP_HEADER, self.origin.group
        ):
            await self._skip(msg)
            return
        if self._requested:
            self._requested -= 1
            if not self._requested:
                self._end_request()
        self._last_seen = asyncio.get_running_loop().time()
        self._in_flight += 1
        delivery = JetStreamDelivery(data, msg.reply, self)
        self.unsettled.add(delivery)
        try:
            await self._handler(delivery)  # (the pool logs what it raises: a bug)
        finally:
            self._in_flight -= 1
            self.unsettled.discard(delivery)  # a handler that never settled: ack_wait decides
            if not self._request_subject:
                self._wake.set()  # the puller waits for a free slot only between requests

    def _on_status(self, subject: str, status: str, headers: dict[str, str]) -> None:
        if subject != self._request_subject:
            return  # a late status of a request this consumer gave up on
        if status == _HEARTBEAT:
            self._last_seen = asyncio.get_running_loop().time()
            return
        # 404 no messages, 408 request expired, 409 consumer deleted or a limit reached:
        # this request is over.
        if status == "409":
            if "deleted" in headers.get("Description", "").lower():
                self._resync = True
            else:  # max ack pending, max waiting...: let the server breathe
                self._backoff = 0.5
        self._end_request()

    async def _skip(self, msg: Msg) -> None:
        """Ack a dead letter replayed for another group, unseen."""
        if self._requested:
            self._requested -= 1
            if not self._requested:
                self._end_request()
        with contextlib.suppress(nats.errors.Error):
            await self.events.broker._client().publish(msg.reply, b"+ACK")

    async def _give_back(self, msg: Msg) -> None:
        """Return a message this cancelled consumer will not handle (no ack_wait to sit out)."""
        if msg.data and msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await self.events.broker._client().publish(msg.reply, b"-NAK")

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self.events.consumers.discard(self)
        # Stop pulling, but keep telling JetStream that the handlers still running are at
        # work: while the service drains (shutdown grace), their events must not go to
        # another instance after ack_wait.  The keep-alive stops with the last settlement.
        self._loop_task.cancel()
        await asyncio.gather(self._loop_task, return_exceptions=True)
        self.settled()
        # As for requests: take back the interest at the server, and wait until it is gone,
        # before dropping the local subscription.  What arrives meanwhile, or was not
        # handled yet, goes straight back to the stream for another instance.
        sub = self._sub
        await withdraw(sub, self.events.publish_timeout)
        queue: asyncio.Queue[Msg] = sub._pending_queue
        while not queue.empty():
            msg = queue.get_nowait()
            sub._pending_size -= len(msg.data)
            await self._give_back(msg)
        await self._stop()
        if self._ephemeral and self.events.broker.connected:
            # Nobody else reads a broadcast consumer; deleting it now spares the stream
            # keeping events for it until its inactivity threshold (which does it otherwise).
            try:
                js = self.events.broker._jetstream()
                await js.delete_consumer(EVENTS_STREAM, self.name)
            except Exception as exc:
                logger.debug("could not delete the consumer %s: %s", self.name, exc)

    def settled(self) -> None:
        """A delivery was settled: once cancelled with none left, stop the keep-alive."""
        if self._cancelled and not self.unsettled:
            self._keepalive_task.cancel()

    async def aclose(self) -> None:
        """Cancel, then stop the handlers still running (broker close)."""
        await super().aclose()
        self._keepalive_task.cancel()
        await asyncio.gather(self._keepalive_task, return_exceptions=True)

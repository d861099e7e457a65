"""The Kafka broker, through aiokafka (``kafka://`` and ``kafkas://`` URLs).

Topics and consumer groups (``docs/kafka.md`` has the full picture):

* requests for a service go to ``basidia.rpc.<service>``, read by the consumer group of
  the same name (its instances share the partitions); a call to a service whose group
  has no member fails with ``ServiceUnavailable`` at once;
* each process has one reply topic, ``basidia.inbox.<id>`` (one partition, read without
  a group, deleted when the process closes its connection);
* events go to ``basidia.events.<event>``, read by one consumer group per handler,
  ``basidia.<service>.<handler>``, with the offsets committed once handled; a record's
  key (``dispatch(..., key=...)``) picks its partition, so events of one key are handled
  in order; broadcast handlers read every partition without a group;
* a failed event waits in its group's ``basidia.retry.<service>.<handler>`` topic until
  due; a dead one goes to ``basidia.dlq.<service>.<handler>``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.structs import ConsumerRecord, TopicPartition

from basidia._speedups import DEFAULT_MAX_FRAME_SIZE
from basidia.brokers._common import Backoff, Names, RecentKeys, Secrets, parse_url, tls_context
from basidia.brokers._kafka_consumers import (
    ATTEMPT_HEADER,
    DUE_HEADER,
    FIRST_FAILURE_HEADER,
    GroupConsumer,
    header,
    stop_client,
)
from basidia.brokers.base import (
    Broker,
    DeadLetter,
    Delivery,
    DeliveryHandler,
    EventSubscription,
    Failure,
    InboxHandler,
    Subscription,
    dead_letter_headers,
    make_dead_letter,
    read_dead_letter,
)
from basidia.errors import BrokerError, ConfigError, ConnectionLost, ServiceUnavailable
from basidia.log import ThrottledLog

__all__ = ["KafkaBroker"]

logger = logging.getLogger("basidia.brokers.kafka")

RPC_PREFIX = "basidia.rpc."
INBOX_PREFIX = "basidia.inbox."
EVENT_PREFIX = "basidia.events."
GROUP_PREFIX = "basidia."
RETRY_PREFIX = "basidia.retry."
DLQ_PREFIX = "basidia.dlq."
#: A record of a dead-letter topic that removes letters (replayed or purged) instead of
#: being one: the offsets of the letters it removes, comma-separated.
REMOVED_HEADER = "basidia-removed"

# Kafka topic names: at most 249 characters of [a-zA-Z0-9._-].
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_TOPIC_CHARS = 249
_INBOX_RE = re.compile(r"^basidia\.inbox\.[0-9a-f]{32}$")
_UNKNOWN_TOPIC = 3


def _checked_name(name: str, what: str, prefix: str) -> str:
    if not _TOPIC_RE.fullmatch(name):
        raise ValueError(
            f"{what} {name[:64]!r} cannot be used in a Kafka topic name: use letters, "
            "digits, '.', '_' and '-'"
        )
    if len(prefix) + len(name) > _MAX_TOPIC_CHARS:
        raise ValueError(
            f"{what} {name[:64]!r}... is {len(name)} characters long; at most "
            f"{_MAX_TOPIC_CHARS - len(prefix)} fit a Kafka topic name"
        )
    return prefix + name


def _ms(seconds: float) -> bytes:
    return str(int(seconds * 1000)).encode()


# -- deliveries ---------------------------------------------------------------------------------


class _RequestDelivery(Delivery):
    """A request: settled, its offset may be committed; requeued, it is not, and the next
    owner of the partition takes it (shutdown)."""

    __slots__ = ("_consumer", "_entry", "_tp")

    def __init__(self, consumer: GroupConsumer, tp: TopicPartition, entry: Any, body: bytes):
        self.body = body
        self._consumer = consumer
        self._tp = tp
        self._entry = entry

    async def ack(self) -> None:
        self._consumer.settle(self._tp, self._entry)

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        if not requeue:
            self._consumer.settle(self._tp, self._entry)

    async def dead_letter(self, failure: Failure) -> None:
        self._consumer.settle(self._tp, self._entry)


class _EventDelivery(Delivery):
    """An event of a consumer group: a retry is a copy in the group's retry topic."""

    __slots__ = (
        "_attempt",
        "_broker",
        "_consumer",
        "_entry",
        "_first_failure",
        "_group",
        "_settled",
        "_tp",
        "event",
    )

    def __init__(
        self,
        broker: KafkaBroker,
        event: str,
        group: str,
        consumer: GroupConsumer,
        tp: TopicPartition,
        entry: Any,
        record: ConsumerRecord[Any, Any],
    ) -> None:
        self.body = record.value or b""
        self.event = event
        self._broker = broker
        self._group = group
        self._consumer = consumer
        self._tp = tp
        self._entry = entry
        self._settled = False
        self._attempt = max(1, int(header(record, ATTEMPT_HEADER) or 1))
        self._first_failure = int(header(record, FIRST_FAILURE_HEADER) or 0) / 1000

    @property
    def attempt(self) -> int:
        return self._attempt

    async def ack(self) -> None:
        self._done()

    def _done(self) -> None:
        if not self._settled:
            self._settled = True
            self._consumer.settle(self._tp, self._entry)

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        if self._settled:
            return
        if requeue:
            first_failure = self._first_failure or time.time()
            try:
                await self._broker.retry_later(
                    self._group, self.body, self._attempt + 1, first_failure, delay
                )
            except BrokerError as exc:
                # Not committed either: redelivered (same attempt) after a restart.
                logger.warning("could not schedule a retry of %s: %s", self.event, exc)
                self._settled = True
                return
        self._done()

    async def dead_letter(self, failure: Failure) -> None:
        if self._settled:
            return
        letter = make_dead_letter(
            failure,
            event=self.event,
            group=self._group,
            attempts=self._attempt,
            frame=self.body,
            first_failure=self._first_failure,
        )
        try:
            await self._broker.park(letter)
        except BrokerError as exc:
            logger.warning("could not dead-letter %s: %s", self.event, exc)
            self._settled = True
            return
        self._done()


# -- broadcast and the inbox: partitions read without a group -----------------------------------


class _Reader(Subscription):
    """Every partition of ``topic`` from its end, without a consumer group: a process's
    reply inbox, or a broadcast handler's copy of an event."""

    def __init__(self, broker: KafkaBroker, topic: str, where: str) -> None:
        self.broker = broker
        self.topic = topic
        self.where = where
        self.consumer: AIOKafkaConsumer | None = None
        self.task: asyncio.Task[None] | None = None
        self._throttled_log = ThrottledLog(logger)

    async def start(self, partitions: int) -> None:
        consumer = self.broker.new_consumer(group_id=None)
        self.consumer = consumer
        try:
            await consumer.start()
            tps = [TopicPartition(self.topic, index) for index in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the positions now: what is published from here arrives
                await consumer.position(tp)
        except BaseException:
            await self.cancel()  # a start that failed or was cancelled leaves no socket open
            raise

    def run(self, on_record: Any) -> None:
        self.task = asyncio.ensure_future(self._read(on_record))

    async def _read(self, on_record: Any) -> None:
        consumer = self.consumer
        assert consumer is not None
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                self._throttled_log.log(logging.WARNING, "fetch", "%s: %r", self.where, exc)
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    try:
                        await on_record(record)
                    except Exception:
                        logger.exception("delivery handler failed on %s", self.where)

    async def cancel(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await stop_client(consumer, self.broker.api_timeout, "broadcast consumer")

    async def aclose(self) -> None:
        await self.cancel()


class _BroadcastDelivery(Delivery):
    """A broadcast event: retried in this process (nothing else has this copy)."""

    __slots__ = ("_attempt", "_first_failure", "_owner", "_settled")

    def __init__(self, owner: _Broadcast, body: bytes, attempt: int, first_failure: float):
        self.body = body
        self._owner = owner
        self._attempt = attempt
        self._first_failure = first_failure
        self._settled = False

    @property
    def attempt(self) -> int:
        return self._attempt

    async def ack(self) -> None:
        self._settled = True

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        if self._settled:
            return
        self._settled = True
        if requeue:
            first = self._first_failure or time.time()
            self._owner.retry(
                _BroadcastDelivery(self._owner, self.body, self._attempt + 1, first), delay
            )

    async def dead_letter(self, failure: Failure) -> None:
        if self._settled:
            return
        self._settled = True
        owner = self._owner
        letter = make_dead_letter(
            failure,
            event=owner.subscription.event,
            group=owner.subscription.group,
            attempts=self._attempt,
            frame=self.body,
            first_failure=self._first_failure,
        )
        await owner.reader.broker.park(letter)


class _Broadcast(Subscription):
    def __init__(
        self,
        reader: _Reader,
        subscription: EventSubscription,
        handler: DeliveryHandler,
        concurrency: int,
    ) -> None:
        self.reader = reader
        self.subscription = subscription
        self._handler = handler
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_record(self, record: ConsumerRecord[Any, Any]) -> None:
        await self._slots.acquire()
        self._spawn(_BroadcastDelivery(self, record.value or b"", 1, 0.0), 0.0)

    def retry(self, delivery: _BroadcastDelivery, delay: float) -> None:
        self._spawn(delivery, delay, acquired=False)

    def _spawn(self, delivery: _BroadcastDelivery, delay: float, *, acquired: bool = True) -> None:
        async def run() -> None:
            try:
                if delay > 0:
                    await asyncio.sleep(delay)
                if not acquired:
                    await self._slots.acquire()
                await self._handler(delivery)
            except Exception:
                logger.exception("delivery handler failed on %s", self.reader.where)
            finally:
                self._slots.release()

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self) -> None:
        await self.reader.cancel()

    async def aclose(self) -> None:
        await self.reader.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- the broker ---------------------------------------------------------------------------------


class KafkaBroker(Broker):
    """A connection to Kafka (``kafka://host:port[,host:port]``; ``kafkas://`` for TLS).

    Credentials in the URL (``kafka://user:password@host:9092``) log in with SASL
    (``sasl_mechanism``: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``).

    Options (keyword arguments, also accepted as ``broker_options`` in the config):

    * ``client_id``: the client id shown by Kafka's tools;
    * ``connect_timeout``: seconds for the first connection;
    * ``api_timeout``: seconds for admin requests, commits and group operations;
    * ``publish_timeout``: seconds to wait for Kafka to acknowledge an event;
    * ``ping_interval``: seconds between liveness probes; a probe unanswered within
      ``ping_interval`` marks the connection lost (pending calls fail at once);
    * ``linger_ms``, ``fetch_max_wait_ms``: batching of the producer and of fetches
      (latency against throughput, docs/kafka.md);
    * ``session_timeout``, ``heartbeat_interval``: how soon a silent group member is
      dropped and its partitions (with what it had not committed) go to another;
    * ``drain_timeout``: seconds a leaving member waits for its started deliveries;
    * ``join_timeout``: seconds ``serve_requests``/``subscribe_events`` wait for partitions;
    * ``request_partitions``, ``event_partitions``: partitions of the topics Basidia
      creates (a group has at most that many active members);
    * ``replication_factor``: of the topics Basidia creates (-1: the broker's default);
    * ``presence_ttl``: seconds a service seen alive is believed alive without asking;
    * ``max_message_bytes``: the largest record (the broker's ``message.max.bytes``);
    * ``duplicate_window``: seconds a published idempotency key is remembered;
    * ``sasl_mechanism``; ``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``: TLS trust
      and client certificate; any of them (or a ``kafkas://`` URL) requires TLS.
    """

    def __init__(
        self,
        url: str = "kafka://127.0.0.1:9092",
        *,
        client_id: str = "basidia",
        connect_timeout: float = 10.0,
        api_timeout: float = 10.0,
        publish_timeout: float = 10.0,
        ping_interval: float = 3.0,
        linger_ms: int = 0,
        fetch_max_wait_ms: int = 5,
        session_timeout: float = 6.0,
        heartbeat_interval: float = 1.0,
        drain_timeout: float = 10.0,
        join_timeout: float = 30.0,
        request_partitions: int = 8,
        event_partitions: int = 8,
        replication_factor: int = -1,
        presence_ttl: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_FRAME_SIZE,
        duplicate_window: float = 120.0,
        sasl_mechanism: str = "PLAIN",
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
    ) -> None:
        super().__init__()
        # kafka://user:password@host:port,host:port: the scheme and credentials of the first
        # server are everyone's.
        first, *others = (part.strip() for part in url.split(","))
        urls = [parse_url(first, "Kafka", ("kafka", "kafkas"))]
        scheme = urls[0].parts.scheme
        for other in others:
            urls.append(parse_url(f"{scheme}://{other}", "Kafka", ("kafka", "kafkas")))
        self.safe_url = ",".join([urls[0].safe, *others])
        self._bootstrap = [f"{parsed.host}:{parsed.port or 9092}" for parsed in urls]
        self._secrets = Secrets(secret for parsed in urls for secret in parsed.secrets)
        credentials = [(p.user, p.password) for p in urls if p.password is not None]
        self._user: str | None = None
        self._password: str | None = None
        if credentials:
            self._user, self._password = credentials[0]
        mechanism = sasl_mechanism.upper()
        if mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise ConfigError(
                f"unsupported sasl_mechanism {sasl_mechanism!r}: use PLAIN, SCRAM-SHA-256 "
                "or SCRAM-SHA-512"
            )
        self._sasl_mechanism = mechanism
        tls = any(p.parts.scheme == "kafkas" for p in urls) or any(
            (tls_ca_file, tls_cert_file, tls_key_file)
        )
        self._tls_files = (tls_ca_file, tls_cert_file, tls_key_file) if tls else None
        self._client_id = client_id
        self._connect_timeout = connect_timeout
        self.api_timeout = api_timeout
        self._publish_timeout = publish_timeout
        self._ping_interval = ping_interval
        self._linger_ms = int(linger_ms)
        self._fetch_max_wait_ms = int(fetch_max_wait_ms)
        self.session_timeout = session_timeout
        self._session_timeout_ms = int(session_timeout * 1000)
        self._heartbeat_interval_ms = int(heartbeat_interval * 1000)
        self.drain_timeout = drain_timeout
        self.join_timeout = join_timeout
        self._request_partitions = int(request_partitions)
        self._event_partitions = int(event_partitions)
        self._replication_factor = int(replication_factor)
        self._presence_ttl = presence_ttl
        self._max_message_bytes = int(max_message_bytes)
        self._recent_keys = RecentKeys(duplicate_window)
        self._backoff = Backoff(0.1, 5.0)

        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._connected = False
        self._closing = False
        self._monitor: asyncio.Task[None] | None = None
        self._topics: set[str] = set()
        self._topic_lock = asyncio.Lock()
        self._inbox_topic = INBOX_PREFIX + uuid.uuid4().hex
        self._inbox: _Reader | None = None
        self._inbox_handlers: dict[str, InboxHandler] = {}
        self._known_inboxes: dict[str, bool] = {}
        self._subscriptions: list[GroupConsumer | _Reader | _Broadcast] = []
        self._serving: dict[str, list[GroupConsumer]] = {}
        self._presence: dict[str, float] = {}
        self._presence_checks: dict[str, asyncio.Task[None]] = {}
        self._dlq_reader: AIOKafkaConsumer | None = None
        self._dlq_lock = asyncio.Lock()
        self._throttled_log = ThrottledLog(logger)
        self._request_topics = Names(lambda s: _checked_name(s, "service name", RPC_PREFIX))
        self._event_topics = Names(lambda e: _checked_name(e, "event name", EVENT_PREFIX))
        self._group_ids = Names(lambda g: _checked_name(g, "consumer group", GROUP_PREFIX))
        self._retry_topics = Names(lambda g: _checked_name(g, "consumer group", RETRY_PREFIX))
        self._dlq_topics = Names(lambda g: _checked_name(g, "consumer group", DLQ_PREFIX))

    def __repr__(self) -> str:
        return f"KafkaBroker({self.safe_url!r})"

    # -- connection ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def max_body_size(self) -> int:
        return self._max_message_bytes

    def reply_to_problem(self, reply_to: str) -> str | None:
        if not _INBOX_RE.fullmatch(reply_to):
            return f"reply address {reply_to[:64]!r} is not a Basidia inbox topic"
        return None

    def _client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "bootstrap_servers": self._bootstrap,
            "client_id": self._client_id,
            "request_timeout_ms": int(self.api_timeout * 1000),
            "retry_backoff_ms": 100,
            "metadata_max_age_ms": 60_000,
        }
        protocol = "PLAINTEXT"
        if self._tls_files is not None:
            options["ssl_context"] = tls_context(*self._tls_files)
            protocol = "SSL"
        if self._password is not None:
            protocol = "SASL_SSL" if self._tls_files is not None else "SASL_PLAINTEXT"
            options["sasl_mechanism"] = self._sasl_mechanism
            options["sasl_plain_username"] = self._user
            options["sasl_plain_password"] = self._password
        options["security_protocol"] = protocol
        return options

    def new_consumer(self, *, group_id: str | None) -> AIOKafkaConsumer:
        """A consumer with this connection's settings; offsets are never auto-committed."""
        options = self._client_options()
        options.pop("metadata_max_age_ms")
        return AIOKafkaConsumer(
            **options,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=self._fetch_max_wait_ms,
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
            rebalance_timeout_ms=int(self.drain_timeout * 1000) + 5000,
            max_poll_interval_ms=300_000,
            metadata_max_age_ms=5_000,
        )

    async def connect(self) -> None:
        if self._producer is not None:
            return
        self._closing = False
        options = self._client_options()
        producer = AIOKafkaProducer(
            **options,
            acks="all",
            linger_ms=self._linger_ms,
            max_request_size=self._max_message_bytes + 64 * 1024,
        )
        admin = AIOKafkaAdminClient(**options)
        try:
            await asyncio.wait_for(producer.start(), self._connect_timeout)
            await asyncio.wait_for(admin.start(), self._connect_timeout)
        except Exception as exc:
            await stop_client(producer, 1.0, "producer")
            await stop_client(admin, 1.0, "admin client")
            raise BrokerError(
                f"could not connect to {self.safe_url}: {self._secrets.describe(exc)}"
            ) from None
        self._producer, self._admin = producer, admin
        self._connected = True
        self._monitor = asyncio.ensure_future(self._watch())
        logger.info("connected to %s", self.safe_url)

    async def _ping(self) -> None:
        producer = self._producer
        assert producer is not None
        client = producer.client
        node = client.get_random_node()
        if node is None:
            raise KafkaError("no broker known")
        await client.send(node, MetadataRequest([]))

    async def _watch(self) -> None:
        """Probe the cluster every ``ping_interval``: aiokafka reconnects by itself but
        tells nobody, and pending calls must fail fast when the link is gone."""
        while True:
            await asyncio.sleep(self._ping_interval)
            try:
                await asyncio.wait_for(self._ping(), self._ping_interval)
            except (TimeoutError, KafkaError, OSError) as exc:
                if self._connected and not self._closing:
                    self._connected = False
                    logger.warning(
                        "lost the connection to %s (%s); reconnecting",
                        self.safe_url,
                        self._secrets.describe(exc),
                    )
                    self._notify_disconnect(
                        ConnectionLost(f"lost the connection to {self.safe_url}")
                    )
            else:
                if not self._connected and not self._closing:
                    self._connected = True
                    logger.info("reconnected to %s", self.safe_url)

    async def close(self) -> None:
        producer = self._producer
        if producer is None:
            return
        self._closing = True
        self._connected = False
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        checks = list(self._presence_checks.values())
        for task in checks:
            task.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        subscriptions, self._subscriptions = self._subscriptions, []
        await asyncio.gather(
            *(subscription.aclose() for subscription in subscriptions), return_exceptions=True
        )
        self._serving.clear()
        if self._inbox is not None:
            await self._inbox.aclose()
            self._inbox = None
            # Nothing reads it any more: a late reply to it is dropped by its sender.
            await self._delete_topic(self._inbox_topic)
        self._inbox_handlers.clear()
        if self._dlq_reader is not None:
            await stop_client(self._dlq_reader, self.api_timeout, "dead-letter reader")
            self._dlq_reader = None
        self._producer = None
        await stop_client(producer, self._publish_timeout, "producer")
        admin, self._admin = self._admin, None
        if admin is not None:
            await stop_client(admin, self.api_timeout, "admin client")
        logger.info("closed the connection to %s", self.safe_url)

    def _producer_or_raise(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise BrokerError(f"{self!r} is not connected")
        return self._producer

    def _admin_or_raise(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            raise BrokerError(f"{self!r} is not connected")
        return self._admin

    # -- topics --------------------------------------------------------------------------------

    async def ensure_topic(self, topic: str, partitions: int) -> None:
        """Create ``topic`` unless this connection saw it already (it may exist)."""
        if topic in self._topics:
            return
        async with self._topic_lock:
            if topic in self._topics:
                return
            admin = self._admin_or_raise()
            new = NewTopic(topic, partitions, 1)
            # -1 asks for the broker's default.replication.factor (KIP-464), which NewTopic's
            # own check does not allow.
            new.replication_factor = self._replication_factor
            try:
                response = await asyncio.wait_for(admin.create_topics([new]), self.api_timeout)
            except TopicAlreadyExistsError:
                pass
            except (TimeoutError, KafkaError) as exc:
                raise BrokerError(
                    f"could not create topic {topic}: {self._secrets.describe(exc)}"
                ) from None
            else:
                for _name, code, *rest in response.topic_errors:
                    if code not in (0, TopicAlreadyExistsError.errno):
                        message = rest[0] if rest else ""
                        raise BrokerError(f"could not create topic {topic}: error {code} {message}")
            self._topics.add(topic)

    async def _topic_exists(self, topic: str) -> bool:
        """Whether ``topic`` exists, asked without letting the broker create it."""
        producer = self._producer_or_raise()
        client = producer.client
        node = client.get_random_node()
        if node is None:
            raise BrokerError(f"no broker of {self.safe_url} is known")
        request = MetadataRequest([topic], allow_auto_topic_creation=False)
        response = await asyncio.wait_for(client.send(node, request), self.api_timeout)
        return all(entry[0] != _UNKNOWN_TOPIC for entry in response.topics)

    async def _delete_topic(self, topic: str) -> None:
        admin = self._admin
        if admin is None:
            return
        try:
            await asyncio.wait_for(admin.delete_topics([topic]), self.api_timeout)
        except Exception as exc:
            logger.debug("could not delete topic %s: %r", topic, exc)

    async def _send(
        self, topic: str, value: bytes, headers: list[tuple[str, bytes]], key: bytes | None = None
    ) -> None:
        """Publish and wait for Kafka's acknowledgement."""
        producer = self._producer_or_raise()
        try:
            future = await producer.send(topic, value, key=key, headers=headers or None)
            await asyncio.wait_for(future, self._publish_timeout)
        except TimeoutError:
            raise BrokerError(
                f"Kafka did not acknowledge a record for {topic} within {self._publish_timeout} s"
            ) from None
        except KafkaError as exc:
            raise BrokerError(
                f"could not publish to {topic}: {self._secrets.describe(exc)}"
            ) from None

    # -- RPC -----------------------------------------------------------------------------------

    async def serve_requests(
        self, service: str, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        topic = self._request_topics[service]
        await self.ensure_topic(topic, self._request_partitions)

        def make(consumer: GroupConsumer, tp: TopicPartition, entry: Any, record: Any) -> Delivery:
            return _RequestDelivery(consumer, tp, entry, record.value or b"")

        consumer = GroupConsumer(
            self,
            [topic],
            topic,
            handler,
            concurrency,
            make,
            ordered=False,
            where=f"topic {topic}",
        )
        await consumer.start(self.join_timeout)
        self._subscriptions.append(consumer)
        self._serving.setdefault(service, []).append(consumer)
        return consumer

    async def send_request(self, service: str, body: bytes, *, correlation_id: int) -> None:
        producer = self._producer
        if producer is None or not self._connected:
            raise ConnectionLost(f"not connected to {self.safe_url}")
        topic = self._request_topics[service]
        await self._check_presence(service, topic)
        try:
            await producer.send(topic, body)
        except KafkaError as exc:
            raise ConnectionLost(
                f"could not send a request to {service!r}: {self._secrets.describe(exc)}"
            ) from None

    async def _check_presence(self, service: str, topic: str) -> None:
        """Raise ``ServiceUnavailable`` unless ``service``'s request group has a member.

        A service seen alive is believed alive for ``presence_ttl`` seconds, then asked
        about again in the background while calls go on."""
        expiry = self._presence.get(service)
        now = time.monotonic()
        if expiry is not None:
            if expiry < now and service not in self._presence_checks:
                task = asyncio.ensure_future(self._refresh_presence(service, topic))
                self._presence_checks[service] = task
            return
        if any(consumer.serving for consumer in self._serving.get(service, ())):
            self._presence[service] = now + self._presence_ttl
            return
        if not await self.group_has_members(topic):
            raise ServiceUnavailable(f"no instance of service {service!r} is running")
        self._presence[service] = time.monotonic() + self._presence_ttl

    async def _refresh_presence(self, service: str, topic: str) -> None:
        try:
            if await self.group_has_members(topic):
                self._presence[service] = time.monotonic() + self._presence_ttl
            else:
                self._presence.pop(service, None)
        except BrokerError:
            self._presence.pop(service, None)
        finally:
            self._presence_checks.pop(service, None)

    async def group_has_members(self, group_id: str) -> bool:
        """Whether consumer group ``group_id`` has a member now."""
        admin = self._admin_or_raise()
        try:
            [response] = await asyncio.wait_for(
                admin.describe_consumer_groups([group_id]), self.api_timeout
            )
        except (TimeoutError, KafkaError, ValueError) as exc:
            raise ConnectionLost(
                f"could not ask {self.safe_url} about group {group_id}: "
                f"{self._secrets.describe(exc)}"
            ) from None
        # (error_code, group_id, state, protocol_type, protocol, members, ...)
        return any(group[5] for group in response.groups)

    async def open_inbox(self, handler: InboxHandler) -> str:
        if self._inbox is None:
            topic = self._inbox_topic
            await self.ensure_topic(topic, 1)
            reader = _Reader(self, topic, f"inbox {topic}")
            await reader.start(1)
            handlers = self._inbox_handlers

            async def on_reply(record: ConsumerRecord[Any, Any]) -> None:
                for handle in handlers.values():
                    handle(record.value or b"")

            reader.run(on_reply)
            self._inbox = reader
        # Every inbox handler of a process shares its one topic (the router ignores the
        # replies it is not waiting for).
        address = self._inbox_topic
        self._inbox_handlers[f"{address}#{len(self._inbox_handlers)}"] = handler
        self._known_inboxes[address] = True
        return address

    async def send_reply(self, reply_to: str, body: bytes) -> None:
        if not _INBOX_RE.fullmatch(reply_to):
            logger.debug("dropped a reply to a topic that is not an inbox")
            return
        producer = self._producer_or_raise()
        known = self._known_inboxes.get(reply_to)
        if known is None:
            try:
                known = await self._topic_exists(reply_to)
            except (TimeoutError, KafkaError, OSError) as exc:
                raise ConnectionLost(
                    f"could not send a reply: {self._secrets.describe(exc)}"
                ) from None
            if len(self._known_inboxes) > 4096:
                self._known_inboxes.clear()
            self._known_inboxes[reply_to] = known
        if not known:
            logger.debug("dropped a reply to a vanished inbox")
            return
        try:
            await producer.send(reply_to, body)
        except KafkaError as exc:
            raise ConnectionLost(f"could not send a reply: {self._secrets.describe(exc)}") from None

    # -- events --------------------------------------------------------------------------------

    async def publish_event(
        self, event: str, body: bytes, *, idempotency_key: str, key: str | None = None
    ) -> None:
        topic = self._event_topics[event]
        await self.ensure_topic(topic, self._event_partitions)
        record_key = key.encode() if key else None

        async def publish() -> None:
            await self._send(topic, body, [], record_key)

        await self._recent_keys.publish_once(idempotency_key, publish)

    async def subscribe_events(
        self, subscription: EventSubscription, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        event, group = subscription.event, subscription.group
        topic = self._event_topics[event]
        await self.ensure_topic(topic, self._event_partitions)
        if subscription.broadcast:
            reader = _Reader(self, topic, f"topic {topic} (broadcast)")
            partitions = await self._producer_or_raise().partitions_for(topic)
            await reader.start(len(partitions))
            broadcast = _Broadcast(reader, subscription, handler, concurrency)
            reader.run(broadcast.on_record)
            self._subscriptions.append(broadcast)
            return broadcast
        retry_topic = self._retry_topics[group]
        await self.ensure_topic(retry_topic, 1)

        def make(consumer: GroupConsumer, tp: TopicPartition, entry: Any, record: Any) -> Delivery:
            return _EventDelivery(self, event, group, consumer, tp, entry, record)

        consumer = GroupConsumer(
            self,
            [topic, retry_topic],
            self._group_ids[group],
            handler,
            concurrency,
            make,
            ordered=True,
            retry_topic=retry_topic,
            where=f"group {group}",
        )
        await consumer.start(self.join_timeout)
        self._subscriptions.append(consumer)
        return consumer

    async def retry_later(
        self, group: str, body: bytes, attempt: int, first_failure: float, delay: float
    ) -> None:
        """Put ``body`` in ``group``'s retry topic, due in ``delay`` seconds."""
        topic = self._retry_topics[group]
        await self.ensure_topic(topic, 1)
        headers = [
            (ATTEMPT_HEADER, str(attempt).encode()),
            (DUE_HEADER, _ms(time.time() + max(0.0, delay))),
            (FIRST_FAILURE_HEADER, _ms(first_failure)),
        ]
        await self._send(topic, body, headers)

    # -- dead letters --------------------------------------------------------------------------

    async def park(self, letter: DeadLetter) -> None:
        """Append ``letter`` to its group's dead-letter topic."""
        topic = self._dlq_topics[letter.group]
        await self.ensure_topic(topic, 1)
        headers = [(name, value.encode()) for name, value in dead_letter_headers(letter).items()]
        await self._send(topic, letter.frame, headers)

    async def _read_letters(self, group: str) -> list[DeadLetter]:
        """Every dead letter of ``group`` still parked, oldest first."""
        topic = self._dlq_topics[group]
        if topic not in self._topics and not await self._topic_exists(topic):
            return []
        async with self._dlq_lock:
            reader = self._dlq_reader
            if reader is None:
                reader = self._dlq_reader = self.new_consumer(group_id=None)
                await asyncio.wait_for(reader.start(), self.api_timeout)
            tp = TopicPartition(topic, 0)
            reader.assign([tp])
            begin = (await asyncio.wait_for(reader.beginning_offsets([tp]), self.api_timeout))[tp]
            end = (await asyncio.wait_for(reader.end_offsets([tp]), self.api_timeout))[tp]
            reader.seek(tp, begin)
            records: list[ConsumerRecord[Any, Any]] = []
            deadline = time.monotonic() + self.api_timeout
            while await reader.position(tp) < end:
                if time.monotonic() > deadline:
                    raise BrokerError(f"could not read {topic} within {self.api_timeout} s")
                batch = await reader.getmany(tp, timeout_ms=200)
                records.extend(batch.get(tp, ()))
        removed: set[int] = set()
        parked = []
        for record in records:
            listed = header(record, REMOVED_HEADER)
            if listed:
                removed.update(int(offset) for offset in listed.split(",") if offset.isdigit())
            elif record.offset < end:
                parked.append(record)
        return [
            dataclasses.replace(
                read_dead_letter(dict(record.headers or ()), record.value or b""),
                id=str(record.offset),
            )
            for record in parked
            if record.offset not in removed
        ]

    async def dead_letters(self, group: str, *, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        return (await self._read_letters(group))[:limit]

    async def dead_letter_groups(self) -> list[str]:
        admin = self._admin_or_raise()
        topics = await asyncio.wait_for(admin.list_topics(), self.api_timeout)
        groups = []
        for topic in sorted(topics):
            if topic.startswith(DLQ_PREFIX):
                group = topic[len(DLQ_PREFIX) :]
                if await self._read_letters(group):
                    groups.append(group)
        return groups

    async def replay_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        letters = self._chosen(await self._read_letters(group), ids)
        for letter in letters:
            await self.retry_later(group, letter.frame, 1, 0.0, 0.0)
        await self._remove(group, letters)
        return len(letters)

    async def purge_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        letters = self._chosen(await self._read_letters(group), ids)
        await self._remove(group, letters)
        return len(letters)

    @staticmethod
    def _chosen(letters: list[DeadLetter], ids: Sequence[str] | None) -> list[DeadLetter]:
        if ids is None:
            return letters
        wanted = set(ids)
        return [letter for letter in letters if letter.id in wanted]

    async def _remove(self, group: str, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        offsets = ",".join(letter.id for letter in letters)
        await self._send(self._dlq_topics[group], b"", [(REMOVED_HEADER, offsets.encode())])

"""Kafka consumers for the Kafka broker: consumer groups with commit-after-handling.

A ``GroupConsumer`` reads its topics as one member of a Kafka consumer group and hands
every record to ``concurrency`` workers.  Offsets are committed per partition only up to
the first record that is not settled yet, so a consumer that dies redelivers everything
after its last settled record (at-least-once).  Records with the same key go through the
same worker, one after another (order per key); records without a key go to any worker.

The group's retry topic holds records due later (``Delivery.nack(delay=...)``): the
consumer pauses that partition at the first record not yet due and seeks back to it,
so that other partitions keep flowing (docs/kafka.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import CloseReason
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition

from basidia.brokers.base import Delivery, DeliveryHandler, Subscription
from basidia.log import ThrottledLog

if TYPE_CHECKING:
    from basidia.brokers.kafka import KafkaBroker

__all__ = [
    "ATTEMPT_HEADER",
    "DUE_HEADER",
    "FIRST_FAILURE_HEADER",
    "GroupConsumer",
    "header",
    "stop_client",
]

logger = logging.getLogger("basidia.brokers.kafka")

#: Headers of a record in a retry topic: its attempt number, when it is due and when it
#: first failed (milliseconds since the epoch).
ATTEMPT_HEADER = "basidia-attempt"
DUE_HEADER = "basidia-due"
FIRST_FAILURE_HEADER = "basidia-first-failure"

# Seconds a fetch waits for records before the loop looks at its state again.
_FETCH_TIMEOUT_MS = 500
_FETCH_RETRY_SECONDS = 0.5


def header(record: ConsumerRecord[Any, Any], name: str) -> str:
    """The value of header ``name`` of ``record`` as text, "" when absent."""
    for key, value in record.headers or ():
        if key == name:
            return bytes(value or b"").decode("utf-8", "replace")
    return ""


async def stop_client(client: Any, timeout: float, what: str) -> None:
    """Stop an aiokafka consumer, producer or admin client within ``timeout``, and close
    its connections whatever happens.

    ``stop()`` first commits, leaves the group or flushes, which waits on the broker; a
    slow or vanished broker must not hold a closing service up, but abandoning ``stop()``
    half-way would leave its sockets open for the garbage collector.  Past the timeout the
    connections are closed at once (docs/kafka.md, guarantees: shutdown).
    """
    stop = client.close if isinstance(client, AIOKafkaAdminClient) else client.stop
    task = asyncio.ensure_future(stop())
    try:
        # asyncio.wait, not wait_for: aiokafka's stop() itself may end cancelled (an inner
        # task of its own), which must not read as this task being cancelled.
        await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        await _close_connections(client)
        raise
    if task.done() and not task.cancelled() and task.exception() is None:
        return
    if not task.done():
        logger.debug("stopping the %s: no answer within %.1f s", what, timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    elif not task.cancelled():
        logger.debug("stopping the %s: %r", what, task.exception())
    await _close_connections(client)


async def _close_connections(client: Any) -> None:
    kafka_client = getattr(client, "_client", None)
    if kafka_client is None:
        return
    sync = kafka_client._sync_task
    if sync is not None:
        sync.cancel()
        await asyncio.gather(sync, return_exceptions=True)
        kafka_client._sync_task = None
    for conn in list(kafka_client._conns.values()):
        with contextlib.suppress(Exception):
            conn.close(reason=CloseReason.SHUTDOWN)
    kafka_client._conns.clear()


def _number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


class _Entry:
    """One record taken from a partition, until it is settled."""

    __slots__ = ("done", "offset", "partition", "started")

    def __init__(self, partition: _Partition, offset: int) -> None:
        self.partition = partition
        self.offset = offset
        self.done = False
        self.started = False


class _Partition:
    """The records taken from one partition in one assignment, in offset order; the
    offset to commit is the first one not settled."""

    __slots__ = ("committed", "entries", "position")

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        #: The next offset to commit (the first record not settled).
        self.position = -1
        #: The last offset committed.
        self.committed = -1

    def add(self, offset: int) -> _Entry:
        entry = _Entry(self, offset)
        if self.position < 0:
            self.position = offset
        self.entries.append(entry)
        return entry

    def settle(self, entry: _Entry) -> bool:
        """Mark ``entry`` settled; True when the offset to commit moved."""
        entry.done = True
        entries = self.entries
        moved = False
        while entries and entries[0].done:
            self.position = entries.popleft().offset + 1
            moved = True
        return moved

    def in_flight(self) -> int:
        return sum(1 for entry in self.entries if entry.started and not entry.done)


_Item = tuple[TopicPartition, _Partition, _Entry, ConsumerRecord[Any, Any]]
MakeDelivery = Callable[
    ["GroupConsumer", TopicPartition, _Entry, ConsumerRecord[Any, Any]], Delivery
]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: GroupConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._consumer.revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self._consumer.assigned(list(assigned))


class GroupConsumer(Subscription):
    """One member of consumer group ``group_id`` on ``topics`` (see the module)."""

    def __init__(
        self,
        broker: KafkaBroker,
        topics: list[str],
        group_id: str,
        handler: DeliveryHandler,
        concurrency: int,
        make_delivery: MakeDelivery,
        *,
        ordered: bool,
        retry_topic: str = "",
        where: str,
    ) -> None:
        self.broker = broker
        self.topics = topics
        self.group_id = group_id
        self.retry_topic = retry_topic
        self.where = where
        self._handler = handler
        self._make_delivery = make_delivery
        self._concurrency = max(1, int(concurrency))
        self._ordered = ordered
        # A record is taken from Kafka only when fewer than this are unsettled.
        self._prefetch = max(2 * self._concurrency, 16)
        lanes = self._concurrency if ordered else 1
        self._lanes: list[asyncio.Queue[_Item]] = [asyncio.Queue() for _ in range(lanes)]
        self._round_robin = itertools.cycle(range(lanes))
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._unsettled = 0
        self._room = asyncio.Event()
        self._room.set()
        self._dirty = asyncio.Event()
        self._assigned = asyncio.Event()
        self._start_ms = int(time.time() * 1000)
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._resumes: dict[TopicPartition, asyncio.TimerHandle] = {}
        self._stopping = False
        self._finished: asyncio.Task[None] | None = None
        self._throttled_log = ThrottledLog(logger)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Join the group; return once partitions are assigned, or, for the first member
        of a group, once the coordinator lists it (``timeout`` at most).

        A first member need not wait for its partitions (a group join takes seconds):
        what is published from now on waits for it (``_start_new_partitions``), and callers
        see it alive.  A member joining others waits, so that it shares the work when
        this returns."""
        broker = self.broker
        joining_others = await broker.group_has_members(self.group_id)
        consumer = broker.new_consumer(group_id=self.group_id)
        self._consumer = consumer
        try:
            await consumer.start()
        except BaseException:  # a start that failed or was cancelled leaves no socket open
            self._consumer = None
            await stop_client(consumer, broker.api_timeout, f"consumer of {self.where}")
            raise
        consumer.subscribe(topics=self.topics, listener=_Listener(self))
        self._tasks.append(asyncio.ensure_future(self._fetch()))
        self._tasks.append(asyncio.ensure_future(self._commit_loop()))
        for index in range(self._concurrency):
            lane = self._lanes[index if self._ordered else 0]
            self._tasks.append(asyncio.ensure_future(self._work(lane)))
        deadline = time.monotonic() + timeout
        if joining_others:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._assigned.wait(), timeout)
        else:
            while not self._assigned.is_set() and time.monotonic() < deadline:
                if await broker.group_has_members(self.group_id):
                    return
                await asyncio.sleep(0.05)
        if not self._assigned.is_set():
            logger.warning(
                "%s: no partitions assigned within %.0f s; consuming once the group has rebalanced",
                self.where,
                timeout,
            )

    @property
    def serving(self) -> bool:
        return self._consumer is not None and not self._stopping

    async def cancel(self) -> None:
        if self._finished is None:
            self._stopping = True
            for timer in self._resumes.values():
                timer.cancel()
            self._resumes.clear()
            self._finished = asyncio.ensure_future(self._finish())
        if self._in_flight() == 0:
            await asyncio.shield(self._finished)

    def _in_flight(self) -> int:
        return sum(partition.in_flight() for partition in self._partitions.values())

    async def _finish(self, grace: float | None = None) -> None:
        """Stop fetching; let started deliveries settle (within ``grace``), commit, leave."""
        grace = self.broker.drain_timeout if grace is None else grace
        if not self._assigned.is_set():
            # The group's start offsets are committed with its first assignment: without
            # them, events published until the next member starts would be skipped.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._assigned.wait(), self.broker.session_timeout)
        fetch, *others = self._tasks
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        for lane in self._lanes:  # not started: the next owner of the partition gets them
            while not lane.empty():
                lane.get_nowait()
        deadline = time.monotonic() + grace
        while self._in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded
            await asyncio.sleep(0.02)
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        consumer = self._consumer
        if consumer is not None:
            try:
                await self._commit(consumer)
                await self._leave_generation_zero(consumer)
            finally:  # stopped whatever happened above, or its sockets stay open
                await stop_client(consumer, self.broker.api_timeout, f"consumer of {self.where}")

    async def _leave_generation_zero(self, consumer: AIOKafkaConsumer) -> None:
        """aiokafka leaves a group only from a generation above 0; brokers that number
        generations from 0 (Tansu) would keep a stopped member listed, and a service with
        no instance would look alive.  Leave such a generation here."""
        coordinator = consumer._coordinator
        if coordinator is None or coordinator.generation != 0 or not coordinator.member_id:
            return
        request = LeaveGroupRequest(coordinator.group_id, coordinator.member_id)
        try:
            await asyncio.wait_for(coordinator._send_req(request), self.broker.api_timeout)
        except (KafkaError, TimeoutError) as exc:
            logger.debug("%s: leaving the group: %r", self.where, exc)

    async def aclose(self) -> None:
        """Cancel and wait until the consumer has left (broker close), within the time its
        steps may take; past it the consumer is dropped (the group expires it)."""
        broker = self.broker
        bound = broker.session_timeout + broker.drain_timeout + 3 * broker.api_timeout
        try:
            await asyncio.wait_for(self.cancel(), bound)
            assert self._finished is not None
            await asyncio.wait_for(asyncio.shield(self._finished), bound)
        except TimeoutError:
            logger.warning("%s: the consumer did not stop within %.0f s", self.where, bound)
            if self._finished is not None:
                self._finished.cancel()
                await asyncio.gather(self._finished, return_exceptions=True)

    # -- rebalances ------------------------------------------------------------------------

    async def assigned(self, partitions: list[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        for tp in partitions:
            previous = self._partitions.get(tp)
            self._partitions[tp] = _Partition()
            if previous is not None:
                # Assigned again without being revoked first (aiokafka does so when the
                # group rebalances for a metadata change): what was taken and not settled
                # is fetched again, from the first record not settled.
                self._unsettled -= sum(1 for entry in previous.entries if not entry.done)
                if previous.entries:
                    consumer.seek(tp, previous.entries[0].offset)
        self._update_room()
        try:
            await self._start_new_partitions(consumer, partitions)
        except Exception as exc:
            logger.warning("%s: could not set the start offsets: %r", self.where, exc)
        self._assigned.set()

    async def _start_new_partitions(
        self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
    ) -> None:
        """A partition the group has never committed starts at the first record published
        since this subscription was made (nothing older: a new handler does not replay the
        topic's history), and that position is committed at once."""
        fresh = []
        for tp in partitions:
            if await consumer.committed(tp) is None:
                fresh.append(tp)
        if not fresh:
            return
        found = await consumer.offsets_for_times({tp: self._start_ms for tp in fresh})
        at_end = [tp for tp in fresh if found.get(tp) is None]
        if at_end:
            await consumer.seek_to_end(*at_end)
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp in fresh:
            offset_and_time = found.get(tp)
            if offset_and_time is not None:
                consumer.seek(tp, offset_and_time.offset)
                offset = offset_and_time.offset
            else:
                offset = await consumer.position(tp)
            offsets[tp] = OffsetAndMetadata(offset, "")
        await consumer.commit(offsets)

    async def revoked(self, partitions: list[TopicPartition]) -> None:
        consumer = self._consumer
        revoked = [self._partitions[tp] for tp in partitions if tp in self._partitions]
        # Records queued but not started are left to the next owner; started ones settle
        # (within the drain timeout) and are committed before the partitions go.
        for tp in partitions:
            timer = self._resumes.pop(tp, None)
            if timer is not None:
                timer.cancel()
        deadline = time.monotonic() + self.broker.drain_timeout
        while any(p.in_flight() for p in revoked) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if consumer is not None:
            await self._commit(consumer)
        for tp in partitions:
            partition = self._partitions.pop(tp, None)
            if partition is not None:
                self._unsettled -= sum(1 for entry in partition.entries if not entry.done)
        self._update_room()

    # -- fetching ------------------------------------------------------------------------

    def _update_room(self) -> None:
        if self._unsettled < self._prefetch:
            self._room.set()
        else:
            self._room.clear()

    async def _fetch(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        lanes = self._lanes
        failures = 0
        while True:
            await self._room.wait()
            try:
                batches = await consumer.getmany(
                    timeout_ms=_FETCH_TIMEOUT_MS, max_records=self._prefetch - self._unsettled
                )
                failures = 0
            except KafkaError as exc:
                failures += 1
                self._throttled_log.log(
                    logging.WARNING, "fetch", "%s: fetch failed: %r", self.where, exc
                )
                await asyncio.sleep(min(5.0, _FETCH_RETRY_SECONDS * failures))
                continue
            now_ms = time.time() * 1000
            for tp, records in batches.items():
                partition = self._partitions.get(tp)
                if partition is None:
                    continue
                retry = tp.topic == self.retry_topic
                for record in records:
                    if retry:
                        due = _number(header(record, DUE_HEADER))
                        if due > now_ms + 1:
                            self._wait_until_due(consumer, tp, record.offset, due - now_ms)
                            break
                    entry = partition.add(record.offset)
                    self._unsettled += 1
                    if len(lanes) == 1:
                        lane = lanes[0]
                    elif record.key:
                        lane = lanes[hash(record.key) % len(lanes)]
                    else:
                        lane = lanes[next(self._round_robin)]
                    lane.put_nowait((tp, partition, entry, record))
            self._update_room()

    def _wait_until_due(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, wait_ms: float
    ) -> None:
        consumer.pause(tp)
        consumer.seek(tp, offset)

        def resume() -> None:
            self._resumes.pop(tp, None)
            if tp in consumer.assignment():
                consumer.resume(tp)

        loop = asyncio.get_running_loop()
        self._resumes[tp] = loop.call_later(wait_ms / 1000, resume)

    async def _work(self, lane: asyncio.Queue[_Item]) -> None:
        handler = self._handler
        make = self._make_delivery
        while True:
            tp, partition, entry, record = await lane.get()
            if self._partitions.get(tp) is not partition or self._stopping:
                continue  # revoked meanwhile: the next owner of the partition has it
            entry.started = True
            try:
                await handler(make(self, tp, entry, record))
            except Exception:
                logger.exception("delivery handler failed on %s", self.where)

    # -- settlement ----------------------------------------------------------------------

    def settle(self, tp: TopicPartition, entry: _Entry) -> None:
        """The record of ``entry`` is handled: its offset may be committed."""
        if entry.done:
            return
        partition = entry.partition
        if self._partitions.get(tp) is not partition:
            entry.done = True  # revoked meanwhile: the next owner redelivers it
            return
        self._unsettled -= 1
        if partition.settle(entry):
            self._dirty.set()
        self._update_room()

    async def _commit_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._commit(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        offsets = {
            tp: OffsetAndMetadata(partition.position, "")
            for tp, partition in self._partitions.items()
            if partition.position > partition.committed
        }
        if not offsets:
            return
        try:
            await asyncio.wait_for(consumer.commit(offsets), self.broker.api_timeout)
        except (TimeoutError, KafkaError) as exc:
            # A rebalance took the partitions: their records go to the next owner.
            self._throttled_log.log(
                logging.WARNING, "commit", "%s: could not commit offsets: %r", self.where, exc
            )
            return
        for tp, offset in offsets.items():
            partition = self._partitions.get(tp)
            if partition is not None:
                partition.committed = max(partition.committed, offset.offset)

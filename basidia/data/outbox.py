"""The transactional outbox: events written in the handler's database transaction, and the
relay that publishes them afterwards (docs/outbox.md).

A handler writes its rows and its events in one transaction::

    class Orders(Service):
        name = "orders"
        db = Outbox()                      # config "database.url", else sqlite:///orders.db

        @rpc
        async def place(self, order_id: int) -> None:
            async with self.db.transaction() as tx:
                await tx.execute("INSERT INTO orders (id) VALUES ($1)", order_id)
                await tx.dispatch("order.placed", {"id": order_id})

The event exists if and only if the transaction commits.  The relay then publishes
pending events in id order, each awaiting the broker's confirm, marks them sent, and
retries with backoff while the broker refuses.  Each event's idempotency key is
``<service>:<outbox id>``, the same on every attempt, so a consumer's inbox
(``tx = db.inbox()``) absorbs the duplicates a crash between publish and mark can cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from basidia.brokers._common import Backoff as _Backoff
from basidia.context import current_context
from basidia.data.db import Connection, Database, Row, open_database, resolve_url
from basidia.data.inbox import prune_inbox, record_key
from basidia.data.schema import migrate
from basidia.dependencies import DependencyProvider
from basidia.errors import MessageTooLarge
from basidia.versioning import check_version

if TYPE_CHECKING:
    from basidia.context import CallContext
    from basidia.events import EventPublisher

__all__ = ["Backoff", "Outbox", "OutboxTransaction", "Relay", "RelayStats"]

logger = logging.getLogger("basidia.data.outbox")

_encode = msgspec.msgpack.Encoder().encode
# Bytes a frame needs besides the event's data: name, headers (key, source, version).
_FRAME_HEADROOM = 1024
_decode = msgspec.msgpack.Decoder().decode


class Backoff:
    """Capped exponential backoff with jitter: ``initial``, doubling up to ``cap`` seconds,
    each delay drawn between half and all of the current step (docs/outbox.md): the brokers'
    ``Backoff`` with a count of the attempts made since the last ``reset``."""

    def __init__(self, initial: float = 0.1, cap: float = 5.0) -> None:
        self.initial = initial
        self.cap = cap
        self._delays = _Backoff(initial, cap)
        self._attempt = 0

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the step up to ``cap``."""
        delay = self._delays.delay(self._attempt)
        self._attempt += 1
        return delay

    def reset(self) -> None:
        """After a success: start again from ``initial``."""
        self._attempt = 0


def event_key(source: str, outbox_id: int) -> str:
    """The idempotency key of outbox event ``outbox_id`` written by ``source``."""
    return f"{source}:{outbox_id}"


class OutboxTransaction(Connection):
    """A database transaction that can also write events (``dispatch``).

    ``duplicate`` is True inside ``Outbox.inbox()`` when the message was handled before.
    """

    def __init__(self, conn: Connection, source: str, channel: str, max_size: int) -> None:
        self.conn = conn
        self.dialect = conn.dialect
        self.source = source
        self.max_size = max_size
        self.duplicate = False
        self.keys: list[str] = []
        self._channel = channel

    async def execute(self, sql: str, *args: Any) -> int:
        return await self.conn.execute(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self.conn.fetch(sql, *args)

    async def dispatch(self, event: str, data: Any, *, version: int | None = None) -> str:
        """Write event ``event`` with ``data``: published once this transaction commits.

        Returns its idempotency key.  ``version`` is the schema version of ``data``
        (docs/events.md)."""
        if version is not None:
            check_version(version)
        payload = _encode(data)
        if len(payload) > self.max_size:
            # Refused now, in the handler's transaction: the relay could never publish it,
            # and it would hold back every event after it.
            raise MessageTooLarge(
                f"event {event!r} has {len(payload)} bytes of data, over the "
                f"{self.max_size} that fit a frame (max_frame_size)"
            )
        args = (event, payload, self.source, version, time.time())
        if self.dialect == "postgresql":
            # NOTIFY in the same round trip; delivered at commit only, and folded into one
            # per transaction and channel however many events it writes.
            outbox_id = await self.conn.fetchval(
                "WITH inserted AS (INSERT INTO basidia_outbox "
                "(event, payload, source, version, created_at) "
                "VALUES ($1, $2, $3, $4, $5) RETURNING id) "
                "SELECT id, pg_notify($6, '') FROM inserted",
                *args,
                self._channel,
            )
        else:
            outbox_id = await self.conn.fetchval(
                "INSERT INTO basidia_outbox (event, payload, source, version, created_at) "
                "VALUES ($1, $2, $3, $4, $5) RETURNING id",
                *args,
            )
        key = event_key(self.source, int(outbox_id))
        self.keys.append(key)
        return key


@dataclass
class RelayStats:
    """What a relay has done, for the management API and tests."""

    published: int = 0
    failures: int = 0
    last_error: str = ""


class Relay:
    """Publishes the pending events ``source`` wrote to ``db``, in id order.

    On PostgreSQL it claims each batch with ``FOR UPDATE SKIP LOCKED`` and holds the rows
    locked while it publishes them, so several relays (instances) never take the same
    event; it wakes on ``LISTEN/NOTIFY`` and polls every ``poll_interval`` as a safety
    net.  On SQLite it polls, and wakes at once for events written in this process.
    """

    def __init__(
        self,
        db: Database,
        publisher: EventPublisher,
        source: str,
        *,
        batch_size: int = 100,
        poll_interval: float | None = None,
        retention: float = 86400.0,
        backoff: Backoff | None = None,
        max_in_flight: int = 1,
        inbox_retention: float = 7 * 86400.0,
    ) -> None:
        if not 0 < batch_size <= 10_000:
            raise ValueError("batch_size must be 1 to 10000")
        if not 0 < max_in_flight <= 1_000:
            raise ValueError("max_in_flight must be 1 to 1000")
        self.db = db
        self.source = source
        self.batch_size = batch_size
        self.poll_interval = poll_interval or (5.0 if db.dialect == "postgresql" else 0.5)
        self.retention = retention
        self.inbox_retention = inbox_retention
        self.max_in_flight = max_in_flight
        self.stats = RelayStats()
        self._publisher = publisher
        self._backoff = backoff or Backoff()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listening: Any = None
        self._last_prune = 0.0

    def wake(self) -> None:
        """Look for pending events now (a transaction with events has committed)."""
        self._wake.set()

    def start(self) -> None:
        """Run in the background until ``stop``."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"basidia-relay-{self.source}")

    async def stop(self, drain: float = 5.0) -> None:
        """Publish what is pending for up to ``drain`` seconds, then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if drain > 0:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(drain):
                    while await self.publish_pending():
                        pass
        await self.db.close_listener()

    async def _listen(self) -> None:
        if self.db.dialect != "postgresql":
            return
        if self._listening is not None and self._listening():
            return
        try:
            self._listening = await self.db.listen(self.db.notify_channel, self.wake)
        except Exception as exc:  # the poll covers for it; tried again next round
            self._listening = None
            logger.warning("outbox relay: LISTEN failed (%s); polling meanwhile", exc)

    async def _run(self) -> None:
        while True:
            await self._listen()
            self._wake.clear()
            try:
                while await self.publish_pending():
                    pass
                await self._prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                delay = self._backoff.next()
                logger.warning("outbox relay: %s; retrying in %.2f s", self.stats.last_error, delay)
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()

    async def publish_pending(self) -> int:
        """Publish one batch of pending events; return how many were sent.

        A failed publish ends the batch: the events before it are marked sent, it keeps
        its place (so order holds) with ``attempts`` and ``last_error`` updated, and the
        error is raised for the caller's backoff.
        """
        query = (
            "SELECT id, event, payload, version FROM basidia_outbox "
            "WHERE sent_at IS NULL AND source = $1 ORDER BY id LIMIT $2"
        )
        if self.db.dialect == "postgresql":
            async with self.db.transaction() as conn:
                rows = await conn.fetch(
                    query + " FOR UPDATE SKIP LOCKED", self.source, self.batch_size
                )
                sent, failed = await self._publish(rows)
                await self._mark(conn, sent, failed)
        else:
            # One relay per SQLite file: the rows are read, published, then marked, without
            # holding the database's only connection while the broker confirms.
            async with self.db.transaction() as conn:
                rows = await conn.fetch(query, self.source, self.batch_size)
            sent, failed = await self._publish(rows)
            async with self.db.transaction() as conn:
                await self._mark(conn, sent, failed)
        self.stats.published += len(sent)
        if failed is not None:
            raise failed[1]
        return len(sent)

    async def _publish(self, rows: list[Row]) -> tuple[list[int], tuple[int, Exception] | None]:
        """Publish ``rows`` in order; the ids confirmed, and the first failure (its id and
        error) if any.

        With ``max_in_flight`` > 1 up to that many publishes await their confirms at once
        (they are still sent in id order); a failure then may come after later events
        were confirmed: those count as sent, and the failed one goes out after them."""
        sent: list[int] = []
        failed: tuple[int, Exception] | None = None
        window = self.max_in_flight
        for start in range(0, len(rows), window):
            chunk = rows[start : start + window]
            if window == 1:
                outcomes: list[BaseException | None] = [await _capture(self._send(chunk[0]))]
            else:
                tasks = [asyncio.ensure_future(_capture(self._send(row))) for row in chunk]
                outcomes = list(await asyncio.gather(*tasks))
            for row, outcome in zip(chunk, outcomes, strict=True):
                if outcome is None:
                    sent.append(int(row[0]))
                elif failed is None:
                    error = outcome if isinstance(outcome, Exception) else RuntimeError(outcome)
                    failed = (int(row[0]), error)
            if failed is not None:
                break
        return sent, failed

    async def _send(self, row: Row) -> None:
        outbox_id = int(row[0])
        await self._publisher.publish(
            row[1],
            _decode(bytes(row[2])),
            source=self.source,
            idempotency_key=event_key(self.source, outbox_id),
            version=row[3],
        )

    async def _mark(
        self, conn: Connection, sent: list[int], failed: tuple[int, Exception] | None
    ) -> None:
        now = time.time()
        if sent:
            if conn.dialect == "postgresql":
                await conn.execute(
                    "UPDATE basidia_outbox SET sent_at = $1, attempts = attempts + 1 "
                    "WHERE id = ANY($2::bigint[])",
                    now,
                    sent,
                )
            else:
                await conn.executemany(
                    "UPDATE basidia_outbox SET sent_at = $1, attempts = attempts + 1 WHERE id = $2",
                    [(now, outbox_id) for outbox_id in sent],
                )
        if failed is not None:
            failed_id, failure = failed
            await conn.execute(
                "UPDATE basidia_outbox SET attempts = attempts + 1, last_error = $1 WHERE id = $2",
                f"{type(failure).__name__}: {failure}"[:1000],
                failed_id,
            )

    async def _prune(self) -> None:
        """Delete sent events older than ``retention`` and inbox keys older than
        ``inbox_retention`` (at most once a minute)."""
        now = time.time()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        async with self.db.transaction() as conn:
            await conn.execute(
                "DELETE FROM basidia_outbox WHERE sent_at < $1 AND source = $2",
                now - self.retention,
                self.source,
            )
            await prune_inbox(conn, self.inbox_retention, self.source)

    async def pending(self) -> int:
        """How many events wait to be published."""
        async with self.db.transaction() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM basidia_outbox WHERE sent_at IS NULL AND source = $1",
                self.source,
            )
        return int(count)


async def _capture(awaitable: Any) -> BaseException | None:
    """None when ``awaitable`` succeeds, else its exception (cancellation passes through)."""
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return exc
    return None


class DatabaseProvider(DependencyProvider):
    """The part the outbox and the sagas share: which database, opened and migrated.

    The URL is ``url`` when given, else the config value at ``config_key``, else
    ``sqlite:///<service name>.db`` (a relative SQLite path is taken from the working
    directory at start).  ``schema`` (PostgreSQL) puts the tables in a schema of their own.
    """

    db: Database

    def __init__(
        self,
        url: str | None = None,
        *,
        config_key: str = "database.url",
        schema: str | None = None,
    ) -> None:
        self.url = url
        self.config_key = config_key
        self.schema = schema

    def database_url(self) -> str:
        container = self.container
        url = self.url or container.runtime.config.get(self.config_key)
        return resolve_url(str(url or f"sqlite:///{container.service_name}.db"))

    async def open(self) -> Database:
        db = open_database(self.database_url(), schema=self.schema)
        await db.connect()
        try:
            await migrate(db)
        except BaseException:
            await db.close()
            raise
        return db


class Outbox(DatabaseProvider):
    """A service's database with an outbox: ``transaction()`` and ``inbox()``.

    ``relay=False`` leaves publishing to relays elsewhere (another process, or a
    ``Relay`` you run).  ``batch_size``, ``poll_interval``, ``retention`` (seconds a
    sent event is kept), ``max_in_flight`` (publishes awaiting their confirms at once;
    1 keeps the order strict even when a publish fails) and ``inbox_retention`` (seconds
    the keys this service's handlers recorded are kept) tune the relay.
    """

    relay: Relay | None

    def __init__(
        self,
        url: str | None = None,
        *,
        config_key: str = "database.url",
        schema: str | None = None,
        relay: bool = True,
        batch_size: int = 100,
        poll_interval: float | None = None,
        retention: float = 86400.0,
        max_in_flight: int = 1,
        inbox_retention: float = 7 * 86400.0,
    ) -> None:
        super().__init__(url, config_key=config_key, schema=schema)
        self.inbox_retention = inbox_retention
        self.run_relay = relay
        self.max_in_flight = max_in_flight
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self.relay = None

    def __repr__(self) -> str:
        return f"Outbox({self.url or self.config_key!r})"

    @property
    def max_event_size(self) -> int:
        """The most bytes of event data that fit a frame, with room for its headers."""
        runtime = self.container.runtime
        limit = min(runtime.settings.max_frame_size, runtime.broker.max_body_size)
        return limit - _FRAME_HEADROOM

    async def setup(self) -> None:
        self.db = await self.open()
        if self.run_relay:
            self.relay = Relay(
                self.db,
                self.container.runtime.publisher,
                self.container.service_name,
                batch_size=self.batch_size,
                poll_interval=self.poll_interval,
                retention=self.retention,
                max_in_flight=self.max_in_flight,
                inbox_retention=self.inbox_retention,
            )
            self.relay.start()

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        await self.db.close()

    def get_dependency(self, ctx: CallContext | None) -> OutboxHandle:
        return OutboxHandle(self)


class OutboxHandle:
    """What a service instance sees of its ``Outbox``."""

    __slots__ = ("_provider",)

    def __init__(self, provider: Outbox) -> None:
        self._provider = provider

    @property
    def db(self) -> Database:
        """The database itself, for reads and schema set-up."""
        return self._provider.db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[OutboxTransaction]:
        """One transaction: its rows and its events commit together, or neither does."""
        provider = self._provider
        db = provider.db
        async with db.transaction() as conn:
            tx = OutboxTransaction(
                conn, provider.container.service_name, db.notify_channel, provider.max_event_size
            )
            yield tx
        if tx.keys and provider.relay is not None:
            provider.relay.wake()

    @asynccontextmanager
    async def inbox(
        self, key: str | None = None, *, consumer: str | None = None
    ) -> AsyncIterator[OutboxTransaction]:
        """A transaction that records the message's idempotency key as handled.

        ``tx.duplicate`` is True when ``consumer`` handled ``key`` before: return without
        writing.  Else the key is recorded with the block's writes, so a redelivery
        after a crash before the commit is handled again, and one after it is not.
        ``key`` defaults to the event's idempotency key, ``consumer`` to
        ``<service>.<entrypoint>``.
        """
        ctx = current_context()
        key = key or (ctx.idempotency_key if ctx is not None else None)
        if not key:
            raise ValueError(
                "inbox() needs an idempotency key: pass key=..., or call it while "
                "handling an event (which carries one)"
            )
        if consumer is None:
            service = self._provider.container.service_name
            consumer = f"{service}.{ctx.entrypoint}" if ctx is not None else service
        async with self.transaction() as tx:
            tx.duplicate = not await record_key(tx.conn, consumer, key)
            yield tx

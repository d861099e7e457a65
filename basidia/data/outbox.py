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
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from basidia.context import current_context
from basidia.data.db import Connection, Database, Row, open_database, resolve_url
from basidia.data.inbox import record_key
from basidia.data.schema import migrate
from basidia.dependencies import DependencyProvider
from basidia.versioning import check_version

if TYPE_CHECKING:
    from basidia.context import CallContext
    from basidia.events import EventPublisher

__all__ = ["Backoff", "Outbox", "OutboxTransaction", "Relay", "RelayStats"]

logger = logging.getLogger("basidia.data.outbox")

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class Backoff:
    """Capped exponential backoff with jitter: ``initial``, doubling up to ``cap`` seconds,
    each delay drawn between half and all of the current step (docs/outbox.md)."""

    def __init__(self, initial: float = 0.1, cap: float = 5.0) -> None:
        self.initial = initial
        self.cap = cap
        self._step = initial

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the step up to ``cap``."""
        delay = self._step * random.uniform(0.5, 1.0)
        self._step = min(self._step * 2, self.cap)
        return delay

    def reset(self) -> None:
        """After a success: start again from ``initial``."""
        self._step = self.initial


def event_key(source: str, outbox_id: int) -> str:
    """The idempotency key of outbox event ``outbox_id`` written by ``source``."""
    return f"{source}:{outbox_id}"


class OutboxTransaction(Connection):
    """A database transaction that can also write events (``dispatch``).

    ``duplicate`` is True inside ``Outbox.inbox()`` when the message was handled before.
    """

    def __init__(self, conn: Connection, source: str, channel: str) -> None:
        self.conn = conn
        self.dialect = conn.dialect
        self.source = source
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
        outbox_id = await self.conn.fetchval(
            "INSERT INTO basidia_outbox (event, payload, source, version, created_at) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING id",
            event,
            payload,
            self.source,
            version,
            time.time(),
        )
        if not self.keys and self.dialect == "postgresql":
            # Delivered at commit only, and folded into one per transaction and channel.
            await self.conn.execute("SELECT pg_notify($1, '')", self._channel)
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
    ) -> None:
        if not 0 < batch_size <= 10_000:
            raise ValueError("batch_size must be 1 to 10000")
        self.db = db
        self.source = source
        self.batch_size = batch_size
        self.poll_interval = poll_interval or (5.0 if db.dialect == "postgresql" else 0.5)
        self.retention = retention
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
        if self.db.dialect == "postgresql":
            async with self.db.transaction() as conn:
                rows = await conn.fetch(
                    "SELECT id, event, payload, version FROM basidia_outbox "
                    "WHERE sent_at IS NULL AND source = $1 ORDER BY id LIMIT $2 "
                    "FOR UPDATE SKIP LOCKED",
                    self.source,
                    self.batch_size,
                )
                sent, failure = await self._publish(rows)
                await self._mark(conn, sent, rows, failure)
        else:
            # One relay per SQLite file: the rows are read, published, then marked, without
            # holding the database's only connection while the broker confirms.
            async with self.db.transaction() as conn:
                rows = await conn.fetch(
                    "SELECT id, event, payload, version FROM basidia_outbox "
                    "WHERE sent_at IS NULL AND source = $1 ORDER BY id LIMIT $2",
                    self.source,
                    self.batch_size,
                )
            sent, failure = await self._publish(rows)
            async with self.db.transaction() as conn:
                await self._mark(conn, sent, rows, failure)
        self.stats.published += len(sent)
        if failure is not None:
            raise failure
        return len(sent)

    async def _publish(self, rows: list[Row]) -> tuple[list[int], Exception | None]:
        sent: list[int] = []
        publish = self._publisher.publish
        for row in rows:
            outbox_id = int(row[0])
            try:
                await publish(
                    row[1],
                    _decode(bytes(row[2])),
                    source=self.source,
                    idempotency_key=event_key(self.source, outbox_id),
                    version=row[3],
                )
            except Exception as exc:
                return sent, exc
            sent.append(outbox_id)
        return sent, None

    async def _mark(
        self, conn: Connection, sent: list[int], rows: list[Row], failure: Exception | None
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
        if failure is not None:
            failed_id = int(rows[len(sent)][0])
            await conn.execute(
                "UPDATE basidia_outbox SET attempts = attempts + 1, last_error = $1 WHERE id = $2",
                f"{type(failure).__name__}: {failure}"[:1000],
                failed_id,
            )

    async def _prune(self) -> None:
        """Delete sent events older than ``retention`` (at most once a minute)."""
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

    async def pending(self) -> int:
        """How many events wait to be published."""
        async with self.db.transaction() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM basidia_outbox WHERE sent_at IS NULL AND source = $1",
                self.source,
            )
        return int(count)


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
    ``Relay`` you run).  ``batch_size``, ``poll_interval`` and ``retention`` (seconds a
    sent event is kept) tune the relay.
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
    ) -> None:
        super().__init__(url, config_key=config_key, schema=schema)
        self.run_relay = relay
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self.relay = None

    def __repr__(self) -> str:
        return f"Outbox({self.url or self.config_key!r})"

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
            tx = OutboxTransaction(conn, provider.container.service_name, db.notify_channel)
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

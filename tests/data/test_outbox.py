"""The outbox and the inbox on SQLite and PostgreSQL, with the memory broker in-process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from basidia import Service, ServiceRunner, current_context, event_handler, rpc
from basidia.data import Outbox, Relay, SchemaError, migrate, open_database
from basidia.data.schema import SCHEMA_VERSION, schema_version
from basidia.errors import ConfigError

from .conftest import Db


def producer(db: Db, *, relay: bool = True) -> type[Service]:
    class Orders(Service):
        name = "orders"
        store = Outbox(db.url, schema=db.schema, relay=relay)

        @rpc
        async def place(self, order_id: int, fail: bool = False) -> str:
            async with self.store.transaction() as tx:
                await tx.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)")
                await tx.execute("INSERT INTO orders (id) VALUES ($1)", order_id)
                key = await tx.dispatch("order.placed", {"id": order_id})
                if fail:
                    raise ValueError("the order is refused after its event was written")
            return key

        @rpc
        async def place_many(self, first: int, count: int) -> None:
            async with self.store.transaction() as tx:
                for order_id in range(first, first + count):
                    await tx.dispatch("order.placed", {"id": order_id})

    return Orders


class Received:
    def __init__(self) -> None:
        self.events: list[tuple[int, str]] = []
        self.changed = asyncio.Event()

    async def wait_for(self, count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                self.changed.clear()
                await self.changed.wait()


def consumer(received: Received) -> type[Service]:
    class Shipping(Service):
        name = "shipping"
        max_workers = 1  # handled in arrival order

        @event_handler("order.placed")
        async def on_placed(self, order: dict[str, Any]) -> None:
            ctx = current_context()
            assert ctx is not None and ctx.idempotency_key is not None
            received.events.append((order["id"], ctx.idempotency_key))
            received.changed.set()

    return Shipping


async def test_committed_events_are_published_in_order_with_their_outbox_id_as_key(
    db: Db, memory_url: str
) -> None:
    received = Received()
    async with ServiceRunner([producer(db), consumer(received)], broker=memory_url) as runner:
        keys = [await runner.rpc.orders.place(i) for i in range(1, 6)]
        await runner.rpc.orders.place_many(100, 50)
        await received.wait_for(55)
    assert [order for order, _ in received.events] == [*range(1, 6), *range(100, 150)]
    assert [key for _, key in received.events[:5]] == keys == [f"orders:{i}" for i in range(1, 6)]


async def test_a_rolled_back_transaction_publishes_nothing(db: Db, memory_url: str) -> None:
    received = Received()
    async with ServiceRunner([producer(db), consumer(received)], broker=memory_url) as runner:
        with pytest.raises(Exception, match="refused after its event"):
            await runner.rpc.orders.place(1, fail=True)
        await runner.rpc.orders.place(2)
        await received.wait_for(1)
        await asyncio.sleep(0.2)  # room for a wrongly published event to arrive
        relay = runner.containers["orders"].dependencies["store"].relay  # type: ignore[attr-defined]
        assert await relay.pending() == 0
    assert [order for order, _ in received.events] == [2]


async def test_events_written_without_a_relay_wait_until_one_runs(db: Db, memory_url: str) -> None:
    received = Received()
    async with ServiceRunner(
        [producer(db, relay=False), consumer(received)], broker=memory_url
    ) as runner:
        for i in range(3):
            await runner.rpc.orders.place(i)
        await asyncio.sleep(0.2)
        assert received.events == []
        store = open_database(db.url, schema=db.schema)
        await store.connect()
        try:
            relay = Relay(store, runner.runtime.publisher, "orders")
            assert await relay.pending() == 3
            assert await relay.publish_pending() == 3
            assert await relay.pending() == 0
            assert await relay.publish_pending() == 0
        finally:
            await store.close()
        await received.wait_for(3)
    assert [order for order, _ in received.events] == [0, 1, 2]


async def test_the_inbox_handles_a_key_once_with_the_handlers_writes(
    db: Db, memory_url: str
) -> None:
    class Payments(Service):
        name = "payments"
        store = Outbox(db.url, schema=db.schema)

        @rpc
        async def charge(self, order_id: int, key: str, fail: bool = False) -> bool:
            async with self.store.inbox(key) as tx:
                if tx.duplicate:
                    return False
                await tx.execute("CREATE TABLE IF NOT EXISTS charges (order_id INTEGER)")
                await tx.execute("INSERT INTO charges (order_id) VALUES ($1)", order_id)
                if fail:
                    raise ValueError("declined")
            return True

        @rpc
        async def charges(self) -> int:
            async with self.store.transaction() as tx:
                return int(await tx.fetchval("SELECT count(*) FROM charges"))

    async with ServiceRunner([Payments], broker=memory_url) as runner:
        payments = runner.rpc.payments
        with pytest.raises(Exception, match="declined"):
            await payments.charge(1, "k1", fail=True)
        assert await payments.charge(1, "k1") is True  # the failed attempt recorded nothing
        assert await payments.charge(1, "k1") is False
        assert await payments.charge(2, "k2") is True
        results = await asyncio.gather(*(payments.charge(3, "k3") for _ in range(5)))
        assert sorted(results) == [False] * 4 + [True]
        assert await payments.charges() == 3


async def test_schema_migrates_from_version_1_and_refuses_a_newer_one(db: Db) -> None:
    store = open_database(db.url, schema=db.schema)
    await store.connect()
    try:
        assert await schema_version(store) == 0
        assert await migrate(store, target=1) == 0
        await store.execute(
            "INSERT INTO basidia_outbox (event, payload, source, created_at) "
            "VALUES ('e', $1, 's', 0)",
            b"\xc0",
        )
        assert await migrate(store) == 1
        assert await schema_version(store) == SCHEMA_VERSION
        assert await migrate(store) == SCHEMA_VERSION  # nothing to do
        rows = await store.fetch("SELECT event FROM basidia_outbox")
        assert [row["event"] for row in rows] == ["e"]
        assert await store.fetch("SELECT * FROM basidia_sagas") == []
        await store.execute(
            "INSERT INTO basidia_schema (version, applied_at) VALUES ($1, 0)", SCHEMA_VERSION + 1
        )
        with pytest.raises(SchemaError, match="upgrade basidia"):
            await migrate(store)
    finally:
        await store.close()


def test_bad_database_urls_get_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unsupported database URL 'mysql://u:\\*\\*\\*@h/db'"):
        open_database("mysql://u:secret@h/db")
    with pytest.raises(ConfigError, match="bad SQLite URL"):
        open_database("sqlite://relative.db")
    with pytest.raises(ConfigError, match="bad schema name"):
        open_database("postgresql://h/db", schema="Robert'); DROP TABLE x")


def test_import_basidia_data_imports_no_driver() -> None:
    code = (
        "import sys, basidia, basidia.data; "
        "print('asyncpg' in sys.modules, 'aiosqlite' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

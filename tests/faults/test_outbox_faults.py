"""The outbox, the inbox and sagas under faults: service processes SIGKILLed at random points
under load, a broker killed and restarted, two relays on one PostgreSQL, a saga's process
killed at each step (docs/outbox.md, docs/sagas.md)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from basidia import Service, ServiceRunner, current_context, event_handler, rpc
from basidia.data import Database, Outbox, open_database
from basidia.data.schema import migrate
from tests.brokers.cleanup import delete_amqp
from tests.data.conftest import POSTGRES_URL, Db, drop_schema, require_postgres

from .outbox_crasher import ROLLED_BACK_EVERY

REPO = Path(__file__).resolve().parents[2]
# 500 kills on each database: 1,000 over the run.
KILLS = 500


@pytest.fixture
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Db, Db]]:
    """A producer's and a consumer's database of the kind the test is parametrised with."""
    if request.param == "sqlite":
        yield (
            Db(f"sqlite:///{tmp_path / 'producer.db'}"),
            Db(f"sqlite:///{tmp_path / 'consumer.db'}"),
        )
        return
    require_postgres()
    schemas = [f"basidia_f_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    yield Db(POSTGRES_URL, schemas[0]), Db(POSTGRES_URL, schemas[1])
    for schema in schemas:
        await drop_schema(schema)


async def opened(db: Db) -> Database:
    store = open_database(db.url, schema=db.schema)
    await store.connect()
    await migrate(store)
    return store


class Deliveries:
    """What the consuming handler saw: every delivery, and the duplicates its inbox absorbed."""

    def __init__(self) -> None:
        self.delivered = 0
        self.absorbed = 0


def consumer(name: str, event: str, db: Db, deliveries: Deliveries) -> type[Service]:
    class Consumer(Service):
        store = Outbox(db.url, schema=db.schema)

        @event_handler(event)
        async def on_item(self, item: dict[str, Any]) -> None:
            ctx = current_context()
            assert ctx is not None
            deliveries.delivered += 1
            async with self.store.inbox() as tx:
                if tx.duplicate:
                    deliveries.absorbed += 1
                    return
                await tx.execute(
                    "INSERT INTO received (item_id, key) VALUES ($1, $2)",
                    item["id"],
                    ctx.idempotency_key,
                )

    Consumer.name = name
    return Consumer


async def ids(store: Database, sql: str) -> list[int]:
    return [int(row[0]) for row in await store.fetch(sql)]


async def until(check: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.long_fault
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "databases", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_service_processes_killed_under_load_lose_no_committed_event(
    databases: tuple[Db, Db], amqp_url: str, unique: str
) -> None:
    producer_db, consumer_db = databases
    service, event = f"crashing_{unique}", f"crash.item.{unique}"
    consumer_name = f"crash_consumer_{unique}"
    consumer_store = await opened(consumer_db)
    await consumer_store.execute("CREATE TABLE received (item_id BIGINT NOT NULL, key TEXT)")
    deliveries = Deliveries()
    consuming = consumer(consumer_name, event, consumer_db, deliveries)
    try:
        async with ServiceRunner([consuming], broker=amqp_url):
            driver = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.faults.outbox_crasher",
                "--db", producer_db.url,
                "--schema", producer_db.schema or "",
                "--broker", amqp_url,
                "--service", service,
                "--event", event,
                "--kills", str(KILLS),
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(driver.communicate(), 500)
            assert driver.returncode == 0, err.decode()[-3000:]
            summary = json.loads(out.decode().splitlines()[-1])
            assert summary["drained"], summary

            producer_store = await opened(producer_db)
            try:
                committed = await ids(producer_store, "SELECT id FROM items ORDER BY id")
                unsent = await ids(
                    producer_store, "SELECT id FROM basidia_outbox WHERE sent_at IS NULL"
                )
            finally:
                await producer_store.close()
            assert unsent == []

            async def all_received() -> bool:
                rows = await consumer_store.fetch("SELECT count(*) FROM received")
                return int(rows[0][0]) >= len(committed)

            await until(all_received, 120, f"{len(committed)} events received")
            await asyncio.sleep(0.5)  # room for a stray event to arrive
            received = await ids(consumer_store, "SELECT item_id FROM received ORDER BY item_id")
    finally:
        await consumer_store.close()
        group = f"{consumer_name}.on_item"
        await delete_amqp(amqp_url, [f"basidia.events.{group}", f"basidia.events.{group}.dlq"])

    print(
        f"\n{producer_db.dialect}: {summary['kills']} kills in {summary['seconds']} s, "
        f"{len(committed)} committed events, {summary['restarts_with_unpublished']} restarts "
        f"found events committed and not published, {deliveries.delivered} deliveries, "
        f"{deliveries.absorbed} duplicates absorbed by the inbox"
    )
    assert len(committed) >= KILLS  # every process committed before it was killed
    # Every committed event arrived, once in effect; none of a rolled-back transaction.
    assert received == committed
    assert not [item for item in committed if item % ROLLED_BACK_EVERY == 0]
    # The kills landed between commits and their publishes: the next process published those.
    assert summary["restarts_with_unpublished"] > 0
    assert deliveries.delivered == len(committed) + deliveries.absorbed


class Sink:
    """Counts every delivery of every idempotency key."""

    def __init__(self) -> None:
        self.keys: dict[str, int] = {}
        self.changed = asyncio.Event()

    def service(self, name: str, event: str) -> type[Service]:
        sink = self

        class Counting(Service):
            max_workers = 256

            @event_handler(event)
            async def on_event(self, data: dict[str, Any]) -> None:
                ctx = current_context()
                assert ctx is not None and ctx.idempotency_key is not None
                sink.keys[ctx.idempotency_key] = sink.keys.get(ctx.idempotency_key, 0) + 1

        Counting.name = name
        return Counting


def producer(name: str, db: Db, max_in_flight: int = 1) -> type[Service]:
    class Producer(Service):
        store = Outbox(db.url, schema=db.schema, batch_size=200, max_in_flight=max_in_flight)

    Producer.name = name
    return Producer


async def write_events(runner: ServiceRunner, name: str, event: str, total: int) -> None:
    """``total`` events in transactions of 500 rows on PostgreSQL, written as ``tx.dispatch``
    writes them (one statement for many rows: the relays are under test, not the writers)."""
    store: Any = runner.containers[name].make_instance(None).store
    payload = msgspec.msgpack.encode
    for first in range(0, total, 500):
        async with store.transaction() as tx:
            await tx.executemany(
                "INSERT INTO basidia_outbox (event, payload, source, created_at) "
                "VALUES ($1, $2, $3, $4)",
                [(event, payload({"n": n}), name, time.time()) for n in range(first, first + 500)],
            )
            await tx.execute("SELECT pg_notify($1, '')", store.db.notify_channel)


@pytest.mark.slow
@pytest.mark.long_fault
@pytest.mark.postgres
@pytest.mark.timeout(300)
@pytest.mark.parametrize("databases", ["postgresql"], indirect=True)
async def test_a_broker_killed_and_restarted_during_10000_outbox_events_loses_none(
    databases: tuple[Db, Db], nats_server: Any, unique: str
) -> None:
    producer_db, _ = databases
    name, event, total = f"outbox_p_{unique}", f"outbox.restart.{unique}", 10_000
    sink = Sink()
    async with (
        ServiceRunner([sink.service(f"outbox_c_{unique}", event)], broker=nats_server.url),
        ServiceRunner(
            [producer(name, producer_db, max_in_flight=32)], broker=nats_server.url
        ) as runner,
    ):
        relay: Any = runner.containers[name].dependencies["store"].relay
        writing = asyncio.create_task(write_events(runner, name, event, total))

        async def some_sent() -> bool:
            return relay.stats.published >= 2_000

        await until(some_sent, 60, "2,000 events published")
        published_at_kill = relay.stats.published
        nats_server.kill()
        await asyncio.sleep(1.0)
        await nats_server.start()
        await writing

        async def all_received() -> bool:
            return len(sink.keys) >= total

        await until(all_received, 180, f"{total} events received")
        assert await relay.pending() == 0
    print(
        f"\n{producer_db.dialect}: broker restarted during {total} events: "
        f"killed after {published_at_kill} were published, {len(sink.keys)} received, "
        f"{relay.stats.failures} failed publishes retried, "
        f"{sum(sink.keys.values()) - len(sink.keys)} redeliveries"
    )
    assert sorted(sink.keys) == sorted(f"{name}:{n}" for n in range(1, total + 1))
    assert published_at_kill < total - 1_000  # the broker went away mid-way


@pytest.mark.slow
@pytest.mark.long_fault
@pytest.mark.postgres
@pytest.mark.timeout(300)
@pytest.mark.parametrize("databases", ["postgresql"], indirect=True)
async def test_two_relays_on_one_postgresql_publish_10000_events_once(
    databases: tuple[Db, Db], amqp_url: str, unique: str
) -> None:
    producer_db, _ = databases
    name, event, total = f"outbox_two_{unique}", f"outbox.two.{unique}", 10_000
    sink_name = f"outbox_two_sink_{unique}"
    sink = Sink()
    service = producer(name, producer_db, max_in_flight=32)
    try:
        async with (
            ServiceRunner([sink.service(sink_name, event)], broker=amqp_url),
            ServiceRunner([service], broker=amqp_url) as first,
            ServiceRunner([service], broker=amqp_url) as second,
        ):
            relays: list[Any] = [
                runner.containers[name].dependencies["store"].relay for runner in (first, second)
            ]
            await write_events(first, name, event, total)

            async def all_received() -> bool:
                return len(sink.keys) >= total

            await until(all_received, 180, f"{total} events received")
            await asyncio.sleep(0.5)  # room for a second copy to arrive
    finally:
        group = f"{sink_name}.on_event"
        await delete_amqp(amqp_url, [f"basidia.events.{group}", f"basidia.events.{group}.dlq"])
    published = [relay.stats.published for relay in relays]
    print(f"\ntwo relays: {published} events published by each, {len(sink.keys)} received")
    assert sorted(sink.keys) == sorted(f"{name}:{n}" for n in range(1, total + 1))
    assert set(sink.keys.values()) == {1}  # no event sent twice
    assert sum(published) == total and min(published) > 0  # both relays took part


class Effects:
    """The participant's side effects, recorded with its inbox: one per key, or a bug."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.kill_at = ""  # the key of the call to kill the coordinator in
        self.victim: asyncio.subprocess.Process | None = None
        self.refusing: set[str] = set()  # sagas whose third step is refused

    def service(self, name: str, db: Db) -> type[Service]:
        effects = self

        class Participant(Service):
            store = Outbox(db.url, schema=db.schema)

            @rpc
            async def do(self, operation: str, key: str) -> None:
                effects.calls.append((operation, key))
                refused = operation == "third" and key.split(":")[0] in effects.refusing
                if not refused:
                    async with self.store.inbox(key) as tx:
                        if not tx.duplicate:
                            await tx.execute(
                                "INSERT INTO effects (operation, key) VALUES ($1, $2)",
                                operation,
                                key,
                            )
                if key == effects.kill_at and effects.victim is not None:
                    effects.victim.kill()  # SIGKILL: the saga never hears how this step went
                    effects.victim = None
                if refused:
                    raise ValueError(f"{operation} refused")

        Participant.name = name
        return Participant


async def run_coordinator(
    db: Db, nats_url: str, unique: str, participant: str, saga_ids: list[str], effects: Effects
) -> tuple[int, str, str]:
    """Run tests/faults/saga_crasher.py until it ends or is killed: (exit code, out, err)."""
    command = [
        sys.executable, "-m", "tests.faults.saga_crasher",
        "--db", db.url, "--schema", db.schema or "",
        "--broker", nats_url, "--service", f"saga_coordinator_{unique}",
        "--participant", participant, "--saga-ids", *saga_ids,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    effects.victim = process if effects.kill_at else None
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()[-2000:]


@pytest.mark.slow
@pytest.mark.long_fault
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "databases", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_saga_killed_at_each_step_completes_or_compensates_once(
    databases: tuple[Db, Db], nats_url: str, unique: str
) -> None:
    coordinator_db, participant_db = databases
    participant = f"saga_participant_{unique}"
    effects = Effects()
    store = await opened(participant_db)
    await store.execute("CREATE TABLE effects (operation TEXT NOT NULL, key TEXT NOT NULL)")
    await store.close()
    scenarios = [  # (kill at, third step refused, the saga's end)
        ("first", False, "completed"),
        ("second", False, "completed"),
        ("third", False, "completed"),
        ("third", True, "compensated"),
        ("undo_second", True, "compensated"),
        ("undo_first", True, "compensated"),
    ]
    saga_ids = [f"saga{n}" for n in range(len(scenarios))]
    effects.refusing = {saga_id for saga_id, s in zip(saga_ids, scenarios, strict=True) if s[1]}
    async with ServiceRunner([effects.service(participant, participant_db)], broker=nats_url):
        # One coordinator process per saga, killed at the step under test (it may also
        # resume the sagas of the processes killed before it) ...
        for saga_id, (kill_at, _, _) in zip(saga_ids, scenarios, strict=True):
            effects.kill_at = step_key(saga_id, kill_at)
            code, _, err = await run_coordinator(
                coordinator_db, nats_url, unique, participant, [saga_id], effects
            )
            assert code == -9, (kill_at, err)
        # ... then one that resumes them all, once the dead ones' leases run out.
        effects.kill_at = ""
        code, out, err = await run_coordinator(
            coordinator_db, nats_url, unique, participant, saga_ids, effects
        )
        assert code == 0, err
    assert out.split() == [outcome for _, _, outcome in scenarios]
    store = await opened(participant_db)
    try:
        rows = await store.fetch("SELECT operation, key FROM effects")
    finally:
        await store.close()
    done = [(row[0], row[1]) for row in rows]
    # No step's side effect happened twice, though every killed step was called again.
    assert len(done) == len(set(done))
    expected = set()
    for saga_id, (_, refuse_third, _) in zip(saga_ids, scenarios, strict=True):
        operations = (
            ["first", "second", "undo_second", "undo_first"]
            if refuse_third
            else ["first", "second", "third"]
        )
        expected |= {(op, step_key(saga_id, op)) for op in operations}
    assert set(done) == expected
    for saga_id, (kill_at, _, _) in zip(saga_ids, scenarios, strict=True):
        call = (kill_at, step_key(saga_id, kill_at))
        assert effects.calls.count(call) >= 2, call  # the killed step was called again


def step_key(saga_id: str, operation: str) -> str:
    """The idempotency key the saga gives ``operation`` (docs/sagas.md)."""
    if operation.startswith("undo_"):
        return f"{saga_id}:{operation.removeprefix('undo_')}:compensate"
    return f"{saga_id}:{operation}"

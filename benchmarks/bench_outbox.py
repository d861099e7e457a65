"""Outbox throughput on PostgreSQL against a plain ``dispatch``, in one run on one broker.

    python benchmarks/bench_outbox.py                                  # RabbitMQ on loopback
    python benchmarks/bench_outbox.py --broker nats://127.0.0.1:4222 --events 5000

Events per second over ``--events`` events of the same small payload, each published with
the broker's confirm, with 1 and with ``--window`` publishes awaiting their confirms at once:

* ``dispatch``: a plain ``await dispatch(event, data)``, no database.
* ``outbox``: ``--writers`` handlers commit one event per transaction (and then 20) while
  the relay (``Outbox(max_in_flight=...)``) runs: from the first commit to the confirm of
  the last.

docs/outbox.md quotes the figures.  PostgreSQL is the test suite's, in a schema of its own
that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from typing import Any

from basidia import Service, ServiceRunner
from basidia.data import Outbox, Relay

POSTGRES_URL = os.environ.get(
    "BASIDIA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("BASIDIA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATA = {"order_id": 12345, "amount": 99.5, "currency": "EUR"}


def producer(name: str, schema: str, window: int) -> type[Service]:
    class Producer(Service):
        store = Outbox(POSTGRES_URL, schema=schema, batch_size=500, max_in_flight=window)

    Producer.name = name
    return Producer


async def plain_dispatch(runner: ServiceRunner, event: str, events: int, window: int) -> float:
    publish = runner.runtime.publisher.publish
    started = time.perf_counter()
    for start in range(0, events, window):
        count = min(window, events - start)
        await asyncio.gather(*(publish(event, DATA, source="bench") for _ in range(count)))
    return events / (time.perf_counter() - started)


async def through_outbox(
    runner: ServiceRunner, name: str, event: str, events: int, writers: int, per_tx: int = 1
) -> float:
    container = runner.containers[name]
    store: Any = container.make_instance(None).store
    relay: Relay = container.dependencies["store"].relay  # type: ignore[attr-defined]
    transactions = events // (writers * per_tx)
    goal = relay.stats.published + transactions * writers * per_tx

    async def write() -> None:
        for _ in range(transactions):
            async with store.transaction() as tx:
                for _ in range(per_tx):
                    await tx.dispatch(event, DATA)

    started = time.perf_counter()
    await asyncio.gather(*(write() for _ in range(writers)))
    while relay.stats.published < goal:  # noqa: ASYNC110 - a counter, polled finely
        await asyncio.sleep(0.001)
    return transactions * writers * per_tx / (time.perf_counter() - started)


async def measure(args: argparse.Namespace, schema: str, tag: str) -> dict[str, float]:
    event = f"bench.outbox.{tag}"  # nobody consumes it: the broker confirms and drops it
    strict = producer(f"bench_outbox_strict_{tag}", schema, 1)
    windowed = producer(f"bench_outbox_window_{tag}", schema, args.window)
    async with ServiceRunner([strict, windowed], broker=args.broker) as runner:
        await plain_dispatch(runner, event, min(500, args.events), 1)  # warm up
        return {
            "dispatch, 1 in flight": await plain_dispatch(runner, event, args.events, 1),
            "outbox, 1 in flight": await through_outbox(
                runner, strict.name, event, args.events, args.writers
            ),
            f"dispatch, {args.window} in flight": await plain_dispatch(
                runner, event, args.events, args.window
            ),
            f"outbox, {args.window} in flight": await through_outbox(
                runner, windowed.name, event, args.events, args.writers
            ),
            f"outbox, {args.window} in flight, 20 a transaction": await through_outbox(
                runner, windowed.name, event, args.events, args.writers, per_tx=20
            ),
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--broker", default=AMQP_URL)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--writers", type=int, default=8, help="transactions at a time")
    parser.add_argument("--window", type=int, default=64, help="confirms awaited at once")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    schema = f"basidia_bench_{tag}"
    try:
        results = await measure(args, schema, tag)
    finally:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    if args.json:
        print(json.dumps({k: round(v) for k, v in results.items()}))
        return
    print(f"{args.broker.split('@')[-1]}, {args.events} events, outbox on PostgreSQL")
    for name, rate in results.items():
        base = results[name.replace("outbox", "dispatch").removesuffix(", 20 a transaction")]
        print(f"  {name:38} {rate:7.0f} events/s ({rate / base:.0%} of dispatch)")


if __name__ == "__main__":
    asyncio.run(main())

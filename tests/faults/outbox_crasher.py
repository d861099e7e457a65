"""A service process to kill: ``python -m tests.faults.outbox_crasher`` forks service processes
that commit business rows with outbox events under load, and SIGKILLs each at a random moment.

The driver imports everything once, then forks: each child starts a real ``ServiceRunner``
with an ``Outbox`` (whose relay publishes to the broker), says it is ready, and commits
transactions from several tasks at once until the driver kills it, anywhere: inside a
transaction, between a commit and its publish, between a publish and its mark (it says it
is ready once the first transaction has committed).  Every fifth
transaction writes its event and then rolls back.  After the last kill one more child runs
until the outbox is empty and exits.  The driver prints a JSON summary on its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import select
import signal
import sys
import time
from typing import Any

# Imported here, once, rather than lazily in every child after the fork.
import aiosqlite  # noqa: F401
import asyncpg  # noqa: F401

import basidia.brokers.amqp  # noqa: F401
from basidia import Service, ServiceRunner
from basidia.data import Outbox, Relay

ROLLED_BACK_EVERY = 5  # item ids divisible by this belong to rolled-back transactions
WORKERS = 2


class Rollback(Exception):
    """Raised inside a transaction to roll it back after its event was written."""


class CountingOutbox(Outbox):
    """An ``Outbox`` that counts, before its relay starts, the committed events that the
    killed process left unpublished."""

    stranded = 0

    async def setup(self) -> None:
        self.run_relay = False
        await super().setup()
        await self.db.execute("CREATE TABLE IF NOT EXISTS items (id BIGINT PRIMARY KEY)")
        self.relay = Relay(
            self.db,
            self.container.runtime.publisher,
            self.container.service_name,
            poll_interval=0.2,
        )
        CountingOutbox.stranded = await self.relay.pending()
        self.relay.start()


def service_class(args: argparse.Namespace) -> type[Service]:
    class Producer(Service):
        name = args.service
        store = CountingOutbox(args.db, schema=args.schema or None)

    return Producer


async def child(args: argparse.Namespace, cycle: int, ready: int, drain: bool) -> None:
    runner = ServiceRunner([service_class(args)], broker=args.broker)
    await runner.start()
    container = runner.containers[args.service]
    if drain:
        os.write(ready, f"{CountingOutbox.stranded}\n".encode())
        relay = container.dependencies["store"].relay  # type: ignore[attr-defined]
        while await relay.pending():  # noqa: ASYNC110 - the count is in the database
            await asyncio.sleep(0.05)
        await runner.stop()
        return
    store: Any = container.make_instance(None).store
    ids = itertools.count(cycle * 1_000_000 + 1)
    loaded = asyncio.Event()

    async def work() -> None:
        while True:
            item = next(ids)
            try:
                async with store.transaction() as tx:
                    await tx.execute("INSERT INTO items (id) VALUES ($1)", item)
                    await tx.dispatch(args.event, {"id": item})
                    if item % ROLLED_BACK_EVERY == 0:
                        raise Rollback
            except Rollback:
                pass
            loaded.set()

    workers = [asyncio.create_task(work()) for _ in range(WORKERS)]
    await loaded.wait()  # under load: the killing may start
    os.write(ready, f"{CountingOutbox.stranded}\n".encode())
    await asyncio.gather(*workers)


def run_child(args: argparse.Namespace, cycle: int, ready: int, drain: bool) -> None:
    code = 0
    try:
        asyncio.run(child(args, cycle, ready, drain))
    except BaseException as exc:
        print(f"child {cycle}: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    os._exit(code)


def fork(args: argparse.Namespace, cycle: int, drain: bool) -> tuple[int, int]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        run_child(args, cycle, write, drain)
    os.close(write)
    return pid, read


def wait_ready(pid: int, read: int, timeout: float = 30.0) -> int:
    readable, _, _ = select.select([read], [], [], timeout)
    line = os.read(read, 64) if readable else b""
    if not line:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise SystemExit(f"service process {pid} did not start")
    return int(line.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--schema", default="")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--event", required=True)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--max-delay", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rng = random.Random(args.seed)
    restarts_with_unpublished = 0
    startup = 0.0  # seconds from the fork to the first commit, over all the kills
    started = time.monotonic()
    for cycle in range(1, args.kills + 1):
        forked = time.monotonic()
        pid, read = fork(args, cycle, drain=False)
        restarts_with_unpublished += wait_ready(pid, read) > 0
        startup += time.monotonic() - forked
        time.sleep(rng.uniform(0, args.max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
    pid, read = fork(args, args.kills + 1, drain=True)
    restarts_with_unpublished += wait_ready(pid, read) > 0
    _, status = os.waitpid(pid, 0)
    os.close(read)
    summary = {
        "kills": args.kills,
        # Processes that found committed events their killed predecessor had not published.
        "restarts_with_unpublished": restarts_with_unpublished,
        "drained": os.waitstatus_to_exitcode(status) == 0,
        "seconds": round(time.monotonic() - started, 1),
        "startup_seconds": round(startup, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

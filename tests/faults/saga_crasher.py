"""A saga's service process to kill: ``python -m tests.faults.saga_crasher`` starts (or, after
a crash, resumes) sagas of three RPC steps, and prints their ends once they have finished.

Its steps call ``do(operation, key)`` on the participant service the test runs; the test
SIGKILLs this process from inside the participant's handler at the step it is testing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from basidia import Dependency, Service, ServiceRunner
from basidia.data import Saga, Sagas, step

LEASE = 0.5


class Chain(Saga):
    name = "chain"
    timeout = 120.0

    @step
    async def first(self, data: dict[str, Any], key: str) -> None:
        await self.service.participant.do("first", key)

    @first.compensate
    async def undo_first(self, data: dict[str, Any], key: str) -> None:
        await self.service.participant.do("undo_first", key)

    @step
    async def second(self, data: dict[str, Any], key: str) -> None:
        await self.service.participant.do("second", key)

    @second.compensate
    async def undo_second(self, data: dict[str, Any], key: str) -> None:
        await self.service.participant.do("undo_second", key)

    @step
    async def third(self, data: dict[str, Any], key: str) -> None:
        await self.service.participant.do("third", key)


async def run(args: argparse.Namespace) -> None:
    class Coordinator(Service):
        name = args.service
        participant = Dependency(args.participant, timeout=5)
        sagas = Sagas(Chain, url=args.db, schema=args.schema or None, lease=LEASE, backoff_cap=0.5)

    async with ServiceRunner([Coordinator], broker=args.broker) as runner:
        sagas: Any = runner.containers[args.service].dependencies["sagas"]
        for saga_id in args.saga_ids:
            await sagas.start(Chain, {}, saga_id=saga_id)  # nothing new if it exists
        for saga_id in args.saga_ids:
            print((await sagas.wait(saga_id, 100))["status"])


def main() -> None:
    parser = argparse.ArgumentParser()
    for option in ("--db", "--schema", "--broker", "--service", "--participant"):
        parser.add_argument(option, default="")
    parser.add_argument("--saga-ids", nargs="+", default=[])
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

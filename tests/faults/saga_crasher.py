"""A saga's service process to kill: ``python -m tests.faults.saga_crasher`` starts (or, after
a crash, resumes) one saga of three RPC steps and exits 0 once it has finished.

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
        await sagas.start(Chain, {}, saga_id=args.saga_id)
        saga = await sagas.wait(args.saga_id, 100)
        print(saga["status"])


def main() -> None:
    parser = argparse.ArgumentParser()
    for option in ("--db", "--schema", "--broker", "--service", "--participant", "--saga-id"):
        parser.add_argument(option, default="")
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

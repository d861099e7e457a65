"""Lifecycle per service (docs/operations.md): a restart through the management API while
the neighbour keeps answering, a failed start that leaves the others running, readiness
per service, and ``fail_fast`` for the old all-or-nothing start."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from basidia import Dependency, Service, ServiceRunner, State, connect, rpc
from basidia.http import HttpServer
from tests.http.conftest import JSON, TLS, until

pytestmark = pytest.mark.timeout(30)


class Ledger:
    """A dependency of ``accounts``; ``LEDGER`` makes its setup slow or failing."""


class LedgerSwitch:
    def __init__(self) -> None:
        self.fail = False
        self.setups = 0


LEDGER = LedgerSwitch()


async def ledger_provider() -> AsyncIterator[Ledger]:
    LEDGER.setups += 1
    await asyncio.sleep(0.2)  # a restart takes a while: the neighbour must keep serving
    if LEDGER.fail:
        raise ConnectionError("ledger database refused the connection")
    yield Ledger()


class Accounts(Service):
    name = "accounts"
    ledger = Dependency(Ledger)

    @rpc
    async def balance(self) -> int:
        return 100


class Quotes(Service):
    name = "quotes"

    @rpc
    async def quote(self, n: int) -> int:
        return n * 2


@pytest.fixture(autouse=True)
def _reset() -> None:
    LEDGER.fail = False
    LEDGER.setups = 0


@contextlib.asynccontextmanager
async def _serve(runner: ServiceRunner) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The runner's management API over real HTTP, and a client of its broker."""
    async with HttpServer(runner, "127.0.0.1", 0) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10, verify=TLS) as client:
            async with connect(runner.broker.safe_url) as cluster:
                yield client, cluster


@pytest.fixture
async def runner(memory_url: str) -> AsyncIterator[ServiceRunner]:
    runner = ServiceRunner(
        [Accounts, Quotes], broker=memory_url, providers={Ledger: ledger_provider}
    )
    yield runner
    await runner.stop()


async def test_restart_one_service_while_its_neighbour_keeps_answering(
    runner: ServiceRunner,
) -> None:
    """Done-when 2: the management API restarts one service; the other answers throughout."""
    await runner.start()
    async with _serve(runner) as (client, cluster):
        seen: list[str] = []
        runtime = runner.containers["accounts"].runtime
        announce = runtime.on_state_change
        assert announce is not None

        def record(container: Any) -> None:
            seen.append(f"{container.service_name}:{container.state.value}")
            announce(container)

        runtime.on_state_change = record
        answered: list[int] = []
        restarting = True

        async def keep_calling() -> None:
            n = 0
            while restarting:
                n += 1
                answered.append(await cluster.rpc.quotes.quote(n))
                await asyncio.sleep(0.005)

        caller = asyncio.create_task(keep_calling())
        await asyncio.sleep(0.05)
        before = len(answered)
        response = await client.post("/services/accounts/restart", headers=JSON)
        during = len(answered) - before
        restarting = False
        await caller  # any failed call would raise here
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "RUNNING"
        assert seen == [
            "accounts:STOPPING",
            "accounts:STOPPED",
            "accounts:STARTING",
            "accounts:RUNNING",
        ]
        assert during >= 5  # quotes answered while accounts restarted (0.2 s setup)
        assert LEDGER.setups == 2
        assert await cluster.rpc.accounts.balance() == 100


async def test_a_service_whose_dependency_fails_is_in_error_while_the_others_run(
    runner: ServiceRunner,
) -> None:
    """Done-when 2: ERROR with the reason; the neighbour runs; readiness per service."""
    LEDGER.fail = True
    await runner.start()  # no exception: one service of two started
    accounts, quotes = runner.containers["accounts"], runner.containers["quotes"]
    assert accounts.state is State.ERROR and quotes.state is State.RUNNING
    async with _serve(runner) as (client, cluster):
        assert await cluster.rpc.quotes.quote(21) == 42
        service = (await client.get("/services/accounts")).json()
        assert service["state"] == "ERROR"
        assert service["error"] == "ConnectionError: ledger database refused the connection"
        assert (await client.get("/health/ready")).status_code == 503
        assert (await client.get("/health/ready/quotes")).status_code == 200
        assert (await client.get("/health/ready/accounts")).status_code == 503
        assert (await client.get("/health/ready/nobody")).status_code == 404

        LEDGER.fail = False
        restarted = await client.post("/services/accounts/restart", headers=JSON)
        assert restarted.json()["state"] == "RUNNING"
        assert (await client.get("/health/ready/accounts")).status_code == 200
        assert (await client.get("/health/ready")).status_code == 200

        cluster_view = (await client.get("/cluster")).json()
        assert {(i["service"], i["state"]) for i in cluster_view} == {
            ("accounts", "RUNNING"),
            ("quotes", "RUNNING"),
        }


async def test_fail_fast_stops_every_service_and_raises(memory_url: str) -> None:
    LEDGER.fail = True
    runner = ServiceRunner(
        [Quotes, Accounts],
        broker=memory_url,
        providers={Ledger: ledger_provider},
        config={"fail_fast": True},
    )
    with pytest.raises(ConnectionError, match="ledger database"):
        await runner.start()
    assert runner.containers["quotes"].state is State.STOPPED
    assert runner.containers["accounts"].state is State.ERROR


async def test_a_service_starts_initialized_and_restart_of_a_busy_one_is_refused(
    runner: ServiceRunner,
) -> None:
    assert {c.state for c in runner.containers.values()} == {State.INITIALIZED}
    await runner.start()
    async with _serve(runner) as (client, _):
        restart = asyncio.create_task(client.post("/services/accounts/restart", headers=JSON))
        await until(lambda: runner.containers["accounts"].state is State.STARTING)
        busy = await client.post("/services/accounts/restart", headers=JSON)
        assert busy.status_code == 409
        assert (await restart).status_code == 200
        assert (await client.post("/services/nobody/restart", headers=JSON)).status_code == 404

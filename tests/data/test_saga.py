"""Sagas on SQLite and PostgreSQL with the memory broker: completion, compensation in reverse
order, timeouts, retries with one idempotency key, resumption, and what operators see."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from basidia import Dependency, Service, ServiceRunner, ServiceUnavailable, rpc
from basidia.cli import app
from basidia.data import Saga, Sagas, step
from basidia.http.management import Management

from .conftest import Db


class Ledger:
    """What the participant did, in order: ``(operation, key)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.unavailable: dict[str, int] = {}  # operation: how many calls to refuse first
        self.hang: set[str] = set()
        self.refuse: set[str] = set()
        self.gate = asyncio.Event()


def participant(ledger: Ledger) -> type[Service]:
    class Bank(Service):
        name = "bank"

        @rpc
        async def do(self, operation: str, key: str) -> str:
            ledger.calls.append((operation, key))
            if ledger.unavailable.get(operation, 0) > 0:
                ledger.unavailable[operation] -= 1
                raise ServiceUnavailable(f"{operation} is busy")
            if operation in ledger.hang:
                await ledger.gate.wait()
            if operation in ledger.refuse:
                raise ValueError(f"{operation} refused")
            return f"{operation}-done"

    return Bank


class Transfer(Saga):
    name = "transfer"
    timeout = 5.0

    @step
    async def reserve(self, data: dict[str, Any], key: str) -> None:
        data["reserve"] = await self.service.bank.do("reserve", key)

    @reserve.compensate
    async def release(self, data: dict[str, Any], key: str) -> None:
        await self.service.bank.do("release", key)

    @step
    async def debit(self, data: dict[str, Any], key: str) -> None:
        data["debit"] = await self.service.bank.do("debit", key)

    @debit.compensate
    async def credit_back(self, data: dict[str, Any], key: str) -> None:
        await self.service.bank.do("credit_back", key)

    @step
    async def notify(self, data: dict[str, Any], key: str) -> None:
        await self.service.bank.do("notify", key)


def coordinator(db: Db, saga: type[Saga] = Transfer, **options: Any) -> type[Service]:
    class Transfers(Service):
        name = "transfers"
        bank = Dependency("bank", timeout=10)
        sagas = Sagas(saga, url=db.url, schema=db.schema, backoff_cap=0.2, **options)

        @rpc
        async def transfer(self, amount: int, saga_id: str | None = None) -> dict[str, Any]:
            return await self.sagas.run(saga, {"amount": amount}, saga_id=saga_id, timeout=20)

        @rpc
        async def start(self, saga_id: str) -> str:
            return await self.sagas.start(saga, {"amount": 1}, saga_id=saga_id)

    return Transfers


def operations(ledger: Ledger) -> list[str]:
    return [operation for operation, _ in ledger.calls]


async def test_a_saga_runs_its_steps_in_order_and_completes(db: Db, memory_url: str) -> None:
    ledger = Ledger()
    async with ServiceRunner([coordinator(db), participant(ledger)], broker=memory_url) as runner:
        saga = await runner.rpc.transfers.transfer(10, saga_id="t-1")
    assert operations(ledger) == ["reserve", "debit", "notify"]
    assert [key for _, key in ledger.calls] == ["t-1:reserve", "t-1:debit", "t-1:notify"]
    assert saga["status"] == "completed"
    assert saga["data"] == {"amount": 10, "reserve": "reserve-done", "debit": "debit-done"}
    assert [s["status"] for s in saga["steps"]] == ["done", "done", "done"]


async def test_a_failed_step_compensates_the_steps_before_it_in_reverse(
    db: Db, memory_url: str
) -> None:
    ledger = Ledger()
    ledger.refuse.add("notify")
    async with ServiceRunner([coordinator(db), participant(ledger)], broker=memory_url) as runner:
        saga = await runner.rpc.transfers.transfer(10, saga_id="t-2")
    assert operations(ledger) == ["reserve", "debit", "notify", "credit_back", "release"]
    assert ledger.calls[-2:] == [
        ("credit_back", "t-2:debit:compensate"),
        ("release", "t-2:reserve:compensate"),
    ]
    assert saga["status"] == "compensated"
    assert "step notify failed" in saga["error"] and "notify refused" in saga["error"]
    assert [s["status"] for s in saga["steps"]] == ["compensated", "compensated", "failed"]


async def test_an_unavailable_participant_is_retried_with_the_same_key(
    db: Db, memory_url: str
) -> None:
    ledger = Ledger()
    ledger.unavailable["debit"] = 2
    async with ServiceRunner([coordinator(db), participant(ledger)], broker=memory_url) as runner:
        saga = await runner.rpc.transfers.transfer(10, saga_id="t-3")
    assert saga["status"] == "completed"
    assert ledger.calls[1:4] == [("debit", "t-3:debit")] * 3
    assert saga["steps"][1]["attempts"] == 3


async def test_a_timed_out_saga_compensates_the_step_in_flight_too(db: Db, memory_url: str) -> None:
    class Quick(Transfer):
        name = "quick"
        timeout = 1.0

    ledger = Ledger()
    ledger.hang.add("debit")
    services = [coordinator(db, Quick), participant(ledger)]
    async with ServiceRunner(services, broker=memory_url) as runner:
        saga = await runner.rpc.transfers.transfer(10, saga_id="t-4")
        ledger.gate.set()
    assert saga["status"] == "compensated"
    assert "timed out after 1 s at step debit" in saga["error"]
    # The debit's outcome is unknown: it is compensated as well as the reserve.
    assert operations(ledger) == ["reserve", "debit", "credit_back", "release"]


async def test_a_compensation_that_keeps_failing_leaves_the_saga_failed(
    db: Db, memory_url: str
) -> None:
    class Stubborn(Transfer):
        name = "stubborn"
        compensation_attempts = 3

    ledger = Ledger()
    ledger.refuse.update({"notify", "credit_back"})
    services = [coordinator(db, Stubborn), participant(ledger)]
    async with ServiceRunner(services, broker=memory_url) as runner:
        saga = await runner.rpc.transfers.transfer(10, saga_id="t-5")
    assert saga["status"] == "failed"
    assert "compensation of debit failed" in saga["error"]
    assert operations(ledger) == ["reserve", "debit", "notify"] + ["credit_back"] * 3
    assert [s["status"] for s in saga["steps"]] == ["done", "compensating", "failed"]


async def test_a_stopped_saga_resumes_in_the_next_process_and_the_same_id_starts_once(
    db: Db, memory_url: str
) -> None:
    class Patient(Transfer):
        name = "patient"
        timeout = 60.0

    ledger = Ledger()
    ledger.hang.add("debit")
    services = [coordinator(db, Patient, lease=0.5), participant(ledger)]
    async with ServiceRunner(services, broker=memory_url) as runner:
        await runner.rpc.transfers.start("t-6")
        for _ in range(500):
            if operations(ledger) == ["reserve", "debit"]:
                break
            await asyncio.sleep(0.02)
        # The coordinator goes away with the debit in flight; the bank then finishes it.
        await runner.stop_service("transfers")
        ledger.gate.set()
    assert operations(ledger) == ["reserve", "debit"]
    ledger.hang.clear()
    async with ServiceRunner(services, broker=memory_url) as runner:
        assert await runner.rpc.transfers.start("t-6") == "t-6"  # no second saga
        sagas: Any = runner.containers["transfers"].dependencies["sagas"]
        saga = await sagas.wait("t-6", 20)
    assert saga["status"] == "completed"
    # The interrupted debit is repeated with its key: a participant's inbox absorbs it.
    assert ledger.calls[1:] == [
        ("debit", "t-6:debit"),
        ("debit", "t-6:debit"),
        ("notify", "t-6:notify"),
    ]


async def test_sagas_are_visible_through_the_management_api(sqlite: Db, memory_url: str) -> None:
    ledger = Ledger()
    ledger.refuse.add("notify")
    async with ServiceRunner(
        [coordinator(sqlite), participant(ledger)], broker=memory_url
    ) as runner:
        await runner.rpc.transfers.transfer(1, saga_id="m-1")
        ledger.refuse.clear()
        await runner.rpc.transfers.transfer(2, saga_id="m-2")
        management = Management(runner, token="t0ken")
        from starlette.applications import Starlette

        api = Starlette(routes=management.routes())
        headers = {"Authorization": "Bearer t0ken"}
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            listed = (await client.get("/sagas", headers=headers)).json()
            assert [(s["id"], s["status"]) for s in listed] == [
                ("m-2", "completed"),
                ("m-1", "compensated"),
            ]
            only = await client.get("/sagas", params={"status": "completed"}, headers=headers)
            assert [s["id"] for s in only.json()] == ["m-2"]
            one = (await client.get("/sagas/m-1", headers=headers)).json()
            assert [s["name"] for s in one["steps"]] == ["reserve", "debit", "notify"]
            assert (await client.get("/sagas/nope", headers=headers)).status_code == 404
            bad = await client.get("/sagas", params={"status": "lost"}, headers=headers)
            assert bad.status_code == 400 and "unknown saga status" in bad.text
            assert (await client.get("/sagas")).status_code == 401


def test_basidia_sagas_lists_and_shows_them_from_the_database(sqlite: Db, memory_url: str) -> None:
    async def two_sagas() -> None:
        ledger = Ledger()
        ledger.refuse.add("notify")
        services = [coordinator(sqlite), participant(ledger)]
        async with ServiceRunner(services, broker=memory_url) as runner:
            await runner.rpc.transfers.transfer(1, saga_id="m-1")
            ledger.refuse.clear()
            await runner.rpc.transfers.transfer(2, saga_id="m-2")

    asyncio.run(two_sagas())
    cli = CliRunner()
    listed_text = cli.invoke(app, ["sagas", "list", "--database", sqlite.url])
    assert listed_text.exit_code == 0, listed_text.output
    lines = listed_text.output.splitlines()
    assert lines[0].split()[:4] == ["ID", "NAME", "SERVICE", "STATUS"]
    assert lines[1].split()[:4] == ["m-2", "transfer", "transfers", "completed"]
    shown = cli.invoke(app, ["sagas", "show", "m-1", "-d", sqlite.url])
    assert shown.exit_code == 0, shown.output
    assert "saga m-1: transfer of transfers, compensated" in shown.output
    assert "notify refused" in shown.output
    assert '"amount": 1' in shown.output
    missing = cli.invoke(app, ["sagas", "show", "zzz", "-d", sqlite.url])
    assert missing.exit_code == 2 and "no saga 'zzz'" in missing.output
    nofile = cli.invoke(app, ["sagas", "list", "-d", "sqlite:////nonexistent/x.db"])
    assert nofile.exit_code == 2 and "no database file" in nofile.output


def test_a_saga_without_steps_is_refused() -> None:
    with pytest.raises(TypeError, match="declares no @step"):

        class Empty(Saga):
            pass


async def test_starting_a_saga_the_service_does_not_run_is_a_clear_error(
    sqlite: Db, memory_url: str, tmp_path: Path
) -> None:
    async with ServiceRunner([coordinator(sqlite)], broker=memory_url) as runner:
        sagas = runner.containers["transfers"].make_instance(None).sagas
        with pytest.raises(Exception, match="runs no saga 'other'"):
            await sagas.start("other", {})

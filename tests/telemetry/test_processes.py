"""One trace across two ``basidia run`` processes, on NATS and on RabbitMQ.

Each process exports its spans with the ``file`` exporter (``telemetry.traces_file``);
the test reads both files once the processes have stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.brokers.cleanup import delete_amqp, delete_nats_consumers
from tests.http.test_cli import free_port
from tests.telemetry.processes import Process, start, wait_for_log
from tests.telemetry.spans import TRACEPARENT, assert_chain, read_spans

pytestmark = pytest.mark.timeout(90)

MODULE = "tests.telemetry.chain"


async def _chain_across_processes(
    tmp_path: Path, broker: str, unique: str, started: list[Process]
) -> list[Path]:
    port = free_port()
    files = [tmp_path / "front-spans.jsonl", tmp_path / "users-spans.jsonl"]

    def env(spans: Path) -> dict[str, str]:
        return {
            "CHAIN_SUFFIX": unique,
            "BASIDIA_TELEMETRY__TRACES_EXPORTER": "file",
            "BASIDIA_TELEMETRY__TRACES_FILE": str(spans),
        }

    # The front process serves HTTP, the database and the event handler; the other one
    # the users service in the middle, so every hop crosses between the two.
    front = await start(
        tmp_path,
        "front",
        f"{MODULE}:ApiService",
        f"{MODULE}:DbService",
        f"{MODULE}:NotifyService",
        "--broker",
        broker,
        "--http",
        f"127.0.0.1:{port}",
        env=env(files[0]),
    )
    started.append(front)
    users = await start(
        tmp_path,
        "users",
        f"{MODULE}:UsersService",
        "--broker",
        broker,
        "--http",
        "off",
        env=env(files[1]),
    )
    started.append(users)
    await wait_for_log(front, "running 3 service(s)")
    await wait_for_log(users, "running 1 service(s)")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
        response = await client.get("/chain/7", headers={"traceparent": TRACEPARENT})
        assert response.status_code == 200, front.output()
        assert response.json() == {"message": "Hello, User 7!"}
        # The event may be handled after the reply: its span is there once it has been.
        await _until_handled(client, f"chain_notify_{unique}")
    for process in started:
        await process.stop()
    return files


async def _until_handled(client: httpx.AsyncClient, service: str) -> None:
    """Until ``service`` has handled one call (the management API's counter)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        found = (await client.get(f"/services/{service}")).json()
        if found["stats"]["handled"] >= 1:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{service} did not handle the event within 20 s")


@pytest.fixture
async def started() -> AsyncIterator[list[Process]]:
    processes: list[Process] = []
    yield processes
    for process in processes:
        process.kill()


async def test_one_trace_across_two_processes_on_nats(
    tmp_path: Path, nats_url: str, unique: str, started: list[Process]
) -> None:
    try:
        files = await _chain_across_processes(tmp_path, nats_url, unique, started)
    finally:
        await delete_nats_consumers(nats_url, unique)
    assert_chain(read_spans(files), unique, "nats")


async def test_one_trace_across_two_processes_on_rabbitmq(
    tmp_path: Path, amqp_url: str, unique: str, started: list[Process]
) -> None:
    group = f"chain_notify_{unique}.on_greeted"
    try:
        files = await _chain_across_processes(tmp_path, amqp_url, unique, started)
    finally:
        await delete_amqp(amqp_url, [f"basidia.events.{group}", f"basidia.events.{group}.dlq"])
    assert_chain(read_spans(files), unique, "rabbitmq")

"""``basidia dlq list|show|replay|purge`` against real brokers, and the shell's ``dlq`` on the
memory broker (docs/resilience.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from typer.testing import CliRunner

from basidia import NonRetryable, Service, ServiceRunner, connect, current_context, event_handler
from basidia.cli import app
from basidia.resilience.dlq import DeadLetterTool

from .brokers.cleanup import delete_amqp, delete_nats_consumers
from .brokers.contract import dead_letters_of, eventually

pytestmark = pytest.mark.timeout(90)


def picky(name: str, handled: list[tuple[int, int, str]], state: dict[str, bool]) -> type[Service]:
    """``<name>``: its handler refuses every event until ``state["fixed"]``, then records
    (data, attempt, idempotency key) in ``handled``."""

    class Picky(Service):
        @event_handler(f"{name}.order")
        async def on_order(self, order: dict[str, int]) -> None:
            if not state["fixed"]:
                raise NonRetryable(f"order {order['n']} cannot be booked yet")
            ctx = current_context()
            assert ctx is not None
            handled.append((order["n"], ctx.attempt, ctx.idempotency_key or ""))

    Picky.name = name
    return Picky


async def basidia_dlq(*args: str, code: int = 0) -> str:
    """Run ``basidia dlq ARGS`` (in a thread: it runs an event loop of its own)."""
    result = await asyncio.to_thread(CliRunner().invoke, app, ["dlq", *args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(params=["amqp", "nats"])
async def broker_url(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[str]:
    url = str(request.getfixturevalue(f"{request.param}_url"))
    yield url
    group = f"dlq_{unique}.on_order"
    if request.param == "amqp":
        await delete_amqp(url, [f"basidia.events.{group}", f"basidia.events.{group}.dlq"])
    else:
        await delete_nats_consumers(url, unique, purge_dlq=f"basidia.dlq.dlq_{unique}.order")


async def test_basidia_dlq_lists_shows_replays_and_purges(broker_url: str, unique: str) -> None:
    name = f"dlq_{unique}"
    event, group = f"{name}.order", f"{name}.on_order"
    handled: list[tuple[int, int, str]] = []
    state = {"fixed": False}
    where = ["--broker", broker_url, "--service", name]
    async with ServiceRunner([picky(name, handled, state)], broker=broker_url) as runner:
        await runner.dispatch(event, {"n": 1}, idempotency_key=f"{unique}-1")
        [letter] = await dead_letters_of(runner.broker, group, 1)
        assert letter.id

        listed = await basidia_dlq("list", *where)
        assert letter.id in listed and group in listed and "attempts=1" in listed
        assert "NonRetryable: order 1 cannot be booked yet" in listed
        shown = json.loads(await basidia_dlq("show", letter.id, *where, "--handler", "on_order"))
        assert [record["id"] for record in shown] == [letter.id]
        assert shown[0]["reason"] == "NonRetryable: order 1 cannot be booked yet"
        assert shown[0]["frame"]["data"] == {"n": 1}
        assert shown[0]["frame"]["headers"]["idem"] == f"{unique}-1"

        # Fixed: a replay runs the handler once, as a first attempt with the original key.
        state["fixed"] = True
        assert "replayed 1 in all" in await basidia_dlq("replay", *where)
        await eventually(lambda: bool(handled))
        await asyncio.sleep(0.5)
        assert handled == [(1, 1, f"{unique}-1")]
        assert "no dead letters" in await basidia_dlq("list", *where)

        # Purge: only when told which, or told all.
        state["fixed"] = False
        await runner.dispatch(event, {"n": 2})
        await dead_letters_of(runner.broker, group, 1)
        refused = await basidia_dlq("purge", *where, code=2)
        assert "name the dead letters to purge" in refused
        assert "purged 1 in all" in await basidia_dlq("purge", *where, "--yes")
        assert await runner.broker.dead_letters(group) == []
    assert "must be one of" in await basidia_dlq("drop", *where, code=2)


async def test_the_shell_dlq_replays_memory_dead_letters(memory_url: str) -> None:
    # ``basidia shell SERVICES`` hosts the services and offers ``dlq``, a DeadLetterTool on
    # its client's broker: the same memory hub, so the same dead letters.
    handled: list[tuple[int, int, str]] = []
    state = {"fixed": False}
    lines: list[str] = []
    service = picky("shell_picky", handled, state)
    async with ServiceRunner([service], broker=memory_url), connect(memory_url) as cluster:
        dlq = DeadLetterTool(cluster.broker, lines.append)
        await cluster.dispatch("shell_picky.order", {"n": 7}, idempotency_key="seven")
        await dead_letters_of(cluster.broker, "shell_picky.on_order", 1)
        [letter] = await dlq.list()
        assert letter.reason == "NonRetryable: order 7 cannot be booked yet"
        shown: list[dict[str, Any]] = await dlq.show([letter.id])
        assert shown[0]["frame"]["data"] == {"n": 7}
        state["fixed"] = True
        assert await dlq.replay(service="shell_picky") == 1
        await eventually(lambda: handled == [(7, 1, "seven")])
        assert await dlq.list() == [] and lines[-1] == "no dead letters"

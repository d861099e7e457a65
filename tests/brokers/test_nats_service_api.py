"""The NATS service API (ADR-32): Basidia services seen by standard NATS tooling.

Discovery requests are sent with plain nats-py, the way ``nats micro`` does: one request,
every instance answers, the requester gathers the answers.  Answers are checked against
the documented schema and parsed with nats-py's own ADR-32 types.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from basidia import Service, ServiceRunner, connect, rpc
from basidia.brokers.base import ServiceInfo as Announcement
from basidia.brokers.nats import NatsBroker

pytestmark = [pytest.mark.nats, pytest.mark.timeout(60)]

STANDARD_FIELDS = {"type", "name", "id", "version", "metadata"}
ENDPOINT_INFO_FIELDS = {"name", "subject", "queue_group", "metadata"}
ENDPOINT_STATS_FIELDS = {
    "name",
    "subject",
    "queue_group",
    "num_requests",
    "num_errors",
    "last_error",
    "processing_time",
    "average_processing_time",
    "data",
}


@pytest.fixture
async def plain(nats_url: str) -> AsyncIterator[Client]:
    """A plain nats-py connection, as a NATS tool would have."""
    nc = await nats.connect(nats_url, allow_reconnect=False)
    yield nc
    await nc.close()


async def gather(
    nc: Client, subject: str, wait: float = 0.5, expected: int | None = None
) -> list[dict[str, Any]]:
    """Send one request and collect the answers that come within ``wait`` seconds.

    With ``expected``, stop waiting 0.1 s after that many answers (time for an extra one).
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait
    while True:
        if expected is not None and len(answers) == expected:
            deadline = min(deadline, time.monotonic() + 0.1)
            expected = None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            msg = await sub.next_msg(timeout=remaining)
        except nats.errors.TimeoutError:
            break
        if msg.headers and "Status" in msg.headers:
            continue  # "no responders": nobody answers this subject at all
        answers.append(json.loads(msg.data))
    await sub.unsubscribe()
    return answers


def ours(answers: list[dict[str, Any]], *names: str) -> dict[str, dict[str, Any]]:
    """The answers of services named ``names`` (other tests may run services too), by name."""
    found = {answer["name"]: answer for answer in answers if answer["name"] in names}
    assert len(found) == sum(1 for answer in answers if answer["name"] in names)
    return found


def make_services(unique: str) -> tuple[type[Service], type[Service]]:
    class Echo(Service):
        """Echoes what it gets."""

        name = f"echo_{unique}"

        @rpc
        async def echo(self, value: Any) -> Any:
            return value

        @rpc
        async def fail(self) -> None:
            raise ValueError("no luck")

    class Clock(Service):
        name = f"clock_{unique}"

        @rpc
        async def now(self) -> float:
            return time.time()

    return Echo, Clock


async def announce(runner: ServiceRunner) -> None:
    """Register the runner's services with the service API, as the container does."""
    broker = runner.broker
    assert isinstance(broker, NatsBroker)
    for name, container in runner.containers.items():
        await broker.register_service(
            Announcement(
                name,
                version="1.2.3",
                description=(container.service_cls.__doc__ or "").strip(),
                methods=list(container.endpoint_stats),
                stats=container.endpoint_stats,
                metadata={"runner": "test"},
            )
        )


async def test_ping_info_and_stats_answer_for_all_by_name_and_by_id(
    nats_url: str, plain: Client, unique: str
) -> None:
    echo, clock = make_services(unique)
    names = (echo.name, clock.name)
    async with ServiceRunner([echo, clock], broker=nats_url) as runner:
        await announce(runner)
        pings = ours(await gather(plain, "$SRV.PING"), *names)
        assert set(pings) == set(names)
        for verb, kind in (("PING", "ping"), ("INFO", "info"), ("STATS", "stats")):
            everyone = ours(await gather(plain, f"$SRV.{verb}"), *names)
            assert set(everyone) == set(names), verb
            for name in names:
                by_name = await gather(plain, f"$SRV.{verb}.{name}", expected=1)
                assert [answer["name"] for answer in by_name] == [name]
                service_id = pings[name]["id"]
                by_id = await gather(plain, f"$SRV.{verb}.{name}.{service_id}", expected=1)
                assert len(by_id) == 1 and by_id[0]["id"] == service_id
                answer = by_id[0]
                assert answer["type"] == f"io.nats.micro.v1.{kind}_response"
                assert answer["version"] == "1.2.3"
                assert answer["metadata"] == {"runner": "test"}
            assert await gather(plain, f"$SRV.{verb}.{echo.name}.no-such-id", 0.2) == []


async def test_info_lists_every_service_with_its_endpoints(
    nats_url: str, plain: Client, unique: str
) -> None:
    echo, clock = make_services(unique)
    async with ServiceRunner([echo, clock], broker=nats_url) as runner:
        await announce(runner)
        infos = ours(await gather(plain, "$SRV.INFO"), echo.name, clock.name)
    info = infos[echo.name]
    assert set(info) == STANDARD_FIELDS | {"description", "endpoints"}
    assert info["description"] == "Echoes what it gets."
    assert sorted(endpoint["name"] for endpoint in info["endpoints"]) == ["echo", "fail"]
    for endpoint in info["endpoints"]:
        assert set(endpoint) == ENDPOINT_INFO_FIELDS
        assert endpoint["subject"] == f"basidia.rpc.{echo.name}"
        assert endpoint["queue_group"] == echo.name
    assert [endpoint["name"] for endpoint in infos[clock.name]["endpoints"]] == ["now"]
    parsed = ServiceInfo.from_dict(info)  # what nats-py's own tooling types make of it
    assert parsed.name == echo.name and len(parsed.endpoints) == 2


async def test_stats_count_requests_errors_and_processing_time(
    nats_url: str, plain: Client, unique: str
) -> None:
    echo, _ = make_services(unique)
    async with ServiceRunner([echo], broker=nats_url) as runner:
        await announce(runner)
        async with connect(nats_url) as cluster:
            proxy = cluster.rpc[echo.name]
            for value in range(3):
                assert await proxy.echo(value) == value
            for _ in range(2):
                with pytest.raises(Exception, match="no luck"):
                    await proxy.fail()
        [stats] = await gather(plain, f"$SRV.STATS.{echo.name}", expected=1)
    assert set(stats) == STANDARD_FIELDS | {"started", "endpoints"}
    started = datetime.strptime(stats["started"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert 0 <= time.time() - started.replace(tzinfo=UTC).timestamp() < 60
    endpoints = {endpoint["name"]: endpoint for endpoint in stats["endpoints"]}
    for endpoint in endpoints.values():
        assert set(endpoint) == ENDPOINT_STATS_FIELDS
        if endpoint["num_requests"]:
            assert endpoint["processing_time"] > 0
            assert endpoint["average_processing_time"] == (
                endpoint["processing_time"] // endpoint["num_requests"]
            )
    assert (endpoints["echo"]["num_requests"], endpoints["echo"]["num_errors"]) == (3, 0)
    assert endpoints["echo"]["last_error"] == ""
    assert (endpoints["fail"]["num_requests"], endpoints["fail"]["num_errors"]) == (2, 2)
    assert endpoints["fail"]["last_error"] == "ValueError: no luck"
    parsed = ServiceStats.from_dict(stats)
    assert {endpoint.name for endpoint in parsed.endpoints} == {"echo", "fail"}


async def test_a_stopped_service_no_longer_answers(
    nats_url: str, plain: Client, unique: str
) -> None:
    echo, clock = make_services(unique)
    async with ServiceRunner([echo, clock], broker=nats_url) as runner:
        await announce(runner)
        broker = runner.broker
        assert isinstance(broker, NatsBroker)
        broker.unregister_service(clock.name)
        answers = ours(await gather(plain, "$SRV.PING"), echo.name, clock.name)
        assert set(answers) == {echo.name}
        ServicePing.from_dict(answers[echo.name])
    assert ours(await gather(plain, "$SRV.PING"), echo.name, clock.name) == {}


async def test_names_and_versions_the_service_api_cannot_carry(
    nats_url: str, plain: Client, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = NatsBroker(nats_url)
    await broker.connect()
    try:
        await broker.register_service(Announcement(f"billing.v2_{unique}", "1.0.0", "", []))
        assert "not announced" in caplog.text
        assert await gather(plain, f"$SRV.PING.billing.v2_{unique}", 0.2) == []
    finally:
        await broker.close()
    # A version is checked when the class is made, the same on every broker.
    with pytest.raises(TypeError, match="semantic version"):

        class Billing(Service):
            name = f"billing_{unique}"
            version = "2"


async def test_a_runner_announces_its_services_on_its_own(
    nats_url: str, plain: Client, unique: str
) -> None:
    echo, clock = make_services(unique)
    async with ServiceRunner([echo, clock], broker=nats_url):
        await asyncio.sleep(0)
        infos = ours(await gather(plain, "$SRV.INFO"), echo.name, clock.name)
    assert set(infos) == {echo.name, clock.name}
    assert sorted(e["name"] for e in infos[echo.name]["endpoints"]) == ["echo", "fail"]

"""The management API and health probes, driving real services through their states."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from basidia import ServiceRunner, ServiceUnavailable, State
from tests.http.conftest import FLAKY, JSON, AuditService, until

pytestmark = pytest.mark.timeout(30)


async def _state(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await client.get(f"/services/{name}")
    assert response.status_code == 200
    service: dict[str, Any] = response.json()
    return service


async def test_status_shows_version_broker_readiness_and_services(
    client: httpx.AsyncClient,
) -> None:
    status = (await client.get("/")).json()
    assert status["ready"] is True
    assert status["broker"]["connected"] is True
    assert status["broker"]["url"].startswith("memory://")
    assert status["services"] == {"catalog": "RUNNING", "pricing": "RUNNING", "audit": "RUNNING"}
    assert status["version"]


async def test_services_lists_state_entrypoints_and_in_flight_work(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    slow = asyncio.create_task(client.get("/slow", params={"seconds": 0.5}))
    await until(lambda: runner.containers["catalog"].in_flight > 0)
    services = {s["name"]: s for s in (await client.get("/services")).json()}
    await slow
    assert set(services) == {"catalog", "pricing", "audit"}
    catalog, pricing, audit = services["catalog"], services["pricing"], services["audit"]
    assert catalog["state"] == "RUNNING" and catalog["error"] is None
    assert catalog["in_flight"] == 1
    assert {"name": "get_item", "methods": ["GET"], "path": "/items/{item_id:int}"} in catalog[
        "entrypoints"
    ]["http"]
    assert pricing["entrypoints"]["rpc"] == ["price", "broken", "remaining"]
    assert audit["entrypoints"]["events"] == [
        {"name": "on_item_viewed", "event": "item.viewed", "broadcast": False}
    ]


async def test_health_probes(client: httpx.AsyncClient) -> None:
    live = await client.get("/health/live")
    ready = await client.get("/health/ready")
    assert (live.status_code, live.json()) == (200, {"status": "alive"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_stopping_a_service_stops_its_consumers_and_readiness_follows(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    assert await runner.rpc.pricing.price(2) == 3.0

    stopped = await client.post("/services/pricing/stop", headers=JSON)
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "STOPPED"
    assert runner.containers["pricing"].state is State.STOPPED
    assert (await client.get("/")).json()["services"]["pricing"] == "STOPPED"
    # Its RPC consumer is gone: calls fail at once, and so does the HTTP route relying on it.
    with pytest.raises(ServiceUnavailable):
        await runner.rpc.pricing.price(2)
    assert (await client.get("/items/2")).status_code == 503
    assert (await client.get("/prices/2")).status_code == 503  # its own route
    ready = await client.get("/health/ready")
    assert (ready.status_code, ready.json()) == (503, {"status": "not ready"})
    assert (await client.get("/")).json()["ready"] is False
    assert (await client.get("/health/live")).status_code == 200  # alive all the same

    started = await client.post("/services/pricing/start", headers=JSON)
    assert started.status_code == 200
    assert started.json()["state"] == "RUNNING"
    assert await runner.rpc.pricing.price(2) == 3.0
    assert (await client.get("/items/2")).json() == {"id": 2, "price": 3.0}
    assert (await client.get("/health/ready")).status_code == 200


async def test_a_stopped_event_handler_gets_no_events_until_started(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    assert (await client.post("/services/audit/stop", headers=JSON)).json()["state"] == "STOPPED"
    await runner.dispatch("item.viewed", {"id": 1})
    await asyncio.sleep(0.2)
    assert AuditService.seen == []
    assert (await client.post("/services/audit/start", headers=JSON)).json()["state"] == "RUNNING"
    await runner.dispatch("item.viewed", {"id": 2})
    await until(lambda: {"id": 2} in AuditService.seen)


async def test_stop_waits_for_calls_in_flight(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    slow = asyncio.create_task(client.get("/slow", params={"seconds": 0.3}))
    await until(lambda: runner.containers["catalog"].in_flight > 0)
    stopped = await client.post("/services/catalog/stop", headers=JSON, params={"grace": 5})
    assert stopped.json()["state"] == "STOPPED"
    assert (await slow).json() == {"slept": 0.3}


async def test_a_failed_start_shows_error_with_the_reason(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    await client.post("/services/pricing/stop", headers=JSON)
    FLAKY.fail = True
    failed = await client.post("/services/pricing/start", headers=JSON)
    assert failed.status_code == 500
    assert failed.json()["error"] == "start_failed"
    assert failed.json()["detail"] == "RuntimeError: the resource is down"
    service = await _state(client, "pricing")
    assert service["state"] == "ERROR"
    assert service["error"] == "RuntimeError: the resource is down"
    assert (await client.get("/health/ready")).status_code == 503

    FLAKY.fail = False
    restarted = await client.post("/services/pricing/start", headers=JSON)
    assert restarted.status_code == 200
    assert (await _state(client, "pricing"))["error"] is None
    assert (await client.get("/health/ready")).status_code == 200


async def test_a_service_in_transition_answers_409(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    await client.post("/services/pricing/stop", headers=JSON)
    FLAKY.gate = asyncio.Event()
    starting = asyncio.create_task(client.post("/services/pricing/start", headers=JSON))
    await until(lambda: runner.containers["pricing"].state is State.STARTING)
    assert (await _state(client, "pricing"))["state"] == "STARTING"
    assert (await client.post("/services/pricing/start", headers=JSON)).status_code == 409
    assert (await client.post("/services/pricing/stop", headers=JSON)).status_code == 409
    assert (await client.get("/health/ready")).status_code == 503
    FLAKY.gate.set()
    assert (await starting).json()["state"] == "RUNNING"


async def test_start_and_stop_are_idempotent(client: httpx.AsyncClient) -> None:
    assert (await client.post("/services/audit/start", headers=JSON)).json()["state"] == "RUNNING"
    assert (await client.post("/services/audit/stop", headers=JSON)).json()["state"] == "STOPPED"
    assert (await client.post("/services/audit/stop", headers=JSON)).json()["state"] == "STOPPED"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/services/ghost"),
        ("POST", "/services/ghost/start"),
        ("POST", "/services/ghost/stop"),
    ],
)
async def test_unknown_service_gets_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path, headers=JSON)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize("grace", ["soon", "-1", "nan", "1e9"])
async def test_invalid_grace_gets_400_and_the_service_keeps_running(
    client: httpx.AsyncClient, grace: str
) -> None:
    response = await client.post("/services/audit/stop", headers=JSON, params={"grace": grace})
    assert response.status_code == 400
    assert (await _state(client, "audit"))["state"] == "RUNNING"


async def test_broker_disconnected_means_not_ready(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    await runner.broker.close()
    try:
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert (await client.get("/")).json()["broker"]["connected"] is False
    finally:
        await runner.broker.connect()

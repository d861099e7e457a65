"""Liveness follows the broker: a connection closed for good makes the process not live."""

from __future__ import annotations

import httpx
import pytest

from basidia import Service, ServiceRunner, rpc
from basidia.http.server import HttpServer
from tests.faults.conftest import _require_nats
from tests.faults.servers import NatsServer
from tests.http.conftest import until

pytestmark = [pytest.mark.nats, pytest.mark.timeout(60)]


class Pinger(Service):
    name = "liveness_pinger"

    @rpc
    async def ping(self) -> str:
        return "pong"


async def test_live_turns_503_once_the_broker_connection_is_closed_for_good() -> None:
    """NATS with a finite ``max_reconnect_attempts``: while reconnecting the process is
    alive (and not ready); once reconnection gives up, ``/health/live`` answers 503 so
    an orchestrator restarts it."""
    _require_nats()
    from basidia.brokers.nats import NatsBroker

    async with NatsServer() as nats_server:
        broker = NatsBroker(
            nats_server.url, max_reconnect_attempts=3, reconnect_wait=0.05, reconnect_wait_max=0.1
        )
        runner = ServiceRunner([Pinger], broker=broker)
        await runner.start()
        try:
            async with (
                HttpServer(runner, "127.0.0.1", 0) as server,
                httpx.AsyncClient(base_url=server.url, timeout=5) as client,
            ):
                assert (await client.get("/health/live")).status_code == 200
                nats_server.kill()
                await until(lambda: not broker.connected, 10)
                assert (await client.get("/health/ready")).status_code == 503
                await until(lambda: not broker.alive, 20)
                live = await client.get("/health/live")
                assert live.status_code == 503, live.text
                assert live.json()["status"] == "dead"
        finally:
            await runner.stop()

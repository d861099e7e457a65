"""The management API refuses unauthenticated calls when it is reachable beyond loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from basidia import ConfigError, ServiceRunner, State
from basidia.http import HttpServer
from basidia.http.server import is_loopback
from tests.http.conftest import TLS

pytestmark = pytest.mark.timeout(30)

TOKEN = "k7Yq2-test-token-8c1d0f"
MANAGEMENT_CALLS = [
    ("GET", "/"),
    ("GET", "/services"),
    ("GET", "/services/pricing"),
    ("POST", "/services/pricing/stop"),
    ("POST", "/services/pricing/start"),
]


@pytest.fixture
async def exposed(runner: ServiceRunner) -> AsyncIterator[httpx.AsyncClient]:
    """A server on every interface with a token; the client reaches it on loopback."""
    async with HttpServer(runner, "0.0.0.0", 0, token=TOKEN) as server:
        url = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=url, timeout=10, verify=TLS) as client:
            yield client


def test_exposing_the_management_api_without_a_token_is_refused(runner: ServiceRunner) -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3", "api.example.com"):
        with pytest.raises(ConfigError, match="without a token"):
            HttpServer(runner, host, 0)


def test_the_listen_address_from_config_is_checked_too(memory_url: str) -> None:
    runner = ServiceRunner([], broker=memory_url, config={"http": {"listen": "0.0.0.0:0"}})
    with pytest.raises(ConfigError, match="without a token"):
        HttpServer(runner)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["none", "wrong", "no-scheme", "basic", "longer"],
)
async def test_management_calls_without_the_token_get_401(
    runner: ServiceRunner, exposed: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for method, path in MANAGEMENT_CALLS:
        response = await exposed.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert runner.containers["pricing"].state is State.RUNNING  # the stop did not happen


async def test_management_calls_with_the_token_work(
    runner: ServiceRunner, exposed: httpx.AsyncClient
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await exposed.get("/", headers=auth)).json()["ready"] is True
    stopped = await exposed.post("/services/pricing/stop", headers=auth)
    assert stopped.json()["state"] == "STOPPED"
    assert runner.containers["pricing"].state is State.STOPPED
    started = await exposed.post("/services/pricing/start", headers=auth)
    assert started.json()["state"] == "RUNNING"


async def test_probes_endpoints_and_openapi_need_no_token(exposed: httpx.AsyncClient) -> None:
    assert (await exposed.get("/health/live")).status_code == 200
    assert (await exposed.get("/health/ready")).json() == {"status": "ready"}
    assert (await exposed.get("/items/1")).json() == {"id": 1, "price": 1.5}
    assert (await exposed.get("/openapi.json")).status_code == 200


async def test_exposed_without_management_serves_endpoints_and_no_management(
    runner: ServiceRunner,
) -> None:
    async with HttpServer(runner, "0.0.0.0", 0, management=False) as server:
        url = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=url, timeout=10, verify=TLS) as client:
            assert (await client.get("/items/1")).status_code == 200
            assert (await client.get("/services")).status_code == 404
            assert (await client.post("/services/pricing/stop")).status_code == 404
    assert runner.containers["pricing"].state is State.RUNNING


async def test_loopback_without_a_token_is_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/services")).status_code == 200


async def test_a_token_is_required_on_loopback_too_once_set(runner: ServiceRunner) -> None:
    async with (
        HttpServer(runner, "127.0.0.1", 0, token=TOKEN) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, verify=TLS) as client,
    ):
        assert (await client.get("/services")).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/services", headers=auth)).status_code == 200


def test_the_token_never_shows_in_reprs(runner: ServiceRunner) -> None:
    server = HttpServer(runner, "127.0.0.1", 0, token=TOKEN)
    assert TOKEN not in repr(server.settings)
    assert TOKEN not in repr(server)
    assert TOKEN not in repr(runner.config.merged({"http.token": TOKEN}))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback

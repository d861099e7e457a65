"""Without a token, the management API refuses what a web page from another site can send.

A browser on the developer's machine reaches 127.0.0.1 too: a page could stop a service
with a form-like POST, or read ``/services`` after rebinding its own name to 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from basidia import ConfigError, ServiceRunner, State
from basidia.config import Config
from basidia.http import HttpServer
from basidia.http.server import HttpSettings
from tests.http.conftest import JSON, TLS

pytestmark = pytest.mark.timeout(30)


async def _pricing_state(runner: ServiceRunner, client: httpx.AsyncClient) -> str:
    """The pricing service's state, as a local client sees it; it still answers calls."""
    state = str((await client.get("/services/pricing")).json()["state"])
    assert state == runner.containers["pricing"].state.value
    if state == "RUNNING":
        assert await runner.rpc.pricing.price(2) == 3.0
    return state


async def test_a_cross_site_text_plain_post_does_not_stop_a_service(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    # What <form enctype="text/plain" action="http://127.0.0.1:8000/services/pricing/stop"
    # method="post"> on another site sends.
    response = await client.post(
        "/services/pricing/stop",
        content=b"x=y",
        headers={
            "Content-Type": "text/plain",
            "Origin": "https://evil.example",
            "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "navigate",
        },
    )
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    assert "other sites" in response.json()["detail"]
    assert await _pricing_state(runner, client) == "RUNNING"
    assert (await client.get("/health/ready")).json() == {"status": "ready"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        # A browser that says where the request comes from.
        ({**JSON, "Origin": "https://evil.example"}, 403),
        ({**JSON, "Origin": "null"}, 403),  # sandboxed iframe, file:// page
        ({**JSON, "Sec-Fetch-Site": "cross-site"}, 403),
        ({**JSON, "Sec-Fetch-Site": "same-site"}, 403),  # another port of localhost
        # Another web application on this machine is another origin.
        ({**JSON, "Origin": "http://127.0.0.1:1"}, 403),
        ({**JSON, "Origin": "http://localhost:1"}, 403),
        # A browser (or an extension) that leaves Origin out: "simple" requests refused.
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "text/plain; charset=utf-8"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({}, 415),  # fetch(url, {method: "POST", mode: "no-cors"})
    ],
    ids=[
        "foreign-origin",
        "null-origin",
        "cross-site",
        "same-site",
        "other-loopback-port",
        "other-localhost-port",
        "text-plain",
        "text-plain-charset",
        "form",
        "multipart",
        "no-content-type",
    ],
)
async def test_state_changes_a_page_could_send_are_refused(
    runner: ServiceRunner, client: httpx.AsyncClient, headers: dict[str, str], status: int
) -> None:
    for action in ("stop", "start"):
        response = await client.post(f"/services/pricing/{action}", headers=headers)
        assert response.status_code == status, action
        assert response.json()["error"] == {403: "forbidden", 415: "unsupported_media_type"}[status]
    assert await _pricing_state(runner, client) == "RUNNING"
    if status == 415:
        assert "Content-Type: application/json" in response.json()["detail"]


async def test_a_cors_preflight_for_a_json_post_is_never_approved(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    # A page on another site must ask before sending JSON; the answer grants nothing,
    # so the browser never sends the POST.
    preflight = await client.options(
        "/services/pricing/stop",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code >= 400
    assert not [name for name in preflight.headers if name.startswith("access-control-")]
    assert await _pricing_state(runner, client) == "RUNNING"


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "localhost.evil.example:{port}",
        "127.0.0.1.nip.io:{port}",
        "localhost:{port}:80",
        "",
    ],
)
async def test_a_foreign_host_cannot_read_or_change_services(
    runner: ServiceRunner, server: HttpServer, client: httpx.AsyncClient, host: str
) -> None:
    # DNS rebinding: evil.example now resolves to 127.0.0.1; its page is same-origin
    # for the browser, and its requests name evil.example in Host.
    headers = {"Host": host.format(port=server.port)}
    for path in ("/", "/services", "/services/pricing"):
        response = await client.get(path, headers=headers)
        assert response.status_code == 421, path
        assert response.json()["error"] == "misdirected_request"
        assert "pricing" not in response.text and "memory://" not in response.text
    stop = await client.post("/services/pricing/stop", headers={**headers, **JSON})
    assert stop.status_code == 421
    assert await _pricing_state(runner, client) == "RUNNING"


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}", "127.0.0.1"],
)
async def test_loopback_names_are_answered_whatever_the_port(
    server: HttpServer, client: httpx.AsyncClient, host: str
) -> None:
    # Another port too: ssh -L 9000:localhost:8000 or kubectl port-forward keep the client's.
    for port in (server.port, 9000):
        response = await client.get("/services", headers={"Host": host.format(port=port)})
        assert response.status_code == 200
        assert {s["name"] for s in response.json()} == {"catalog", "pricing", "audit"}


async def test_probes_openapi_and_endpoints_answer_any_host(
    client: httpx.AsyncClient,
) -> None:
    # kubelet probes send Host: <pod-ip>:<port>; the services' endpoints are theirs to guard.
    headers = {"Host": "10.1.2.3:8000", "Origin": "https://elsewhere.example"}
    assert (await client.get("/health/live", headers=headers)).status_code == 200
    ready = await client.get("/health/ready", headers=headers)
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert (await client.get("/openapi.json", headers=headers)).status_code == 200
    assert (await client.get("/items/1", headers=headers)).json() == {"id": 1, "price": 1.5}


async def test_a_same_origin_json_post_stops_and_starts_a_service(
    runner: ServiceRunner, server: HttpServer, client: httpx.AsyncClient
) -> None:
    # What a page served by this very server (say, an admin page of one of its
    # services) sends with fetch(..., {method: "POST", headers: JSON}).
    own = {**JSON, "Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    stopped = await client.post("/services/pricing/stop", headers=own)
    assert (stopped.status_code, stopped.json()["state"]) == (200, "STOPPED")
    assert runner.containers["pricing"].state is State.STOPPED

    via_localhost = {
        "Host": f"localhost:{server.port}",
        "Origin": f"http://localhost:{server.port}",
        "Content-Type": "application/json; charset=utf-8",
    }
    started = await client.post("/services/pricing/start", headers=via_localhost, content=b"{}")
    assert (started.status_code, started.json()["state"]) == (200, "RUNNING")
    # And what curl sends: no Origin, no Sec-Fetch-*.
    curl = await client.post("/services/pricing/stop", headers=JSON)
    assert curl.json()["state"] == "STOPPED"


@pytest.fixture
async def proxied(runner: ServiceRunner) -> AsyncIterator[tuple[HttpServer, httpx.AsyncClient]]:
    """A server behind a reverse proxy reached as admin.example.com."""
    async with (
        HttpServer(runner, "127.0.0.1", 0, allowed_hosts=["Admin.Example.com"]) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, verify=TLS) as client,
    ):
        yield server, client


async def test_allowed_hosts_let_a_reverse_proxy_through(
    runner: ServiceRunner, proxied: tuple[HttpServer, httpx.AsyncClient]
) -> None:
    _, client = proxied
    # proxy_set_header Host $host: the proxy's name arrives.
    assert (await client.get("/services", headers={"Host": "admin.example.com"})).status_code == 200
    assert (await client.get("/services", headers={"Host": "other.example.com"})).status_code == 421
    # The proxy's default Host (its upstream, 127.0.0.1:port) with its pages' Origin.
    page = {**JSON, "Origin": "https://admin.example.com", "Sec-Fetch-Site": "same-origin"}
    stopped = await client.post("/services/pricing/stop", headers=page)
    assert stopped.json()["state"] == "STOPPED"
    evil = {**JSON, "Origin": "https://evil.example"}
    assert (await client.post("/services/pricing/start", headers=evil)).status_code == 403
    assert runner.containers["pricing"].state is State.STOPPED


async def test_with_a_token_the_token_alone_decides(runner: ServiceRunner) -> None:
    token = "cross-site-test-token-5e1b"
    async with (
        HttpServer(runner, "127.0.0.1", 0, token=token) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, verify=TLS) as client,
    ):
        # A page cannot send Authorization cross-site without a preflight this server
        # never approves: a foreign form gets 401 and nothing happens...
        form = {"Content-Type": "text/plain", "Origin": "https://evil.example"}
        refused = await client.post("/services/pricing/stop", headers=form)
        assert refused.status_code == 401
        assert runner.containers["pricing"].state is State.RUNNING
        # ...and a client with the token may use any Host and `curl -X POST`.
        auth = {"Authorization": f"Bearer {token}", "Host": "admin.example.com"}
        assert (await client.get("/services", headers=auth)).status_code == 200
        stopped = await client.post("/services/pricing/stop", headers=auth)
        assert stopped.json()["state"] == "STOPPED"


def test_allowed_hosts_from_the_environment_and_their_errors() -> None:
    config = Config.load(
        None, environ={"BASIDIA_HTTP__ALLOWED_HOSTS": "Admin.example.com, [::2],10.0.0.7,"}
    )
    settings = HttpSettings.from_config(config)
    assert settings.allowed_hosts == ("admin.example.com", "::2", "10.0.0.7")
    for wrong in ("admin.example.com:8443", "*", "https://admin.example.com", "*.example.com"):
        with pytest.raises(ConfigError, match="without a port"):
            HttpSettings.from_config(Config({"http": {"allowed_hosts": [wrong]}}))

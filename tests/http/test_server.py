"""Settings of the HTTP server, from arguments and config, and its start/stop behaviour."""

from __future__ import annotations

import socket

import httpx
import pytest

from basidia import Config, ConfigError, ServiceRunner
from basidia.http import HttpServer, HttpSettings
from basidia.http.server import http_server_for, parse_listen
from tests.http.conftest import TLS

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9000", ("::1", 9000)),
        (":9001", ("127.0.0.1", 9001)),
        ("9002", ("127.0.0.1", 9002)),
        (9003, ("127.0.0.1", 9003)),
        ("off", None),
        ("OFF", None),
        (False, None),
    ],
)
def test_parse_listen(text: object, address: tuple[str, int] | None) -> None:
    assert parse_listen(text) == address


@pytest.mark.parametrize("text", ["localhost:http", "127.0.0.1:70000", "host:"])
def test_parse_listen_refuses_nonsense(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(text)


def test_defaults_are_loopback_with_limits() -> None:
    settings = HttpSettings.from_config(Config({}))
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.management is True and settings.token is None
    assert settings.max_body_size == 1 << 20
    assert settings.max_header_size == 16 << 10
    assert settings.header_timeout == 10.0 and settings.idle_timeout == 5.0


def test_config_environment_and_arguments_layer() -> None:
    config = Config.load(
        environ={"BASIDIA_HTTP__TOKEN": "from-env", "BASIDIA_HTTP__MAX_BODY_SIZE": "2048"},
        base={"http": {"listen": "0.0.0.0:9000", "management": "yes", "idle_timeout": 2}},
    )
    settings = HttpSettings.from_config(config, port=9100)
    assert (settings.host, settings.port) == ("0.0.0.0", 9100)
    assert settings.token == "from-env"
    assert settings.max_body_size == 2048
    assert settings.idle_timeout == 2.0
    assert "from-env" not in repr(settings)


@pytest.mark.parametrize(
    "section",
    [
        {"max_body_size": -1},
        {"max_header_size": 10},
        {"header_timeout": 0},
        {"idle_timeout": "soon"},
        {"max_connections": 0},
        {"management": "perhaps"},
    ],
)
def test_invalid_settings_are_config_errors(section: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        HttpSettings.from_config(Config({"http": section}))


def test_http_can_be_turned_off_by_config(memory_url: str) -> None:
    off = ServiceRunner([], broker=memory_url, config={"http": {"listen": "off"}})
    assert http_server_for(off) is None
    on = ServiceRunner([], broker=memory_url, config={"http": {"listen": "127.0.0.1:0"}})
    server = http_server_for(on)
    assert server is not None and server.port == 0


async def test_port_zero_binds_a_free_port_and_reports_it(server: HttpServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(timeout=5, verify=TLS) as client:
        assert (await client.get(f"{server.url}/health/live")).status_code == 200


async def test_a_busy_port_is_a_config_error_saying_what_to_do(runner: ServiceRunner) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = HttpServer(runner, "127.0.0.1", taken.getsockname()[1])
        with pytest.raises(ConfigError, match="--http HOST:PORT"):
            await server.start()


async def test_start_and_stop_twice_are_harmless(runner: ServiceRunner) -> None:
    server = HttpServer(runner, "127.0.0.1", 0)
    await server.start()
    await server.start()
    port = server.port
    await server.stop()
    await server.stop()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


async def test_localhost_listens_on_every_loopback_address(runner: ServiceRunner) -> None:
    async with HttpServer(runner, "localhost", 0) as server:
        addresses = {info[4][0] for info in socket.getaddrinfo("localhost", server.port)}
        async with httpx.AsyncClient(timeout=5, verify=TLS) as client:
            for address in addresses:
                host = f"[{address}]" if ":" in address else address
                response = await client.get(f"http://{host}:{server.port}/health/live")
                assert response.status_code == 200

"""The management token is text, wherever it is set, and must be presented exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from basidia import ConfigError, ServiceRunner, State
from basidia.config import Config
from basidia.http import HttpServer
from tests.http.conftest import TLS, PricingService, Resource, resource_provider

pytestmark = pytest.mark.timeout(30)


def _from_environment(token: str, tmp_path: Path) -> Config:
    return Config.load(None, environ={"BASIDIA_HTTP__TOKEN": token})


def _from_a_substituted_yaml_file(token: str, tmp_path: Path) -> Config:
    path = tmp_path / "basidia.yaml"
    path.write_text("http:\n  token: ${MANAGEMENT_TOKEN}\n", encoding="utf-8")
    return Config.load(path, environ={"MANAGEMENT_TOKEN": token})


def _from_a_quoted_toml_file(token: str, tmp_path: Path) -> Config:
    path = tmp_path / "basidia.toml"
    path.write_text(f'[http]\ntoken = "{token}"\n', encoding="utf-8")
    return Config.load(path, environ={})


def _from_the_command_line(token: str, tmp_path: Path) -> Config:
    return Config.load(None, environ={}, overrides={"http.token": token})


SOURCES = [
    _from_environment,
    _from_a_substituted_yaml_file,
    _from_a_quoted_toml_file,
    _from_the_command_line,
]


async def _runner(memory_url: str, config: Config) -> ServiceRunner:
    runner = ServiceRunner(
        [PricingService],
        broker=memory_url,
        config=config.merged({"shutdown_grace": 1}),
        providers={Resource: resource_provider},
    )
    await runner.start()
    return runner


@pytest.fixture
async def serve_with() -> AsyncIterator[Callable[..., Any]]:
    """Start a runner and a loopback server for a config; stop them at the end."""
    started: list[tuple[ServiceRunner, HttpServer]] = []

    async def start(memory_url: str, config: Config, host: str = "127.0.0.1") -> HttpServer:
        runner = await _runner(memory_url, config)
        server = HttpServer(runner, host, 0)
        started.append((runner, server))
        await server.start()
        return server

    yield start
    for runner, server in started:
        await server.stop()
        await runner.stop()


@pytest.mark.parametrize("source", SOURCES, ids=lambda source: source.__name__.strip("_"))
@pytest.mark.parametrize(
    ("token", "not_the_token"),
    [
        ("0", ["", "Bearer", "Bearer 0.0", "Bearer false"]),
        ("1e3", ["", "Bearer 1000.0", "Bearer 1000", "Bearer 1E3"]),
        ("007", ["", "Bearer 7"]),
        ("true", ["", "Bearer True", "Bearer 1"]),
    ],
)
async def test_a_token_that_looks_like_a_number_is_text_presented_exactly(
    memory_url: str,
    tmp_path: Path,
    serve_with: Callable[..., Any],
    source: Callable[[str, Path], Config],
    token: str,
    not_the_token: list[str],
) -> None:
    server: HttpServer = await serve_with(memory_url, source(token, tmp_path))
    assert server.settings.token == token
    async with httpx.AsyncClient(base_url=server.url, timeout=10, verify=TLS) as client:
        for authorization in not_the_token:
            headers = {"Authorization": authorization} if authorization else {}
            refused = await client.post("/services/pricing/stop", headers=headers)
            assert refused.status_code == 401, authorization
        assert server.runner.containers["pricing"].state is State.RUNNING
        auth = {"Authorization": f"Bearer {token}"}
        stopped = await client.post("/services/pricing/stop", headers=auth)
        assert (stopped.status_code, stopped.json()["state"]) == (200, "STOPPED")


async def test_token_0_protects_an_exposed_api_instead_of_being_refused_as_none(
    memory_url: str, serve_with: Callable[..., Any]
) -> None:
    # It used to read as the number 0, "no token": beyond loopback, refusal to start.
    server: HttpServer = await serve_with(
        memory_url, Config.load(None, environ={"BASIDIA_HTTP__TOKEN": "0"}), host="0.0.0.0"
    )
    url = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(base_url=url, timeout=10, verify=TLS) as client:
        assert (await client.get("/services")).status_code == 401
        assert (await client.get("/services", headers={"Authorization": "Bearer 0"})).is_success


async def test_an_empty_token_means_no_token(
    memory_url: str, serve_with: Callable[..., Any]
) -> None:
    config = Config.load(None, environ={"BASIDIA_HTTP__TOKEN": ""})
    server: HttpServer = await serve_with(memory_url, config)
    assert server.settings.token is None
    async with httpx.AsyncClient(base_url=server.url, timeout=10, verify=TLS) as client:
        assert (await client.get("/services")).status_code == 200
    runner = await _runner(memory_url, config)
    try:
        with pytest.raises(ConfigError, match="without a token"):
            HttpServer(runner, "0.0.0.0", 0)
    finally:
        await runner.stop()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("basidia.yaml", "http:\n  token: 0123\n"),  # YAML reads 83
        ("basidia.yaml", "http:\n  token: 1.5e+3\n"),
        ("basidia.yaml", "http:\n  token: yes\n"),
        ("basidia.toml", "[http]\ntoken = 1e3\n"),
    ],
)
async def test_an_unquoted_token_in_a_config_file_is_refused(
    memory_url: str, tmp_path: Path, name: str, text: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    runner = await _runner(memory_url, Config.load(path, environ={}))
    try:
        with pytest.raises(ConfigError, match="must be text") as refused:
            HttpServer(runner, "127.0.0.1", 0)
        assert "quote it" in str(refused.value)
        for shown in ("83", "0123", "1500", "1e3", "True"):
            assert shown not in str(refused.value)
    finally:
        await runner.stop()


@pytest.mark.parametrize("token", ["XyZ-token\n", " XyZ-token", "XyZ\x00token", "XyZ-tökén"])
async def test_a_token_no_client_could_send_is_refused_without_showing_it(
    memory_url: str, token: str
) -> None:
    runner = await _runner(memory_url, Config.load(None, environ={"BASIDIA_HTTP__TOKEN": token}))
    try:
        with pytest.raises(ConfigError, match="printable ASCII") as refused:
            HttpServer(runner, "127.0.0.1", 0)
        assert "XyZ" not in str(refused.value)
    finally:
        await runner.stop()

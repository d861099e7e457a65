"""Fixtures for fault tests: throw-away brokers, skipped where their binaries are missing.

``nats_server`` and ``rabbit_server`` give each test a fresh broker. ``shared_nats_server`` and
``shared_rabbit_server`` share one broker across a test module to save startup time (RabbitMQ
takes seconds); after each test it is resumed and restarted if the test paused or killed it.
Its queues and streams persist between tests, so use unique names.

Set ``BASIDIA_REQUIRE_BROKERS=1`` to turn the skips into failures, as CI should.

CI runs the suite twice, with the compiled core and then with ``BASIDIA_NO_EXTENSIONS=1``.
The broker adapters and the fault paths are the same Python code in both runs, so tests
marked ``long_fault`` (a scenario over about 20 s) run only in the first: under the pure
core they are skipped with the reason ``LONG_FAULT_SKIP``.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from basidia._speedups import NO_EXTENSIONS

from .ledger import Ledger
from .servers import NatsServer, RabbitServer, RedisServer

LONG_FAULT_SKIP = "runs once, in the compiled-core run (BASIDIA_NO_EXTENSIONS is set)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``long_fault`` tests in the pure-Python run (see the module docstring)."""
    if not NO_EXTENSIONS:
        return
    skip = pytest.mark.skip(reason=LONG_FAULT_SKIP)
    for item in items:
        if item.get_closest_marker("long_fault") is not None:
            item.add_marker(skip)


def _brokers_required() -> bool:
    return os.environ.get("BASIDIA_REQUIRE_BROKERS", "") not in ("", "0")


def _skip_or_fail(reason: str) -> None:
    if _brokers_required():
        pytest.fail(f"{reason} (BASIDIA_REQUIRE_BROKERS is set)")
    pytest.skip(reason)


def _require_nats() -> None:
    if not os.access(NatsServer.BINARY, os.X_OK):
        _skip_or_fail(f"{NatsServer.BINARY} is missing: apt-get install nats-server")


def _require_redis() -> None:
    if not os.access(RedisServer.BINARY, os.X_OK):
        _skip_or_fail(f"{RedisServer.BINARY} is missing: apt-get install redis-server")


def _require_rabbit() -> None:
    if not os.access(RabbitServer.BINARY, os.X_OK):
        _skip_or_fail(f"{RabbitServer.BINARY} is missing: apt-get install rabbitmq-server")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("rabbitmq")
        except KeyError:
            _skip_or_fail("running as root needs the rabbitmq user to run a RabbitMQ node as")


async def _healed(server: NatsServer | RabbitServer) -> None:
    server.resume()
    if not server.running:
        await server.start()


@pytest.fixture
def ledger() -> Ledger:
    """A fresh ledger; call ``ledger.assert_clean()`` at the end of the test."""
    return Ledger()


@pytest.fixture
async def nats_server() -> AsyncIterator[NatsServer]:
    """A fresh nats-server with JetStream for this test."""
    _require_nats()
    async with NatsServer() as server:
        yield server


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A fresh redis-server, append-only file fsynced on every write, for this test."""
    _require_redis()
    async with RedisServer() as server:
        yield server


@pytest.fixture
async def rabbit_server() -> AsyncIterator[RabbitServer]:
    """A fresh RabbitMQ node for this test."""
    _require_rabbit()
    async with RabbitServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def _module_nats_server() -> AsyncIterator[NatsServer]:
    _require_nats()
    async with NatsServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def _module_rabbit_server() -> AsyncIterator[RabbitServer]:
    _require_rabbit()
    async with RabbitServer() as server:
        yield server


@pytest.fixture
async def shared_nats_server(_module_nats_server: NatsServer) -> AsyncIterator[NatsServer]:
    """The module's nats-server, running and unpaused again after the test."""
    yield _module_nats_server
    await _healed(_module_nats_server)


@pytest.fixture
async def shared_rabbit_server(_module_rabbit_server: RabbitServer) -> AsyncIterator[RabbitServer]:
    """The module's RabbitMQ node, running and unpaused again after the test."""
    yield _module_rabbit_server
    await _healed(_module_rabbit_server)

"""Fixtures shared by the whole suite: real brokers, found or skipped with a reason."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from basidia._speedups import env_flag

REQUIRE_BROKERS = env_flag("BASIDIA_REQUIRE_BROKERS")

AMQP_URL = os.environ.get("BASIDIA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("BASIDIA_TEST_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("BASIDIA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_broker(name: str, host: str, port: int) -> None:
    """Skip (or fail, under BASIDIA_REQUIRE_BROKERS=1) when a broker is not reachable."""
    if _reachable(host, port):
        return
    reason = f"{name} is not reachable on {host}:{port}"
    if REQUIRE_BROKERS:
        pytest.fail(f"{reason} and BASIDIA_REQUIRE_BROKERS=1 is set")
    pytest.skip(f"{reason}; start it or set BASIDIA_TEST_{name.upper()}_URL")


@pytest.fixture
def amqp_url() -> str:
    """URL of a running RabbitMQ (the shared one on 127.0.0.1:5672 by default)."""
    require_broker("amqp", "127.0.0.1", 5672)
    return AMQP_URL


@pytest.fixture
def nats_url() -> str:
    """URL of a running NATS server with JetStream (127.0.0.1:4222 by default)."""
    require_broker("nats", "127.0.0.1", 4222)
    return NATS_URL


@pytest.fixture
def redis_url() -> str:
    """URL of a running Redis server, 7.0 or later (127.0.0.1:6379 by default)."""
    require_broker("redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A memory broker URL of its own, so tests cannot see each other's queues."""
    yield f"memory://test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def unique() -> str:
    """A short unique suffix for service and event names on shared brokers."""
    return uuid.uuid4().hex[:10]

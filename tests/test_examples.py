"""The example services, loaded the way ``basidia run examples/`` loads them."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from basidia import Cluster, Config, Service, ServiceRunner, connect
from basidia.loader import load_services
from basidia.testing import entrypoint_hook, entrypoint_waiter

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, type[Service]]]:
    """The services in examples/, freshly imported (their class-level state is new).

    In a temporary working directory: the order saga's services keep their SQLite files
    there."""
    monkeypatch.chdir(tmp_path)
    path, modules = list(sys.path), set(sys.modules)
    try:
        yield {service.service_name(): service for service in load_services([str(EXAMPLES)])}
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            del sys.modules[name]


@pytest.fixture
async def running(
    examples: dict[str, type[Service]], memory_url: str
) -> AsyncIterator[tuple[ServiceRunner, Cluster]]:
    config = Config.load(EXAMPLES / "config.yaml", environ={})
    async with (
        ServiceRunner(examples.values(), broker=memory_url, config=config) as runner,
        connect(memory_url, config=config) as cluster,
    ):
        yield runner, cluster


def test_the_examples_directory_holds_the_design_services(
    examples: dict[str, type[Service]],
) -> None:
    assert set(examples) >= {
        "greeting_service",
        "database_service",
        "user_service",
        "notification_service",
    }


async def test_greeting_hello(running: tuple[ServiceRunner, Cluster]) -> None:
    _, cluster = running
    assert await cluster.rpc.greeting_service.hello("World") == "Hello, World!"


async def test_user_greeting_goes_through_the_database_service(
    running: tuple[ServiceRunner, Cluster],
) -> None:
    runner, cluster = running
    assert await cluster.rpc.database_service.get_user(42) == {"id": 42, "name": "User 42"}
    assert await cluster.rpc.user_service.get_user_greeting(42) == "Hello, User 42!"
    assert runner.containers["database_service"].stats.handled == 2  # one direct, one nested


async def test_create_user_notifies_exactly_once_with_an_idempotency_key(
    running: tuple[ServiceRunner, Cluster], examples: dict[str, type[Service]]
) -> None:
    runner, cluster = running
    notifications: Any = examples["notification_service"]
    container = runner.containers["notification_service"]

    async with entrypoint_waiter(container, "on_user_created"):
        user_id = await cluster.rpc.user_service.create_user("ada@example.com")
    await asyncio.sleep(0.05)  # room for a duplicate delivery to show up

    assert await cluster.rpc.notification_service.sent_notes() == [
        {"id": user_id, "email": "ada@example.com"}
    ]
    assert container.stats.handled == 2  # the event once, plus sent_notes
    [key] = notifications.seen_keys
    assert len(key) >= 16  # a real key, not an empty placeholder


async def test_redelivered_event_with_the_same_key_sends_no_second_note(
    running: tuple[ServiceRunner, Cluster],
) -> None:
    runner, cluster = running
    container = runner.containers["notification_service"]
    user = {"id": 7, "email": "bob@example.com"}
    async with entrypoint_waiter(container, "on_user_created"):
        await cluster.dispatch("user.created", user, idempotency_key="user-7-created")
    # The same business event, published again: the memory broker drops the repeat (as
    # JetStream would); a redelivery that did reach the handler finds its key seen.
    await cluster.dispatch("user.created", user, idempotency_key="user-7-created")
    async with entrypoint_waiter(container, "on_user_created"):
        await cluster.dispatch("user.created", {"id": 8, "email": "cyd@example.com"})

    notes = await cluster.rpc.notification_service.sent_notes()
    assert notes == [user, {"id": 8, "email": "cyd@example.com"}]


def test_config_yaml_loads_with_its_defaults() -> None:
    config = Config.load(EXAMPLES / "config.yaml", environ={})
    settings = config.settings
    assert settings.broker == "memory://"
    assert settings.rpc_timeout == 10.0
    assert settings.max_workers == 64
    assert settings.log_level == "INFO"
    assert config["database.url"] == "sqlite:///users.db"


def test_config_yaml_database_url_honours_database_url() -> None:
    config = Config.load(
        EXAMPLES / "config.yaml", environ={"DATABASE_URL": "postgres://app:pw@db/users"}
    )
    assert config["database.url"] == "postgres://app:pw@db/users"
    assert "pw@" not in repr(config)


def test_config_yaml_environment_overrides() -> None:
    config = Config.load(
        EXAMPLES / "config.yaml",
        environ={
            "DATABASE_URL": "postgres://db/from-substitution",
            "BASIDIA_DATABASE__URL": "postgres://db/from-basidia-env",
            "BASIDIA_BROKER": "nats://127.0.0.1:4222",
            "BASIDIA_LOG_LEVEL": "DEBUG",
        },
    )
    assert config["database.url"] == "postgres://db/from-basidia-env"
    assert config.settings.broker == "nats://127.0.0.1:4222"
    assert config.settings.log_level == "DEBUG"


async def test_user_service_dsn_comes_from_config(
    examples: dict[str, type[Service]], memory_url: str
) -> None:
    config = Config.load(EXAMPLES / "config.yaml", environ={"DATABASE_URL": "sqlite:///x.db"})
    async with ServiceRunner(examples.values(), broker=memory_url, config=config) as runner:
        assert runner.containers["user_service"].make_instance(None).dsn == "sqlite:///x.db"


async def test_api_service_answers_over_rpc(
    running: tuple[ServiceRunner, Cluster], examples: dict[str, type[Service]]
) -> None:
    if "api_service" not in examples:
        pytest.skip("examples/api_service.py is not in this checkout")
    requests = pytest.importorskip("starlette.requests")
    runner, _ = running
    request = requests.Request(
        {"type": "http", "method": "GET", "path": "/users/3", "path_params": {"user_id": "3"}}
    )
    async with entrypoint_hook(runner.containers["api_service"], "get_user") as get_user:
        response = await get_user(request)
    assert response.status_code == 200
    assert json.loads(response.body) == {"message": "Hello, User 3!"}


async def test_order_saga_completes_and_confirms_the_order(
    running: tuple[ServiceRunner, Cluster],
) -> None:
    _, cluster = running
    result = await cluster.rpc.orders.place_order(1, 25.0, "1 Main Street")
    assert result["status"] == "completed"
    assert result["data"]["tracking"] == "track-1"
    assert await cluster.rpc.orders.order_status(1) == "confirmed"
    assert await cluster.rpc.payments.balance(1) == 25.0
    # The same order again runs no second saga and charges nothing more.
    assert (await cluster.rpc.orders.place_order(1, 25.0, "1 Main Street"))["status"] == (
        "completed"
    )
    assert await cluster.rpc.payments.balance(1) == 25.0


async def test_order_saga_refunds_and_cancels_when_shipping_fails(
    running: tuple[ServiceRunner, Cluster],
) -> None:
    _, cluster = running
    result = await cluster.rpc.orders.place_order(2, 25.0, "")
    assert result["status"] == "compensated"
    assert "step ship failed" in result["error"] and "no address" in result["error"]
    assert await cluster.rpc.orders.order_status(2) == "cancelled"
    assert await cluster.rpc.payments.balance(2) == 0.0

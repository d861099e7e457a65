"""basidia.testing: the unittest-style case and Nameko's test helpers, async."""

# The snippets of docs/architecture.md below are kept verbatim, mutable class attributes included.
# ruff: noqa: RUF012

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from unittest.mock import AsyncMock, MagicMock

import pytest

from basidia import (
    ConfigDependency,
    Dependency,
    EventDispatcher,
    Service,
    ServiceRunner,
    ServiceUnavailable,
    State,
    connect,
    event_handler,
    rpc,
)
from basidia.testing import (
    EntrypointResult,
    ServiceTestCase,
    entrypoint_hook,
    entrypoint_waiter,
    replace_dependencies,
    worker_factory,
)

# -- the services of docs/architecture.md (the public API), verbatim ----------------------------


class GreetingService(Service):
    name = "greeting_service"

    @rpc
    async def hello(self, name: str) -> str:
        return f"Hello, {name}!"


class DatabaseService(Service):
    name = "database_service"

    @rpc
    async def get_user(self, user_id: int) -> dict:
        return {"id": user_id, "name": f"User {user_id}"}


class UserService(Service):
    name = "user_service"
    db = Dependency("database_service")  # by name: an RPC proxy
    dsn = ConfigDependency("database.url")  # a config value

    @rpc
    async def get_user_greeting(self, user_id: int) -> str:
        user = await self.db.get_user(user_id)
        return f"Hello, {user['name']}!"


# -- the ServiceTestCase snippet of docs/architecture.md, verbatim ------------------------------


class TestGreetingService(ServiceTestCase):
    services = [GreetingService]

    async def test_hello(self):
        assert await self.rpc.greeting_service.hello("Test") == "Hello, Test!"


# -- services of these tests ----------------------------------------------------------------


class Clock:
    """A type injected with ``Dependency(Clock)``."""


async def provide_clock() -> AsyncIterator[Clock]:
    yield Clock()


class SignupService(Service):
    name = "signup_service"
    dispatch = EventDispatcher()
    db = Dependency("database_service")
    clock = Dependency(Clock)
    dsn = ConfigDependency("database.url", default="sqlite:///default.db")

    @rpc
    async def signup(self, email: str) -> str:
        await self.dispatch("user.created", {"email": email})
        return email

    @rpc
    async def where(self) -> str:
        return str(self.dsn)


class WelcomeService(Service):
    name = "welcome_service"
    welcomed: list[str] = []  # what the tests look at; emptied before each

    @event_handler("user.created", max_attempts=1)
    async def on_user_created(self, user: dict[str, str]) -> str:
        if user["email"].startswith("bad"):
            raise ValueError(f"cannot welcome {user['email']}")
        WelcomeService.welcomed.append(user["email"])
        return user["email"]


@pytest.fixture(autouse=True)
def fresh_welcomes() -> None:
    WelcomeService.welcomed = []


# -- ServiceTestCase beyond the snippet ------------------------------------------------------


class TestUserServices(ServiceTestCase):
    services = [DatabaseService, UserService, WelcomeService]
    config = {"database": {"url": "sqlite:///case.db"}}

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        WelcomeService.welcomed = []

    async def test_calls_go_through_real_rpc(self) -> None:
        assert await self.rpc.user_service.get_user_greeting(4) == "Hello, User 4!"
        assert self.container("user_service").state is State.RUNNING

    async def test_dispatch_reaches_event_handlers(self) -> None:
        async with entrypoint_waiter(self.container("welcome_service"), "on_user_created"):
            key = await self.dispatch("user.created", {"email": "ada@example.com"})
        assert key
        assert WelcomeService.welcomed == ["ada@example.com"]

    async def test_config_reaches_the_services(self) -> None:
        container = self.container("user_service")
        assert container.make_instance(None).dsn == "sqlite:///case.db"


# -- worker_factory -----------------------------------------------------------------------


async def test_worker_factory_mocks_rpc_proxies() -> None:
    service = worker_factory(UserService)
    service.db.get_user.return_value = {"id": 3, "name": "Ada"}

    assert await service.get_user_greeting(3) == "Hello, Ada!"
    service.db.get_user.assert_awaited_once_with(3)


async def test_worker_factory_mocks_the_event_dispatcher() -> None:
    service = worker_factory(SignupService)
    assert await service.signup("ada@example.com") == "ada@example.com"
    service.dispatch.assert_awaited_once_with("user.created", {"email": "ada@example.com"})


async def test_worker_factory_takes_given_values_and_config_defaults() -> None:
    class FakeDb:
        async def get_user(self, user_id: int) -> dict[str, object]:
            return {"id": user_id, "name": "Fake"}

    service = worker_factory(UserService, db=FakeDb(), dsn="sqlite:///given.db")
    assert await service.get_user_greeting(1) == "Hello, Fake!"
    assert service.dsn == "sqlite:///given.db"

    signup = worker_factory(SignupService)
    assert signup.dsn == "sqlite:///default.db"  # the declared default
    assert isinstance(signup.clock, MagicMock)
    assert isinstance(signup.db, AsyncMock)


def test_worker_factory_rejects_unknown_dependencies() -> None:
    with pytest.raises(TypeError, match="database"):
        worker_factory(UserService, database=object())


def test_dependencies_outside_a_container_say_how_to_test() -> None:
    with pytest.raises(AttributeError, match="worker_factory"):
        UserService().db  # noqa: B018


# -- entrypoint_hook --------------------------------------------------------------------------


async def test_entrypoint_hook_runs_with_real_dependencies(memory_url: str) -> None:
    config = {"database": {"url": "sqlite:///hook.db"}}
    services = [DatabaseService, SignupService, UserService]
    providers = {Clock: provide_clock}
    runner = ServiceRunner(services, broker=memory_url, config=config, providers=providers)
    async with runner:
        async with entrypoint_hook(runner.containers["user_service"], "get_user_greeting") as hook:
            assert await hook(5) == "Hello, User 5!"  # the real database_service, over RPC
            assert await hook(user_id=6) == "Hello, User 6!"
        async with entrypoint_hook(runner.containers["signup_service"], "where") as where:
            assert await where() == "sqlite:///hook.db"


async def test_entrypoint_hook_calls_event_handlers_directly(memory_url: str) -> None:
    async with ServiceRunner([WelcomeService], broker=memory_url) as runner:
        container = runner.containers["welcome_service"]
        async with entrypoint_hook(container, "on_user_created") as handle:
            assert await handle({"email": "ada@example.com"}) == "ada@example.com"
            with pytest.raises(ValueError, match=r"cannot welcome bad@example\.com"):
                await handle({"email": "bad@example.com"})
    assert WelcomeService.welcomed == ["ada@example.com"]


async def test_entrypoint_hook_errors(memory_url: str) -> None:
    runner = ServiceRunner([GreetingService], broker=memory_url)
    container = runner.containers["greeting_service"]
    with pytest.raises(KeyError, match="goodbye"):
        async with entrypoint_hook(container, "goodbye"):
            pass
    async with entrypoint_hook(container, "hello") as hello:
        with pytest.raises(ServiceUnavailable, match="INITIALIZED"):
            await hello("World")  # the service has not been started


# -- entrypoint_waiter -----------------------------------------------------------------------


async def test_entrypoint_waiter_waits_for_the_handler_to_complete(memory_url: str) -> None:
    async with ServiceRunner([WelcomeService], broker=memory_url) as runner:
        container = runner.containers["welcome_service"]
        async with entrypoint_waiter(container, "on_user_created") as result:
            await runner.dispatch("user.created", {"email": "ada@example.com"})
            assert WelcomeService.welcomed == []  # not handled yet: it happens in the background
        assert WelcomeService.welcomed == ["ada@example.com"]
        assert (result.result, result.exception) == ("ada@example.com", None)
        assert result.args == ({"email": "ada@example.com"},)
        assert result.context is not None and result.context.idempotency_key


async def test_entrypoint_waiter_times_out_when_nothing_arrives(memory_url: str) -> None:
    async with ServiceRunner([WelcomeService], broker=memory_url) as runner:
        container = runner.containers["welcome_service"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError, match=r"welcome_service\.on_user_created"):
            async with entrypoint_waiter(container, "on_user_created", timeout=0.2):
                await runner.dispatch("user.deleted", {"email": "ada@example.com"})
        assert loop.time() - started < 2


async def test_entrypoint_waiter_callback_picks_the_call_to_wait_for(memory_url: str) -> None:
    def is_bob(result: EntrypointResult) -> bool:
        return result.result == "bob@example.com"

    async with ServiceRunner([WelcomeService], broker=memory_url) as runner:
        container = runner.containers["welcome_service"]
        async with entrypoint_waiter(container, "on_user_created", callback=is_bob) as result:
            for name in ("ada", "bob", "cyd"):
                await runner.dispatch("user.created", {"email": f"{name}@example.com"})
        assert result.result == "bob@example.com"
        assert "bob@example.com" in WelcomeService.welcomed


async def test_entrypoint_waiter_reports_the_exception(memory_url: str) -> None:
    async with ServiceRunner([WelcomeService], broker=memory_url) as runner:
        container = runner.containers["welcome_service"]
        async with entrypoint_waiter(container, "on_user_created") as result:
            await runner.dispatch("user.created", {"email": "bad@example.com"})
    assert isinstance(result.exception, ValueError)
    assert str(result.exception) == "cannot welcome bad@example.com"


async def test_entrypoint_waiter_rejects_unknown_entrypoints(memory_url: str) -> None:
    runner = ServiceRunner([WelcomeService], broker=memory_url)
    with pytest.raises(KeyError, match="on_user_deleted"):
        async with entrypoint_waiter(runner.containers["welcome_service"], "on_user_deleted"):
            pass


# -- replace_dependencies --------------------------------------------------------------------


async def test_replace_dependencies_before_start_changes_real_rpc_results(
    memory_url: str,
) -> None:
    runner = ServiceRunner([DatabaseService, UserService], broker=memory_url)
    db = replace_dependencies(runner.containers["user_service"], "db")
    db.get_user.return_value = {"id": 1, "name": "Mocked Ada"}
    async with runner, connect(memory_url) as cluster:
        assert await cluster.rpc.user_service.get_user_greeting(1) == "Hello, Mocked Ada!"
        db.get_user.assert_awaited_once_with(1)
        # The real database_service still answers callers that are not replaced.
        assert await cluster.rpc.database_service.get_user(1) == {"id": 1, "name": "User 1"}


async def test_replace_dependencies_while_running(memory_url: str) -> None:
    async with (
        ServiceRunner([DatabaseService, UserService], broker=memory_url) as runner,
        connect(memory_url) as cluster,
    ):
        greeting = cluster.rpc.user_service.get_user_greeting
        assert await greeting(2) == "Hello, User 2!"
        db = replace_dependencies(runner.containers["user_service"], "db")
        db.get_user.return_value = {"id": 2, "name": "Mock"}
        assert await greeting(2) == "Hello, Mock!"


async def test_replace_dependencies_with_values(memory_url: str) -> None:
    runner = ServiceRunner([SignupService], broker=memory_url)
    container = runner.containers["signup_service"]
    dispatch, db, clock = replace_dependencies(
        container, "dispatch", "db", clock=Clock(), dsn="postgres://test/db"
    )[:3]
    assert isinstance(dispatch, AsyncMock) and isinstance(db, AsyncMock)
    assert isinstance(clock, Clock)  # Dependency(Clock) needs no provider once replaced
    async with runner, connect(memory_url) as cluster:
        assert await cluster.rpc.signup_service.where() == "postgres://test/db"
        await cluster.rpc.signup_service.signup("ada@example.com")
    dispatch.assert_awaited_once_with("user.created", {"email": "ada@example.com"})


def test_replace_dependencies_rejects_unknown_names(memory_url: str) -> None:
    runner = ServiceRunner([UserService], broker=memory_url)
    with pytest.raises(KeyError, match="cache"):
        replace_dependencies(runner.containers["user_service"], "cache")
    with pytest.raises(KeyError, match="cache"):
        replace_dependencies(runner.containers["user_service"], cache=object())

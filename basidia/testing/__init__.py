"""Testing Basidia services: a unittest case, pytest fixtures and Nameko's helpers, async.

* ``ServiceTestCase``: hosts ``services`` on a private memory broker; ``self.rpc``.
* ``worker_factory(Service, **deps)``: a service instance with mocked dependencies.
* ``entrypoint_hook(container, "method")``: call an entrypoint directly.
* ``entrypoint_waiter(container, "handler")``: wait until an entrypoint has run.
* ``replace_dependencies(container, "db", ...)``: swap dependencies for mocks.

The pytest fixtures (``basidia_runner``, ``basidia_rpc``...) live in
``basidia.testing.plugin``, loaded automatically when Basidia is installed.
"""

from __future__ import annotations

import asyncio
import os
import unittest
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar
from unittest.mock import AsyncMock, MagicMock

from basidia.container import ServiceContainer
from basidia.context import CallContext
from basidia.dependencies import (
    ConfigDependency,
    Dependency,
    DependencyProvider,
    EventDispatcher,
    declared_dependencies,
)
from basidia.rpc import ClusterProxy
from basidia.runner import Cluster, ServiceRunner, connect
from basidia.service import Service

__all__ = [
    "EntrypointResult",
    "ServiceTestCase",
    "entrypoint_hook",
    "entrypoint_waiter",
    "replace_dependencies",
    "fixture_broker_url",
    "unique_memory_url",
    "worker_factory",
]

#: The broker the fixtures and ``ServiceTestCase`` use when set (``basidia test --broker``).
TEST_BROKER_ENV = "BASIDIA_TEST_BROKER"


def unique_memory_url() -> str:
    """A memory broker nobody else uses, so tests cannot see each other's messages."""
    return f"memory://test-{uuid.uuid4().hex[:12]}"


def fixture_broker_url() -> str:
    """The broker of the fixtures: ``BASIDIA_TEST_BROKER`` (``basidia test --broker``) when
    set, else a private memory broker."""
    return os.environ.get(TEST_BROKER_ENV) or unique_memory_url()


class ServiceTestCase(unittest.IsolatedAsyncioTestCase):
    """Runs ``services`` for each test on a private memory broker (or ``broker``).

    ``self.rpc`` calls them, ``self.dispatch`` publishes events, ``self.runner``
    and ``self.container(name)`` give access to the running services.
    """

    services: ClassVar[Sequence[type[Service]]] = ()
    broker: ClassVar[str | None] = None
    config: ClassVar[Mapping[str, Any]] = {}

    runner: ServiceRunner
    cluster: Cluster
    rpc: ClusterProxy

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        url = self.broker or fixture_broker_url()
        # Remote errors carry their tracebacks in tests, and a service that fails to start
        # fails the test, unless ``config`` says otherwise.
        config = {"remote_tracebacks": True, "fail_fast": True, **self.config}
        self.runner = ServiceRunner(self.services, broker=url, config=config)
        await self.runner.start()
        self.addAsyncCleanup(self.runner.stop)
        self.cluster = connect(url, config=self.config)
        await self.cluster.start()
        self.addAsyncCleanup(self.cluster.close)
        self.rpc = self.cluster.rpc

    async def dispatch(self, event: str, data: Any) -> str:
        """Publish an event to the services under test; return its idempotency key."""
        return await self.cluster.dispatch(event, data)

    def container(self, name: str) -> ServiceContainer:
        """The running container of service ``name``."""
        return self.runner.containers[name]


def _mock_for(provider: DependencyProvider) -> Any:
    if isinstance(provider, Dependency) and isinstance(provider.target, str):
        return AsyncMock(name=f"{provider.attr_name} (RPC proxy to {provider.target})")
    if isinstance(provider, EventDispatcher):
        return AsyncMock(name=f"{provider.attr_name} (event dispatcher)")
    if isinstance(provider, ConfigDependency):
        return provider.default
    return MagicMock(name=provider.attr_name)


def worker_factory(service_cls: type[Service], **dependencies: Any) -> Any:
    """An instance of ``service_cls`` whose dependencies are mocks, or the values given.

    RPC proxies and event dispatchers become ``AsyncMock``s, so
    ``service.db.get_user.return_value = {...}`` and
    ``service.dispatch.assert_awaited_with(...)`` work; config values take the
    declared default.
    """
    declared = declared_dependencies(service_cls)
    unknown = set(dependencies) - set(declared)
    if unknown:
        raise TypeError(f"{service_cls.__qualname__} has no dependencies {sorted(unknown)}")
    instance = service_cls()
    for name, provider in declared.items():
        instance.__dict__[name] = (
            dependencies[name] if name in dependencies else _mock_for(provider)
        )
    return instance


def replace_dependencies(container: ServiceContainer, *names: str, **values: Any) -> Any:
    """Replace dependencies of ``container`` with mocks (``names``) or values (``values``).

    Returns the replacement for a single dependency, else a tuple in ``names``
    order followed by ``values`` order.  Call before or while the service runs.
    """
    replacements: list[Any] = []
    for name in names:
        if name not in container.dependencies:
            raise KeyError(f"{container.service_name} has no dependency {name!r}")
        mock = _mock_for(container.dependencies[name])
        container.replace_dependency(name, mock)
        replacements.append(mock)
    for name, value in values.items():
        container.replace_dependency(name, value)
        replacements.append(value)
    return replacements[0] if len(replacements) == 1 else tuple(replacements)


@asynccontextmanager
async def entrypoint_hook(
    container: ServiceContainer, name: str
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Yield a function that runs entrypoint ``name`` of a running container directly
    (dependencies, context and middleware as for a real call, no broker)."""
    if name not in container.service_cls.__entrypoints__:
        raise KeyError(f"{container.service_name} has no entrypoint {name!r}")

    async def hook(*args: Any, **kwargs: Any) -> Any:
        return await container.call_entrypoint(name, *args, **kwargs)

    yield hook


@dataclass
class EntrypointResult:
    """An entrypoint call: what it returned or raised, with its arguments and context."""

    result: Any = None
    exception: BaseException | None = None
    args: tuple[Any, ...] = ()
    context: CallContext | None = None


@asynccontextmanager
async def entrypoint_waiter(
    container: ServiceContainer,
    name: str,
    *,
    timeout: float = 5.0,
    callback: Callable[[EntrypointResult], bool] | None = None,
) -> AsyncIterator[EntrypointResult]:
    """On leaving the block, wait until entrypoint ``name`` has completed a call.

    ``callback`` can reject calls (return False) to wait for a particular one; it sees
    the call's result, exception, arguments and context.
    Raises ``TimeoutError`` if no matching call completes within ``timeout``.
    """
    if name not in container.service_cls.__entrypoints__:
        raise KeyError(f"{container.service_name} has no entrypoint {name!r}")
    outcome = EntrypointResult()
    done = asyncio.Event()

    def observe(
        ctx: CallContext, args: tuple[Any, ...], exc: BaseException | None, result: Any
    ) -> None:
        if ctx.entrypoint != name or done.is_set():
            return
        candidate = EntrypointResult(result, exc, args, ctx)
        if callback is None or callback(candidate):
            outcome.result, outcome.exception = result, exc
            outcome.args, outcome.context = args, ctx
            done.set()

    container._observers.append(observe)
    try:
        yield outcome
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{container.service_name}.{name} did not complete within {timeout} s"
            ) from None
    finally:
        container._observers.remove(observe)

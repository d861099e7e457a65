"""Dependency providers: what a service instance gets injected as attributes.

A provider is declared as a class attribute of a service.  Each container binds
its own copy (``bind``), sets it up when the service starts, injects its value
into every service instance, and stops it when the service stops.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from basidia.errors import ConfigError
from basidia.resilience.breaker import Breaker, Bulkhead, GuardedProxy, RpcRetry, guard_for

if TYPE_CHECKING:
    from basidia.container import ServiceContainer
    from basidia.context import CallContext

__all__ = [
    "ConfigDependency",
    "Dependency",
    "DependencyProvider",
    "EventDispatcher",
    "provides",
]

T = TypeVar("T")
ProviderFactory = Callable[..., AsyncIterator[Any]]

#: Factories registered with ``@provides``, by the type they provide.
_FACTORIES: dict[type, ProviderFactory] = {}


def declared_dependencies(service_cls: type) -> dict[str, DependencyProvider]:
    """The dependency providers a service class declares, inherited ones included."""
    found: dict[str, DependencyProvider] = {}
    for klass in reversed(service_cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, DependencyProvider):
                found[name] = value
    return found


class DependencyProvider:
    """Base class of dependency providers (Nameko's DependencyProvider, async).

    Override ``setup``/``stop`` for resources and ``get_dependency`` for the value
    injected.  With ``per_call = False`` (the default) ``get_dependency`` is
    called once after ``setup`` and its value reused for every call; set it to
    True for values that depend on the call (``ctx``).
    """

    per_call: ClassVar[bool] = False
    attr_name: str = ""
    container: ServiceContainer

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr_name = name

    def bind(self, container: ServiceContainer) -> DependencyProvider:
        """A copy of this declaration for one container."""
        bound = copy.copy(self)
        bound.container = container
        return bound

    async def setup(self) -> None:
        """Acquire resources before the service starts consuming."""

    async def stop(self) -> None:
        """Release resources after the service has stopped consuming and drained."""

    def get_dependency(self, ctx: CallContext | None) -> Any:
        """The value injected into service instances."""
        raise NotImplementedError

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        raise AttributeError(
            f"{self.attr_name!r} is injected only into service instances that a container "
            "creates; in tests use basidia.testing.worker_factory"
        )


def provides(kind: type[T]) -> Callable[[ProviderFactory], ProviderFactory]:
    """Register an async generator as the provider of ``kind`` for ``Dependency(kind)``.

    The generator may take the service's ``Config``; it yields the value and
    cleans up after the yield::

        @provides(Database)
        async def database(config):
            db = await Database.connect(config["database.url"])
            yield db
            await db.close()
    """

    def register(factory: ProviderFactory) -> ProviderFactory:
        if not inspect.isasyncgenfunction(factory):
            raise TypeError("@provides decorates an async generator function (use yield)")
        _FACTORIES[kind] = factory
        return factory

    return register


class Dependency(DependencyProvider):
    """``Dependency("service_name")``: an RPC proxy; ``Dependency(SomeType)``: a provided value.

    An RPC proxy's calls inherit the deadline of the call being handled; ``timeout``
    caps each call (default: config ``rpc_timeout``).  They go through a circuit breaker,
    a bulkhead and safe retries, one set per (calling service, target service), set by
    the ``breaker_*``, ``bulkhead_*`` and ``rpc_retry_*`` config keys or here (``False``
    turns one off); ``idempotent`` (True, or the names of methods) allows retrying calls
    that may have reached the target (docs/resilience.md).
    """

    def __init__(
        self,
        target: str | type,
        *,
        timeout: float | None = None,
        breaker: Breaker | bool | None = None,
        bulkhead: Bulkhead | bool | None = None,
        retry: RpcRetry | bool | None = None,
        idempotent: bool | Collection[str] = False,
    ) -> None:
        if not isinstance(target, (str, type)):
            raise TypeError("Dependency takes a service name or a type")
        self.target = target
        self.timeout = timeout
        self.guard_options: dict[str, Any] = {
            "breaker": breaker,
            "bulkhead": bulkhead,
            "retry": retry,
            "idempotent": idempotent if isinstance(idempotent, bool) else frozenset(idempotent),
        }
        self._value: Any = None
        self._manager: AbstractAsyncContextManager[Any] | None = None

    def __repr__(self) -> str:
        target = self.target if isinstance(self.target, str) else self.target.__qualname__
        return f"Dependency({target!r})"

    async def setup(self) -> None:
        container = self.container
        if isinstance(self.target, str):
            runtime = container.runtime
            guard = guard_for(
                container,
                container.service_name,
                self.target,
                runtime.settings,
                **self.guard_options,
            )
            self._value = GuardedProxy(runtime.client, self.target, self.timeout, guard)
            return
        factory = container.runtime.providers.get(self.target) or _FACTORIES.get(self.target)
        if factory is None:
            raise ConfigError(
                f"no provider for {self.target.__qualname__} (needed by "
                f"{container.service_name}.{self.attr_name}); register one with "
                f"@basidia.provides({self.target.__qualname__})"
            )
        args = (container.runtime.config,) if inspect.signature(factory).parameters else ()
        self._manager = asynccontextmanager(factory)(*args)
        self._value = await self._manager.__aenter__()

    async def stop(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            await manager.__aexit__(None, None, None)

    def get_dependency(self, ctx: CallContext | None) -> Any:
        return self._value


class ConfigDependency(DependencyProvider):
    """A configuration value, by dotted key: ``ConfigDependency("database.url")``."""

    def __init__(self, key: str, default: Any = None) -> None:
        self.key = key
        self.default = default

    def __repr__(self) -> str:
        return f"ConfigDependency({self.key!r})"

    def get_dependency(self, ctx: CallContext | None) -> Any:
        return self.container.runtime.config.get(self.key, self.default)


class EventDispatcher(DependencyProvider):
    """Publishes events from a service: ``await self.dispatch("user.created", data)``."""

    def get_dependency(self, ctx: CallContext | None) -> Any:
        return self.container.runtime.publisher.bound(self.container.service_name)

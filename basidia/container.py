"""The container: runs one service, from broker deliveries to handler calls and replies."""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from basidia._deadlines import HandlerWatchdog
from basidia._speedups import Frame, Kind
from basidia._tasks import current_task_getter
from basidia._version import __version__
from basidia.brokers.base import EndpointStats, ServiceInfo, Subscription
from basidia.context import CallContext, current_call
from basidia.dependencies import declared_dependencies
from basidia.errors import MethodNotFound, ServiceUnavailable
from basidia.log import ThrottledLog
from basidia.middleware import Middleware, handle_chain
from basidia.service import Entrypoint, Service

if TYPE_CHECKING:
    from basidia.brokers.base import Broker
    from basidia.config import Config, Settings
    from basidia.dependencies import DependencyProvider, ProviderFactory
    from basidia.events import EventPublisher
    from basidia.rpc import RpcClient

__all__ = ["Observer", "Runtime", "ServiceContainer", "State"]

#: Called after every entrypoint call with (context, arguments, exception, result).
Observer = Callable[[CallContext, tuple[Any, ...], "BaseException | None", Any], None]

logger = logging.getLogger("basidia.container")


class State(enum.StrEnum):
    """Lifecycle of a container: INITIALIZED → STARTING → RUNNING → STOPPING → STOPPED, and
    ERROR (with the reason in ``ServiceContainer.error``) when a start fails; a STOPPED or
    ERROR service can start again (docs/operations.md)."""

    INITIALIZED = "INITIALIZED"
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    ERROR = "ERROR"


@dataclass
class Runtime:
    """What the containers of one runner share: one broker connection and its clients."""

    broker: Broker
    client: RpcClient
    publisher: EventPublisher
    config: Config
    settings: Settings
    providers: Mapping[type, ProviderFactory] = field(default_factory=dict)
    middleware: Sequence[Middleware] = ()
    #: Called with a container whenever its state changes (the service directory).
    on_state_change: Callable[[ServiceContainer], None] | None = None
    #: The entrypoint groups containers serve (``Entrypoint.group``); None: all of them.
    #: ``basidia worker`` serves ``events`` and ``timers`` only.
    groups: frozenset[str] | None = None


@dataclass
class ContainerStats:
    """Counters an operator can read (management API, health, ``$SRV.STATS``)."""

    handled: int = 0
    errors: int = 0
    expired: int = 0
    malformed: int = 0
    dead_lettered: int = 0
    #: Events acknowledged without running the handler: their idempotency key was handled.
    duplicates: int = 0
    last_error: str = ""
    processing_time: float = 0.0


class ServiceContainer:
    """Runs one service class: its dependencies, subscriptions and in-flight calls."""

    def __init__(self, service_cls: type[Service], runtime: Runtime) -> None:
        self.service_cls = service_cls
        self.service_name = service_cls.service_name()
        self.runtime = runtime
        settings = runtime.settings
        self.max_workers = service_cls.max_workers or settings.max_workers
        self._state = State.INITIALIZED
        self.error: BaseException | None = None
        self.stats = ContainerStats()
        self.started_at = 0.0
        # The entrypoints by kind: each kind attaches itself (``Entrypoint.attach``).
        self._kinds: dict[type[Entrypoint], list[Entrypoint]] = {}
        for entrypoint in service_cls.__entrypoints__.values():
            if runtime.groups is None or entrypoint.group in runtime.groups:
                self._kinds.setdefault(type(entrypoint), []).append(entrypoint)
        #: Per RPC method: requests, errors, time (``$SRV.STATS``), filled by the RPC kind.
        self.endpoint_stats: dict[str, EndpointStats] = {}
        declarations = declared_dependencies(service_cls)
        self.dependencies: dict[str, DependencyProvider] = {
            name: declaration.bind(self) for name, declaration in declarations.items()
        }
        self._injections: dict[str, Any] = {}
        self._per_call: list[tuple[str, DependencyProvider]] = []
        self._replaced: dict[str, Any] = {}
        self._set_up: list[str] = []
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        # The running task, read for every call (``track``); bound to the loop at start.
        self._current_task: Callable[[], asyncio.Task[Any] | None] = asyncio.current_task
        self._drained: asyncio.Event | None = None
        self._handle = handle_chain(runtime.middleware, self._run_handler)
        self._observers: list[Observer] = []
        #: Bad input (malformed frames, unusable reply addresses, unsendable replies) is
        #: logged once per kind per interval, and counted (``stats.malformed``).
        self.bad_input = ThrottledLog(logger)
        self._limit: asyncio.Semaphore | None = None
        self._watchdog = HandlerWatchdog()

    def __repr__(self) -> str:
        return f"<ServiceContainer {self.service_name} {self.state.value}>"

    @property
    def state(self) -> State:
        """Where the service is in its lifecycle."""
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self._state = state
        notify = self.runtime.on_state_change
        if notify is not None:
            notify(self)

    @property
    def entrypoints(self) -> dict[str, list[str]]:
        """The names of the entrypoints this container serves, by group."""
        found: dict[str, list[str]] = {}
        for group in self._kinds.values():
            for entrypoint in group:
                found.setdefault(entrypoint.group, []).append(entrypoint.name)
        return found

    @property
    def in_flight(self) -> int:
        """Calls being handled right now."""
        return len(self._tasks)

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Set up dependencies, then start consuming; ERROR (and re-raise) on failure."""
        if self.state not in (State.INITIALIZED, State.STOPPED, State.ERROR):
            raise RuntimeError(f"cannot start {self.service_name}: it is {self.state.value}")
        self.state = State.STARTING
        self.error = None
        self._current_task = current_task_getter(asyncio.get_running_loop())
        try:
            for name, provider in self.dependencies.items():
                if name not in self._replaced:
                    await provider.setup()
                    self._set_up.append(name)
            self._injections = dict(self._replaced)
            self._per_call = []
            for name, provider in self.dependencies.items():
                if name in self._replaced:
                    continue
                if provider.per_call:
                    self._per_call.append((name, provider))
                else:
                    self._injections[name] = provider.get_dependency(None)
            sources = sum(kind.sources(group) for kind, group in self._kinds.items())
            # One queue's consumer is bounded by its own concurrency; several sources of
            # calls (queues, HTTP, timers) share a limit.
            self._limit = asyncio.Semaphore(self.max_workers) if sources > 1 else None
            for kind, group in self._kinds.items():
                self._subscriptions += await kind.attach(self, group)
            await self._announce()
        except BaseException as exc:
            self.error = exc
            self.state = State.ERROR
            await self._unsubscribe()
            await self._stop_dependencies()
            raise
        self.started_at = time.time()
        self.state = State.RUNNING
        logger.info("%s is running (%d workers)", self.service_name, self.max_workers)

    async def _announce(self) -> None:
        """Tell the broker about this service (NATS publishes it on ``$SRV``)."""
        await self.runtime.broker.register_service(
            ServiceInfo(
                name=self.service_name,
                version=self.service_cls.version or __version__,
                description=inspect.cleandoc(self.service_cls.__doc__ or ""),
                methods=list(self.endpoint_stats),
                stats=self.endpoint_stats,
            )
        )

    def _withdraw(self) -> None:
        self.runtime.broker.unregister_service(self.service_name)

    async def _unsubscribe(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            try:
                await subscription.cancel()
            except Exception:
                logger.exception("%s: could not cancel a subscription", self.service_name)

    def replace_dependency(self, name: str, value: Any) -> None:
        """Inject ``value`` instead of dependency ``name`` (tests); its provider is not set up."""
        if name not in self.dependencies:
            known = ", ".join(self.dependencies) or "none"
            raise KeyError(f"{self.service_name} has no dependency {name!r} (it has: {known})")
        self._replaced[name] = value
        self._injections[name] = value
        self._per_call = [(n, p) for n, p in self._per_call if n != name]

    async def _stop_dependencies(self) -> None:
        names, self._set_up = self._set_up, []
        for name in reversed(names):
            try:
                await self.dependencies[name].stop()
            except Exception:
                logger.exception("%s: dependency %s failed to stop", self.service_name, name)

    async def stop(self, grace: float | None = None) -> None:
        """Stop consuming, let in-flight calls finish within ``grace`` seconds, cancel the
        rest (their events go back to the broker), then stop the dependencies."""
        if self.state in (State.INITIALIZED, State.STOPPED, State.STOPPING, State.ERROR):
            return  # ERROR: the failed start has already released everything
        if grace is None:
            grace = self.runtime.settings.shutdown_grace
        self.state = State.STOPPING
        self._withdraw()
        await self._unsubscribe()
        if self._tasks:
            logger.info("%s: waiting for %d calls in flight", self.service_name, len(self._tasks))
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                logger.warning(
                    "%s: %d calls still running after %.1f s; cancelling them",
                    self.service_name,
                    len(self._tasks),
                    grace,
                )
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
            finally:
                self._drained = None
        self._watchdog.close()
        await self._stop_dependencies()
        self.state = State.STOPPED
        logger.info("%s stopped", self.service_name)

    # -- calls ---------------------------------------------------------------------

    def make_instance(self, ctx: CallContext | None) -> Service:
        """A service instance with its dependencies injected, for one call."""
        instance = self.service_cls()
        instance.__dict__.update(self._injections)
        for name, provider in self._per_call:
            instance.__dict__[name] = provider.get_dependency(ctx)
        return instance

    async def _run_handler(self, ctx: CallContext, args: tuple[Any, ...]) -> Any:
        """Call the entrypoint's method on a fresh instance (the innermost middleware link)."""
        entrypoint = self.service_cls.__entrypoints__[ctx.entrypoint]
        return await entrypoint.func(self.make_instance(ctx), *args)

    async def handle(
        self,
        ctx: CallContext,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        task: asyncio.Task[Any],
        endpoint: EndpointStats | None = None,
    ) -> Any:
        """Run a handler in ``task`` (this one, tracked): cancelled at its deadline (raising
        ``TimeoutError``), through the middleware when there is any, under the service's
        concurrency limit; counted in ``stats`` (and ``endpoint``, an RPC method's).

        Entrypoint kinds call it for every call they take (docs/architecture.md)."""
        token = current_call.set(ctx)
        watchdog = self._watchdog
        deadline = ctx.deadline
        if deadline:
            watched = watchdog.watched
            outer = watched.get(task)  # a call handled within a call, in one task
            watched[task] = deadline
            if watchdog.timer is None:
                watchdog.arm()
        limit = self._limit
        stats = self.stats
        start = time.perf_counter()
        try:
            if limit is not None:
                await limit.acquire()
            try:
                if self._handle is None:
                    result = await func(self.make_instance(ctx), *args)
                else:
                    result = await self._handle(ctx, args)
            finally:
                if limit is not None:
                    limit.release()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and task in watchdog.expired:
                watchdog.expired.discard(task)
                task.uncancel()
                exc = TimeoutError(f"{ctx.service}.{ctx.entrypoint} passed its deadline")
            stats.errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            if endpoint is not None:
                endpoint.num_errors += 1
                endpoint.last_error = stats.last_error
            if self._observers:
                self._observe(ctx, args, exc, None)
            if isinstance(exc, TimeoutError):
                raise exc from None
            raise
        else:
            if self._observers:
                self._observe(ctx, args, None, result)
            return result
        finally:
            if deadline:
                if outer is None:
                    watched.pop(task, None)  # gone already if its deadline passed
                else:
                    watched[task] = outer
            elapsed = time.perf_counter() - start
            stats.handled += 1
            stats.processing_time += elapsed
            if endpoint is not None:
                endpoint.num_requests += 1
                endpoint.processing_time += int(elapsed * 1e9)
            current_call.reset(token)

    def _observe(
        self, ctx: CallContext, args: tuple[Any, ...], exc: BaseException | None, result: Any
    ) -> None:
        for observer in list(self._observers):
            observer(ctx, args, exc, result)

    def track(self) -> asyncio.Task[Any]:
        """Count this task as work in flight until ``untrack``: from delivery to settlement."""
        task = self._current_task()
        assert task is not None
        self._tasks.add(task)
        return task

    def untrack(self, task: asyncio.Task[Any]) -> None:
        tasks = self._tasks
        tasks.discard(task)
        if not tasks and self._drained is not None:
            self._drained.set()

    # -- direct calls (testing helpers) ----------------------------------------------

    async def call_entrypoint(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run entrypoint ``name`` as if a request or event had arrived, bypassing the broker."""
        entrypoint = self.service_cls.__entrypoints__.get(name)
        if entrypoint is None:
            raise MethodNotFound(f"{self.service_name} has no entrypoint {name!r}")
        if self.state is not State.RUNNING:
            raise ServiceUnavailable(f"{self.service_name} is {self.state.value}")
        timeout = self.runtime.settings.rpc_timeout
        frame = Frame(Kind.REQUEST, 0, f"{self.service_name}.{name}", b"", "direct")
        ctx = CallContext(self.service_name, name, frame, time.time() + timeout)
        return await self.run_call(ctx, entrypoint.func, _bind(entrypoint.func, args, kwargs))

    async def run_call(
        self, ctx: CallContext, func: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        """Run ``func`` (an entrypoint's function) with ``args`` as one call of this service:
        counted in flight, under the service's concurrency limit and ``ctx.deadline``,
        through the middleware.  For entrypoints that do not come through the broker (HTTP)."""
        task = self.track()
        try:
            return await self.handle(ctx, func, args, task)
        finally:
            self.untrack(task)


def _bind(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    signature = inspect.signature(func)
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())[1:]

"""Hosting services (``ServiceRunner``) and calling them from outside (``connect``)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Collection, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from basidia._version import __version__
from basidia._wire import Codec
from basidia.brokers import broker_from_url
from basidia.brokers.base import Broker
from basidia.brokers.mixed import MixedBroker
from basidia.config import Config, Settings
from basidia.container import Runtime, ServiceContainer, State
from basidia.dependencies import ProviderFactory
from basidia.directory import Directory, Instance
from basidia.events import EventPublisher
from basidia.middleware import Middleware
from basidia.rpc import ClusterProxy, RpcClient
from basidia.service import Service
from basidia.telemetry import instrumentation_for

__all__ = ["Cluster", "ServiceRunner", "connect"]

logger = logging.getLogger("basidia.runner")


def _config(config: Config | Mapping[str, Any] | None) -> Config:
    if isinstance(config, Config):
        return config
    return Config(config or {})


class _Connection:
    """A broker connection with an RPC client and an event publisher on it."""

    def __init__(
        self,
        broker: str | Broker | None,
        config: Config,
        timeout: float | None,
        middleware: Sequence[Middleware],
        event_broker: str | Broker | None = None,
        services: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.settings: Settings = config.settings
        # Traces and metrics, when telemetry is on: outermost middleware (docs/observability.md).
        self.telemetry = instrumentation_for(config, middleware, services)
        if self.telemetry is not None and self.telemetry not in middleware:
            middleware = [self.telemetry, *middleware]
        self.middleware = list(middleware)
        if broker is None:
            broker = self.settings.broker
        self.broker = (
            broker_from_url(broker, self.settings.broker_options)
            if isinstance(broker, str)
            else broker
        )
        if event_broker is None:
            event_broker = self.settings.event_broker or None
        if event_broker is not None and event_broker != broker:
            # RPC on one broker, events on another (docs/brokers.md).
            events = (
                broker_from_url(event_broker, self.settings.event_broker_options)
                if isinstance(event_broker, str)
                else event_broker
            )
            self.broker = MixedBroker(self.broker, events)
        codec = Codec(self.settings.serializer)
        self.client = RpcClient(
            self.broker,
            timeout=timeout or self.settings.rpc_timeout,
            codec=codec,
            max_frame_size=self.settings.max_frame_size,
            middleware=middleware,
        )
        self.publisher = EventPublisher(self.broker, codec, self.settings.max_frame_size)
        self.publisher.telemetry = self.telemetry
        self.rpc = ClusterProxy(self.client)
        #: The services hosted on this connection (a runner's), by name.
        self.containers: dict[str, ServiceContainer] = {}
        if self.telemetry is not None:
            self.telemetry.attach(self.containers, self.broker)
        # The service directory travels on the RPC broker, as the NATS service API does:
        # it tells who answers calls (docs/operations.md).
        self._rpc_broker = self.broker.rpc if isinstance(self.broker, MixedBroker) else self.broker
        self.directory = Directory(
            self._rpc_broker,
            heartbeat=self.settings.directory_heartbeat,
            expiry=self.settings.directory_expiry,
        )

    async def open(self) -> None:
        await self.broker.connect()
        try:
            await self.client.start()
            self.broker.directory = self._rpc_broker.directory = self.directory
            if not self._rpc_broker.reports_no_responders:
                # The broker cannot say "no responders": the directory tells instead.
                await self.directory.watch()
        except BaseException:
            await self.directory.close(leave=False)
            await self.broker.close()
            raise

    async def close(self) -> None:
        await self.directory.close()
        await self.client.close()
        await self.broker.close()
        if self.telemetry is not None:
            await self.telemetry.detach(self.containers)


def _service_name(service: Any) -> str:
    return (
        service.service_name() if isinstance(service, type) and issubclass(service, Service) else ""
    )


class _Client:
    """What a runner and a standalone client both offer over their connection."""

    _connection: _Connection

    @property
    def broker(self) -> Broker:
        """The broker connection."""
        return self._connection.broker

    @property
    def rpc(self) -> ClusterProxy:
        """``rpc.<service>.<method>(...)`` for any service on the broker."""
        return self._connection.rpc

    async def dispatch(
        self,
        event: str,
        data: Any,
        *,
        idempotency_key: str | None = None,
        version: int | None = None,
        key: str | None = None,
    ) -> str:
        """Publish an event (of schema ``version``, docs/events.md); return its
        idempotency key once the broker has it.  Events of one ``key`` are handled in
        order where the broker partitions (Kafka)."""
        return await self._connection.publisher.publish(
            event, data, idempotency_key=idempotency_key, version=version, key=key
        )

    @property
    def directory(self) -> Directory:
        """This process's part in the service directory (docs/operations.md)."""
        return self._connection.directory

    async def services(self, wait: float = 1.0) -> list[Instance]:
        """Every service instance on the broker, from the service directory: the first
        call gives the processes ``wait`` seconds to answer (``basidia services``)."""
        return await self._connection.directory.snapshot(wait)


class ServiceRunner(_Client):
    """Hosts services on one shared broker connection.

    ``broker`` is a URL (``memory://``, ``amqp://...``, ``nats://...``, ``redis://...``,
    ``kafka://...``) or a ``Broker``; by default it comes from the config (``broker``),
    else the in-process memory broker.  ``event_broker`` (or the config's
    ``event_broker``) puts events on another broker than RPC.  A service that fails to
    start is left in ERROR while the others run, unless ``fail_fast`` (default: the
    ``fail_fast`` setting).  ``groups`` limits the entrypoints served to those groups
    (``basidia worker``: ``{"events", "timers"}``).
    """

    def __init__(
        self,
        services: Iterable[type[Service]] = (),
        broker: str | Broker | None = None,
        *,
        config: Config | Mapping[str, Any] | None = None,
        providers: Mapping[type, ProviderFactory] | None = None,
        middleware: Sequence[Middleware] = (),
        event_broker: str | Broker | None = None,
        fail_fast: bool | None = None,
        groups: Collection[str] | None = None,
    ) -> None:
        self.config = _config(config)
        services = list(services)
        self.providers = dict(providers or {})
        self._connection = _Connection(
            broker,
            self.config,
            None,
            middleware,
            event_broker,
            [_service_name(s) for s in services],
        )
        self.middleware = self._connection.middleware
        self.fail_fast = self._connection.settings.fail_fast if fail_fast is None else fail_fast
        self.runtime = Runtime(
            broker=self._connection.broker,
            client=self._connection.client,
            publisher=self._connection.publisher,
            config=self.config,
            settings=self._connection.settings,
            providers=self.providers,
            middleware=self.middleware,
            on_state_change=self._state_changed,
            groups=None if groups is None else frozenset(groups),
        )
        self.containers = self._connection.containers
        for service in services:
            self.add_service(service)
        self._started = False

    def __repr__(self) -> str:
        names = ", ".join(self.containers)
        return f"<ServiceRunner [{names}] on {self.broker.safe_url}>"

    def add_service(self, service: type[Service]) -> ServiceContainer:
        """Host ``service`` too; start it with ``start`` (or ``start_service`` once running)."""
        if not (isinstance(service, type) and issubclass(service, Service)):
            raise TypeError(f"{service!r} is not a Service subclass")
        name = service.service_name()
        if name in self.containers:
            raise ValueError(f"two services are named {name!r}")
        container = self.containers[name] = ServiceContainer(service, self.runtime)
        return container

    def _state_changed(self, container: ServiceContainer) -> None:
        self._connection.directory.changed()

    def _instances(self) -> list[Instance]:
        """This runner's services as the directory announces them."""
        directory = self._connection.directory
        return [
            Instance(
                service=name,
                instance=directory.process,
                host=directory.host,
                pid=directory.pid,
                version=container.service_cls.version or __version__,
                state=container.state.value,
                error=_reason(container.error) if container.error is not None else "",
                entrypoints=container.entrypoints,
                broker=self.broker.safe_url,
                started_at=container.started_at,
            )
            for name, container in self.containers.items()
        ]

    async def start(self) -> None:
        """Connect and start every service.  One that fails to start stays in ERROR (its
        reason logged) while the others run; with ``fail_fast``, or when none starts, the
        others are stopped and the error is raised."""
        if self._started:
            return
        await self._connection.open()
        self._started = True
        self._connection.directory.announce(self._instances)
        failed: list[BaseException] = []
        try:
            for container in self.containers.values():
                try:
                    await container.start()
                except Exception as exc:
                    if self.fail_fast:
                        raise
                    failed.append(exc)
                    logger.error(
                        "%s failed to start and is in ERROR, the other services run: %s",
                        container.service_name,
                        _reason(exc),
                    )
            if failed and len(failed) == len(self.containers):
                raise failed[0]
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "running %d service(s) on %s: %s",
            len(self.containers),
            self.broker.safe_url,
            ", ".join(self.containers) or "none",
        )

    async def start_service(self, name: str) -> None:
        """Start one stopped service."""
        await self.containers[name].start()

    async def stop_service(self, name: str, grace: float | None = None) -> None:
        """Stop one service (its consumers go; in-flight calls finish)."""
        await self.containers[name].stop(grace)

    async def restart_service(self, name: str, grace: float | None = None) -> None:
        """Stop one service (draining its calls within ``grace``), then start it again;
        the other services keep serving meanwhile."""
        await self.containers[name].stop(grace)
        await self.containers[name].start()

    async def stop(self, grace: float | None = None) -> None:
        """Stop consuming everywhere, drain in-flight calls within ``grace``, disconnect."""
        if not self._started:
            return
        self._started = False
        await asyncio.gather(
            *(c.stop(grace) for c in self.containers.values() if c.state is not State.STOPPED),
            return_exceptions=True,
        )
        await self._connection.close()

    async def __aenter__(self) -> ServiceRunner:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(
        self, stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Start, serve until one of ``stop_signals`` arrives, then stop gracefully."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        installed = []
        for sig in stop_signals:
            try:
                loop.add_signal_handler(sig, stopping.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
                pass
        try:
            await self.start()
            await stopping.wait()
            logger.info("stopping: finishing calls in flight")
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()


class Cluster(_Client):
    """A standalone client: ``async with connect(url) as cluster: await cluster.rpc.svc.m()``."""

    def __init__(
        self,
        broker: str | Broker | None = None,
        *,
        config: Config | Mapping[str, Any] | None = None,
        timeout: float | None = None,
        middleware: Sequence[Middleware] = (),
        event_broker: str | Broker | None = None,
    ) -> None:
        self._connection = _Connection(
            broker, _config(config), timeout, list(middleware), event_broker
        )

    async def start(self) -> Cluster:
        """Connect (``async with`` does this for you)."""
        await self._connection.open()
        return self

    async def close(self) -> None:
        """Disconnect; calls still waiting fail with ``ConnectionLost``."""
        await self._connection.close()

    async def __aenter__(self) -> Cluster:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def connect(
    broker: str | Broker | None = None,
    *,
    config: Config | Mapping[str, Any] | None = None,
    timeout: float | None = None,
    middleware: Sequence[Middleware] = (),
    event_broker: str | Broker | None = None,
) -> Cluster:
    """A client for the services on ``broker``; use it with ``async with``.
    ``event_broker`` publishes events to another broker than RPC's."""
    return Cluster(
        broker, config=config, timeout=timeout, middleware=middleware, event_broker=event_broker
    )

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

import msgspec

from basidia._deadlines import HandlerWatchdog
from basidia._speedups import (
    FLAG_JSON,
    HARD_MAX_FRAME_SIZE,
    Frame,
    Kind,
    decode_frame,
    encode_frame,
)
from basidia._version import __version__
from basidia.brokers.base import Delivery, EventSubscription, Subscription, error_reply
from basidia.context import CallContext, current_call
from basidia.dependencies import declared_dependencies
from basidia.errors import (
    BrokerError,
    FrameError,
    MessageTooLarge,
    MethodNotFound,
    RemoteError,
    RpcError,
    ServiceUnavailable,
    ValidationError,
)
from basidia.log import ThrottledLog, shorten
from basidia.middleware import Middleware, handle_chain
from basidia.service import EventHandler, HttpEndpoint, Rpc, Service

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

# Frame kinds as plain ints: comparing with IntEnum members costs a Python-level call.
_REQUEST, _REPLY, _EVENT = int(Kind.REQUEST), int(Kind.REPLY), int(Kind.EVENT)
_msgpack_encode = msgspec.msgpack.Encoder().encode
_json_encode = msgspec.json.Encoder().encode
# Reply addresses already checked with the broker (callers' inboxes repeat); bounded.
_MAX_KNOWN_REPLY_ADDRESSES = 1024


class State(enum.StrEnum):
    """Lifecycle of a container: STOPPED → STARTING → RUNNING → STOPPING → STOPPED, or ERROR."""

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


@dataclass
class ContainerStats:
    """Counters an operator can read (management API, health, ``$SRV.STATS``)."""

    handled: int = 0
    errors: int = 0
    expired: int = 0
    malformed: int = 0
    dead_lettered: int = 0
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
        self.state = State.STOPPED
        self.error: BaseException | None = None
        self.stats = ContainerStats()
        self.started_at = 0.0
        entrypoints = service_cls.__entrypoints__
        self.rpc_entrypoints = {e.name: e for e in entrypoints.values() if isinstance(e, Rpc)}
        self.event_entrypoints = [e for e in entrypoints.values() if isinstance(e, EventHandler)]
        self.http_entrypoints = [e for e in entrypoints.values() if isinstance(e, HttpEndpoint)]
        declarations = declared_dependencies(service_cls)
        self.dependencies: dict[str, DependencyProvider] = {
            name: declaration.bind(self) for name, declaration in declarations.items()
        }
        self._injections: dict[str, Any] = {}
        self._per_call: list[tuple[str, DependencyProvider]] = []
        self._replaced: dict[str, Any] = {}
        self._rpc_routes: dict[str, tuple[Callable[..., Any], Callable[[bytes, int], Any]]] = {}
        self._set_up: list[str] = []
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._drained: asyncio.Event | None = None
        self._handle = handle_chain(runtime.middleware, self._run_handler)
        self._observers: list[Observer] = []
        self._max_frame_size = settings.max_frame_size
        self._reply_addresses: set[str] = set()
        #: Bad input (malformed frames, unusable reply addresses, unsendable replies) is
        #: logged once per kind per interval, and counted (``stats.malformed``).
        self.bad_input = ThrottledLog(logger)
        self._limit: asyncio.Semaphore | None = None
        self._watchdog = HandlerWatchdog()

    def __repr__(self) -> str:
        return f"<ServiceContainer {self.service_name} {self.state.value}>"

    @property
    def in_flight(self) -> int:
        """Calls being handled right now."""
        return len(self._tasks)

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Set up dependencies, then start consuming; ERROR (and re-raise) on failure."""
        if self.state not in (State.STOPPED, State.ERROR):
            raise RuntimeError(f"cannot start {self.service_name}: it is {self.state.value}")
        self.state = State.STARTING
        self.error = None
        try:
            # Type hints are resolved now, not on the first call.
            self._rpc_routes = {
                name: (entrypoint.func, entrypoint.spec.decode)
                for name, entrypoint in self.rpc_entrypoints.items()
            }
            for handler in self.event_entrypoints:
                handler.decoders()
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
            groups = (
                (1 if self.rpc_entrypoints else 0)
                + len(self.event_entrypoints)
                + (1 if self.http_entrypoints else 0)
            )
            # One queue's consumer is bounded by its own concurrency; several sources of
            # calls (queues, HTTP) share a limit.
            self._limit = asyncio.Semaphore(self.max_workers) if groups > 1 else None
            await self._subscribe()
            await self._announce()
        except BaseException as exc:
            self.state = State.ERROR
            self.error = exc
            await self._unsubscribe()
            await self._stop_dependencies()
            raise
        self.started_at = time.time()
        self.state = State.RUNNING
        logger.info("%s is running (%d workers)", self.service_name, self.max_workers)

    async def _subscribe(self) -> None:
        broker = self.runtime.broker
        if self.rpc_entrypoints:
            self._subscriptions.append(
                await broker.serve_requests(
                    self.service_name, self._on_request, concurrency=self.max_workers
                )
            )
        for handler in self.event_entrypoints:
            subscription = EventSubscription(
                handler.event,
                f"{self.service_name}.{handler.name}",
                broadcast=handler.broadcast,
                durable=handler.durable,
            )

            async def on_event(delivery: Delivery, _handler: EventHandler = handler) -> None:
                await self._on_event(_handler, delivery)

            self._subscriptions.append(
                await broker.subscribe_events(subscription, on_event, concurrency=self.max_workers)
            )

    async def _announce(self) -> None:
        """Tell brokers that publish a service directory (NATS ``$SRV``) about this service."""
        register = getattr(self.runtime.broker, "register_service_info", None)
        if register is None:
            return
        await register(
            self.service_name,
            version=self.service_cls.version or __version__,
            endpoints=list(self.rpc_entrypoints),
            description=inspect.cleandoc(self.service_cls.__doc__ or ""),
            metadata={},
        )

    def _withdraw(self) -> None:
        unregister = getattr(self.runtime.broker, "unregister_service_info", None)
        if unregister is not None:
            unregister(self.service_name)

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
        if self.state in (State.STOPPED, State.STOPPING, State.ERROR):
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

    async def _handle_call(
        self,
        ctx: CallContext,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        task: asyncio.Task[Any],
    ) -> Any:
        """Run a handler in ``task`` (this one, tracked): cancelled at its deadline (raising
        ``TimeoutError``), through the middleware when there is any."""
        token = current_call.set(ctx)
        watchdog = self._watchdog
        watched = watchdog.watch(task, ctx.deadline) if ctx.deadline else None
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
            if watched is not None:
                watched.discard(task)
            stats.handled += 1
            stats.processing_time += time.perf_counter() - start
            current_call.reset(token)

    def _observe(
        self, ctx: CallContext, args: tuple[Any, ...], exc: BaseException | None, result: Any
    ) -> None:
        for observer in list(self._observers):
            observer(ctx, args, exc, result)

    def _track(self) -> asyncio.Task[Any]:
        """Count this task as work in flight until ``_untrack``: from delivery to settlement."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        return task

    def _untrack(self, task: asyncio.Task[Any]) -> None:
        tasks = self._tasks
        tasks.discard(task)
        if not tasks and self._drained is not None:
            self._drained.set()

    async def _on_request(self, delivery: Delivery) -> None:
        task = self._track()
        try:
            body = delivery.body
            frame = self._accept_request(body)
            if frame is not None:
                if len(body) > self._max_frame_size:
                    size = f"a request of {len(body)} bytes"
                    reply: bytes | None = self._error_body(
                        frame,
                        MessageTooLarge(
                            f"{size} exceeds {self.service_name}'s frame limit "
                            f"of {self._max_frame_size} bytes"
                        ),
                    )
                else:
                    reply = await self._answer(frame, task)
                if reply is not None and frame.reply_to:
                    await self._send_reply(frame, reply)
        except asyncio.CancelledError:
            await delivery.nack(requeue=True)  # shutdown: another instance takes it
            raise
        except Exception:  # a bug: still settle the delivery, or it holds a slot forever
            logger.exception("%s: a request failed unexpectedly", self.service_name)
            await delivery.ack()
        else:
            await delivery.ack()
        finally:
            self._untrack(task)

    async def _send_reply(self, frame: Frame, body: bytes) -> None:
        try:
            await self.runtime.broker.send_reply(frame.reply_to, body)
        except BrokerError as exc:
            # The caller fails at its deadline or on its own disconnect; nothing to retry.
            self.bad_input.log(
                logging.WARNING,
                "reply not sent",
                "%s: could not answer %s: %s",
                self.service_name,
                shorten(frame.target, 200),
                shorten(str(exc)),
            )

    def _reject(self, kind: str, detail: str) -> None:
        self.stats.malformed += 1
        self.bad_input.log(
            logging.ERROR, kind, "%s: rejected %s: %s", self.service_name, kind, shorten(detail)
        )

    def _accept_request(self, body: bytes) -> Frame | None:
        """The request frame in ``body``; None (logged, counted) if it must be dropped.

        A well-formed request over the service's frame limit (but under the hard
        ceiling) is accepted, so that its caller gets ``MessageTooLarge`` rather than a
        timeout; the handler never runs for it.
        """
        try:
            frame = decode_frame(body, self._max_frame_size)
        except FrameError as exc:
            oversized = self._oversized_request(body)
            if oversized is None:
                # Without a frame there is no trustworthy reply address: log, count, drop.
                self._reject("a malformed request frame", str(exc))
                return None
            frame = oversized
        if frame.kind != _REQUEST:
            self._reject("a frame of another kind on the request queue", _kind(frame))
            return None
        reply_to = frame.reply_to
        if reply_to and reply_to not in self._reply_addresses:
            problem = self.runtime.broker.reply_to_problem(reply_to)
            if problem is not None:
                self._reject("a request with an unusable reply address", problem)
                return None
            if len(self._reply_addresses) >= _MAX_KNOWN_REPLY_ADDRESSES:
                self._reply_addresses.clear()
            self._reply_addresses.add(reply_to)
        if frame.deadline and frame.deadline <= time.time() * 1000:
            self.stats.expired += 1
            logger.debug("%s: dropped an expired request for %s", self.service_name, frame.target)
            return None
        return frame

    def _oversized_request(self, body: bytes) -> Frame | None:
        if not self._max_frame_size < len(body) <= HARD_MAX_FRAME_SIZE:
            return None
        try:
            return decode_frame(body, HARD_MAX_FRAME_SIZE)
        except FrameError:
            return None

    async def _answer(self, frame: Frame, task: asyncio.Task[Any]) -> bytes | None:
        """The reply or error frame for a request; None when the caller has given up."""
        method = frame.target.rpartition(".")[2]
        route = self._rpc_routes.get(method)
        if route is None:
            return self._error_body(
                frame, MethodNotFound(f"{self.service_name} has no RPC method {method!r}")
            )
        func, decode_args = route
        try:
            args = decode_args(frame.payload, frame.flags)
        except ValidationError as exc:
            return self._error_body(frame, exc)
        ctx = CallContext(self.service_name, method, frame, frame.deadline / 1000.0)
        try:
            result = await self._handle_call(ctx, func, args, task)
        except TimeoutError:
            return None  # the caller has timed out too: nobody waits for an answer
        except RpcError as exc:
            return self._error_body(frame, exc)
        except Exception as exc:
            logger.warning(
                "%s.%s raised %s: %s",
                self.service_name,
                method,
                type(exc).__name__,
                shorten(str(exc)),
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            return self._error_body(frame, RemoteError(type(exc).__name__, str(exc)))
        return self._reply_body(frame, result)

    def _reply_body(self, frame: Frame, result: Any) -> bytes:
        # A reply must fit this service's frame limit and what the broker carries.
        limit = min(self._max_frame_size, self.runtime.broker.max_body_size)
        try:
            flags = frame.flags
            payload = _json_encode(result) if flags & FLAG_JSON else _msgpack_encode(result)
            return encode_frame(
                Frame(
                    _REPLY,
                    frame.correlation_id,
                    "",
                    payload,
                    "",
                    0,
                    {},
                    frame.flags & FLAG_JSON,
                ),
                limit,
            )
        except FrameError as exc:
            message = f"the result of {frame.target} cannot be sent: {exc}"
            self.bad_input.log(logging.ERROR, "reply too large", "%s", message)
            return self._error_body(frame, MessageTooLarge(message))
        except (TypeError, msgspec.EncodeError, RecursionError) as exc:
            message = f"the result of {frame.target} cannot be sent: {exc}"
            logger.error("%s", message)
            return self._error_body(frame, RemoteError(type(exc).__name__, message))

    def _error_body(self, frame: Frame, exc: RpcError) -> bytes:
        # error_reply keeps a RemoteError's original type, as if the caller had called the
        # raising service directly, and cuts long messages so the frame always fits.
        return error_reply(frame.correlation_id, exc, frame.target)

    async def _on_event(self, handler: EventHandler, delivery: Delivery) -> None:
        task = self._track()
        try:
            await self._serve_event(handler, delivery, task)
        finally:
            self._untrack(task)

    async def _serve_event(
        self, handler: EventHandler, delivery: Delivery, task: asyncio.Task[Any]
    ) -> None:
        try:
            frame = decode_frame(delivery.body, self._max_frame_size)
            if frame.kind != _EVENT:
                raise FrameError(f"expected an event frame, got {_kind(frame)}")
        except FrameError as exc:
            self._reject(f"a malformed event frame for {handler.name}", str(exc))
            await self._dead_letter(delivery, f"malformed frame: {exc}")
            return
        msgpack_decode, json_decode = handler.decoders()
        try:
            data = (json_decode if frame.flags & FLAG_JSON else msgpack_decode)(frame.payload)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            self._reject(f"invalid event data for {handler.name}", str(exc))
            await self._dead_letter(delivery, f"invalid event data: {exc}")
            return
        attempts = handler.max_attempts or self.runtime.settings.event_max_attempts
        if delivery.attempt > attempts:
            # Redelivered past its attempts without a verdict: the process handling it
            # died each time.  Stop the crash loop here.
            logger.error(
                "%s.%s: event delivered %d times without completing; dead-lettering it",
                self.service_name,
                handler.name,
                delivery.attempt,
            )
            await self._dead_letter(
                delivery, f"delivered {delivery.attempt} times without completing"
            )
            return
        ctx = CallContext(self.service_name, handler.name, frame, 0.0, delivery.attempt)
        try:
            await self._handle_call(ctx, handler.func, (data,), task)
        except asyncio.CancelledError:
            await delivery.nack(requeue=True)  # shutdown: another instance takes it
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if delivery.attempt < attempts:
                logger.warning(
                    "%s.%s failed (attempt %d of %d), will retry: %s",
                    self.service_name,
                    handler.name,
                    delivery.attempt,
                    attempts,
                    reason,
                )
                await delivery.nack(requeue=True)
            else:
                logger.error(
                    "%s.%s failed %d times; dead-lettering the event: %s",
                    self.service_name,
                    handler.name,
                    delivery.attempt,
                    reason,
                )
                await self._dead_letter(delivery, reason)
        else:
            await delivery.ack()

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.stats.dead_lettered += 1
        await delivery.dead_letter(reason)

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
        task = self._track()
        try:
            return await self._handle_call(ctx, func, args, task)
        finally:
            self._untrack(task)


def _bind(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    signature = inspect.signature(func)
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())[1:]


def _kind(frame: Frame) -> str:
    try:
        return Kind(frame.kind).name.lower()
    except ValueError:
        return f"kind {frame.kind}"

"""How the broker entrypoints serve their deliveries: RPC requests and events.

``Rpc.attach`` and ``EventHandler.attach`` (``basidia.service``) start these on a
container; the container itself knows no entrypoint kind (docs/architecture.md).
A request is decoded, checked, handled and answered; an event is decoded, handled,
retried or dead-lettered.  Every delivery is settled, whatever happens on the way
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from basidia._speedups import CompiledRequestHandler, Frame, Kind, decode_frame
from basidia._wire import decode_over_limit, error_reply, reply_frame
from basidia.brokers.base import (
    Delivery,
    EndpointStats,
    EventSubscription,
    Failure,
    Subscription,
)
from basidia.config import dedup_off
from basidia.context import CALL_STACK_HEADER, IDEMPOTENCY_HEADER, CallContext
from basidia.errors import (
    BrokerError,
    FrameError,
    MessageTooLarge,
    MethodNotFound,
    RateLimited,
    RemoteError,
    RpcError,
    ValidationError,
)
from basidia.log import shorten
from basidia.resilience.dedup import Claim, acquire, release_store
from basidia.resilience.ratelimit import RateLimiter
from basidia.resilience.retry import Retry
from basidia.versioning import EventVersionError

if TYPE_CHECKING:
    from basidia.container import ServiceContainer
    from basidia.service import EventHandler, Rpc

__all__ = ["RequestServer", "serve_events"]

logger = logging.getLogger("basidia.container")

# Frame kinds as plain ints: comparing with IntEnum members costs a Python-level call.
_REQUEST, _EVENT = int(Kind.REQUEST), int(Kind.EVENT)
# Reply addresses already checked with the broker (callers' inboxes repeat); bounded.
_MAX_KNOWN_REPLY_ADDRESSES = 1024

# The settlement a delivery does not need: its class does not override it.
_NOTHING_TO_ACK = Delivery.ack

_Route = tuple[Callable[..., Any], Callable[[Frame], Any], EndpointStats, RateLimiter | None]


def _kind(frame: Frame) -> str:
    try:
        return Kind(frame.kind).name.lower()
    except ValueError:
        return f"kind {frame.kind}"


def _reject(container: ServiceContainer, kind: str, detail: str) -> None:
    """Count and log (throttled) a message dropped as bad input."""
    container.stats.malformed += 1
    container.bad_input.log(
        logging.ERROR, kind, "%s: rejected %s: %s", container.service_name, kind, shorten(detail)
    )


def _caller(frame: Frame) -> str:
    """Who makes a call, for per-client rate limits: the calling service, or the process
    (its reply inbox) for a call from outside any service."""
    stack = frame.headers.get(CALL_STACK_HEADER)
    if stack:
        return stack.rpartition(" ")[2].partition(".")[0]
    return frame.reply_to


class RequestServer:
    """Serves the request queue of one service: one consumer for all its RPC methods."""

    def __init__(self, container: ServiceContainer, methods: Sequence[Rpc]) -> None:
        self.container = container
        self._name = container.service_name
        self._broker = container.runtime.broker
        self._max_frame_size = container.runtime.settings.max_frame_size
        # A reply must fit this frame limit and what the broker carries (NATS: the
        # max_payload of the server it is connected to when the service starts).
        self._reply_limit = min(self._max_frame_size, self._broker.max_body_size)
        self._tracebacks = container.runtime.settings.remote_tracebacks
        self._track, self._untrack = container.track, container.untrack
        self._handle = container.handle
        self._reply_addresses: set[str] = set()
        # Type hints are resolved now, not on the first call.
        self._routes: dict[str, _Route] = {}
        for method in methods:
            stats = container.endpoint_stats.setdefault(method.name, EndpointStats())
            limiter = None if method.rate_limit is None else RateLimiter(method.rate_limit)
            self._routes[method.name] = (method.func, method.spec.decode, stats, limiter)

    async def start(self) -> Subscription:
        """Consume the service's request queue."""
        container = self.container
        # The compiled core serves with a C twin of on_request, which hands it what is
        # not on the straight line (basidia/_speedups/_calls_c.pyx).
        handler = (
            self.on_request if CompiledRequestHandler is None else CompiledRequestHandler(self)
        )
        return await self._broker.serve_requests(
            self._name, handler, concurrency=container.max_workers
        )

    async def on_request(self, delivery: Delivery) -> None:
        # One coroutine from delivery to reply: a layer of ``await`` costs as much as a
        # frame's decoding, so the steps around the handler are plain calls.
        task = self._track()
        try:
            body = delivery.body
            frame = self._accept(body)
            if frame is not None:
                call = self._prepare(frame, len(body))
                if isinstance(call, bytes):
                    reply: bytes | None = call
                else:
                    ctx, func, args, stats = call
                    try:
                        result = await self._handle(ctx, func, args, task, stats)
                    except TimeoutError:
                        reply = None  # the caller has timed out too: nobody waits
                    except Exception as exc:
                        reply = self._failure_body(frame, exc)
                    else:
                        reply = self._reply_body(frame, result)
                if reply is not None and frame.reply_to:
                    try:
                        broker = self._broker
                        if not broker.send_reply_now(frame.reply_to, reply):
                            await broker.send_reply(frame.reply_to, reply)
                    except BrokerError as exc:
                        self._reply_not_sent(frame, exc)
        except asyncio.CancelledError:
            await delivery.nack(requeue=True)  # shutdown: another instance takes it
            raise
        except Exception:  # a bug: still settle the delivery, or it holds a slot forever
            logger.exception("%s: a request failed unexpectedly", self._name)
            await delivery.ack()
        else:
            if type(delivery).ack is not _NOTHING_TO_ACK:
                await delivery.ack()
        finally:
            self._untrack(task)

    def _reply_not_sent(self, frame: Frame, exc: BrokerError) -> None:
        # The caller fails at its deadline or on its own disconnect; nothing to retry.
        self.container.bad_input.log(
            logging.WARNING,
            "reply not sent",
            "%s: could not answer %s: %s",
            self._name,
            shorten(frame.target, 200),
            shorten(str(exc)),
        )

    def _accept(self, body: bytes) -> Frame | None:
        """The request frame in ``body``; None (logged, counted) if it must be dropped.

        A well-formed request over the service's frame limit (but under the hard
        ceiling) is accepted, so that its caller gets ``MessageTooLarge`` rather than a
        timeout; the handler never runs for it.
        """
        try:
            frame = decode_frame(body, self._max_frame_size)
        except FrameError as exc:
            oversized = decode_over_limit(body, self._max_frame_size)
            if oversized is None:
                # Without a frame there is no trustworthy reply address: log, count, drop.
                _reject(self.container, "a malformed request frame", str(exc))
                return None
            frame = oversized
        if frame.kind != _REQUEST:
            _reject(self.container, "a frame of another kind on the request queue", _kind(frame))
            return None
        reply_to = frame.reply_to
        if reply_to and reply_to not in self._reply_addresses:
            problem = self._broker.reply_to_problem(reply_to)
            if problem is not None:
                _reject(self.container, "a request with an unusable reply address", problem)
                return None
            if len(self._reply_addresses) >= _MAX_KNOWN_REPLY_ADDRESSES:
                self._reply_addresses.clear()
            self._reply_addresses.add(reply_to)
        if frame.deadline and frame.deadline <= time.time() * 1000:
            self.container.stats.expired += 1
            logger.debug("%s: dropped an expired request for %s", self._name, frame.target)
            return None
        return frame

    def _prepare(
        self, frame: Frame, size: int
    ) -> bytes | tuple[CallContext, Callable[..., Any], tuple[Any, ...], EndpointStats]:
        """What the handler is called with, or the error reply when it must not be:
        a frame over the service's limit, an unknown method, the rate limit, arguments
        that do not validate."""
        if size > self._max_frame_size:
            return self._error_body(
                frame,
                MessageTooLarge(
                    f"a request of {size} bytes exceeds {self._name}'s frame "
                    f"limit of {self._max_frame_size} bytes"
                ),
            )
        method = frame.target.rpartition(".")[2]
        route = self._routes.get(method)
        if route is None:
            return self._error_body(
                frame, MethodNotFound(f"{self._name} has no RPC method {method!r}")
            )
        func, decode_args, stats, limiter = route
        if limiter is not None:
            wait = limiter.take(_caller(frame))
            if wait:
                stats.num_requests += 1
                stats.num_errors += 1
                limited = RateLimited(f"{self._name}.{method}: rate limit reached", wait)
                return self._error_body(frame, limited)
        try:
            args = decode_args(frame)
        except ValidationError as exc:
            stats.num_requests += 1
            stats.num_errors += 1
            stats.last_error = f"ValidationError: {shorten(exc.message, 200)}"
            return self._error_body(frame, exc)
        return CallContext(self._name, method, frame, frame.deadline / 1000.0), func, args, stats

    def _failure_body(self, frame: Frame, exc: Exception) -> bytes:
        """The error reply for a handler that raised ``exc``."""
        if isinstance(exc, RpcError):
            return self._error_body(frame, exc)
        logger.warning(
            "%s.%s raised %s: %s",
            self._name,
            frame.target.rpartition(".")[2],
            type(exc).__name__,
            shorten(str(exc)),
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )
        trace = traceback.format_exc() if self._tracebacks else None
        return self._error_body(frame, RemoteError(type(exc).__name__, str(exc), trace))

    def _reply_body(self, frame: Frame, result: Any) -> bytes:
        try:
            return reply_frame(frame, result, self._reply_limit)
        except FrameError as exc:
            message = f"the result of {frame.target} cannot be sent: {exc}"
            self.container.bad_input.log(logging.ERROR, "reply too large", "%s", message)
            return self._error_body(frame, MessageTooLarge(message))
        except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
            message = f"the result of {frame.target} cannot be sent: {exc}"
            logger.error("%s", message)
            return self._error_body(frame, RemoteError(type(exc).__name__, message))

    def _error_body(self, frame: Frame, exc: RpcError) -> bytes:
        # error_reply keeps a RemoteError's original type, as if the caller had called the
        # raising service directly, and cuts long messages so the frame always fits.
        return error_reply(frame.correlation_id, exc, frame.target)


async def serve_events(container: ServiceContainer, handler: EventHandler) -> Subscription:
    """Consume the events of ``handler`` in ``container``'s service."""
    subscription = EventSubscription(
        handler.event,
        f"{container.service_name}.{handler.name}",
        broadcast=handler.broadcast,
        durable=handler.durable,
    )
    server = _EventServer(container, handler)
    try:
        subscribed = await container.runtime.broker.subscribe_events(
            subscription, server.on_event, concurrency=container.max_workers
        )
    except BaseException:
        await server.close()
        raise
    return _Closing(subscribed, server.close)


class _Closing(Subscription):
    """A subscription that releases what its handler holds (a deduplication store) once
    cancelled."""

    def __init__(self, subscription: Subscription, close: Callable[[], Awaitable[None]]) -> None:
        self._subscription = subscription
        self._close = close

    async def cancel(self) -> None:
        try:
            await self._subscription.cancel()
        finally:
            await self._close()


class _EventServer:
    """Handles the events of one handler: decode, handle, then ack, retry or dead-letter."""

    def __init__(self, container: ServiceContainer, handler: EventHandler) -> None:
        self.container = container
        self.handler = handler
        settings = container.runtime.settings
        self._max_frame_size = settings.max_frame_size
        self._decode = handler.decoder.decode
        self.policy = (handler.retry or Retry()).resolve(settings, handler.max_attempts)
        self._group = f"{container.service_name}.{handler.name}"
        # A broadcast handler runs in every instance: each keeps its own keys.
        self._scope = f"{self._group}:{uuid.uuid4().hex[:12]}" if handler.broadcast else self._group
        self._broker = container.runtime.broker
        self._dedup_spec = settings.dedup_store if handler.dedup is not False else "off"
        if handler.dedup and dedup_off(self._dedup_spec):
            self._dedup_spec = "memory"  # asked for by the handler, off in config
        self.dedup = acquire(
            self._broker, self._dedup_spec, window=settings.dedup_window, lease=settings.dedup_lease
        )

        self._in_flight = 0
        self._closing = False

    async def close(self) -> None:
        """Let go of the deduplication store, once the handlers still running (a stop
        drains them after cancelling the subscription) have finished."""
        self._closing = True
        if not self._in_flight:
            await self._release_store()

    async def _release_store(self) -> None:
        if self.dedup is not None:
            self.dedup = None
            await release_store(self._broker, self._dedup_spec)

    async def on_event(self, delivery: Delivery) -> None:
        container = self.container
        task = container.track()
        self._in_flight += 1
        try:
            await self._serve(delivery, task)
        finally:
            self._in_flight -= 1
            try:
                if self._closing and not self._in_flight:
                    await self._release_store()
            finally:
                container.untrack(task)  # a stop waits for this, the store's release included

    async def _serve(self, delivery: Delivery, task: asyncio.Task[Any]) -> None:
        container, handler = self.container, self.handler
        name = container.service_name
        try:
            frame = decode_frame(delivery.body, self._max_frame_size)
            if frame.kind != _EVENT:
                raise FrameError(f"expected an event frame, got {_kind(frame)}")
        except FrameError as exc:
            _reject(container, f"a malformed event frame for {handler.name}", str(exc))
            await self._dead_letter(delivery, f"malformed frame: {exc}", "")
            return
        try:
            data = self._decode(frame)
        except EventVersionError as exc:  # only handlers that declare versions raise it
            _reject(container, f"an event version {handler.name} does not accept", str(exc))
            await self._dead_letter(delivery, str(exc), "")
            return
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            _reject(container, f"invalid event data for {handler.name}", str(exc))
            await self._dead_letter(delivery, f"invalid event data: {exc}", "")
            return
        policy = self.policy
        attempts = policy.max_attempts
        if delivery.attempt > attempts:
            # Redelivered past its attempts without a verdict: the process handling it
            # died each time.  Stop the crash loop here.
            logger.error(
                "%s.%s: event delivered %d times without completing; dead-lettering it",
                name,
                handler.name,
                delivery.attempt,
            )
            await self._dead_letter(
                delivery, f"delivered {delivery.attempt} times without completing", ""
            )
            return
        key = frame.headers.get(IDEMPOTENCY_HEADER, "") if self.dedup is not None else ""
        if key and not await self._claim(delivery, key):
            return
        ctx = CallContext(name, handler.name, frame, 0.0, delivery.attempt)
        try:
            await container.handle(ctx, handler.func, (data,), task)
        except asyncio.CancelledError:
            await self._release(key)
            await delivery.nack(requeue=True)  # shutdown: another instance takes it
            raise
        except Exception as exc:
            await self._release(key)
            reason = f"{type(exc).__name__}: {exc}"
            retryable = policy.retryable(exc)
            if delivery.attempt < attempts and retryable:
                delay = policy.delay_after(delivery.attempt)
                logger.warning(
                    "%s.%s failed (attempt %d of %d), will retry in %.3g s: %s",
                    name,
                    handler.name,
                    delivery.attempt,
                    attempts,
                    delay,
                    shorten(reason),
                )
                await delivery.nack(requeue=True, delay=delay)
            else:
                logger.error(
                    "%s.%s failed %s; dead-lettering the event: %s",
                    name,
                    handler.name,
                    f"{delivery.attempt} times" if retryable else "and cannot be retried",
                    shorten(reason),
                )
                await self._dead_letter(delivery, reason, type(exc).__name__)
        else:
            if key:
                await self._complete(key)
            await delivery.ack()

    async def _claim(self, delivery: Delivery, key: str) -> bool:
        """Claim ``key`` in the deduplication store; False when the delivery was settled
        here (a duplicate: acked if done, retried later if another handler holds it)."""
        assert self.dedup is not None
        try:
            claim = await self.dedup.claim(self._scope, key)
        except BrokerError as exc:
            # No store, no promise: retry later rather than risk running twice.
            logger.warning("%s: %s; the event comes back later", self._group, exc)
            await delivery.nack(requeue=True, delay=self.policy.delay_after(1))
            return False
        if claim is Claim.NEW:
            return True
        self.container.stats.duplicates += 1
        if claim is Claim.DONE:
            logger.debug("%s: dropped a duplicate of event %s", self._group, shorten(key, 100))
            await delivery.ack()
        else:  # another delivery of the same event is being handled right now
            await delivery.nack(requeue=True, delay=self.policy.delay_after(1))
        return False

    async def _complete(self, key: str) -> None:
        dedup = self.dedup
        if dedup is None:  # closed while the handler ran (shutdown): the ack settles it
            return
        try:
            await dedup.complete(self._scope, key)
        except BrokerError as exc:
            logger.warning("%s: could not remember a handled event: %s", self._group, exc)

    async def _release(self, key: str) -> None:
        if key and self.dedup is not None:
            try:
                await self.dedup.release(self._scope, key)
            except BrokerError as exc:  # the claim lapses after dedup_lease
                logger.warning("%s: %s", self._group, exc)

    async def _dead_letter(self, delivery: Delivery, reason: str, exception: str) -> None:
        """Park the event; ``exception`` is the handler's exception type, "" when the
        failure was not the handler's."""
        self.container.stats.dead_lettered += 1
        failure = Failure(reason, exception, self.container.service_name, self.handler.name)
        await delivery.dead_letter(failure)

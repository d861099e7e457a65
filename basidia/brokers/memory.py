"""The in-memory broker: Basidia's embedded default.

Every ``MemoryBroker`` with the same URL on the same event loop shares one
hub, so services, runners and ``connect()`` clients of one process find each
other.  Frames go through the same codec as on a network broker; only the
transport is a queue.  Durable event groups keep their queue while no member
runs, as a durable queue would on RabbitMQ.  Dead letters are ``DeadLetter`` records
kept by the hub (``MemoryBroker.dead_letters``); a repeat publish of an idempotency key
within 120 s is dropped, as JetStream drops it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import itertools
import logging
import time
import types
import weakref
from asyncio.tasks import _enter_task, _leave_task
from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import Any

from basidia._speedups import CompiledMemoryReplier, CompiledMemorySender, future_factory
from basidia._tasks import current_task_getter
from basidia.brokers._common import RecentKeys, WorkerPool, redact_url
from basidia.brokers.base import (
    Broker,
    DeadLetter,
    Delivery,
    DeliveryHandler,
    EventSubscription,
    Failure,
    InboxHandler,
    Subscription,
    make_dead_letter,
)
from basidia.errors import BrokerError, ConfigError, ServiceUnavailable

__all__ = ["DeadLetter", "MemoryBroker"]

logger = logging.getLogger("basidia.brokers.memory")

#: Seconds a published idempotency key is remembered (JetStream's default window).
DUPLICATE_WINDOW = 120.0
#: Requests a hub hands over in the sender's task per loop iteration (see ``_Queue``).
EAGER_BUDGET = 64
#: Requests handed over in the sender's task within one another, at most (a service
#: calling another in its first step, which calls another...).
EAGER_DEPTH = 8


class _RequestDelivery(Delivery):
    """A request: settlement is meaningless in memory, so it costs nothing."""

    __slots__ = ()

    def __init__(self, body: bytes) -> None:
        self.body = body


class _EventDelivery(Delivery):
    """An event: a retry is a new delivery carrying the attempt and the first failure."""

    __slots__ = ("_attempt", "_first_failure", "_queue", "_settled")

    def __init__(
        self, body: bytes, queue: _Queue, attempt: int = 1, first_failure: float = 0.0
    ) -> None:
        self.body = body
        self._queue = queue
        self._attempt = attempt
        self._first_failure = first_failure
        self._settled = False

    @property
    def attempt(self) -> int:
        return self._attempt

    async def ack(self) -> None:
        self._settled = True

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        if self._settled:
            return
        self._settled = True
        if requeue:
            first_failure = self._first_failure or time.time()
            retry = _EventDelivery(self.body, self._queue, self._attempt + 1, first_failure)
            if delay > 0:
                # A timer, not a sleeping worker: other events keep flowing meanwhile.
                self._queue.put_later(delay, retry)
            else:
                self._queue.put(retry)

    async def dead_letter(self, failure: Failure) -> None:
        if self._settled:
            return
        self._settled = True
        queue = self._queue
        letter = make_dead_letter(
            failure,
            event=queue.event,
            group=queue.group,
            attempts=self._attempt,
            frame=self.body,
            first_failure=self._first_failure,
        )
        hub = queue.hub
        hub.dead_letters.append(dataclasses.replace(letter, id=str(next(hub.ids))))


#: What a worker's runner yields once a handler has finished (``_runner``).
_DONE = object()


@types.coroutine
def _runner(pool: _MemorySubscription) -> Generator[Any, Any, None]:
    """Runs the handler coroutines sent to it, one after the other, passing on what
    they yield (the futures they wait for), and yields ``_DONE`` after each.

    Driving a coroutine from outside with ``send`` costs a ``StopIteration`` when it
    returns, as much as the rest of the hand-off; a handler run by ``yield from``
    inside this generator returns without one.  One per worker, reused."""
    handler = yield None
    while True:
        try:
            yield from handler
        except Exception:  # the framework settles and logs its own errors: a bug
            pool.log_failure()
        handler = yield _DONE


class _Started:
    """A request whose handler began in the sender's task and then suspended: the
    worker whose identity it ran under awaits the rest (``_Queue.run_eagerly``)."""

    __slots__ = ("cancelled", "runner", "yielded")

    def __init__(self, runner: Generator[Any, Any, None], yielded: Any) -> None:
        #: The worker's runner, inside the handler (on the compiled core, the handler
        #: itself: it ends with ``StopIteration``, the runner never does).
        self.runner = runner
        #: What the handler's first step yielded: the future it waits for (or None).
        self.yielded = yielded
        #: True when the worker was cancelled before it took over: the handler gets it.
        self.cancelled = False

    def __await__(self) -> Generator[Any, Any, None]:
        runner = self.runner
        try:
            yielded = runner.throw(asyncio.CancelledError()) if self.cancelled else self.yielded
            while yielded is not _DONE:
                try:
                    value = yield yielded
                except BaseException as exc:  # cancellation and the like: the handler's
                    yielded = runner.throw(exc)
                else:
                    yielded = runner.send(value)
        except StopIteration:  # the compiled core's hand-off runs the handler itself
            return


class _Worker:
    """What a queue needs to run a delivery as one of a subscription's idle workers."""

    __slots__ = ("context", "handle", "pool", "runner", "task")

    def __init__(
        self,
        task: asyncio.Task[None],
        context: contextvars.Context,
        handle: DeliveryHandler,
        pool: _MemorySubscription,
    ) -> None:
        self.task = task
        self.context = context
        self.handle = handle
        self.pool = pool
        self.runner = _runner(pool)
        self.runner.send(None)


class _Queue:
    """A named queue with competing consumers.

    Leaner than ``asyncio.Queue`` (pure Python, several calls per item): a
    delivery goes straight to a waiting consumer's future when there is one.

    One consumer is woken at a time: while a woken consumer has not run yet, what
    arrives is queued, and that consumer, once it runs, wakes the next one if more
    is queued (then takes from the queue without waiting).  A burst of deliveries
    costs two wake-ups, not one each, when handlers finish without suspending;
    when they suspend, each woken consumer still passes the rest on at once.

    A request queue (``eager``) hands a request to an idle worker without waking it
    when it can: the handler's first step runs at once, in the sender's task but as
    that worker (its task is the current one, its context the context), as
    Python 3.12's eager tasks start a task.  An echo-like handler finishes in that
    step, so its reply is in the caller's reply router before the caller would wait
    for it: the round trip costs no task switch at all (docs/memory.md#the-hand-off).  A
    handler that suspends is handed to the worker, which awaits the rest.  Only idle
    workers are borrowed, so ``max_workers`` holds; at most ``EAGER_BUDGET``
    requests per loop iteration go this way, so that callers in a loop still let
    the loop run.
    """

    def __init__(
        self, hub: _Hub, name: str, event: str = "", group: str = "", *, eager: bool = False
    ) -> None:
        self.hub = hub
        self.name = name
        self.event = event
        #: The consumer group (a broadcast queue's name adds the instance to it).
        self.group = group or name
        self.eager = eager
        self.items: deque[Delivery] = deque()
        self.waiters: deque[tuple[asyncio.Future[Any], _Worker | None]] = deque()
        # Queues live on one loop (hubs are per loop): bind its future factory once.
        self._loop = asyncio.get_running_loop()
        self._create_future = future_factory(self._loop)
        self._current_task = current_task_getter(self._loop)
        self.consumers = 0
        # Consumers handed a delivery that have not run yet.
        self._woken = 0

    def empty(self) -> bool:
        return not self.items

    def put_later(self, delay: float, delivery: Delivery) -> None:
        """``put`` after ``delay`` seconds (a retry's backoff)."""
        self._loop.call_later(delay, self.put, delivery)

    def put(self, delivery: Delivery) -> None:
        if self.eager and not self.items and self.waiters and self.run_eagerly(delivery):
            return
        self.items.append(delivery)
        if not self._woken:
            self._wake_next()

    def run_eagerly(self, delivery: Delivery) -> bool:
        """Run ``delivery``'s handler as an idle worker, now (see the class); False when
        it cannot (no idle worker, out of budget, nested too deep)."""
        hub = self.hub
        if hub.eager_budget <= 0 or hub.eager_depth >= EAGER_DEPTH:
            return False
        waiters = self.waiters
        while waiters:
            waiter, worker = waiters.pop()  # the worker idle last: its memory is warm
            if worker is not None and not waiter.done():
                break
            if not waiter.done():  # a consumer that cannot be borrowed: leave it
                waiters.append((waiter, worker))
                return False
        else:
            return False
        hub.eager_budget -= 1
        if not hub.eager_budget:
            self._loop.call_soon(hub.refill)
        loop = self._loop
        task = worker.task
        current = self._current_task()
        if current is not None:
            _leave_task(loop, current)
        _enter_task(loop, task)
        hub.eager_depth += 1
        try:
            try:
                yielded = worker.context.run(worker.runner.send, worker.handle(delivery))
            except asyncio.CancelledError:
                # The handler let a cancellation out: the worker ends, as it would have.
                waiters.append((waiter, worker))
                task.cancel()
                return True
            if yielded is _DONE:
                waiters.append((waiter, worker))  # idle again
                return True
        finally:
            hub.eager_depth -= 1
            _leave_task(loop, task)
            if current is not None:
                _enter_task(loop, current)
        # Suspended: from now on the worker is busy with it.
        worker.pool.busy(task)
        self._woken += 1
        waiter.set_result(_Started(worker.runner, yielded))
        return True

    def _wake_next(self) -> None:
        """Hand the first queued delivery to a waiting consumer, if there is one."""
        items, waiters = self.items, self.waiters
        while waiters:
            waiter = waiters.popleft()[0]
            if not waiter.done():
                waiter.set_result(items.popleft())
                self._woken += 1
                return

    async def get(self, worker: _Worker | None = None) -> Delivery | _Started:
        items = self.items
        if items:
            return items.popleft()
        waiter: asyncio.Future[Delivery | _Started] = self._create_future()
        self.waiters.append((waiter, worker))
        try:
            delivery = await waiter
        except asyncio.CancelledError:
            # Cancelled after a delivery was handed over: give it back, first in line.
            if waiter.done() and not waiter.cancelled():
                self._woken -= 1
                handed = waiter.result()
                if isinstance(handed, _Started):
                    # Its handler has begun: the cancellation is the handler's to take.
                    handed.cancelled = True
                    if items and not self._woken:
                        self._wake_next()
                    return handed
                items.appendleft(handed)
                if not self._woken:
                    self._wake_next()
            raise
        self._woken -= 1
        if items:
            self._wake_next()
        return delivery


class _MemorySubscription(WorkerPool[Any]):
    """``concurrency`` workers taking deliveries from one queue, shared with the queue's
    other consumers: a cancelled subscription leaves what is queued to them."""

    def __init__(
        self,
        queue: _Queue,
        handler: DeliveryHandler,
        concurrency: int,
        on_cancel: Callable[[], object] | None = None,
    ) -> None:
        where = f"queue {queue.name}"
        super().__init__(queue, handler, concurrency, drain=False, logger=logger, where=where)
        self._queue = queue
        self._on_cancel = on_cancel
        queue.consumers += 1
        self.start_workers()

    def _spawn(self) -> asyncio.Task[None]:
        # The worker's context is known, for the requests run as the worker (_Queue).
        context = contextvars.copy_context()
        return asyncio.get_running_loop().create_task(self._serve(context), context=context)

    async def _serve(self, context: contextvars.Context) -> None:
        """A worker: ``WorkerPool._work`` that also takes over handlers begun as it."""
        task = asyncio.current_task()
        assert task is not None
        queue, handle, idle = self._queue, self._handle, self._idle
        worker = _Worker(task, context, handle, self)
        while not self.stopping:
            idle.add(task)
            try:
                item = await queue.get(worker)
            finally:
                idle.discard(task)
            try:
                if type(item) is _Started:
                    await item
                else:
                    await handle(item)
            except Exception:  # the framework settles and logs its own errors: a bug
                self.log_failure()
        # The others wait on a queue that nothing fills any more.
        self._stop_idle()

    def busy(self, task: asyncio.Task[None]) -> None:
        """``task`` holds a handler begun in another task: not idle, even before it runs."""
        self._idle.discard(task)

    def log_failure(self) -> None:
        self._logger.exception("delivery handler failed on %s", self.where)

    async def cancel(self) -> None:
        if self.stopping:
            return
        self._queue.consumers -= 1
        await self._stop()
        if self._on_cancel is not None:
            self._on_cancel()


class _Hub:
    """Queues, inboxes and dead letters shared by the brokers of one URL on one loop."""

    def __init__(self) -> None:
        self.requests: dict[str, _Queue] = {}
        self.groups: dict[str, dict[str, _Queue]] = {}
        self.inboxes: dict[str, InboxHandler] = {}
        self.dead_letters: list[DeadLetter] = []
        self.ids = itertools.count(1)
        #: Idempotency keys published lately, by any broker of the hub.
        self.recent_keys = RecentKeys(DUPLICATE_WINDOW)
        #: Requests left to run in their sender's task this loop iteration (``_Queue``).
        self.eager_budget = EAGER_BUDGET
        #: Requests running in their sender's task within one another right now.
        self.eager_depth = 0

    def refill(self) -> None:
        self.eager_budget = EAGER_BUDGET


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Hub]] = (
    weakref.WeakKeyDictionary()
)


def _hub_for(name: str) -> _Hub:
    loop = asyncio.get_running_loop()
    hubs = _hubs.setdefault(loop, {})
    hub = hubs.get(name)
    if hub is None:
        hub = hubs[name] = _Hub()
    return hub


class MemoryBroker(Broker):
    """In-process broker for ``memory://`` or ``memory://name`` URLs."""

    reports_no_responders = True

    def __init__(self, url: str = "memory://") -> None:
        super().__init__()
        if not url.startswith("memory://"):
            raise ConfigError(
                f"invalid memory URL {redact_url(url)!r}: the scheme must be memory://"
            )
        self.url = self.safe_url = url
        self._name = url[len("memory://") :].strip("/")
        self._hub: _Hub | None = None
        self._subscriptions: list[_MemorySubscription] = []
        self._inboxes: list[str] = []
        if CompiledMemorySender is not None:
            # send_request_now (with put and run_eagerly) and send_reply_now in C
            # (basidia/_speedups/_calls_c.pyx).
            self.send_request_now = CompiledMemorySender(  # type: ignore[method-assign]
                self, MemoryBroker.send_request_now, _RequestDelivery, _Started, EAGER_DEPTH
            )
            self.send_reply_now = CompiledMemoryReplier(  # type: ignore[method-assign]
                self, MemoryBroker.send_reply_now
            )

    def __repr__(self) -> str:
        return f"MemoryBroker({self.safe_url!r})"

    @property
    def connected(self) -> bool:
        return self._hub is not None

    async def dead_letters(self, group: str, *, limit: int = 100) -> list[DeadLetter]:
        """The events of ``group`` parked after their last attempt, oldest first."""
        letters = [letter for letter in self._connected_hub().dead_letters if letter.group == group]
        return letters[: max(0, limit)]

    async def dead_letter_groups(self) -> list[str]:
        return sorted({letter.group for letter in self._connected_hub().dead_letters})

    def _take(self, group: str, ids: Sequence[str] | None) -> list[DeadLetter]:
        """Remove and return ``group``'s dead letters (those in ``ids``, or all)."""
        hub = self._connected_hub()
        wanted = None if ids is None else set(ids)
        taken, kept = [], []
        for letter in hub.dead_letters:
            if letter.group == group and (wanted is None or letter.id in wanted):
                taken.append(letter)
            else:
                kept.append(letter)
        hub.dead_letters = kept
        return taken

    async def replay_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        hub = self._connected_hub()
        letters = self._take(group, ids)
        for letter in letters:
            queues = hub.groups.setdefault(letter.event, {})
            # The group's queue, or each instance's queue of a broadcast group.
            targets = [queue for queue in queues.values() if queue.group == group]
            if not targets:
                targets = [queues.setdefault(group, _Queue(hub, group, letter.event, group))]
            for queue in targets:
                queue.put(_EventDelivery(letter.frame, queue))
        return len(letters)

    async def purge_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        return len(self._take(group, ids))

    def _connected_hub(self) -> _Hub:
        if self._hub is None:
            raise BrokerError(f"{self!r} is not connected")
        return self._hub

    async def connect(self) -> None:
        self._hub = _hub_for(self._name)

    async def close(self) -> None:
        if self._hub is None:
            return
        for address in self._inboxes:
            self._hub.inboxes.pop(address, None)
        self._inboxes.clear()
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            await subscription.aclose()
        self._hub = None

    def _subscribe(
        self,
        queue: _Queue,
        handler: DeliveryHandler,
        concurrency: int,
        on_cancel: Callable[[], object] | None = None,
    ) -> Subscription:
        subscription = _MemorySubscription(queue, handler, concurrency, on_cancel)
        self._subscriptions.append(subscription)
        return subscription

    async def serve_requests(
        self, service: str, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        hub = self._connected_hub()
        queue = hub.requests.get(service)
        if queue is None:
            queue = hub.requests[service] = _Queue(hub, service, eager=True)
        return self._subscribe(queue, handler, concurrency)

    async def send_request(self, service: str, body: bytes, *, correlation_id: int) -> None:
        self.send_request_now(service, body, correlation_id)

    def send_request_now(self, service: str, body: bytes, correlation_id: int) -> bool:
        hub = self._hub
        if hub is None:
            raise BrokerError(f"{self!r} is not connected")
        queue = hub.requests.get(service)
        if queue is None or not queue.consumers:
            raise ServiceUnavailable(
                f"no instance of service {service!r} is running on {self.safe_url}. "
                "Hint: memory:// lives inside one process, so services that another process "
                "runs (basidia run in another terminal) are not seen here: host them in this "
                "process (basidia shell PATH) or give both a network broker "
                "(--broker amqp://... or nats://...)"
            )
        queue.put(_RequestDelivery(body))
        return True

    async def open_inbox(self, handler: InboxHandler) -> str:
        hub = self._connected_hub()
        address = f"inbox.{next(hub.ids)}"
        hub.inboxes[address] = handler
        self._inboxes.append(address)
        return address

    async def send_reply(self, reply_to: str, body: bytes) -> None:
        self.send_reply_now(reply_to, body)

    def send_reply_now(self, reply_to: str, body: bytes) -> bool:
        hub = self._hub
        if hub is None:
            raise BrokerError(f"{self!r} is not connected")
        handler = hub.inboxes.get(reply_to)
        if handler is not None:
            handler(body)
        return True

    async def publish_event(
        self, event: str, body: bytes, *, idempotency_key: str, key: str | None = None
    ) -> None:
        hub = self._connected_hub()
        if not hub.recent_keys.first_time(idempotency_key):
            return  # a repeat within the duplicate window: already delivered
        for queue in hub.groups.get(event, {}).values():
            queue.put(_EventDelivery(body, queue))

    async def subscribe_events(
        self, subscription: EventSubscription, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        hub = self._connected_hub()
        groups = hub.groups.setdefault(subscription.event, {})
        if subscription.broadcast:
            # A private queue per instance, gone with it.
            name = f"{subscription.group}.{next(hub.ids)}"
        else:
            name = subscription.group
        queue = groups.get(name)
        if queue is None:
            queue = groups[name] = _Queue(hub, name, subscription.event, subscription.group)
        on_cancel = None
        if subscription.broadcast or not subscription.durable:
            # Transient queues drop what arrives while nobody consumes them.
            def on_cancel() -> None:
                if not queue.consumers:
                    groups.pop(name, None)

        return self._subscribe(queue, handler, concurrency, on_cancel)

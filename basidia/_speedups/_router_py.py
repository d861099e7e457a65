"""Reply routing: correlation id → the caller's future, with deadlines.

This file is the router's one source, for both cores: run as Python, it is the
pure-Python router; setup.py compiles it in Cython's pure-Python mode, with the
declarations in ``_router_c.pxd``, into the compiled ``_router_c``.  So the two
cannot drift, and ``tests/speedups`` runs the router's tests on both builds.
An attribute added here must be declared in the .pxd too.

Deadlines do not cost a loop timer per call.  The router keeps a heap of
``(deadline, correlation id)`` and arms a single timer for the earliest live
deadline.  A call that ends early leaves a stale entry in the heap; stale
entries are skipped when they reach the top, or all dropped when no call is
pending, and the heap is rebuilt from the pending calls when stale entries
outnumber live ones by more than ``_COMPACT_SLACK``, so it stays in proportion
to the calls in flight.
"""

from __future__ import annotations

import asyncio
from functools import partial
from heapq import heapify, heappop, heappush
from time import monotonic
from typing import Any

from basidia.errors import RpcTimeout

__all__ = ["ReplyRouter", "future_factory"]

_U64_MASK = 0xFFFF_FFFF_FFFF_FFFF  # correlation ids are u64 on the wire
# Stale heap entries tolerated beyond the pending calls before a rebuild; enough
# to make rebuilds rare when only a few calls are in flight.
_COMPACT_SLACK = 1024
# A pending call nobody awaits yet (``register``): its reply is kept until ``take``.
_UNCLAIMED = None
_ABSENT: Any = object()


def future_factory(loop: asyncio.AbstractEventLoop) -> Any:
    """``loop.create_future``, or what it does, without its Python frame, on asyncio's loops."""
    if type(loop).create_future is asyncio.BaseEventLoop.create_future:
        return partial(asyncio.Future, loop=loop)
    return loop.create_future


class ReplyRouter:
    """Routes replies to the futures of the calls waiting for them.

    Every call registers with ``create`` and gets a fresh 64-bit correlation id
    and a future that resolves with the reply, or fails with ``RpcTimeout``
    when its deadline passes.  A reply for an id that is no longer pending
    (late, duplicate or unknown) is dropped and counted in ``late_replies``.

    ``register`` is ``create`` without the future: a reply (or failure) that comes
    before the caller waits is kept, and ``take`` hands it over; only a caller that
    has to wait asks for a future (``wait``).  On the memory broker a handler that
    does not suspend answers while the request is being sent, and the round trip
    then makes no future at all (docs/benchmarks.md).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Bound once, as they run for every call.  BaseEventLoop.time() is
        # time.monotonic() and BaseEventLoop.create_future() is Future(loop=loop);
        # calling those directly saves a Python frame each per call on asyncio's own
        # loops (loops with a clock or futures of their own keep them).
        self._create_future = future_factory(loop)
        self._time = monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        # correlation id -> its future, or _UNCLAIMED while nobody waits for it.
        self._pending: dict[int, asyncio.Future[Any] | None] = {}
        # Replies and failures of registered calls, come before anybody waited.
        self._arrived: dict[int, Any] = {}
        self._failed: dict[int, BaseException] = {}
        # (deadline in loop time, correlation id); may hold stale entries.
        self._deadlines: list[tuple[float, int]] = []
        # The one timer, armed for ``_timer_at`` ≤ the earliest pending deadline.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._last_id = 0
        self.late_replies = 0
        self.timeouts = 0

    @property
    def pending(self) -> int:
        """Calls waiting for a reply."""
        return len(self._pending)

    def create(self, timeout: float) -> tuple[int, asyncio.Future[Any]]:
        """Register a call that expires after ``timeout`` seconds, and its future."""
        correlation_id = self.register(timeout)
        return correlation_id, self.wait(correlation_id)

    def take(self, correlation_id: int, default: Any = None) -> Any:
        """The reply of a ``register``-ed call if it has come (the call is then over), or
        ``default`` if it has not; raises what failed the call (``RpcTimeout``, a lost
        connection) if that came first."""
        reply = self._arrived.pop(correlation_id, _ABSENT)
        if reply is not _ABSENT:
            return reply
        failure = self._failed.pop(correlation_id, None)
        if failure is not None:
            raise failure
        return default

    def wait(self, correlation_id: int) -> asyncio.Future[Any]:
        """A future for the reply of a ``register``-ed call that has not come yet (``take``)."""
        if self._pending.get(correlation_id, _ABSENT) is not _UNCLAIMED:
            raise RuntimeError(f"call {correlation_id} is not pending: its reply was taken")
        future: asyncio.Future[Any] = self._create_future()
        self._pending[correlation_id] = future
        return future

    def register(self, timeout: float) -> int:
        """Register a call that expires after ``timeout`` seconds; its reply is kept for
        ``take`` until a future asks for it (``wait``)."""
        self._last_id = (self._last_id + 1) & _U64_MASK
        correlation_id = self._last_id
        now = self._time()
        deadline = now + timeout
        pending = self._pending
        pending[correlation_id] = _UNCLAIMED
        deadlines = self._deadlines
        heappush(deadlines, (deadline, correlation_id))
        if len(deadlines) > 2 * len(pending) + _COMPACT_SLACK:
            deadlines = [entry for entry in deadlines if entry[1] in pending]
            heapify(deadlines)
            self._deadlines = deadlines
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        return correlation_id

    def resolve(self, correlation_id: int, reply: object) -> bool:
        """Hand ``reply`` to the waiting call; return False if none was waiting."""
        future = self._pending.pop(correlation_id, _ABSENT)
        if future is _ABSENT:
            self.late_replies += 1
            return False
        if not self._pending:
            self._deadlines.clear()  # every entry is stale now
        if future is _UNCLAIMED:
            self._arrived[correlation_id] = reply
            return True
        try:
            future.set_result(reply)
        except asyncio.InvalidStateError:  # the caller was cancelled and did not discard
            self.late_replies += 1
            return False
        return True

    def fail(self, correlation_id: int, exc: BaseException) -> bool:
        """Fail one waiting call with ``exc``; return False if it was not pending."""
        future = self._pending.pop(correlation_id, _ABSENT)
        if future is _ABSENT:
            return False
        if not self._pending:
            self._deadlines.clear()
        self._settle(correlation_id, future, exc)
        return True

    def _settle(self, correlation_id: int, future: Any, exc: BaseException) -> None:
        """Fail one call that was pending with ``future`` (or _UNCLAIMED)."""
        if future is _UNCLAIMED:
            self._failed[correlation_id] = exc
        elif not future.done():
            future.set_exception(exc)

    def discard(self, correlation_id: int) -> None:
        """Forget a call whose caller has gone (cancelled); a later reply counts as late."""
        if self._pending.pop(correlation_id, _ABSENT) is not _ABSENT and not self._pending:
            self._deadlines.clear()
        if self._arrived or self._failed:
            self._arrived.pop(correlation_id, None)
            self._failed.pop(correlation_id, None)

    def fail_all(self, exc: BaseException) -> int:
        """Fail every pending call with ``exc`` (connection lost, shutdown); disarm the timer."""
        pending = self._pending
        self._pending = {}
        self._deadlines = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for correlation_id, future in pending.items():
            self._settle(correlation_id, future, exc)
        return len(pending)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        """Fail the calls whose deadline has passed, then re-arm for the next one."""
        self._timer = None
        now = self._time()
        pending = self._pending
        deadlines = self._deadlines
        while deadlines:
            if not pending:
                deadlines.clear()  # all stale
                return
            deadline, correlation_id = deadlines[0]
            future = pending.get(correlation_id, _ABSENT)
            if future is not _ABSENT and deadline > now:
                self._arm(deadline)
                return
            heappop(deadlines)
            if future is _ABSENT:  # the call ended before its deadline
                continue
            del pending[correlation_id]
            if future is _UNCLAIMED or not future.done():
                self.timeouts += 1
                self._settle(
                    correlation_id, future, RpcTimeout("deadline passed before a reply arrived")
                )

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
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Bound once, as they run for every call.  BaseEventLoop.time() is
        # time.monotonic() and BaseEventLoop.create_future() is Future(loop=loop);
        # calling those directly saves a Python frame each per call on asyncio's own
        # loops (loops with a clock or futures of their own keep them).
        self._create_future = future_factory(loop)
        self._time = monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        self._pending: dict[int, asyncio.Future[Any]] = {}
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
        """Register a call that expires after ``timeout`` seconds."""
        self._last_id = (self._last_id + 1) & _U64_MASK
        correlation_id = self._last_id
        future = self._create_future()
        now = self._time()
        deadline = now + timeout
        pending = self._pending
        pending[correlation_id] = future
        deadlines = self._deadlines
        heappush(deadlines, (deadline, correlation_id))
        if len(deadlines) > 2 * len(pending) + _COMPACT_SLACK:
            deadlines = [entry for entry in deadlines if entry[1] in pending]
            heapify(deadlines)
            self._deadlines = deadlines
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        return correlation_id, future

    def resolve(self, correlation_id: int, reply: object) -> bool:
        """Hand ``reply`` to the waiting call; return False if none was waiting."""
        future = self._pending.pop(correlation_id, None)
        if future is None:
            self.late_replies += 1
            return False
        if not self._pending:
            self._deadlines.clear()  # every entry is stale now
        try:
            future.set_result(reply)
        except asyncio.InvalidStateError:  # the caller was cancelled and did not discard
            self.late_replies += 1
            return False
        return True

    def fail(self, correlation_id: int, exc: BaseException) -> bool:
        """Fail one waiting call with ``exc``; return False if it was not pending."""
        future = self._pending.pop(correlation_id, None)
        if future is None:
            return False
        if not self._pending:
            self._deadlines.clear()
        if not future.done():
            future.set_exception(exc)
        return True

    def discard(self, correlation_id: int) -> None:
        """Forget a call whose caller has gone (cancelled); a later reply counts as late."""
        if self._pending.pop(correlation_id, None) is not None and not self._pending:
            self._deadlines.clear()

    def fail_all(self, exc: BaseException) -> int:
        """Fail every pending call with ``exc`` (connection lost, shutdown); disarm the timer."""
        pending = self._pending
        self._pending = {}
        self._deadlines = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)
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
            future = pending.get(correlation_id)
            if future is not None and deadline > now:
                self._arm(deadline)
                return
            heappop(deadlines)
            if future is None:  # the call ended before its deadline
                continue
            del pending[correlation_id]
            if not future.done():
                self.timeouts += 1
                future.set_exception(RpcTimeout("deadline passed before a reply arrived"))

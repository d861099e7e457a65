"""Reply routing: correlation id → the caller's future, with deadlines.

Written to compile unchanged in Cython's pure-Python mode (``_router_c.pxd``
augments it); keep it to plain attribute and dict work.
"""

from __future__ import annotations

import asyncio
from typing import Any

from basidia.errors import RpcTimeout

__all__ = ["ReplyRouter"]

_U64_MASK = (1 << 64) - 1


class ReplyRouter:
    """Routes replies to the futures of the calls waiting for them.

    Every call registers with ``create`` and gets a fresh 64-bit correlation id
    and a future that resolves with the reply, or fails with ``RpcTimeout``
    when its deadline passes.  A reply for an id that is no longer pending
    (late, duplicate or unknown) is dropped and counted in ``late_replies``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: dict[int, tuple[asyncio.Future[Any], asyncio.TimerHandle]] = {}
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
        future = self._loop.create_future()
        timer = self._loop.call_later(timeout, self._expire, correlation_id)
        self._pending[correlation_id] = (future, timer)
        return correlation_id, future

    def resolve(self, correlation_id: int, reply: object) -> bool:
        """Hand ``reply`` to the waiting call; return False if none was waiting."""
        entry = self._pending.pop(correlation_id, None)
        if entry is None:
            self.late_replies += 1
            return False
        future, timer = entry
        timer.cancel()
        if future.done():  # the caller was cancelled between its timer and now
            self.late_replies += 1
            return False
        future.set_result(reply)
        return True

    def fail(self, correlation_id: int, exc: BaseException) -> bool:
        """Fail one waiting call with ``exc``; return False if it was not pending."""
        entry = self._pending.pop(correlation_id, None)
        if entry is None:
            return False
        future, timer = entry
        timer.cancel()
        if not future.done():
            future.set_exception(exc)
        return True

    def discard(self, correlation_id: int) -> None:
        """Forget a call whose caller has gone (cancelled); a later reply counts as late."""
        entry = self._pending.pop(correlation_id, None)
        if entry is not None:
            entry[1].cancel()

    def fail_all(self, exc: BaseException) -> int:
        """Fail every pending call with ``exc`` (connection lost, shutdown)."""
        pending = self._pending
        self._pending = {}
        for future, timer in pending.values():
            timer.cancel()
            if not future.done():
                future.set_exception(exc)
        return len(pending)

    def _expire(self, correlation_id: int) -> None:
        entry = self._pending.pop(correlation_id, None)
        if entry is None:
            return
        future = entry[0]
        if not future.done():
            self.timeouts += 1
            future.set_exception(RpcTimeout("deadline passed before a reply arrived"))

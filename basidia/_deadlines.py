"""Deadlines for many concurrent calls at the cost of one timer per time slot.

A timer per call (``asyncio.timeout``) costs more than the rest of an in-memory
call.  Instead, the handlers being watched are kept in a dict (task → deadline), which
the container writes directly on every call, and one timer checks it every slot of
50 ms while anything is watched.  A deadline therefore fires up to one slot late, well
inside the ±10 % promised for deadlines of a second or more.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

__all__ = ["SLOT_SECONDS", "HandlerWatchdog"]

SLOT_SECONDS = 0.05


class HandlerWatchdog:
    """Cancels handler tasks whose deadline (seconds since the epoch) has passed."""

    def __init__(self) -> None:
        #: The tasks watched and their deadlines; ``ServiceContainer.handle`` adds and
        #: removes its task itself (it runs for every call), then calls ``arm`` if no
        #: check is scheduled (``timer`` is None).
        self.watched: dict[asyncio.Task[Any], float] = {}
        #: The scheduled check, or None.
        self.timer: asyncio.TimerHandle | None = None
        #: Tasks cancelled because of their deadline, until they notice it.
        self.expired: set[asyncio.Task[Any]] = set()

    def arm(self) -> None:
        """Check the deadlines one slot from now."""
        self.timer = asyncio.get_running_loop().call_later(SLOT_SECONDS, self._check)

    def _check(self) -> None:
        self.timer = None
        watched = self.watched
        if not watched:
            return  # the next call watched arms again
        now = time.time()
        for task in [task for task, deadline in watched.items() if deadline <= now]:
            del watched[task]
            if not task.done():
                self.expired.add(task)
                task.cancel()
        self.arm()

    def close(self) -> None:
        """Drop the timer (the container is stopping)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.watched.clear()
        self.expired.clear()

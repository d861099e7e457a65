"""Deadlines for many concurrent calls at the cost of one timer per time slot.

A timer per call (``asyncio.timeout``) costs more than the rest of an in-memory
call; calls due within the same 50 ms slot share one timer instead.  A
deadline therefore fires up to one slot late, well inside the ±10 % promised
for deadlines of a second or more.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

__all__ = ["SLOT_SECONDS", "HandlerWatchdog"]

SLOT_SECONDS = 0.05
_SLOTS_PER_SECOND = 20  # 1 / SLOT_SECONDS, as an int for cheap arithmetic


class HandlerWatchdog:
    """Cancels handler tasks whose deadline (seconds since the epoch) has passed."""

    def __init__(self) -> None:
        self._slots: dict[int, set[asyncio.Task[Any]]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        #: Tasks cancelled because of their deadline, until they notice it.
        self.expired: set[asyncio.Task[Any]] = set()

    def watch(self, task: asyncio.Task[Any], deadline: float) -> set[asyncio.Task[Any]]:
        """Cancel ``task`` at ``deadline``; remove it from the returned set when it is done."""
        slot = int(deadline * _SLOTS_PER_SECOND) + 1
        tasks = self._slots.get(slot)
        if tasks is None:
            tasks = self._slots[slot] = set()
            loop = asyncio.get_running_loop()
            when = loop.time() + slot / _SLOTS_PER_SECOND - time.time()
            self._timers[slot] = loop.call_at(when, self._fire, slot)
        tasks.add(task)
        return tasks

    def _fire(self, slot: int) -> None:
        self._timers.pop(slot, None)
        for task in self._slots.pop(slot, ()):
            if not task.done():
                self.expired.add(task)
                task.cancel()

    def close(self) -> None:
        """Drop every timer (the container is stopping)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._slots.clear()
        self.expired.clear()

"""``@timer``: run a method of a service every so many seconds, in each of its instances.

An entrypoint kind written the way docs/architecture.md describes: one class that
attaches itself to a container, and calls that go through ``container.handle``
(middleware, the concurrency limit, counters, graceful stop), with no change to
the container.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from basidia._speedups import Frame, Kind
from basidia.brokers.base import Subscription
from basidia.context import CallContext
from basidia.log import shorten
from basidia.service import Entrypoint, mark

if TYPE_CHECKING:
    from typing import Self

    from basidia.container import ServiceContainer

__all__ = ["Timer", "timer"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

logger = logging.getLogger("basidia.timers")


class Timer(Entrypoint):
    """Runs its method every ``interval`` seconds; see ``timer``."""

    group = "timers"

    def __init__(self, func: Callable[..., Awaitable[Any]], interval: float, eager: bool) -> None:
        super().__init__(func)
        if not (isinstance(interval, int | float) and math.isfinite(interval) and interval > 0):
            raise ValueError(f"{func.__qualname__}: a timer's interval must be > 0 seconds")
        if len(inspect.signature(func).parameters) != 1:
            raise TypeError(f"{func.__qualname__}: a timer method takes no argument but self")
        self.interval = float(interval)
        self.eager = eager

    def describe(self) -> Any:
        return {"name": self.name, "interval": self.interval, "eager": self.eager}

    @classmethod
    async def attach(
        cls, container: ServiceContainer, entrypoints: Sequence[Self]
    ) -> list[Subscription]:
        return [_Ticking(container, entrypoint) for entrypoint in entrypoints]


def timer(interval: float, *, eager: bool = False) -> Callable[[F], F]:
    """Call the decorated ``async def`` method every ``interval`` seconds while the
    service runs, in every instance (as Nameko's ``@timer``).

    The first call comes ``interval`` seconds after the service starts, or at once
    with ``eager=True``.  Calls never overlap: one that takes longer than
    ``interval`` is followed by the next as soon as it ends.  A call that raises is
    logged and the timer goes on.  Calls count as the service's work: they share its
    ``max_workers`` with its other entrypoints, go through its middleware, and a
    stopping service lets the running one finish within its grace period.
    """

    def decorate(func: F) -> F:
        return mark(func, Timer(func, interval, eager))

    return decorate


class _Ticking(Subscription):
    """The loop of one timer in one container."""

    def __init__(self, container: ServiceContainer, entrypoint: Timer) -> None:
        self._container = container
        self._timer = entrypoint
        self._target = f"{container.service_name}.{entrypoint.name}"
        self._busy = False
        self._cancelled = False
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._timer.interval
        due = loop.time() + (0.0 if self._timer.eager else interval)
        while not self._cancelled:
            await asyncio.sleep(max(0.0, due - loop.time()))
            started = loop.time()
            self._busy = True
            try:
                await self._tick()
            finally:
                self._busy = False
            due = max(started + interval, loop.time())

    async def _tick(self) -> None:
        container, entrypoint = self._container, self._timer
        task = container.track()
        try:
            frame = Frame(Kind.REQUEST, 0, self._target, b"", "timer")
            ctx = CallContext(container.service_name, entrypoint.name, frame, 0.0)
            await container.handle(ctx, entrypoint.func, (), task)
        except Exception as exc:
            logger.error("%s raised %s: %s", self._target, type(exc).__name__, shorten(str(exc)))
        finally:
            container.untrack(task)

    async def cancel(self) -> None:
        """No call starts any more; one running now finishes (the container's grace)."""
        self._cancelled = True
        if not self._busy:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

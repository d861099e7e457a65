"""A ledger of what a fault test sent and what came out, judged with Jepsen's queue vocabulary.

Every message carries a unique id. The publisher records each attempt (``record_sent``) and its
outcome (``record_confirmed`` or ``record_failed``); consumers record each delivery
(``record_received``) and each side effect they really apply (``record_side_effect``, keyed by
idempotency key). Awaits that might hang go through ``guard``. Then ``report()`` classifies:

- **lost**: confirmed but never received. Must be 0.
- **recovered**: received although its publish failed or has no outcome yet. Allowed.
- **unexpected**: received but never sent: corruption or cross-talk. Must be 0.
- **duplicated**: received more than once. Allowed under at-least-once delivery.
- **duplicate side effects**: an idempotency key applied more than once. Must be 0.
- **unresolved**: sent with no outcome recorded, a publish that silently went nowhere. Must be 0.
- **hung awaits**: a guarded await that outlived its timeout. Must be 0.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# How many ids of each kind the summary shows; the report keeps them all.
_SHOWN_IDS = 10
# How long a cancelled guarded await gets to run its cleanup before the ledger moves on.
_CANCEL_GRACE = 1.0
_POLL_INTERVAL = 0.05


class HungAwait(Exception):
    """A guarded await did not finish within its timeout; the ledger recorded it."""


@dataclass(frozen=True)
class LedgerReport:
    """What the ledger saw. Id tuples are sorted; counts of sends and deliveries are totals."""

    sent: int
    confirmed: int
    failed: int
    deliveries: int
    received: int
    lost: tuple[str, ...]
    recovered: tuple[str, ...]
    unexpected: tuple[str, ...]
    duplicated: tuple[str, ...]
    unresolved: tuple[str, ...]
    duplicate_side_effects: tuple[str, ...]
    hung_awaits: tuple[str, ...]

    def __str__(self) -> str:
        lines = [
            f"sent {self.sent}, confirmed {self.confirmed}, failed {self.failed}, "
            f"received {self.received} distinct in {self.deliveries} deliveries"
        ]
        for label, items in (
            ("lost", self.lost),
            ("recovered", self.recovered),
            ("unexpected", self.unexpected),
            ("duplicated", self.duplicated),
            ("unresolved", self.unresolved),
            ("duplicate side effects", self.duplicate_side_effects),
            ("hung awaits", self.hung_awaits),
        ):
            lines.append(f"{label}: {len(items)}{_sample(items)}")
        return "\n".join(lines)


class Ledger:
    """Counts messages and side effects through a fault test; see the module docstring."""

    def __init__(self) -> None:
        self._sent: set[str] = set()
        self._confirmed: set[str] = set()
        self._failed: set[str] = set()
        self._deliveries: Counter[str] = Counter()
        self._side_effects: Counter[str] = Counter()
        self._hung: list[str] = []

    def record_sent(self, message_id: str) -> None:
        """A publish of ``message_id`` is about to be attempted."""
        self._sent.add(message_id)

    def record_confirmed(self, message_id: str) -> None:
        """The broker confirmed ``message_id``: from now on it must be delivered."""
        self._confirmed.add(message_id)
        self._failed.discard(message_id)

    def record_failed(self, message_id: str) -> None:
        """The publish of ``message_id`` raised or timed out: delivering it is allowed, not owed.

        A later confirmation of a retried publish of the same id overrides this.
        """
        if message_id not in self._confirmed:
            self._failed.add(message_id)

    def record_received(self, message_id: str) -> None:
        """A consumer got ``message_id`` (count every delivery, redeliveries included)."""
        self._deliveries[message_id] += 1

    def record_side_effect(self, key: str) -> None:
        """A handler applied the side effect for idempotency ``key``; twice is a duplicate."""
        self._side_effects[key] += 1

    async def guard(self, awaitable: Awaitable[T], timeout: float, what: str) -> T:
        """Await ``awaitable`` for at most ``timeout`` seconds.

        On timeout, cancel it, record ``what`` as a hung await and raise ``HungAwait``. Timeouts
        raised by the awaitable itself pass through unchanged: only the guard's own counts.
        """
        task = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        finally:
            if not task.done():
                task.cancel()
                # Its outcome no longer matters; retrieving it keeps asyncio from logging it.
                task.add_done_callback(_ignore_outcome)
                # One that ignores cancellation is already recorded below; do not hang on it too.
                await asyncio.wait({task}, timeout=_CANCEL_GRACE)
        if not done:
            self._hung.append(f"{what} (over {timeout:g} s)")
            raise HungAwait(f"{what} did not finish within {timeout:g} s")
        return task.result()

    async def wait_delivered(self, timeout: float) -> bool:
        """Wait until every confirmed message was received; False if ``timeout`` ran out first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._confirmed.issubset(self._deliveries):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL_INTERVAL)
        return True

    def report(self) -> LedgerReport:
        """Classify everything recorded so far."""
        received = set(self._deliveries)
        return LedgerReport(
            sent=len(self._sent),
            confirmed=len(self._confirmed),
            failed=len(self._failed),
            deliveries=sum(self._deliveries.values()),
            received=len(received),
            lost=_sorted(self._confirmed - received),
            recovered=_sorted((received & self._sent) - self._confirmed),
            unexpected=_sorted(received - self._sent),
            duplicated=_sorted(key for key, count in self._deliveries.items() if count > 1),
            unresolved=_sorted(self._sent - self._confirmed - self._failed),
            duplicate_side_effects=_sorted(
                key for key, count in self._side_effects.items() if count > 1
            ),
            hung_awaits=tuple(self._hung),
        )

    def assert_clean(self, *, allow_duplicates_delivered: bool = True) -> None:
        """Raise AssertionError with the report if anything broke a delivery promise.

        Broken promises: lost, unexpected or unresolved messages, duplicate side effects, hung
        awaits, and duplicate deliveries unless ``allow_duplicates_delivered``.
        """
        report = self.report()
        problems = [
            report.lost,
            report.unexpected,
            report.unresolved,
            report.duplicate_side_effects,
            report.hung_awaits,
        ]
        if not allow_duplicates_delivered:
            problems.append(report.duplicated)
        if any(problems):
            raise AssertionError(f"ledger is not clean:\n{report}")


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _sorted(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(ids))


def _sample(items: tuple[str, ...]) -> str:
    if not items:
        return ""
    more = f", ... {len(items) - _SHOWN_IDS} more" if len(items) > _SHOWN_IDS else ""
    return " (" + ", ".join(items[:_SHOWN_IDS]) + more + ")"


async def publish_until_confirmed(
    ledger: Ledger,
    message_id: str,
    publish: Callable[[], Awaitable[object]],
    *,
    timeout: float,
    attempts: int,
    retry_on: tuple[type[BaseException], ...],
    pause: float = 0.2,
) -> int:
    """Publish ``message_id`` again (same idempotency key) until the broker confirms it.

    Every attempt is bounded by ``timeout`` (a hang is recorded, not waited out);
    an attempt failing with one of ``retry_on`` is recorded as failed and retried
    after ``pause``.  Returns the number of failed attempts.
    """
    ledger.record_sent(message_id)
    failures = 0
    for _ in range(attempts):
        try:
            await ledger.guard(publish(), timeout=timeout, what=f"publish {message_id}")
        except retry_on:
            ledger.record_failed(message_id)
            failures += 1
            await asyncio.sleep(pause)
        else:
            ledger.record_confirmed(message_id)
            break
    return failures

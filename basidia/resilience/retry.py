"""Event retries: exponential backoff with jitter between attempts (docs/resilience.md).

A failed attempt goes back to the broker with a delay (``Delivery.nack(delay=...)``), so
waiting never holds a handler slot, and where the broker keeps the delay (RabbitMQ delay
queues, a JetStream NAK with delay) a pending retry survives a restart of the service.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from basidia.errors import BasidiaError, ValidationError

if TYPE_CHECKING:
    from basidia.config import Settings

__all__ = ["NonRetryable", "Retry", "RetryPolicy"]


class NonRetryable(BasidiaError):
    """Raise it (or a subclass) from an event handler to dead-letter the event at once,
    with the exception as the reason: retrying cannot help (bad data, a refused order)."""


#: Exceptions never retried, whatever the policy says: data that does not validate will not
#: validate on the next attempt either.
ALWAYS_FINAL: tuple[type[BaseException], ...] = (
    NonRetryable,
    ValidationError,
    msgspec.ValidationError,
)


@dataclass(frozen=True, slots=True)
class Retry:
    """An event handler's retry policy: ``@event_handler("x", retry=Retry(...))``.

    Every field left ``None`` takes the configured default (``event_max_attempts``,
    ``event_retry_delay``, ``event_retry_multiplier``, ``event_retry_max_delay``,
    ``event_retry_jitter``).  After attempt ``n`` fails, the next comes after
    ``min(max_delay, delay * multiplier ** (n - 1))`` seconds, spread by ``jitter`` (a
    fraction: 0.2 is ±20 %).  ``give_up_on`` lists exception types dead-lettered at once
    (``NonRetryable`` and validation errors always are).
    """

    max_attempts: int | None = None
    delay: float | None = None
    multiplier: float | None = None
    max_delay: float | None = None
    jitter: float | None = None
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("Retry(max_attempts=...) must be at least 1")
        for name in ("delay", "max_delay"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Retry({name}=...) must be >= 0")
        if self.multiplier is not None and self.multiplier < 1:
            raise ValueError("Retry(multiplier=...) must be >= 1")
        if self.jitter is not None and not 0 <= self.jitter < 1:
            raise ValueError("Retry(jitter=...) must be in [0, 1)")

    def resolve(self, settings: Settings, max_attempts: int | None = None) -> RetryPolicy:
        """The policy with every default filled in from ``settings``; ``max_attempts``
        (the decorator's own argument) wins over both."""
        return RetryPolicy(
            max_attempts=max_attempts or self.max_attempts or settings.event_max_attempts,
            delay=settings.event_retry_delay if self.delay is None else self.delay,
            multiplier=(
                settings.event_retry_multiplier if self.multiplier is None else self.multiplier
            ),
            max_delay=settings.event_retry_max_delay if self.max_delay is None else self.max_delay,
            jitter=settings.event_retry_jitter if self.jitter is None else self.jitter,
            give_up_on=ALWAYS_FINAL + tuple(self.give_up_on),
        )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A resolved ``Retry``: every value set."""

    max_attempts: int
    delay: float
    multiplier: float
    max_delay: float
    jitter: float
    give_up_on: tuple[type[BaseException], ...] = ALWAYS_FINAL

    def base_delay(self, attempt: int) -> float:
        """Seconds to wait after attempt ``attempt`` (1 for the first) failed, before
        jitter."""
        return min(self.max_delay, self.delay * self.multiplier ** max(0, attempt - 1))

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait after attempt ``attempt`` failed, with jitter."""
        base = self.base_delay(attempt)
        if not self.jitter or not base:
            return base
        return min(self.max_delay, base * random.uniform(1 - self.jitter, 1 + self.jitter))

    def retryable(self, exc: BaseException) -> bool:
        """Whether another attempt may succeed where ``exc`` was raised."""
        return not isinstance(exc, self.give_up_on)

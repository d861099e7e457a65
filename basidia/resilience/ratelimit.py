"""Token-bucket rate limits for RPC methods and HTTP routes (docs/resilience.md).

``@rpc(rate_limit="100/s")`` and ``@http_endpoint(..., rate_limit="10/s")``: each limit is a
bucket of ``burst`` tokens refilled at ``rate`` per second, one per client key where one is
known (the authenticated principal or address over HTTP, the calling service over RPC).
An empty bucket answers HTTP 429 with ``Retry-After``, or ``RateLimited`` to an RPC caller.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["RateLimit", "RateLimiter"]

_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
#: Client keys with a bucket of their own, at most; the least recently seen go first.
MAX_CLIENTS = 10_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``rate`` calls per second on average, ``burst`` at once (default: ``rate``, at
    least 1); one bucket per client key with ``per_client``, else one for all."""

    rate: float
    burst: int | None = None
    per_client: bool = True

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("a rate limit's rate must be > 0")
        if self.burst is not None and self.burst < 1:
            raise ValueError("a rate limit's burst must be at least 1")

    @classmethod
    def parse(cls, spec: str | float | RateLimit) -> RateLimit:
        """``"10/s"``, ``"600/min"``, ``"5/10s"``, a number (per second) or a ``RateLimit``."""
        if isinstance(spec, RateLimit):
            return spec
        if isinstance(spec, int | float):
            return cls(float(spec))
        match = _SPEC.match(spec)
        if match is None:
            raise ValueError(f"a rate limit reads like '10/s' or '600/min', not {spec!r}")
        count, every, unit = match.groups()
        seconds = (int(every) if every else 1) * _UNITS[unit]
        return cls(float(count) / seconds, burst=max(1, math.ceil(float(count))))


class RateLimiter:
    """The buckets of one limit."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self.rate = limit.rate
        self.burst = float(limit.burst or max(1, math.ceil(limit.rate)))
        # client key -> (tokens, monotonic time of the last refill)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        #: Calls refused so far.
        self.refused = 0

    def take(self, client: str = "") -> float:
        """Take a token for ``client``: 0.0 when granted, else the seconds until one is."""
        key = client if self.limit.per_client else ""
        now = time.monotonic()
        buckets = self._buckets
        tokens, last = buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            buckets[key] = (tokens - 1, now)
            buckets.move_to_end(key)
            while len(buckets) > MAX_CLIENTS:
                buckets.popitem(last=False)
            return 0.0
        buckets[key] = (tokens, now)
        self.refused += 1
        return (1 - tokens) / self.rate

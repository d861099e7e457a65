"""Resilience: event retries with backoff, deduplication, circuit breakers, bulkheads, rate
limits and authentication at the edge (docs/resilience.md).

The authentication dependencies are in ``basidia.resilience.edge``.
"""

from basidia.resilience.breaker import Breaker, BreakerState, Bulkhead, RpcRetry
from basidia.resilience.dedup import DedupStore, MemoryDedupStore, RedisDedupStore
from basidia.resilience.ratelimit import RateLimit
from basidia.resilience.retry import NonRetryable, Retry, RetryPolicy

__all__ = [
    "Breaker",
    "BreakerState",
    "Bulkhead",
    "DedupStore",
    "MemoryDedupStore",
    "NonRetryable",
    "RateLimit",
    "RedisDedupStore",
    "Retry",
    "RetryPolicy",
    "RpcRetry",
]

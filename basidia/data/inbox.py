"""The inbox: idempotency keys a consumer has handled, recorded in the transaction of the
handler's own writes, so that an at-least-once delivery has an exactly-once effect
(docs/outbox.md).  ``Outbox.inbox()`` is the way a handler uses it."""

from __future__ import annotations

import time

from basidia.data.db import Connection

__all__ = ["prune_inbox", "record_key", "seen"]


async def record_key(conn: Connection, consumer: str, key: str) -> bool:
    """Record ``key`` as handled by ``consumer`` in ``conn``'s transaction.

    True when it is new; False when it was handled before (a duplicate).  On PostgreSQL a
    concurrent delivery of the same key waits here until the first transaction ends: it
    then sees the key (a duplicate) or, if the first rolled back, records it itself.
    """
    inserted = await conn.execute(
        "INSERT INTO basidia_inbox (consumer, key, handled_at) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING",
        consumer,
        key,
        time.time(),
    )
    return inserted == 1


async def seen(conn: Connection, consumer: str, key: str) -> bool:
    """Whether ``consumer`` has handled ``key``."""
    found = await conn.fetchval(
        "SELECT 1 FROM basidia_inbox WHERE consumer = $1 AND key = $2", consumer, key
    )
    return found is not None


async def prune_inbox(conn: Connection, older_than: float) -> int:
    """Forget keys handled more than ``older_than`` seconds ago; return how many.

    A redelivery later than that would be handled again: keep it well beyond the
    broker's redelivery horizon."""
    return await conn.execute(
        "DELETE FROM basidia_inbox WHERE handled_at < $1", time.time() - older_than
    )

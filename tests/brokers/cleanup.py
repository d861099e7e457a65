"""Removing what a test left on the shared brokers: queues, exchanges, JetStream consumers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import aiormq
import nats
import nats.js.errors

from basidia.brokers.nats import DLQ_STREAM, EVENTS_STREAM


async def delete_amqp(url: str, queues: Iterable[str], exchanges: Iterable[str] = ()) -> None:
    """Delete ``queues`` and ``exchanges`` on the broker at ``url`` (missing ones are fine)."""
    connection = await asyncio.wait_for(aiormq.connect(url), 10)
    try:
        channel = await connection.channel(timeout=5)
        for queue in queues:
            await channel.queue_delete(queue, timeout=5)
        for exchange in exchanges:
            await channel.exchange_delete(exchange, timeout=5)
    finally:
        await connection.close(timeout=5)


async def delete_nats_consumers(url: str, token: str, *, purge_dlq: str = "") -> None:
    """Delete the consumers of the events stream that a test with ``token`` created
    (``token`` is in their group's name or in their event's); with ``purge_dlq`` (a
    subject filter), also the dead letters it left."""
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        jsm = nc.jsm()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            for info in await jsm.consumers_info(EVENTS_STREAM):
                if token in info.name or token in (info.config.filter_subject or ""):
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await jsm.delete_consumer(EVENTS_STREAM, info.name)
        if purge_dlq:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await jsm.purge_stream(DLQ_STREAM, subject=purge_dlq)
    finally:
        await nc.close()


async def delete_redis_keys(url: str, token: str, prefix: str = "basidia") -> None:
    """Delete the keys (streams, sets) on the Redis server at ``url`` whose name holds
    ``token``, and the consumer groups named with it on other streams (a shared event's)."""
    import redis.asyncio as aioredis
    from redis.exceptions import ResponseError

    client = aioredis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = [key async for key in client.scan_iter(match=f"*{token}*", count=1000)]
        if keys:
            await client.delete(*keys)
        dlq = f"{prefix}:dlq:".encode()
        groups = [key[len(dlq) :] for key in keys if key.startswith(dlq)]
        if groups:
            await client.srem(f"{prefix}:dlq-groups", *groups)
        async for stream in client.scan_iter(match=f"{prefix}:ev:*", count=1000):
            with contextlib.suppress(ResponseError):
                for group in await client.xinfo_groups(stream):
                    if token in group["name"].decode():
                        await client.xgroup_destroy(stream, group["name"])
    finally:
        await client.aclose()

"""The raw redis-py floor for ``basidia bench --broker redis://``.

An echo responder and a client on plain redis-py asyncio clients, doing what a fair
hand-written request/reply over Redis would, with the same topology as Basidia's: msgspec
MessagePack on both sides, requests appended to a stream read by the responder as a
consumer group (``XREADGROUP ... NOACK``), replies published on the client's own pub/sub
channel and matched to their call by a correlation id.  Basidia's overhead is measured
against this.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from typing import Any

import msgspec
import redis.asyncio as aioredis

__all__ = ["RawEcho", "open_raw_echo"]

_CALL_TIMEOUT = 30.0  # seconds: a benchmark call never waits forever
_BATCH = 64


class RawEcho:
    """One echo responder and one client, each with its own connections."""

    def __init__(self, url: str) -> None:
        tag = os.urandom(6).hex()
        self._stream = f"bench:raw:{tag}"
        self._channel = f"bench:raw:reply:{tag}"
        self._server = aioredis.Redis.from_url(url, max_connections=256)
        self._client = aioredis.Redis.from_url(url, max_connections=256)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(tuple[int, bytes]).decode
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._server.xgroup_create(self._stream, "echo", "$", mkstream=True)
        await self._pubsub.subscribe(self._channel)
        self._tasks = [
            asyncio.ensure_future(self._serve()),
            asyncio.ensure_future(self._receive()),
        ]

    async def _serve(self) -> None:
        server = self._server
        encode, decode = self._encode, self._decode

        async def answer(fields: dict[bytes, bytes]) -> None:
            call_id, payload = decode(fields[b"m"])
            await server.publish(fields[b"r"], encode((call_id, payload)))

        while True:
            reply: Any = await server.xreadgroup(
                "echo", "raw", {self._stream: ">"}, count=_BATCH, block=1000, noack=True
            )
            for _stream, entries in reply or ():
                await asyncio.gather(*(answer(fields) for _id, fields in entries))

    async def _receive(self) -> None:
        pending, decode = self._pending, self._decode
        async for message in self._pubsub.listen():
            if message["type"] != "message":
                continue
            call_id, payload = decode(message["data"])
            future = pending.pop(call_id, None)
            if future is not None and not future.done():
                future.set_result(payload)

    async def call(self, payload: bytes) -> bytes:
        """One request/reply round trip; returns the echoed payload."""
        call_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        body = self._encode((call_id, payload))
        try:
            await self._client.xadd(
                self._stream, {"m": body, "r": self._channel}, maxlen=100_000, approximate=True
            )
            return await asyncio.wait_for(future, _CALL_TIMEOUT)
        finally:
            self._pending.pop(call_id, None)

    async def close(self) -> None:
        """Stop the responder, delete the stream, close the connections."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._server.delete(self._stream)
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        await self._client.aclose()
        await self._server.aclose()


async def open_raw_echo(url: str) -> RawEcho:
    """Connect to ``url`` and start an echo responder on a stream of its own."""
    echo = RawEcho(url)
    try:
        await asyncio.wait_for(echo.start(), 10)
    except BaseException:
        await echo.close()
        raise
    return echo

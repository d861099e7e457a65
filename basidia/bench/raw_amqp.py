"""The raw aiormq floor for ``basidia bench --broker amqp://``.

An echo consumer and a client on two plain aiormq connections, doing what a
competent hand-written RPC client would: msgspec MessagePack on both sides,
requests on a channel without publisher confirms (the reply is the
acknowledgement), replies through RabbitMQ's direct reply-to consumed no-ack on
that same channel, correlation ids in a dict of futures, and an echo consumer
with a prefetch window that acks after replying.  Basidia's overhead is
measured against this.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import cast

import aiormq
import msgspec
from aiormq import Channel, Connection
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

__all__ = ["RawEcho", "open_raw_echo"]

_CALL_TIMEOUT = 30.0  # seconds: a benchmark call never waits forever
_SETUP_TIMEOUT = 10.0  # seconds for connecting, declaring and consuming
_PREFETCH = 128  # above the benchmark's 64 calls in flight, so the window never throttles
_DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class RawEcho:
    """One echo consumer and one client, each on its own connection."""

    def __init__(
        self,
        server: Connection,
        client: Connection,
        channel: Channel,
        queue: str,
    ) -> None:
        self._server = server
        self._client = client
        self._channel = channel
        self._queue = queue
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(bytes).decode
        self._loop = asyncio.get_running_loop()

    async def on_reply(self, message: DeliveredMessage) -> None:
        """Resolve the call waiting for ``message`` (direct reply-to, no-ack)."""
        future = self._pending.pop(message.header.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def call(self, payload: bytes) -> bytes:
        """One request/reply round trip; returns the echoed payload."""
        correlation_id = str(next(self._ids))
        future = self._loop.create_future()
        self._pending[correlation_id] = future
        timer = self._loop.call_later(_CALL_TIMEOUT, _expire, future)
        try:
            await self._channel.basic_publish(
                self._encode(payload),
                routing_key=self._queue,
                properties=spec.Basic.Properties(
                    correlation_id=correlation_id, reply_to=_DIRECT_REPLY_TO
                ),
                wait=False,
                timeout=_CALL_TIMEOUT,
            )
            return self._decode(await future)
        finally:
            timer.cancel()
            self._pending.pop(correlation_id, None)

    async def close(self) -> None:
        """Close both connections (the exclusive queue goes with the server's)."""
        for connection in (self._client, self._server):
            await connection.close(timeout=_SETUP_TIMEOUT)


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no echo within the call timeout"))


async def _start_echo(server: Connection, queue: str) -> None:
    channel = cast(Channel, await server.channel(publisher_confirms=False, timeout=_SETUP_TIMEOUT))
    await channel.basic_qos(prefetch_count=_PREFETCH, timeout=_SETUP_TIMEOUT)
    await channel.queue_declare(queue, exclusive=True, auto_delete=True, timeout=_SETUP_TIMEOUT)
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(bytes).decode

    async def echo(message: DeliveredMessage) -> None:
        properties = message.header.properties
        await channel.basic_publish(
            encode(decode(message.body)),
            routing_key=properties.reply_to or "",
            properties=spec.Basic.Properties(correlation_id=properties.correlation_id),
            wait=False,
            timeout=_CALL_TIMEOUT,
        )
        await channel.basic_ack(message.delivery_tag or 0, wait=False)

    await channel.basic_consume(queue, echo, timeout=_SETUP_TIMEOUT)


async def open_raw_echo(url: str) -> RawEcho:
    """Connect twice to ``url`` and start an echo consumer on a queue of its own."""
    server: Connection = await asyncio.wait_for(aiormq.connect(url), _SETUP_TIMEOUT)
    client: Connection | None = None
    try:
        client = await asyncio.wait_for(aiormq.connect(url), _SETUP_TIMEOUT)
        queue = f"basidia.bench.raw.{uuid.uuid4().hex[:12]}"
        await _start_echo(server, queue)
        channel = cast(
            Channel, await client.channel(publisher_confirms=False, timeout=_SETUP_TIMEOUT)
        )
        echo = RawEcho(server, client, channel, queue)
        await channel.basic_consume(
            _DIRECT_REPLY_TO, echo.on_reply, no_ack=True, timeout=_SETUP_TIMEOUT
        )
    except BaseException:
        for connection in (client, server):
            if connection is not None:
                await connection.close(timeout=_SETUP_TIMEOUT)
        raise
    return echo

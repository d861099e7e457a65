"""The raw aiokafka floor for ``basidia bench --broker kafka://``.

An echo responder and a client on plain aiokafka, doing what a fair hand-written
request-reply over Kafka would: msgspec MessagePack on both sides, a request topic and a
reply topic, each read by one consumer (the responder's assigned its partition rather
than joining a group: the same fetch path without a group's seconds-long join), the
correlation id in the record key and a dict of futures.  Both use the settings
``KafkaBroker`` uses by default (``acks=all``, ``linger_ms=0``, ``fetch_max_wait_ms=5``),
so that the difference is Basidia's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from basidia.brokers.kafka import KafkaBroker

__all__ = ["RawEcho", "open_raw_echo"]

_CALL_TIMEOUT = 30.0  # seconds: a benchmark call never waits forever


class RawEcho:
    """One echo responder and one client, each with its own producer and consumer."""

    def __init__(self, options: dict[str, Any], fetch_max_wait_ms: int) -> None:
        name = uuid.uuid4().hex
        self.request_topic = f"bench.raw.rpc.{name}"
        self.reply_topic = f"bench.raw.inbox.{name}"
        self._options = options
        self._admin = AIOKafkaAdminClient(**options)
        self._server_producer = AIOKafkaProducer(**options, acks="all", linger_ms=0)
        self._client_producer = AIOKafkaProducer(**options, acks="all", linger_ms=0)
        consumer_options = {**options, "fetch_max_wait_ms": fetch_max_wait_ms}
        self._server = AIOKafkaConsumer(**consumer_options, enable_auto_commit=False)
        self._client = AIOKafkaConsumer(**consumer_options, enable_auto_commit=False)
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(bytes).decode

    async def start(self) -> None:
        await self._admin.start()
        await self._admin.create_topics(
            [NewTopic(self.request_topic, 1, 1), NewTopic(self.reply_topic, 1, 1)]
        )
        for client in (self._server_producer, self._client_producer, self._server, self._client):
            await client.start()
        for consumer, topic in (
            (self._client, self.reply_topic),
            (self._server, self.request_topic),
        ):
            partition = TopicPartition(topic, 0)
            consumer.assign([partition])
            await consumer.seek_to_end(partition)
            await consumer.position(partition)
        self._tasks = [
            asyncio.ensure_future(self._serve()),
            asyncio.ensure_future(self._read_replies()),
        ]

    async def _serve(self) -> None:
        encode, decode = self._encode, self._decode
        send = self._server_producer.send
        while True:
            batches = await self._server.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    await send(self.reply_topic, encode(decode(record.value)), key=record.key)

    async def _read_replies(self) -> None:
        pending = self._pending
        while True:
            batches = await self._client.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    future = pending.pop(record.key, None)
                    if future is not None and not future.done():
                        future.set_result(record.value)

    async def call(self, payload: bytes) -> bytes:
        """One request/reply round trip; returns the echoed payload."""
        key = b"%d" % next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            await self._client_producer.send(self.request_topic, self._encode(payload), key=key)
            reply = await asyncio.wait_for(future, _CALL_TIMEOUT)
        finally:
            self._pending.pop(key, None)
        return self._decode(reply)

    async def close(self) -> None:
        """Stop everything and delete the two topics."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in (self._server, self._client, self._server_producer, self._client_producer):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._admin.delete_topics([self.request_topic, self.reply_topic]), 10
            )
        with contextlib.suppress(Exception):
            await self._admin.close()


async def open_raw_echo(url: str) -> RawEcho:
    """Start an echo responder on topics of its own at ``url`` (credentials and TLS as
    ``KafkaBroker`` reads them)."""
    broker = KafkaBroker(url)
    raw = RawEcho(broker._client_options(), broker._fetch_max_wait_ms)
    try:
        await raw.start()
    except BaseException:
        await raw.close()
        raise
    return raw

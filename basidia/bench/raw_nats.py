"""The raw nats-py floor for ``basidia bench --broker nats://``.

An echo responder and a client on two plain nats-py connections, doing what a
fair hand-written client would: msgspec MessagePack on both sides, one
``nc.request`` per call (nats-py's muxed inbox), the responder on a queue group
like a Basidia service.  Basidia's overhead is measured against this.
"""

from __future__ import annotations

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

__all__ = ["RawEcho", "open_raw_echo"]

_CALL_TIMEOUT = 30.0  # seconds: a benchmark call never waits forever


class RawEcho:
    """One echo responder and one client, each on its own connection."""

    def __init__(self, server: Client, client: Client, subject: str) -> None:
        self._server = server
        self._client = client
        self._subject = subject
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(bytes).decode

    async def call(self, payload: bytes) -> bytes:
        """One request/reply round trip; returns the echoed payload."""
        reply = await self._client.request(
            self._subject, self._encode(payload), timeout=_CALL_TIMEOUT
        )
        return self._decode(reply.data)

    async def close(self) -> None:
        """Close both connections."""
        await self._client.close()
        await self._server.close()


async def open_raw_echo(url: str) -> RawEcho:
    """Connect twice to ``url`` and start an echo responder on a subject of its own."""
    server = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        client = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    except BaseException:
        await server.close()
        raise
    subject = f"bench.raw.{server.new_inbox().rpartition('.')[2]}"
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(bytes).decode

    async def echo(msg: Msg) -> None:
        await msg.respond(encode(decode(msg.data)))

    try:
        await server.subscribe(subject, queue="bench", cb=echo)
        await server.flush(timeout=5)
    except BaseException:
        await client.close()
        await server.close()
        raise
    return RawEcho(server, client, subject)

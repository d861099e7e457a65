"""The NATS adapter's hot path, beside nats-py's client API.

nats-py spends, on every message it receives, two regular-expression matches, a
dictionary of arguments, a copy out of its buffer and a ``del`` that moves the
rest of it, an ``await`` of ``_process_msg``, a ``Msg`` object with its subject
and reply decoded, and a put into the subscription's queue; and on every
publish a subject check, an ``await`` of ``_send_command`` and a future put into
the flusher's queue, which wakes the flusher task.  An RPC round trip has two
publishes and two deliveries, so on the request and reply path Basidia:

* reads the connection's bytes with its own parser (``FastParser``, which
  replaces nats-py's ``Parser`` on the client): a ``MSG`` or ``HMSG`` for a
  subscription with a sink (the request and inbox subscriptions) is handed to
  the sink synchronously, as bytes, in the client's read loop; every other
  message goes to nats-py's ``_process_msg`` as before, and the control lines
  (``PING``, ``PONG``, ``+OK``, ``-ERR``, ``INFO``) to the client's own handlers;
* queues a publish into nats-py's pending buffer in one call that never
  suspends (``Outbox.publish``), and writes every publish of one loop iteration
  to the socket in one ``writelines`` (the pending buffer keeps everything in
  order with what nats-py itself queues there); when the link is down, the
  socket's write buffer is over ``HIGH_WATER``, or the body is over the
  server's ``max_payload``, it returns False and the adapter publishes through
  ``Client.publish``, which buffers, waits or raises as documented.

Both rely on nats-py 2 internals, which ``pyproject.toml`` pins (``nats-py>=2.16,<3``):
the client's ``_ps``, ``_pending``, ``_pending_data_size``, ``_transport`` (a
``TcpTransport`` and its ``_io_writer``), ``_max_payload``, ``stats``,
``_process_msg``, ``_process_err``, ``_process_ping``, ``_process_pong`` and
``_process_info``.  ``supported`` tells whether they are all there; when they
are not, or with the broker option ``fast_path=False``, the adapter uses the
public API alone, slower but the same (docs/nats.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.errors import ProtocolError
from nats.protocol.parser import ERR_RE, INFO_RE, OK_RE, PING_RE, PONG_RE, Parser

from basidia._speedups import future_factory

__all__ = ["HIGH_WATER", "FastParser", "Outbox", "Pending", "Sink", "supported"]

logger = logging.getLogger("basidia.brokers.nats")

#: Takes a message synchronously, in the client's read loop: (subject, headers or
#: None, body).  A sink must not block; an exception it raises is logged.
Sink = Callable[[bytes, bytes | None, bytes], None]

#: Bytes waiting in the socket's write buffer past which publishes take nats-py's
#: path again, which waits for the buffer to drain.
HIGH_WATER = 1024 * 1024

# A partial control line longer than this is not NATS (nats-server's own limit is
# its max_control_line, 4 KiB by default).
_MAX_PARTIAL_LINE = 1024 * 1024

_CONNECTED = Client.CONNECTED
_CLIENT_INTERNALS = (
    "_status",
    "_ps",
    "_pending",
    "_pending_data_size",
    "_transport",
    "_max_payload",
    "stats",
    "_process_msg",
    "_process_err",
    "_process_ping",
    "_process_pong",
    "_process_info",
)


def supported(nc: Client) -> bool:
    """Whether ``nc`` (a client not yet connected) has the internals this module uses."""
    return all(hasattr(nc, name) for name in _CLIENT_INTERNALS) and isinstance(nc._ps, Parser)


class FastParser(Parser):
    """nats-py's protocol parser, with the messages of some subscriptions handed to sinks.

    ``sinks`` maps a subscription id (``Subscription._id``) to its sink.  Bytes are
    kept as they came: a message split across reads waits for the reads it needs,
    joined once.
    """

    def __init__(self, nc: Client) -> None:
        self.sinks: dict[int, Sink] = {}
        self._generation = 0
        self._chunks: list[bytes] = []
        self._have = 0
        self._want = 0
        super().__init__(nc)

    def reset(self) -> None:
        super().reset()  # nats-py's own fields, for anything that reads them
        # A reset (a reconnection) drops what was buffered, and stops a parse under way.
        self._generation += 1
        self._chunks = []
        self._have = 0
        self._want = 0

    async def parse(self, data: bytes = b"") -> None:
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._want:
                return
            data = b"".join(self._chunks)
            self._chunks = []
        generation = self._generation
        nc: Any = self.nc
        sinks = self.sinks
        stats = nc.stats
        size = len(data)
        pos = 0
        while pos < size:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if size - pos > _MAX_PARTIAL_LINE:
                    raise ProtocolError("nats: control line too long")
                self._keep(data, pos, 0)
                return
            if data.startswith(b"MSG ", pos):
                args = data[pos + 4 : eol].split()
                if len(args) == 3:
                    subject, sid, body_size = args
                elif len(args) == 4:
                    subject, sid, _reply, body_size = args
                else:
                    raise ProtocolError("nats: malformed MSG")
                header_size = 0
            elif data.startswith(b"HMSG ", pos):
                args = data[pos + 5 : eol].split()
                if len(args) == 4:
                    subject, sid, header_bytes, body_size = args
                elif len(args) == 5:
                    subject, sid, _reply, header_bytes, body_size = args
                else:
                    raise ProtocolError("nats: malformed HMSG")
                try:
                    header_size = int(header_bytes)
                except ValueError:
                    raise ProtocolError("nats: malformed HMSG") from None
            else:
                await self._control(data[pos : eol + 2])
                if generation != self._generation:
                    return
                pos = eol + 2
                continue
            try:
                total = int(body_size)
                sub_id = int(sid)
            except ValueError:
                raise ProtocolError("nats: malformed MSG") from None
            start = eol + 2
            end = start + total
            if end + 2 > size:
                self._keep(data, pos, end + 2 - pos)
                return
            pos = end + 2
            sink = sinks.get(sub_id)
            if sink is not None:
                stats["in_msgs"] += 1
                stats["in_bytes"] += total
                try:
                    if header_size:
                        split = start + header_size
                        sink(subject, data[start:split], data[split:end])
                    else:
                        sink(subject, None, data[start:end])
                except Exception:  # a bug; the read loop must go on
                    logger.exception("a NATS message sink failed")
                continue
            reply = args[2] if len(args) == (5 if header_size else 4) else b""
            if header_size:
                headers: bytes | None = data[start : start + header_size]
                body = data[start + header_size : end]
            else:
                headers, body = None, data[start:end]
            await nc._process_msg(sub_id, subject, reply, body, headers)
            if generation != self._generation:
                return

    def _keep(self, data: bytes, pos: int, want: int) -> None:
        """Keep ``data[pos:]`` until ``want`` bytes (or, with 0, any more bytes) are there."""
        rest = data[pos:]
        self._chunks = [rest]
        self._have = len(rest)
        self._want = want

    async def _control(self, line: bytes) -> None:
        """A control line, handled as nats-py's parser handles it."""
        nc: Any = self.nc
        if PING_RE.match(line):
            await nc._process_ping()
        elif PONG_RE.match(line):
            await nc._process_pong()
        elif OK_RE.match(line):
            return
        elif (err := ERR_RE.match(line)) is not None:
            text = err.group(1)
            await nc._process_err(text.decode().lower() if text else "")
        elif (info := INFO_RE.match(line)) is not None:
            await nc._process_info(json.loads(info.group(1).decode()))
        else:
            raise ProtocolError("nats: unknown protocol")


class Pending:
    """A request subscription's queue on the fast path, in place of nats-py's
    ``asyncio.Queue`` (several Python calls per message): at most ``max_msgs``
    bodies and ``max_bytes`` bytes wait for the workers, as nats-py bounds its own.

    One worker is woken at a time: while a woken worker has not run yet, what
    arrives is queued, and that worker, once it runs, wakes the next one if more
    is queued; a burst of requests costs two wake-ups, not one each.
    """

    __slots__ = (
        "_create_future",
        "_woken",
        "items",
        "max_bytes",
        "max_msgs",
        "on_full",
        "size",
        "waiters",
    )

    def __init__(
        self, max_msgs: int, max_bytes: int, on_full: Callable[[], None] = lambda: None
    ) -> None:
        self.items: deque[bytes] = deque()
        self.waiters: deque[asyncio.Future[bytes]] = deque()
        self.max_msgs = max_msgs
        self.max_bytes = max_bytes
        #: Called when a body is dropped, a bound being reached.
        self.on_full = on_full
        #: Bytes queued.
        self.size = 0
        self._woken = 0
        self._create_future = future_factory(asyncio.get_running_loop())

    def empty(self) -> bool:
        return not self.items

    def offer(self, body: bytes) -> bool:
        """Queue ``body``; False, dropping it, when a bound would be passed."""
        items = self.items
        size = self.size + len(body)
        if (self.max_msgs > 0 and len(items) >= self.max_msgs) or (
            self.max_bytes > 0 and size >= self.max_bytes
        ):
            return False
        items.append(body)
        self.size = size
        if not self._woken:
            self._wake_next()
        return True

    def sink(self, subject: bytes, headers: bytes | None, body: bytes) -> None:
        """The parser's sink for the subscription: ``offer``, ``on_full`` when it refuses."""
        if not self.offer(body):
            self.on_full()

    def _wake_next(self) -> None:
        items, waiters = self.items, self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                body = items.popleft()
                self.size -= len(body)
                waiter.set_result(body)
                self._woken += 1
                return

    async def get(self) -> bytes:
        items = self.items
        if items:
            body = items.popleft()
            self.size -= len(body)
            return body
        waiter: asyncio.Future[bytes] = self._create_future()
        self.waiters.append(waiter)
        try:
            body = await waiter
        except asyncio.CancelledError:
            # Cancelled after a body was handed over: give it back, first in line.
            if waiter.done() and not waiter.cancelled():
                self._woken -= 1
                body = waiter.result()
                items.appendleft(body)
                self.size += len(body)
                if not self._woken:
                    self._wake_next()
            raise
        self._woken -= 1
        if items:
            self._wake_next()
        return body


class Outbox:
    """Publishes on a connected client, written to its socket once per loop iteration."""

    __slots__ = ("_congested", "_loop", "_nc", "_scheduled", "_writer")

    def __init__(self, nc: Client) -> None:
        self._nc: Any = nc
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        self._congested = False
        self._writer: Any = None

    def publish(self, subject: bytes, reply: bytes, body: bytes) -> bool:
        """Queue a ``PUB``; False, having done nothing, when nats-py's ``publish`` must do it."""
        nc = self._nc
        if nc._status != _CONNECTED or len(body) > nc._max_payload:
            return False
        if self._congested:
            writer = self._writer
            if (
                writer is not nc._transport._io_writer
                or writer.transport.get_write_buffer_size() > HIGH_WATER
            ):
                return False
            self._congested = False
        if reply:
            command = b"PUB %b %b %d\r\n%b\r\n" % (subject, reply, len(body), body)
        else:
            command = b"PUB %b %d\r\n%b\r\n" % (subject, len(body), body)
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += len(body)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._scheduled = False
        nc = self._nc
        if not nc._pending or nc._status != _CONNECTED:
            return  # nats-py writes its pending buffer once it is connected again
        try:
            writer = nc._transport._io_writer
            writer.writelines(nc._pending)
        except Exception as exc:  # a closing socket: nats-py's read loop reconnects
            logger.debug("writing to NATS: %r", exc)
            return
        nc._pending = []
        nc._pending_data_size = 0
        if writer.transport.get_write_buffer_size() > HIGH_WATER:
            self._writer = writer
            self._congested = True

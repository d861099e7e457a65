"""One Redis connection that carries the per-call commands, pipelined.

redis-py's pool takes a connection for each command, writes it through a task of its
own (``wait_for``) and waits for its answer before the connection serves anyone else:
with 64 calls in flight that is 64 connections, 64 writes and a pool lock per command.
Here every command issued in one turn of the event loop goes out in one write on one
connection, and a reader task hands the answers back in order (Redis answers the
commands of a connection in the order they came).  ``RedisBroker`` sends a request's
``EVALSHA``, a reply's ``PUBLISH`` and an event's ``EVALSHA`` this way
(docs/redis.md, performance).

A lost link fails every command written and not answered with the connection's error
(``redis.exceptions.ConnectionError``/``TimeoutError``, as the pool would); the next
command connects again.  An error reply (``ResponseError``) fails only its command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

__all__ = ["Pipe"]

logger = logging.getLogger("basidia.brokers.redis")

_LINK_ERRORS = (RedisError, ConnectionError, OSError, asyncio.TimeoutError)


class _Link:
    """One connection, what was written on it and not answered, and its reader."""

    __slots__ = ("conn", "reader", "something_waits", "waiting")

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        #: Written and not answered yet, oldest first.
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.something_waits = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    def unusable(self) -> bool:
        """Closed by the server (or a proxy) while idle, with nobody reading to notice, or
        its reader gone."""
        reader = getattr(self.conn, "_reader", None)
        task = self.reader
        return reader is None or reader.at_eof() or task is None or task.done()

    def fail(self, error: BaseException) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class Pipe:
    """Pipelined commands on one connection made by ``new_connection``."""

    def __init__(
        self,
        new_connection: Callable[[], AbstractConnection],
        on_link_error: Callable[[BaseException], None],
    ) -> None:
        self._new_connection = new_connection
        self._on_link_error = on_link_error
        self._link: _Link | None = None
        self._connecting: asyncio.Future[_Link] | None = None
        self._commands: list[tuple[Any, ...]] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._closed = False
        self._chores: set[asyncio.Future[None]] = set()

    async def execute(self, *args: Any) -> Any:
        """Send one command (in the next write) and return its answer."""
        link = self._link
        if link is None or (not link.waiting and link.unusable()):
            # Not connected, or closed by the server (or a proxy) while idle, with nobody
            # reading to notice.  (With answers awaited, the reader notices and fails them.)
            await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._commands.append(args)
        self._futures.append(future)
        if len(self._futures) == 1:
            loop.call_soon(self._flush)
        return await future

    async def _connect(self) -> None:
        if self._closed:
            raise RedisConnectionError("the connection is closed")
        if self._link is not None:
            self._drop(self._link, RedisConnectionError("the connection was closed"))
        connecting = self._connecting
        if connecting is None:
            connecting = self._connecting = asyncio.ensure_future(self._open())
            connecting.add_done_callback(self._connected)
        await asyncio.shield(connecting)

    async def _open(self) -> _Link:
        conn = self._new_connection()
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await _disconnect(conn)
            raise
        return _Link(conn)

    def _connected(self, connecting: asyncio.Future[_Link]) -> None:
        self._connecting = None
        if connecting.cancelled() or connecting.exception() is not None:
            return
        link = connecting.result()
        if self._closed:  # closed while connecting
            self._chore(_disconnect(link.conn))
            return
        self._link = link
        link.reader = asyncio.ensure_future(self._read(link))

    def _drop(self, link: _Link, error: BaseException) -> None:
        """Forget ``link``: fail what waits on it, stop its reader, close it."""
        if self._link is link:
            self._link = None
        link.fail(error)
        reader, link.reader = link.reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._chore(_disconnect(link.conn))

    def _chore(self, coro: Coroutine[Any, Any, None]) -> None:
        chore = asyncio.ensure_future(coro)
        self._chores.add(chore)
        chore.add_done_callback(self._chores.discard)

    def _flush(self) -> None:
        commands, futures = self._commands, self._futures
        self._commands, self._futures = [], []
        link = self._link
        writer = getattr(link.conn, "_writer", None) if link is not None else None
        if link is None or writer is None or writer.transport.is_closing():
            error = RedisConnectionError("the connection was lost before the command was sent")
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        conn = link.conn
        try:
            writer.writelines(conn.pack_commands(commands))
            link.waiting.extend(futures)
        except Exception:  # an argument redis-py cannot encode: fail that one alone
            for command, future in zip(commands, futures, strict=True):
                try:
                    packed = conn.pack_command(*command)
                except Exception as exc:
                    if not future.done():
                        future.set_exception(exc)
                    continue
                writer.writelines(packed)
                link.waiting.append(future)
        link.something_waits.set()

    async def _read(self, link: _Link) -> None:
        conn, waiting, something_waits = link.conn, link.waiting, link.something_waits
        try:
            while True:
                if not waiting:
                    something_waits.clear()
                    await something_waits.wait()
                    continue
                try:
                    answer: Any = await conn.read_response()
                except ResponseError as exc:
                    answer = exc
                future = waiting.popleft()
                if future.done():  # its caller gave up
                    continue
                if isinstance(answer, ResponseError):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
        except _LINK_ERRORS as exc:
            self._on_link_error(exc)
            error = exc if isinstance(exc, RedisError) else RedisConnectionError(str(exc))
            self._drop(link, error)
        except Exception as exc:  # not a link error: still never leave a caller waiting
            logger.exception("the pipelined Redis connection failed")
            self._on_link_error(exc)
            self._drop(link, RedisConnectionError(f"the connection failed: {exc!r}"))

    async def aclose(self) -> None:
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            reader = link.reader
            self._drop(link, RedisConnectionError("the connection is closed"))
            if reader is not None:
                await asyncio.gather(reader, return_exceptions=True)
        if self._chores:
            await asyncio.gather(*self._chores, return_exceptions=True)
        error = RedisConnectionError("the connection is closed")
        for future in self._futures:
            if not future.done():
                future.set_exception(error)
        self._commands, self._futures = [], []


async def _disconnect(conn: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.disconnect()

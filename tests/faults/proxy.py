"""An asyncio TCP fault proxy: put it between a client and a broker and break the link on demand.

Faults apply at once to open connections and to new ones. They combine: ``latency`` and
``slowdown`` stack with each other and with ``blackhole`` or ``cut_after``; ``pass_through()``
clears them all. Directions are seen from the client: ``"up"`` is client to target, ``"down"`` is
target to client.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Literal
from urllib.parse import quote

Direction = Literal["up", "down"]
BlackholeDirection = Literal["up", "down", "both"]
# Chunks on their way through one direction, stamped with when they may be written; None is EOF.
_Chunks = asyncio.Queue[tuple[float, bytes] | None]

_READ_SIZE = 64 * 1024
# Chunks in flight per direction: enough to hide latency, small enough that a stalled side pushes
# back on its sender (through the kernel's socket buffers) instead of growing memory.
_QUEUE_CHUNKS = 64
# Slowdown releases data in slices of this share of a second so the rate holds for short bursts.
_SLOWDOWN_SLICE_SECONDS = 0.05
_CONNECT_TIMEOUT = 5.0
_CLOSE_TIMEOUT = 1.0
# Every task the proxy creates is named with this prefix, so tests can check none outlive stop().
TASK_NAME_PREFIX = "FaultProxy"


@dataclass
class _Faults:
    down: bool = False
    blackholed: frozenset[Direction] = frozenset()
    latency: float = 0.0
    bytes_per_second: float | None = None
    cut_after: int | None = None


class FaultProxy:
    """Forward TCP from ``127.0.0.1:<port>`` to a target, injecting faults on demand.

    Use ``async with FaultProxy(host, port) as proxy:`` or ``await start()`` and ``await stop()``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._faults = _Faults()
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.connections_accepted = 0

    @property
    def port(self) -> int:
        """The local port clients should connect to."""
        if self._server is None:
            raise RuntimeError("FaultProxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def active_connections(self) -> int:
        """Connections currently forwarded (closed and refused ones excluded)."""
        return len(self._links)

    def url_for(self, scheme: str, user: str | None = None, password: str | None = None) -> str:
        """A broker URL pointing at the proxy, such as ``amqp://guest:guest@127.0.0.1:PORT/``."""
        credentials = ""
        if user is not None:
            credentials = quote(user, safe="")
            if password is not None:
                credentials += ":" + quote(password, safe="")
            credentials += "@"
        return f"{scheme}://{credentials}127.0.0.1:{self.port}/"

    async def start(self) -> None:
        """Listen on an ephemeral loopback port."""
        self._stopping = False
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)

    async def stop(self) -> None:
        """Close the listener and every connection, and wait for all proxy tasks to end."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def pass_through(self) -> None:
        """Clear every fault; held data flows again."""
        self._faults = _Faults()
        self._notify()

    def down(self) -> None:
        """Abort every open connection and close new ones right after accepting them."""
        self._faults.down = True
        for link in list(self._links):
            link.abort()

    def blackhole(self, direction: BlackholeDirection = "both") -> None:
        """Stop forwarding in ``direction`` while keeping both sockets open: a half-open link.

        Held bytes are not dropped: they are delivered in order after ``pass_through()``, as TCP
        would after a healed partition. While held, the sender is pushed back on once the proxy's
        and the kernel's buffers are full.
        """
        self._faults.blackholed = frozenset(("up", "down") if direction == "both" else (direction,))
        self._notify()

    def latency(self, seconds: float) -> None:
        """Delay every byte by ``seconds`` in each direction, without capping throughput."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._faults.latency = seconds
        self._notify()

    def slowdown(self, bytes_per_second: float) -> None:
        """Cap each direction of each connection at ``bytes_per_second``."""
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be > 0; use blackhole() to stop the flow")
        self._faults.bytes_per_second = bytes_per_second
        self._notify()

    def cut_after(self, n_bytes: int) -> None:
        """Close each connection once ``n_bytes`` more have gone through it.

        Bytes are counted across both directions together, from this call for open connections
        and from accept for new ones. The last chunk is truncated so exactly ``n_bytes`` pass,
        then both sockets are closed (FIN, after the truncated data is flushed).
        """
        if n_bytes < 1:
            raise ValueError("n_bytes must be >= 1; use down() to close connections at once")
        self._faults.cut_after = n_bytes
        for link in self._links:
            link.forwarded_since_cut = 0

    def _notify(self) -> None:
        # Waiters hold the old event; replacing it before setting wakes each of them exactly once.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _until_flowing(self, direction: Direction) -> None:
        while direction in self._faults.blackholed:
            await self._changed.wait()

    def _on_client(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # A plain callback, not a coroutine: the handler task is tracked from the moment it exists,
        # so stop() never misses one, and connections refused while down or stopping get none.
        self.connections_accepted += 1
        if self._faults.down or self._stopping:
            client_writer.transport.abort()
            return
        handler = asyncio.create_task(
            self._serve(client_reader, client_writer), name=f"{TASK_NAME_PREFIX} connection"
        )
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            target_reader, target_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), _CONNECT_TIMEOUT
            )
        except (TimeoutError, OSError):
            # Like a target that is down: the client sees its connection closed.
            client_writer.transport.abort()
            return
        except asyncio.CancelledError:
            client_writer.transport.abort()
            raise
        link = _Link(self, client_reader, client_writer, target_reader, target_writer)
        self._links.add(link)
        try:
            # down() or stop() may have come while the target connection was being opened.
            if self._faults.down or self._stopping:
                link.abort()
            await link.run()
        finally:
            self._links.discard(link)


class _Link:
    """One proxied connection: a reader and a writer task for each direction."""

    def __init__(
        self,
        proxy: FaultProxy,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        target_reader: asyncio.StreamReader,
        target_writer: asyncio.StreamWriter,
    ) -> None:
        self._proxy = proxy
        self._client_reader = client_reader
        self._client_writer = client_writer
        self._target_reader = target_reader
        self._target_writer = target_writer
        self._tasks: list[asyncio.Task[None]] = []
        self.forwarded_since_cut = 0

    async def run(self) -> None:
        """Forward until both directions reach EOF or the link is closed or aborted."""
        self._tasks = [
            *self._pump("up", self._client_reader, self._target_writer),
            *self._pump("down", self._target_reader, self._client_writer),
        ]
        try:
            await asyncio.wait(self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._close_writers()

    def _pump(
        self, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> list[asyncio.Task[None]]:
        # Reading and writing in separate tasks lets the writer hold chunks back (latency,
        # blackhole) while the reader keeps taking them in, up to the queue's bound.
        chunks: _Chunks = asyncio.Queue(_QUEUE_CHUNKS)
        name = f"{TASK_NAME_PREFIX} {direction}"
        return [
            asyncio.create_task(self._read(reader, chunks), name=f"{name} read"),
            asyncio.create_task(self._write(direction, chunks, writer), name=f"{name} write"),
        ]

    def abort(self) -> None:
        """Drop both sockets at once, discarding unsent data."""
        self._client_writer.transport.abort()
        self._target_writer.transport.abort()
        self._cancel_tasks()

    def close(self) -> None:
        """Close both sockets after flushing what was already written to them."""
        self._client_writer.close()
        self._target_writer.close()
        self._cancel_tasks()

    def _cancel_tasks(self) -> None:
        # The calling task may be one of them (a cut found by a writer): it stops at its next await.
        for task in self._tasks:
            task.cancel()

    async def _read(self, reader: asyncio.StreamReader, queue: _Chunks) -> None:
        loop = asyncio.get_running_loop()
        try:
            while chunk := await reader.read(_READ_SIZE):
                # Stamp arrival so latency delays each chunk once instead of accumulating.
                await queue.put((loop.time() + self._proxy._faults.latency, chunk))
        except OSError:
            self.abort()
            return
        await queue.put(None)

    async def _write(
        self,
        direction: Direction,
        queue: _Chunks,
        writer: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                release_at, chunk = item
                await asyncio.sleep(max(0.0, release_at - loop.time()))
                while chunk:
                    await self._proxy._until_flowing(direction)
                    chunk = await self._forward(chunk, writer)
            # The sender half-closed: pass the FIN on and keep the other direction open.
            await self._proxy._until_flowing(direction)
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            self.abort()

    async def _forward(self, chunk: bytes, writer: asyncio.StreamWriter) -> bytes:
        """Write a rate-limited, cut-limited part of ``chunk``; return what is left."""
        faults = self._proxy._faults
        size = len(chunk)
        if faults.bytes_per_second is not None:
            size = min(size, max(1, int(faults.bytes_per_second * _SLOWDOWN_SLICE_SECONDS)))
        cut = faults.cut_after is not None and self.forwarded_since_cut + size >= faults.cut_after
        if faults.cut_after is not None:
            size = min(size, faults.cut_after - self.forwarded_since_cut)
        writer.write(chunk[:size])
        self.forwarded_since_cut += size
        if cut:
            self.close()
            return b""
        await writer.drain()
        if faults.bytes_per_second is not None:
            await asyncio.sleep(size / faults.bytes_per_second)
        return chunk[size:]

    async def _close_writers(self) -> None:
        for writer in (self._client_writer, self._target_writer):
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT)
            except (TimeoutError, OSError):
                # A peer that never reads keeps a flushing socket open; drop it instead.
                writer.transport.abort()

"""The fault harness itself: each fault is observed the way a client of the link would see it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import aiormq
import nats
import pytest
from nats.js.api import StorageType

from .ledger import HungAwait, Ledger
from .proxy import TASK_NAME_PREFIX, BlackholeDirection, FaultProxy
from .servers import NatsServer, RabbitServer

pytestmark = pytest.mark.timeout(30)

# Long enough that a forwarded byte would have arrived on loopback, short enough to keep tests fast.
_STALL = 0.3
_QUEUE_DEFINITION_PERSISTED = 2.0


class EchoServer:
    """A loopback echo server that also records every byte it received."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed_connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> EchoServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.closed_connections += 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(handler)


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the peer sends before closing; a reset counts as closing."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy


async def test_pass_through_forwards_both_ways_intact(proxy: FaultProxy, echo: EchoServer) -> None:
    payload = os.urandom(1024 * 1024)
    reader, writer = await connect(proxy)
    writer.write(payload)
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    await close(writer)
    assert echoed == payload
    assert echo.received == payload


@pytest.mark.parametrize("direction", ["up", "down", "both"])
async def test_blackhole_stalls_the_link_but_keeps_it_open(
    proxy: FaultProxy, echo: EchoServer, direction: BlackholeDirection
) -> None:
    reader, writer = await connect(proxy)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"

    proxy.blackhole(direction)
    writer.write(b"held")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), _STALL)
    assert proxy.active_connections == 1
    assert not reader.at_eof()
    reached_target = direction == "down"
    assert echo.received.endswith(b"held") == reached_target

    proxy.pass_through()
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
    await close(writer)


async def test_down_closes_open_connections_and_refuses_new_ones(proxy: FaultProxy) -> None:
    open_reader, open_writer = await connect(proxy)
    proxy.down()
    assert await read_until_closed(open_reader) == b""
    await close(open_writer)

    reader, writer = await connect(proxy)
    writer.write(b"anyone?")
    assert await read_until_closed(reader) == b""
    await close(writer)

    assert proxy.connections_accepted == 2
    assert proxy.active_connections == 0

    proxy.pass_through()
    reader, writer = await connect(proxy)
    writer.write(b"back")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"back"
    await close(writer)


async def test_cut_after_closes_once_n_bytes_went_up(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.cut_after(10)
    reader, writer = await connect(proxy)
    writer.write(bytes(range(100)))
    assert await read_until_closed(reader) == b""
    await close(writer)
    await eventually(lambda: echo.closed_connections == 1)
    assert echo.received == bytes(range(10))


async def test_cut_after_counts_both_directions(proxy: FaultProxy) -> None:
    proxy.cut_after(10)
    reader, writer = await connect(proxy)
    writer.write(b"abcdef")
    # 6 bytes up, so only 4 of the echo come back down before the cut.
    assert await read_until_closed(reader) == b"abcd"
    await close(writer)


async def test_latency_delays_each_direction_without_capping_throughput(proxy: FaultProxy) -> None:
    proxy.latency(0.2)
    reader, writer = await connect(proxy)

    started = time.monotonic()
    writer.write(b"x")
    await asyncio.wait_for(reader.readexactly(1), 5)
    round_trip = time.monotonic() - started

    # Twenty separate chunks: a delay line keeps this near one round trip, where per-chunk
    # sleeps would take twenty.
    started = time.monotonic()
    for _ in range(20):
        writer.write(b"y" * 1024)
        await writer.drain()
        await asyncio.sleep(0.005)
    await asyncio.wait_for(reader.readexactly(20 * 1024), 5)
    burst = time.monotonic() - started
    await close(writer)

    assert 0.35 <= round_trip < 2.0
    assert burst < 1.5


async def test_slowdown_caps_bytes_per_second(proxy: FaultProxy) -> None:
    proxy.slowdown(20_000)
    reader, writer = await connect(proxy)
    started = time.monotonic()
    writer.write(b"z" * 10_000)
    await asyncio.wait_for(reader.readexactly(10_000), 10)
    elapsed = time.monotonic() - started
    await close(writer)
    assert 0.4 <= elapsed < 5.0


async def test_stop_closes_connections_and_leaves_no_tasks(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port)
    await proxy.start()
    reader, writer = await connect(proxy)
    proxy.blackhole()  # a held connection must not keep stop() waiting
    writer.write(b"stuck")
    await proxy.stop()
    assert await read_until_closed(reader) == b""
    await close(writer)
    leftovers = [
        task for task in asyncio.all_tasks() if task.get_name().startswith(TASK_NAME_PREFIX)
    ]
    assert leftovers == []


async def test_target_down_closes_the_client_connection() -> None:
    async with EchoServer() as gone:
        port = gone.port
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await connect(proxy)
        assert await read_until_closed(reader) == b""
        await close(writer)


async def test_ledger_classifies_messages_and_catches_hangs(ledger: Ledger) -> None:
    for message_id in ("confirmed", "confirmed-twice", "failed-recovered", "confirmed-lost"):
        ledger.record_sent(message_id)
    ledger.record_confirmed("confirmed")
    ledger.record_confirmed("confirmed-twice")
    ledger.record_confirmed("confirmed-lost")
    ledger.record_failed("failed-recovered")
    for message_id in ("confirmed", "confirmed-twice", "confirmed-twice", "failed-recovered"):
        ledger.record_received(message_id)
    ledger.record_received("never-sent")
    ledger.record_side_effect("key-1")
    ledger.record_side_effect("key-1")
    with pytest.raises(HungAwait):
        await ledger.guard(asyncio.sleep(10), 0.05, "a sleeping publish")
    assert await ledger.guard(asyncio.sleep(0, "done"), 1, "a quick publish") == "done"

    report = ledger.report()
    assert report.lost == ("confirmed-lost",)
    assert report.recovered == ("failed-recovered",)
    assert report.unexpected == ("never-sent",)
    assert report.duplicated == ("confirmed-twice",)
    assert report.duplicate_side_effects == ("key-1",)
    assert report.hung_awaits == ("a sleeping publish (over 0.05 s)",)
    with pytest.raises(AssertionError, match="lost: 1 \\(confirmed-lost\\)"):
        ledger.assert_clean()


async def test_ledger_is_clean_when_every_confirmed_message_arrives(ledger: Ledger) -> None:
    for number in range(100):
        ledger.record_sent(str(number))
        ledger.record_confirmed(str(number))
    for number in range(100):
        ledger.record_received(str(number))
        ledger.record_side_effect(f"key-{number}")
    ledger.record_received("7")  # a redelivery the handler recognised by its idempotency key
    assert await ledger.wait_delivered(1)
    ledger.assert_clean()
    with pytest.raises(AssertionError, match="duplicated: 1 \\(7\\)"):
        ledger.assert_clean(allow_duplicates_delivered=False)


@pytest.mark.timeout(60)
async def test_nats_server_keeps_jetstream_data_across_kill_and_restart(
    nats_server: NatsServer,
) -> None:
    client = await nats.connect(nats_server.url, allow_reconnect=False)
    jetstream = client.jetstream()
    await jetstream.add_stream(name="ORDERS", subjects=["orders.*"], storage=StorageType.FILE)
    await jetstream.publish("orders.1", b"first order")
    await client.close()

    nats_server.kill()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", nats_server.port)
    await nats_server.restart()

    client = await nats.connect(nats_server.url, allow_reconnect=False)
    message = await client.jetstream().get_msg("ORDERS", 1)
    await client.close()
    assert message.data == b"first order"


async def test_nats_server_pause_freezes_it_until_resume(nats_server: NatsServer) -> None:
    nats_server.pause()
    # The kernel still accepts the connection; the frozen server never greets it.
    reader, writer = await asyncio.open_connection("127.0.0.1", nats_server.port)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.readline(), _STALL)
    nats_server.resume()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"INFO ")
    await close(writer)


@pytest.mark.timeout(120)
async def test_rabbit_server_keeps_durable_messages_across_kill_and_restart(
    rabbit_server: RabbitServer,
) -> None:
    connection = await aiormq.connect(rabbit_server.url)
    channel = await connection.channel()
    await channel.queue_declare("orders", durable=True)
    await channel.basic_publish(
        b"first order",
        routing_key="orders",
        properties=aiormq.spec.Basic.Properties(delivery_mode=2),
    )
    await connection.close()
    # RabbitMQ 3.10 logs queue definitions to disk asynchronously: a SIGKILL right after
    # declare-ok can lose the queue (seen within ~0.1 s; never after 1 s). Confirmed messages
    # in a queue that was already on disk survive an immediate kill.
    await asyncio.sleep(_QUEUE_DEFINITION_PERSISTED)

    rabbit_server.kill()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", rabbit_server.port)
    await rabbit_server.restart()

    connection = await aiormq.connect(rabbit_server.url)
    channel = await connection.channel()
    message = await channel.basic_get("orders", no_ack=True)
    await connection.close()
    assert message.body == b"first order"


@pytest.mark.timeout(120)
async def test_rabbit_server_pause_stalls_clients_until_resume(
    shared_rabbit_server: RabbitServer,
) -> None:
    shared_rabbit_server.pause()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(aiormq.connect(shared_rabbit_server.url), _STALL)
    shared_rabbit_server.resume()
    connection = await asyncio.wait_for(aiormq.connect(shared_rabbit_server.url), 10)
    await connection.close()


@pytest.mark.timeout(120)
async def test_proxy_down_drops_a_real_amqp_connection(shared_rabbit_server: RabbitServer) -> None:
    async with FaultProxy("127.0.0.1", shared_rabbit_server.port) as proxy:
        connection = await aiormq.connect(proxy.url_for("amqp", "guest", "guest"))
        proxy.down()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(connection.closing, 5)
        assert connection.is_closed

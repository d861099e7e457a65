"""RPC as a caller sees it: results, typed errors, deadlines, concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from basidia import (
    ConnectionLost,
    Dependency,
    MethodNotFound,
    Middleware,
    OutgoingCall,
    RemoteError,
    RpcError,
    RpcTimeout,
    Service,
    ServiceRunner,
    ServiceUnavailable,
    ValidationError,
    connect,
    current_context,
    register_error,
    rpc,
)
from basidia._speedups import Frame, Kind, decode_frame, encode_frame
from basidia.brokers.memory import MemoryBroker
from basidia.rpc import error_from_frame
from basidia.runner import Cluster

from .brokers.contract import eventually

pytestmark = pytest.mark.timeout(30)


class Point(msgspec.Struct):
    x: int
    y: int


class InsufficientFunds(RpcError):
    code = "tests.insufficient_funds"


register_error(InsufficientFunds)

finished: list[str] = []


class Calculator(Service):
    name = "calculator"

    @rpc
    async def add(self, a: int, b: int = 10) -> int:
        return a + b

    @rpc
    async def echo(self, value: Any) -> Any:
        return value

    @rpc
    async def norm(self, point: Point) -> int:
        return abs(point.x) + abs(point.y)

    @rpc
    async def fail(self, message: str) -> None:
        raise ValueError(message)

    @rpc
    async def withdraw(self, amount: int) -> None:
        raise InsufficientFunds(f"cannot withdraw {amount}")

    @rpc
    async def slow(self, seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
        finally:
            finished.append("slow")
        return "done"

    @rpc
    async def remaining(self) -> float:
        ctx = current_context()
        assert ctx is not None and ctx.remaining is not None
        return ctx.remaining

    @rpc
    async def unserializable(self) -> Any:
        return object()


class Frontend(Service):
    name = "frontend"
    calculator = Dependency("calculator")
    fast = Dependency("calculator", timeout=0.3)

    @rpc
    async def nested_remaining(self) -> float:
        return float(await self.calculator.remaining())

    @rpc
    async def call_slow(self, seconds: float) -> str:
        return str(await self.fast.slow(seconds))

    @rpc
    async def forward_failure(self) -> None:
        await self.calculator.fail("deep")


@pytest.fixture
async def cluster(memory_url: str) -> AsyncIterator[Cluster]:
    async with ServiceRunner([Calculator, Frontend], broker=memory_url):
        async with connect(memory_url, timeout=5) as cluster:
            yield cluster


async def test_results_come_back_decoded(cluster: Cluster) -> None:
    calc = cluster.rpc.calculator
    assert await calc.add(1, 2) == 3
    assert await calc.add(1) == 11  # default from the signature
    assert await calc.add(a=1, b=5) == 6
    assert await calc.add(4, b=5) == 9
    assert await calc.echo({"nested": [1, 2.5, None, True, "x"]}) == {
        "nested": [1, 2.5, None, True, "x"]
    }
    assert await calc.norm({"x": -3, "y": 4}) == 7  # converted to the Struct of the hint


async def test_json_serializer_gives_the_same_results(memory_url: str) -> None:
    config = {"serializer": "json"}
    async with ServiceRunner([Calculator], broker=memory_url, config=config):
        async with connect(memory_url, config=config) as cluster:
            assert await cluster.rpc.calculator.add(2, b=3) == 5
            with pytest.raises(ValidationError, match="'a'"):
                await cluster.rpc.calculator.add("two")


async def test_unknown_service_is_unavailable_at_once(cluster: Cluster) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="no_such_service"):
        await cluster.rpc.no_such_service.method()
    assert time.monotonic() - started < 0.5


async def test_unknown_method_is_method_not_found(cluster: Cluster) -> None:
    with pytest.raises(MethodNotFound, match="'subtract'"):
        await cluster.rpc.calculator.subtract(1, 2)


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("one", 2), {}, "invalid argument 'a': Expected `int`, got `str`"),
        ((1, "two"), {}, "invalid argument 'b': Expected `int`, got `str`"),
        ((), {"a": 1, "b": "two"}, "invalid argument 'b'"),
        ((), {}, "at least length 1"),
        ((1, 2, 3), {}, "at most length 2"),
        ((), {"a": 1, "c": 3}, "unknown field `c`"),
        ((1,), {"a": 1}, "multiple values for argument 'a'"),
    ],
)
async def test_wrong_arguments_are_validation_errors(
    cluster: Cluster, args: tuple[Any, ...], kwargs: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        await cluster.rpc.calculator.add(*args, **kwargs)
    assert expected in str(raised.value)


async def test_nested_validation_names_the_parameter_and_path(cluster: Cluster) -> None:
    with pytest.raises(ValidationError, match=r"invalid argument 'point'.*at point\.y"):
        await cluster.rpc.calculator.norm({"x": 1, "y": "up"})


async def test_handler_exception_becomes_remote_error(cluster: Cluster) -> None:
    with pytest.raises(RemoteError) as raised:
        await cluster.rpc.calculator.fail("x")
    assert raised.value.exc_type == "ValueError"
    assert raised.value.message == "x"
    assert str(raised.value) == "ValueError: x"


async def test_remote_error_keeps_its_type_through_nested_calls(cluster: Cluster) -> None:
    with pytest.raises(RemoteError) as raised:
        await cluster.rpc.frontend.forward_failure()
    assert (raised.value.exc_type, raised.value.message) == ("ValueError", "deep")


async def test_registered_errors_are_raised_as_their_type(cluster: Cluster) -> None:
    with pytest.raises(InsufficientFunds, match="cannot withdraw 5"):
        await cluster.rpc.calculator.withdraw(5)


async def test_unserializable_result_is_a_remote_error_not_a_hang(cluster: Cluster) -> None:
    with pytest.raises(RemoteError, match="cannot be sent"):
        await cluster.rpc.calculator.unserializable()


async def test_unserializable_argument_fails_on_the_caller(cluster: Cluster) -> None:
    with pytest.raises(ValidationError, match="cannot be encoded"):
        await cluster.rpc.calculator.echo(object())


async def test_deadline_exceeded_raises_rpc_timeout_and_leaks_no_task(cluster: Cluster) -> None:
    finished.clear()
    tasks_before = len(asyncio.all_tasks())
    started = time.monotonic()
    with pytest.raises(RpcTimeout, match=r"calculator\.slow"):
        await cluster.rpc.calculator.slow.with_timeout(0.3)(30)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.0
    # The server cancels the handler at the same deadline: nothing keeps running.
    for _ in range(100):
        if finished:
            break
        await asyncio.sleep(0.01)
    assert finished == ["slow"]
    assert len(asyncio.all_tasks()) <= tasks_before
    assert cluster._connection.client.router.pending == 0


async def test_deadline_propagates_to_nested_calls(cluster: Cluster) -> None:
    remaining = await cluster.rpc.frontend.nested_remaining.with_timeout(2.0)()
    assert 1.0 < remaining <= 2.0  # the nested call got the caller's deadline, not 30 s


async def test_dependency_timeout_caps_nested_calls(cluster: Cluster) -> None:
    with pytest.raises(RpcTimeout):
        await cluster.rpc.frontend.call_slow(5)


async def test_thousand_concurrent_calls_through_one_proxy_get_their_own_results(
    cluster: Cluster,
) -> None:
    add = cluster.rpc.calculator.add
    results = await asyncio.gather(*(add(i, i) for i in range(1000)))
    assert results == [2 * i for i in range(1000)]


async def test_a_cancelled_call_leaves_nothing_pending(cluster: Cluster) -> None:
    call = asyncio.ensure_future(cluster.rpc.calculator.slow(0.5))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert cluster._connection.client.router.pending == 0


async def test_a_call_goes_wherever_a_coroutine_goes(cluster: Cluster) -> None:
    # On the compiled core a call is not a Python coroutine but a C awaitable
    # (docs/benchmarks.md#the-compiled-call-path): asyncio must take it all the same.
    add, slow = cluster.rpc.calculator.add, cluster.rpc.calculator.slow
    assert await asyncio.create_task(add(1, 2)) == 3
    assert await asyncio.wait_for(slow(0.01), 5) == "done"
    gathered = await asyncio.gather(add(2, 2), slow(0.01), asyncio.ensure_future(add(3, 3)))
    assert gathered == [4, "done", 6]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow(0.5), 0.05)
    assert cluster._connection.client.router.pending == 0
    assert await slow.with_timeout(5)(0.01) == "done"
    assert repr(add) == "<MethodProxy calculator.add>"


async def test_a_call_never_awaited_leaves_nothing_pending(cluster: Cluster) -> None:
    router = cluster._connection.client.router
    call = cluster.rpc.calculator.slow(0.5)
    call.__await__().send(None)  # sent, then dropped while it waits
    assert router.pending == 1
    del call
    assert router.pending == 0


async def test_middleware_sees_outgoing_calls_and_handlers(memory_url: str) -> None:
    seen: list[str] = []

    class Recorder(Middleware):
        async def call(self, call: OutgoingCall, call_next: Any) -> Any:
            seen.append(f"call {call.service}.{call.method}")
            call.headers["tenant"] = "acme"
            return await call_next(call)

        async def handle(self, ctx: Any, args: tuple[Any, ...], call_next: Any) -> Any:
            seen.append(f"handle {ctx.service}.{ctx.entrypoint} tenant={ctx.headers.get('tenant')}")
            return await call_next(ctx, args)

    async with ServiceRunner([Calculator], broker=memory_url, middleware=[Recorder()]):
        async with connect(memory_url, middleware=[Recorder()]) as cluster:
            assert await cluster.rpc.calculator.add(1, 1) == 2
    assert seen == ["call calculator.add", "handle calculator.add tenant=acme"]


async def test_calls_fail_fast_when_the_client_closes(memory_url: str) -> None:
    async with ServiceRunner([Calculator], broker=memory_url):
        cluster = await connect(memory_url).start()
        call = asyncio.ensure_future(cluster.rpc.calculator.slow(5))
        await asyncio.sleep(0.05)
        await cluster.close()
        with pytest.raises(ConnectionLost, match="closed"):
            await call


async def test_deeply_nested_arguments_are_a_validation_error(
    cluster: Cluster, memory_url: str
) -> None:
    deep: Any = None
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValidationError, match="cannot be encoded"):
        await cluster.rpc.calculator.echo(deep)
    # The same bomb sent as raw bytes by a client that does not check: a typed error back.
    broker = MemoryBroker(memory_url)
    await broker.connect()
    replies: list[bytes] = []
    inbox = await broker.open_inbox(replies.append)
    bomb = b"\x91" + b"\x91" * 100_000 + b"\xc0"
    request = Frame(Kind.REQUEST, 7, "calculator.echo", bomb, inbox, 0)
    await broker.send_request("calculator", encode_frame(request), correlation_id=7)
    await eventually(lambda: len(replies) == 1)
    await broker.close()
    error = error_from_frame(decode_frame(replies[0]))
    assert isinstance(error, ValidationError) and "nested too deeply" in str(error)
    assert await cluster.rpc.calculator.add(1, 2) == 3

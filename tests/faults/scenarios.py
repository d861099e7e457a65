"""Fault scenarios written once, run on every broker (RELIABILITY.md F7 and F10).

Each takes the brokers to test with (a service's and a caller's, with the broker's short
test timers) and the means to break the link or the server; the broker's test module
supplies them, with its own throw-away server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from basidia import BasidiaError, RpcTimeout, Service, ServiceRunner, connect, rpc
from basidia.brokers import Broker
from basidia.errors import ConnectionLost

from .proxy import FaultProxy

#: Every call's deadline in these scenarios, in seconds.
CALL_TIMEOUT = 2.0
#: F10: how long the server stays stopped.
PAUSE = 20.0
#: F10: the calls' deadline.  Shorter than the quickest a stopped server is noticed
#: (RabbitMQ: 3 missed heartbeats; NATS: 2 unanswered pings at 1 s, so 2 s at the
#: earliest), so calls sent as it stops wait for replies until their deadline.
PAUSED_CALL_TIMEOUT = 1.0


async def until(predicate: Any, timeout: float, what: str) -> float:
    """Wait for ``predicate()``; return the seconds it took, fail after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def until_answered(call: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    """``await call()`` until it answers, retrying typed errors for ``timeout`` seconds."""
    started = time.monotonic()
    while True:
        try:
            return await call()
        except BasidiaError:
            if time.monotonic() - started > timeout:
                raise
            await asyncio.sleep(0.05)


def _digest(blob: bytes) -> bytes:
    return hashlib.sha256(blob).digest()


async def f7_links_cut_after_2_to_the_k_bytes(
    proxy: FaultProxy, server: Broker, client: Broker
) -> dict[int, int]:
    """F7: ``server`` and ``client`` both reach the broker through ``proxy``, which cuts their
    links after 2, 4, ... 4096 bytes, so mid-handshake, mid-frame or between frames.

    Every call ends in its result or a typed error well within 30 s, no handler ever sees
    a corrupt payload, and once the links are whole the service answers.  Returns, per cut,
    the calls answered before the first failure.
    """
    corrupt: list[bytes] = []

    class Checked(Service):
        name = "f7_checked"

        @rpc
        async def echo(self, blob: bytes, digest: bytes) -> bytes:
            if _digest(blob) != digest:
                corrupt.append(blob)
            return blob

    answered: dict[int, int] = {}
    async with (
        ServiceRunner([Checked], broker=server),
        connect(client, timeout=CALL_TIMEOUT) as cluster,
    ):
        echo = cluster.rpc.f7_checked.echo
        for cut in (2**k for k in range(1, 13)):
            proxy.cut_after(cut)
            answered[cut] = 0
            started = time.monotonic()
            for n in range(64):
                blob = os.urandom(1 + 37 * n)
                try:
                    assert await echo(blob, _digest(blob)) == blob
                except BasidiaError:
                    break
                answered[cut] += 1
            took = time.monotonic() - started
            assert took < 30, f"cut after {cut} bytes: the calls took {took:.1f} s"
            proxy.pass_through()
            await until(lambda: server.connected and client.connected, 15, f"after a cut at {cut}")
            # A subscription can reach the server a moment after its connection does.
            assert await until_answered(lambda: echo(b"whole", _digest(b"whole")), 5) == b"whole"
    assert corrupt == []
    # The cuts fell at different places: small ones before any call, large ones after some.
    assert answered[2] == 0 and answered[4096] > 0, answered
    return answered


async def f10_server_paused(
    pause: Callable[[], None], resume: Callable[[], None], server: Broker, client: Broker
) -> None:
    """F10: ``pause()`` stops the broker (SIGSTOP) for ``PAUSE`` seconds, then ``resume()``.

    Meanwhile every call fails with a typed error: those left waiting for a reply at their
    deadline (within 10 %), none later.  After SIGCONT the service is whole within 10 s.
    """

    class Echo(Service):
        name = "f10_echo"

        @rpc
        async def work(self, n: int) -> int:
            return n

    async with (
        ServiceRunner([Echo], broker=server),
        connect(client, timeout=PAUSED_CALL_TIMEOUT) as cluster,
    ):
        work = cluster.rpc.f10_echo.work
        assert await work(0) == 0

        async def timed(n: int) -> tuple[BaseException | int, float]:
            started = time.monotonic()
            try:
                outcome: BaseException | int = await work(n)
            except BasidiaError as exc:
                outcome = exc
            return outcome, time.monotonic() - started

        pause()
        paused = time.monotonic()
        try:
            outcomes = list(await asyncio.gather(*(timed(n) for n in range(1, 11))))
            while time.monotonic() - paused < PAUSE:
                outcomes.append(await timed(11))
                await asyncio.sleep(0.25)
        finally:
            resume()
        resumed = time.monotonic()
        for outcome, took in outcomes:
            assert isinstance(outcome, RpcTimeout | ConnectionLost), outcome
            assert took <= PAUSED_CALL_TIMEOUT * 1.1, (outcome, took)
            if isinstance(outcome, RpcTimeout):
                assert took >= PAUSED_CALL_TIMEOUT * 0.9, took
        # The first calls were sent before the link was known dead: they waited for replies.
        assert all(isinstance(outcome, RpcTimeout) for outcome, _ in outcomes[:10])

        assert await until_answered(lambda: work(12), 10) == 12
        assert time.monotonic() - resumed < 10, "not whole again within 10 s of SIGCONT"
        assert await asyncio.gather(*(work(n) for n in range(100))) == list(range(100))

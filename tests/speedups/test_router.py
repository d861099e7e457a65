"""The reply router, run against both implementations (``impl`` is ``py`` then ``c``)."""

from __future__ import annotations

import asyncio
import gc
import random
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from basidia.errors import ConnectionLost, RpcTimeout
from tests.speedups.conftest import Implementation

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def router(impl: Implementation) -> AsyncIterator[Any]:
    router = impl.ReplyRouter(asyncio.get_running_loop())
    yield router
    router.fail_all(ConnectionLost("test over"))


def live_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    """Timers the loop still has to run (CPython's BaseEventLoop keeps them in ``_scheduled``)."""
    return [handle for handle in loop._scheduled if not handle.cancelled()]  # type: ignore[attr-defined]


async def test_resolve_hands_the_reply_to_the_caller(router: Any) -> None:
    correlation_id, future = router.create(5.0)
    assert router.pending == 1
    assert router.resolve(correlation_id, "reply") is True
    assert await future == "reply"
    assert router.pending == 0
    assert (router.late_replies, router.timeouts) == (0, 0)


async def test_a_reply_that_comes_before_the_caller_waits_is_kept_for_it(router: Any) -> None:
    """``register`` then ``take``: no future for a reply that arrives while the request
    is being sent (the memory broker's hand-off)."""
    correlation_id = router.register(5.0)
    assert router.take(correlation_id) is None  # nothing yet
    assert router.resolve(correlation_id, "early") is True
    assert router.pending == 0
    assert router.take(correlation_id) == "early"
    assert router.take(correlation_id) is None  # handed over once
    assert router.resolve(correlation_id, "again") is False
    assert router.late_replies == 1


async def test_a_registered_call_waits_when_its_reply_is_not_there(router: Any) -> None:
    correlation_id = router.register(5.0)
    assert router.take(correlation_id) is None
    future = router.wait(correlation_id)
    assert router.resolve(correlation_id, "later") is True
    assert await future == "later"
    with pytest.raises(RuntimeError, match="not pending"):
        router.wait(correlation_id)


async def test_a_failure_that_comes_before_the_caller_waits_is_raised_by_take(
    router: Any,
) -> None:
    timed_out = router.register(0.01)
    failed = router.register(5.0)
    lost = router.register(5.0)
    assert router.fail(failed, RpcTimeout("failed on purpose")) is True
    await asyncio.sleep(0.05)
    with pytest.raises(RpcTimeout, match="deadline passed"):
        router.take(timed_out)
    with pytest.raises(RpcTimeout, match="on purpose"):
        router.take(failed)
    router.fail_all(ConnectionLost("gone"))
    with pytest.raises(ConnectionLost):
        router.take(lost)
    assert (router.pending, router.timeouts) == (0, 1)


async def test_discard_forgets_a_reply_nobody_took(router: Any) -> None:
    correlation_id = router.register(5.0)
    router.resolve(correlation_id, "unwanted")
    router.discard(correlation_id)
    assert router.take(correlation_id) is None


async def test_ids_are_fresh_positive_u64(router: Any) -> None:
    ids = []
    for _ in range(200_000):
        correlation_id, _future = router.create(5.0)
        router.resolve(correlation_id, None)
        ids.append(correlation_id)
    assert len(set(ids)) == len(ids)
    assert ids[0] >= 1
    assert all(type(i) is int and 0 < i < 2**64 for i in ids[:10])


async def test_a_call_without_reply_times_out(router: Any) -> None:
    start = time.monotonic()
    _correlation_id, future = router.create(0.05)
    with pytest.raises(RpcTimeout, match="deadline passed before a reply arrived"):
        await future
    assert time.monotonic() - start >= 0.045
    assert (router.pending, router.timeouts) == (0, 1)


async def test_a_late_reply_is_counted_and_dropped(router: Any) -> None:
    correlation_id, future = router.create(0.01)
    with pytest.raises(RpcTimeout):
        await future
    assert router.resolve(correlation_id, "too late") is False
    assert router.late_replies == 1


async def test_duplicate_and_unknown_replies_are_late(router: Any) -> None:
    correlation_id, future = router.create(5.0)
    assert router.resolve(correlation_id, 1) is True
    assert router.resolve(correlation_id, 2) is False
    assert router.resolve(123_456_789, 3) is False
    assert await future == 1
    assert router.late_replies == 2


async def test_deadlines_expire_in_their_own_order(router: Any) -> None:
    _slow_id, slow = router.create(5.0)
    fast_id, fast = router.create(0.02)
    _middle_id, middle = router.create(0.2)
    with pytest.raises(RpcTimeout):
        await fast
    assert not slow.done() and not middle.done()
    assert router.resolve(fast_id, "late") is False
    with pytest.raises(RpcTimeout):
        await middle
    assert not slow.done()
    assert (router.pending, router.timeouts) == (1, 2)


async def test_a_cancelled_caller_does_not_count_as_a_timeout(router: Any) -> None:
    correlation_id, future = router.create(0.02)
    future.cancel()
    await asyncio.sleep(0.06)
    assert (router.pending, router.timeouts) == (0, 0)
    assert router.resolve(correlation_id, "x") is False
    assert router.late_replies == 1


async def test_a_reply_to_a_cancelled_caller_is_late(router: Any) -> None:
    correlation_id, future = router.create(5.0)
    future.cancel()
    assert router.resolve(correlation_id, "x") is False
    assert (router.pending, router.late_replies) == (0, 1)


async def test_discard_forgets_a_call(router: Any) -> None:
    correlation_id, future = router.create(0.02)
    router.discard(correlation_id)
    router.discard(correlation_id)  # twice is harmless
    assert router.pending == 0
    await asyncio.sleep(0.06)
    assert not future.done()
    assert router.timeouts == 0
    assert router.resolve(correlation_id, "x") is False
    assert router.late_replies == 1


async def test_fail_fails_one_call(router: Any) -> None:
    correlation_id, future = router.create(5.0)
    other_id, other = router.create(5.0)
    assert router.fail(correlation_id, ConnectionLost("gone")) is True
    assert router.fail(correlation_id, ConnectionLost("gone")) is False
    with pytest.raises(ConnectionLost, match="gone"):
        await future
    assert router.pending == 1
    assert router.resolve(other_id, "ok") is True
    assert await other == "ok"


async def test_fail_all_fails_every_call_and_disarms(router: Any) -> None:
    loop = asyncio.get_running_loop()
    futures = [router.create(5.0)[1] for _ in range(3)]
    futures[0].cancel()
    assert router.fail_all(ConnectionLost("down")) == 3
    assert router.pending == 0
    for future in futures[1:]:
        with pytest.raises(ConnectionLost):
            await future
    assert live_timers(loop) == []
    assert router.fail_all(ConnectionLost("again")) == 0


async def test_one_timer_whatever_the_number_of_calls(router: Any) -> None:
    loop = asyncio.get_running_loop()
    calls = [router.create(0.05 + i * 1e-4) for i in range(1000)]
    assert len(live_timers(loop)) == 1
    for correlation_id, _future in calls:
        router.resolve(correlation_id, None)
    assert len(live_timers(loop)) <= 1
    await asyncio.sleep(0.3)  # the armed timer fires, finds nothing, and is not re-armed
    assert live_timers(loop) == []
    assert router.timeouts == 0


async def test_calls_outlive_many_short_ones(router: Any) -> None:
    """Stale deadline entries are compacted away without losing live ones."""
    survivors = [router.create(0.2) for _ in range(10)]
    for _ in range(5):
        calls = [router.create(30.0) for _ in range(1500)]
        random.shuffle(calls)
        for correlation_id, _future in calls:
            router.resolve(correlation_id, None)
    assert router.pending == 10
    for _correlation_id, future in survivors:
        with pytest.raises(RpcTimeout):
            await future
    assert (router.pending, router.timeouts, router.late_replies) == (0, 10, 0)


async def test_counters_are_plain_ints(router: Any) -> None:
    router.resolve(1, None)
    assert type(router.late_replies) is int and type(router.timeouts) is int


class _ShiftedClockLoop(asyncio.SelectorEventLoop):
    """A loop with a clock of its own, an hour ahead of time.monotonic()."""

    def time(self) -> float:
        return super().time() + 3600.0


@pytest.mark.parametrize("make_loop", [_ShiftedClockLoop, asyncio.SelectorEventLoop])
def test_deadlines_follow_the_loop_clock(
    impl: Implementation, make_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    loop = make_loop()
    try:
        router = impl.ReplyRouter(loop)

        async def scenario() -> None:
            _correlation_id, future = router.create(0.05)
            with pytest.raises(RpcTimeout):
                await asyncio.wait_for(future, 2.0)

        loop.run_until_complete(scenario())
        assert router.timeouts == 1
    finally:
        loop.close()


def test_works_on_uvloop(impl: Implementation) -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        router = impl.ReplyRouter(loop)

        async def scenario() -> None:
            correlation_id, future = router.create(5.0)
            loop.call_soon(router.resolve, correlation_id, "ok")
            assert await future == "ok"
            _correlation_id, future = router.create(0.02)
            with pytest.raises(RpcTimeout):
                await future

        loop.run_until_complete(scenario())
        assert (router.pending, router.timeouts) == (0, 1)
    finally:
        loop.close()


def test_a_router_in_a_reference_cycle_is_collected(impl: Implementation) -> None:
    loop = asyncio.new_event_loop()
    try:
        router = impl.ReplyRouter(loop)
        _correlation_id, future = router.create(30.0)
        # router -> future -> its callback -> router, a cycle only the collector can end
        future.add_done_callback(lambda _f, router=router: None)
        probes = weakref.ref(router), weakref.ref(future)
    finally:
        loop.close()  # which lets go of the armed timer, the other way to the router
    del router, future
    gc.collect()
    assert [probe() for probe in probes] == [None, None]

"""The compiled reply router's own machinery, held to the twin's behaviour.

``test_router.py`` specifies the router and runs it on both implementations.
These tests press on what only the hand-written compiled twin has: a hash
table that grows, reuses its tombstones and shrinks again; a deadline heap
that must give entries back in the twin's order (ties, stale entries and
compaction included); references to futures that it owns and must let go of;
and shortcuts around ``loop.create_future`` and ``future.set_result`` that must
not change what a caller sees.  Most compare the two implementations step by
step on a loop whose clock moves only when told to, so that deadlines, the
timers armed and the order in which callers learn their fate are exact.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest

from basidia.errors import ConnectionLost, RpcTimeout
from tests.speedups.conftest import PY, Implementation, outcome, require_c

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# Timings vary with the machine's load; the cases themselves are fast.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class ManualClockLoop(asyncio.SelectorEventLoop):
    """A loop whose clock moves only when told to, and which notes every timer armed."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.timers: list[float] = []

    def time(self) -> float:
        return self.now

    def call_at(  # type: ignore[override]
        self, when: float, callback: Any, *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        self.timers.append(when)
        return super().call_at(when, callback, *args, context=context)

    def advance(self, seconds: float) -> None:
        """Move the clock on, then run the timers that became due and what they scheduled."""
        self.now += seconds
        for _ in range(2):
            self.run_until_complete(asyncio.sleep(0))


def describe(future: asyncio.Future[Any]) -> tuple[Any, ...]:
    """What the caller awaiting ``future`` gets, comparable across loops."""
    if future.cancelled():
        return ("cancelled",)
    exc = future.exception()
    if exc is not None:
        return ("error", type(exc).__name__, str(exc))
    return ("result", future.result())


class Session:
    """One implementation's router on a manual clock, and a log of what its callers see."""

    def __init__(self, impl: Implementation, loop_class: type[ManualClockLoop]) -> None:
        self.loop = loop_class()
        self.router = impl.ReplyRouter(self.loop)
        self.futures: dict[int, asyncio.Future[Any]] = {}
        self.log: list[tuple[Any, ...]] = []

    def create(self, timeout: Any) -> tuple[Any, ...]:
        result = outcome(self.router.create, timeout)
        if result[0] == "ok":
            correlation_id, future = result[1]
            self.futures[correlation_id] = future
            future.add_done_callback(
                lambda f, i=correlation_id: self.log.append(("done", i, describe(f)))
            )
            result = ("ok", correlation_id, type(future))
        return result

    def state(self) -> tuple[Any, ...]:
        router = self.router
        # repr: exact for floats, and equal for two NaNs
        return (
            router.pending,
            router.late_replies,
            router.timeouts,
            [repr(t) for t in self.loop.timers],
        )

    def close(self) -> None:
        self.router.fail_all(ConnectionLost("session over"))
        self.loop.advance(0.0)
        self.loop.close()


@contextmanager
def side_by_side(
    loop_class: type[ManualClockLoop] = ManualClockLoop,
) -> Iterator[tuple[Session, Session]]:
    """A pure and a compiled session, closed afterwards."""
    c = require_c()
    py = Session(PY, loop_class)
    try:
        compiled = Session(c, loop_class)
        try:
            yield py, compiled
        finally:
            compiled.close()
    finally:
        py.close()


# ---- differential: any sequence of operations --------------------------------

KEYS = [-1, 2**64, 2**64 + 1, 2**65 + 3, "x", None, 1.0, 2.0, 1.5, True, False, Decimal(3), [1]]
TIMEOUTS = [0.0, 0.001, 0.002, 0.002, 0.01, 0.5, 5.0, -1.0, 0, 1, True, float("inf"), float("nan")]
BAD_TIMEOUTS = ["1", Decimal(1), 10**400]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.sampled_from(TIMEOUTS + BAD_TIMEOUTS)),
        st.tuples(st.sampled_from(["resolve", "fail", "discard"]), st.integers(0, 30)),
        st.tuples(st.sampled_from(["resolve", "fail", "discard"]), st.sampled_from(KEYS)),
        st.tuples(st.just("cancel"), st.integers(1, 30)),
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.001, 0.002, 0.01, 1.0, 10.0])),
        st.tuples(st.just("fail_all"), st.none()),
        st.tuples(st.just("reinit"), st.none()),
    ),
    max_size=60,
)


def run(session: Session, ops: list[tuple[str, Any]]) -> list[tuple[Any, ...]]:
    """Apply ``ops`` and return what each gave and the router's state after it."""
    trace: list[tuple[Any, ...]] = []
    for index, (name, arg) in enumerate(ops):
        router = session.router
        if name == "create":
            result = session.create(arg)
        elif name == "resolve":
            result = outcome(router.resolve, arg, f"reply {index}")
        elif name == "fail":
            result = outcome(router.fail, arg, ConnectionLost(f"failed {index}"))
        elif name == "discard":
            result = outcome(router.discard, arg)
        elif name == "cancel":
            future = session.futures.get(arg)
            result = ("ok", future is not None and future.cancel())
        elif name == "advance":
            session.loop.advance(arg)
            result = ("ok", None)
        elif name == "reinit":  # __init__ again starts afresh: the old calls are forgotten
            result = outcome(router.__init__, session.loop)
        else:
            result = outcome(router.fail_all, ConnectionLost(f"all failed {index}"))
        trace.append((name, result, session.state()))
    session.loop.advance(0.0)
    trace.append(("log", session.log))
    return trace


@settings(relaxed, max_examples=300)
@given(ops=operations)
def test_any_sequence_of_operations_looks_the_same(ops: list[tuple[str, Any]]) -> None:
    with side_by_side() as (py, c):
        assert run(c, ops) == run(py, ops)


# ---- the table -----------------------------------------------------------------


async def test_growth_to_100k_pending_calls(impl: Implementation) -> None:
    router = impl.ReplyRouter(asyncio.get_running_loop())
    calls = [router.create(30.0) for _ in range(100_000)]
    assert router.pending == 100_000
    assert [correlation_id for correlation_id, _future in calls] == list(range(1, 100_001))
    if impl.tag == "c":
        stats = router._stats()
        assert stats["slots"] >= 2 * 100_000 and stats["deadlines"] == 100_000
    random.Random(7).shuffle(calls)
    for correlation_id, _future in calls:
        assert router.resolve(correlation_id, correlation_id) is True
    assert all(future.result() == correlation_id for correlation_id, future in calls)
    assert (router.pending, router.late_replies) == (0, 0)
    assert router.resolve(calls[0][0], None) is False
    if impl.tag == "c":  # the heap gives its memory back at once, the table on the next call
        assert router._stats()["deadline_capacity"] <= 64
        router.resolve(*router.create(1.0))
        assert router._stats()["slots"] == 64
    router.fail_all(ConnectionLost("test over"))


async def test_tombstones_are_reused_not_piled_up() -> None:
    """Calls ending out of order, with others in flight, never grow the table."""
    router = require_c().ReplyRouter(asyncio.get_running_loop())
    rng = random.Random(11)
    long_lived = router.create(30.0)  # so that the table is never empty
    in_flight: list[int] = []
    largest = 0
    for _ in range(50_000):
        in_flight.append(router.create(30.0)[0])
        if len(in_flight) > 20:
            victim = in_flight.pop(rng.randrange(len(in_flight)))
            assert router.resolve(victim, None) is True
        stats = router._stats()
        assert stats["pending"] + stats["tombstones"] <= stats["slots"] // 2
        largest = max(largest, stats["slots"])
    assert largest <= 128  # 22 calls in flight: never past the second size
    assert router.resolve(long_lived[0], "done") is True
    router.fail_all(ConnectionLost("test over"))


async def test_ids_that_are_not_ints_find_calls_as_a_dict_would(impl: Implementation) -> None:
    router = impl.ReplyRouter(asyncio.get_running_loop())
    futures = dict(router.create(30.0) for _ in range(5))
    assert router.resolve(True, "by bool") is True  # True == 1, hash(True) == 1
    assert router.resolve(2.0, "by float") is True
    assert router.resolve(Decimal(3), "by decimal") is True
    assert router.resolve(3, "again") is False
    assert router.resolve(4.5, "no such id") is False
    with pytest.raises(TypeError, match="unhashable type: 'list'"):
        router.resolve([4], None)
    assert [futures[i].result() for i in (1, 2, 3)] == ["by bool", "by float", "by decimal"]
    assert (router.pending, router.late_replies) == (2, 2)
    router.fail_all(ConnectionLost("test over"))


# ---- the heap ------------------------------------------------------------------


def test_deadlines_fire_in_the_twins_order_through_ties_and_compaction() -> None:
    """6,000 calls on a few distinct deadlines, most ended early while others are in
    flight: ties, stale entries and compactions."""
    rng = random.Random(5)
    schedule = []  # (timeout of the next call, the calls to end right after it)
    in_flight: list[int] = []
    for correlation_id in range(1, 6_001):
        in_flight.append(correlation_id)
        ending = []
        if rng.random() < 0.8:
            ending.append(in_flight.pop(rng.randrange(len(in_flight))))
        schedule.append((rng.choice([0.001, 0.002, 0.002, 0.003, 0.0105, 1.0]), ending))
    with side_by_side() as (py, c):
        most = 0  # the longest the compiled heap got
        for session in (py, c):
            for timeout, ending in schedule:
                session.create(timeout)
                for correlation_id in ending:
                    assert session.router.resolve(correlation_id, "early") is True
                if session is c:
                    most = max(most, c.router._stats()["deadlines"])
            session.loop.advance(0.0)  # the callers whose calls ended early hear now
            session.log.clear()
            for _ in range(12):
                session.loop.advance(0.001)
            session.loop.advance(1.0)
        assert c.log == py.log
        assert c.loop.timers == py.loop.timers
        assert c.router.timeouts == py.router.timeouts == len(in_flight)
    assert most <= 2 * len(in_flight) + 1024 + 1  # the twin's rule for compacting
    deadlines = {i: 1000.0 + timeout for i, (timeout, _ending) in enumerate(schedule, 1)}
    expected = sorted((deadlines[i], i) for i in in_flight)
    assert [entry[1] for entry in c.log] == [i for _deadline, i in expected]
    assert {entry[2] for entry in c.log} == {
        ("error", "RpcTimeout", "deadline passed before a reply arrived")
    }


# ---- calling back into the router from inside it -----------------------------


class HookedLoop(ManualClockLoop):
    """A manual-clock loop that runs ``hook(n)`` in its n-th create_future call."""

    hook: Callable[[int], None] | None = None
    made = 0

    def create_future(self) -> asyncio.Future[Any]:
        self.made += 1
        if self.hook is not None:
            self.hook(self.made)
        return ReentrantFuture(loop=self)


class ReentrantFuture(asyncio.Future[Any]):
    """A future whose set_exception first runs ``hook``, which may call the router."""

    hook: Callable[[], None] | None = None

    def set_exception(self, exception: Any) -> None:
        if self.hook is not None:
            self.hook()
        super().set_exception(exception)


def test_fail_all_from_inside_create_while_the_table_grows() -> None:
    ops: list[tuple[str, Any]] = [("create", 0.01 * (i % 3)) for i in range(100)]
    ops += [("resolve", i) for i in range(60, 101, 3)] + [("advance", 0.05)]
    slots: list[int] = []  # the compiled table's size as each fail_all begins
    with side_by_side(HookedLoop) as (py, c):
        for session in (py, c):
            router = session.router

            # Calls 33 and 66 make the compiled table grow (the 33rd call in a table
            # of 64 slots); fail_all runs inside calls 34 and 67, just after, and 68.
            def hook(made: int, router: Any = router, compiled: bool = session is c) -> None:
                if made in (34, 67, 68):
                    if compiled:
                        slots.append(router._stats()["slots"])
                    router.fail_all(ConnectionLost(f"down at call {made}"))

            assert isinstance(session.loop, HookedLoop)
            session.loop.hook = hook
        assert run(c, ops) == run(py, ops)
        assert c.router._stats()["pending"] == c.router.pending
    assert slots == [256, 256, 64]


def test_calls_made_and_ended_while_fail_all_fails_futures() -> None:
    """fail_all hands the router a fresh table first; what the futures do goes there."""
    with side_by_side(HookedLoop) as (py, c):
        for session in (py, c):
            for _ in range(50):
                session.create(1.0)
            router = session.router
            made: list[int] = []

            def hook(router: Any = router, made: list[int] = made) -> None:
                if len(made) < 5:
                    made.append(router.create(0.5)[0])
                    router.resolve(made[-1] - 1 if len(made) > 1 else 10, "inside")
                    router.discard(20)  # a call being failed: already out of the table

            for future in session.futures.values():
                future.hook = hook  # type: ignore[attr-defined]
            assert router.fail_all(ConnectionLost("down")) == 50
            assert router.pending == 1
            session.loop.advance(1.0)
        assert c.log == py.log
        assert c.state() == py.state()


@pytest.mark.parametrize("tag", ["py", "c"])
def test_calls_made_and_ended_while_deadlines_pass(tag: str) -> None:
    """The timer's callback fails futures whose set_exception calls the router back:
    nothing is lost, nothing is failed twice, and the counts add up."""
    session = Session(PY if tag == "py" else require_c(), HookedLoop)
    router = session.router
    rng = random.Random(3)

    def hook() -> None:
        choice = rng.random()
        if choice < 0.4:
            session.create(rng.choice([0.0, 0.001, 0.002, 5.0]))
        elif choice < 0.7:
            router.resolve(rng.randrange(1, router.pending + 50), "inside")
        elif choice < 0.75:
            router.fail_all(ConnectionLost("down inside"))

    try:
        ReentrantFuture.hook = staticmethod(hook)
        for _ in range(300):
            session.create(rng.choice([0.001, 0.002, 0.003]))
        for _ in range(10):
            session.loop.advance(0.001)
            waiting = [f for f in session.futures.values() if not f.done()]
            assert router.pending == len(waiting)
        ReentrantFuture.hook = None
        session.loop.advance(10.0)
        assert router.pending == 0
        assert all(future.done() for future in session.futures.values())
        assert len(session.log) == len(session.futures)
        timed_out = sum(entry[2][1:2] == ("RpcTimeout",) for entry in session.log)
        assert timed_out == router.timeouts > 0
    finally:
        ReentrantFuture.hook = None
        session.close()


# ---- references ----------------------------------------------------------------


def _refs(obj: object) -> int:
    return sys.getrefcount(obj) - 1  # not counting getrefcount's own argument


def test_the_router_lets_go_of_futures_replies_and_errors(impl: Implementation) -> None:
    loop = ManualClockLoop()
    try:
        router = impl.ReplyRouter(loop)
        reply, error = object(), ConnectionLost("gone")
        base_reply, base_error = _refs(reply), _refs(error)

        correlation_id, future = router.create(30.0)
        held = _refs(future)  # ours, and the router's
        assert router.resolve(correlation_id, reply) is True
        assert _refs(future) == held - 1
        assert _refs(reply) == base_reply + 1  # the future's result
        assert router.resolve(correlation_id, reply) is False  # late: not kept
        del future
        assert _refs(reply) == base_reply

        correlation_id, future = router.create(30.0)
        assert router.fail(correlation_id, error) is True
        assert _refs(future) == held - 1
        assert future.exception() is error
        del future
        assert _refs(error) == base_error

        correlation_id, future = router.create(30.0)
        router.discard(correlation_id)
        assert _refs(future) == held - 1

        correlation_id, future = router.create(0.5)
        loop.advance(1.0)
        assert isinstance(future.exception(), RpcTimeout)
        assert _refs(future) == held - 1

        futures = [router.create(30.0)[1] for _ in range(100)]
        counts = [_refs(future) for future in futures]
        assert router.fail_all(error) == 100
        assert [_refs(future) + 1 for future in futures] == counts
        assert all(future.exception() is error for future in futures)
        del futures
        assert _refs(error) == base_error

        correlation_id, future = router.create(30.0)
        del router  # the armed timer still holds it, until the loop lets the timer go
    finally:
        loop.close()
    gc.collect()
    assert _refs(future) == held - 1


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


def test_no_memory_kept_per_call(impl: Implementation) -> None:
    """100,000 calls that end every way a call can leave the memory where it was."""
    loop = ManualClockLoop()
    router = impl.ReplyRouter(loop)
    error = ConnectionLost("gone")

    def calls(count: int) -> None:
        for i in range(count):
            correlation_id, future = router.create(30.0)
            if i % 4 == 0:
                router.resolve(correlation_id, i)
            elif i % 4 == 1:
                router.fail(correlation_id, error)
                future.exception()
            elif i % 4 == 2:
                router.discard(correlation_id)
            else:
                router.resolve(correlation_id + 10**30, i)  # no such id: a late reply
                router.resolve(correlation_id, i)

    try:
        calls(5_000)  # warm: the freelists and the table reach their sizes
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            calls(100_000)
            assert router.pending == 0
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 64 * 1024, grown
    finally:
        router.fail_all(error)
        loop.close()


# ---- what the shortcuts must not change ---------------------------------------


async def test_deadlines_are_on_the_loops_monotonic_clock(impl: Implementation) -> None:
    loop = asyncio.get_running_loop()
    router = impl.ReplyRouter(loop)
    before = time.monotonic()
    _correlation_id, _future = router.create(7.5)
    after = time.monotonic()
    (timer,) = [
        handle
        for handle in loop._scheduled  # type: ignore[attr-defined]
        if getattr(handle._callback, "__self__", None) is router
    ]
    assert before + 7.5 <= timer.when() <= after + 7.5
    router.fail_all(ConnectionLost("test over"))


class OtherFuture(asyncio.Future[Any]):
    pass


def test_futures_come_from_where_create_future_would_take_them(
    impl: Implementation, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.new_event_loop()
    try:
        router = impl.ReplyRouter(loop)
        assert type(router.create(1.0)[1]) is asyncio.Future
        # BaseEventLoop.create_future looks ``futures.Future`` up on every call.
        monkeypatch.setattr(asyncio.futures, "Future", OtherFuture)
        assert type(router.create(1.0)[1]) is OtherFuture
        monkeypatch.undo()
        # A create_future of the loop's own is used as it is.
        loop.create_future = lambda: OtherFuture(loop=loop)  # type: ignore[method-assign]
        router = impl.ReplyRouter(loop)
        assert type(router.create(1.0)[1]) is OtherFuture
        router.fail_all(ConnectionLost("test over"))
    finally:
        loop.close()


def test_replies_go_through_the_futures_own_set_result(impl: Implementation) -> None:
    loop = asyncio.new_event_loop()
    try:
        router = impl.ReplyRouter(loop)
        correlation_id, future = router.create(1.0)
        seen: list[object] = []
        future.set_result = seen.append
        assert router.resolve(correlation_id, "reply") is True
        assert seen == ["reply"] and not future.done()

        correlation_id, future = router.create(1.0)

        def refuse(reply: object) -> None:
            raise RuntimeError("refused")

        future.set_result = refuse
        with pytest.raises(RuntimeError, match="refused"):
            router.resolve(correlation_id, "reply")
        assert (router.pending, router.late_replies) == (0, 0)
    finally:
        loop.close()

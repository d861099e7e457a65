"""Circuit breakers, bulkheads and safe retries for outgoing RPC calls (docs/resilience.md).

One ``CallGuard`` per (calling service, target service): every call through a
``Dependency`` goes through its bulkhead (a bound on calls in flight, with a bounded wait),
its circuit breaker (closed → open after consecutive failures or a failure rate → half-open
after ``reset`` seconds, one probe → closed on success), and retries where a retry is safe
(the request never reached a handler, or the method is declared idempotent), never past
the call's deadline.
"""

from __future__ import annotations

import asyncio
import enum
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from basidia.errors import (
    BrokerError,
    BulkheadFull,
    CircuitOpen,
    ConnectionLost,
    RemoteError,
    RequestNotSent,
    RpcError,
    RpcTimeout,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from basidia.config import Settings
    from basidia.rpc import RpcClient

__all__ = ["Breaker", "BreakerState", "Bulkhead", "CallGuard", "CircuitBreaker", "RpcRetry"]

#: Failures that count against the breaker: the target is slow, unreachable or failing.
#: A caller's own mistake (bad arguments, unknown method) does not, nor a target without
#: instances (``ServiceUnavailable``), which fails every call at once already.
FAILURES: tuple[type[BaseException], ...] = (RpcTimeout, BrokerError, RemoteError)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Breaker:
    """A ``Dependency``'s circuit breaker settings; ``None`` fields take the configured
    defaults (``breaker_failures``, ``breaker_failure_rate``, ``breaker_window``,
    ``breaker_min_calls``, ``breaker_reset``)."""

    failures: int | None = None
    failure_rate: float | None = None
    window: float | None = None
    min_calls: int | None = None
    reset: float | None = None


@dataclass(frozen=True, slots=True)
class Bulkhead:
    """A ``Dependency``'s bulkhead: at most ``max_calls`` in flight (0: unbounded), a call
    waiting at most ``max_wait`` seconds for a place; ``None`` takes the configured default."""

    max_calls: int | None = None
    max_wait: float | None = None


@dataclass(frozen=True, slots=True)
class RpcRetry:
    """A ``Dependency``'s retries: ``attempts`` in all (1: none), the first wait ``delay``
    seconds, doubled each time; ``None`` takes ``rpc_retry_attempts``/``rpc_retry_delay``."""

    attempts: int | None = None
    delay: float | None = None


class CircuitBreaker:
    """The breaker of one (caller, target): counts outcomes and decides whether a call may go."""

    def __init__(
        self,
        target: str,
        *,
        failures: int,
        failure_rate: float,
        window: float,
        min_calls: int,
        reset: float,
    ) -> None:
        self.target = target
        self.failures = failures
        self.failure_rate = failure_rate
        self.window = window
        self.min_calls = min_calls
        self.reset = reset
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        #: Times it opened, and calls refused while open (for the management API, metrics).
        self.trips = 0
        self.refused = 0
        self._probing = False
        # (monotonic time, failed?) of the calls within the window.
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._failed_in_window = 0

    def describe(self) -> dict[str, Any]:
        """What the management API shows (``/services``)."""
        self._refresh(time.monotonic())
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive,
            "trips": self.trips,
            "refused": self.refused,
        }

    def _refresh(self, now: float) -> None:
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.reset:
            self.state = BreakerState.HALF_OPEN
            self._probing = False

    def before(self) -> bool:
        """Whether a call may go now; True makes it the probe when half-open."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        self._refresh(time.monotonic())
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        self.refused += 1
        return False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through."""
        return max(0.0, self.opened_at + self.reset - time.monotonic())

    def success(self) -> None:
        self.consecutive = 0
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED
            self._probing = False
            self._outcomes.clear()
            self._failed_in_window = 0
        elif self.failure_rate:
            self._record(False)

    def failure(self) -> None:
        now = time.monotonic()
        self.consecutive += 1
        if self.state is BreakerState.HALF_OPEN:
            self._open(now)  # the probe failed
            return
        if self.state is BreakerState.OPEN:
            return
        if self.failures and self.consecutive >= self.failures:
            self._open(now)
            return
        if self.failure_rate:
            self._record(True)
            calls = len(self._outcomes)
            if calls >= self.min_calls and self._failed_in_window / calls >= self.failure_rate:
                self._open(now)

    def abandoned(self) -> None:
        """A call let through ended without an outcome (cancelled): a probe may go again."""
        self._probing = False

    def _record(self, failed: bool) -> None:
        now = time.monotonic()
        outcomes = self._outcomes
        outcomes.append((now, failed))
        self._failed_in_window += failed
        horizon = now - self.window
        while outcomes and outcomes[0][0] < horizon:
            self._failed_in_window -= outcomes.popleft()[1]

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.trips += 1
        self._probing = False
        self._outcomes.clear()
        self._failed_in_window = 0


class CallGuard:
    """Bulkhead, breaker and safe retries around the calls of one caller to one target."""

    def __init__(
        self,
        caller: str,
        target: str,
        settings: Settings,
        *,
        breaker: Breaker | bool | None = None,
        bulkhead: Bulkhead | bool | None = None,
        retry: RpcRetry | bool | None = None,
        idempotent: bool | Collection[str] = False,
    ) -> None:
        self.caller = caller
        self.target = target
        self.breaker: CircuitBreaker | None = None
        if breaker is not False:
            spec = breaker if isinstance(breaker, Breaker) else Breaker()
            self.breaker = CircuitBreaker(
                target,
                failures=_pick(spec.failures, settings.breaker_failures),
                failure_rate=_pick(spec.failure_rate, settings.breaker_failure_rate),
                window=_pick(spec.window, settings.breaker_window),
                min_calls=_pick(spec.min_calls, settings.breaker_min_calls),
                reset=_pick(spec.reset, settings.breaker_reset),
            )
            if not (self.breaker.failures or self.breaker.failure_rate):
                self.breaker = None
        self._limit: asyncio.Semaphore | None = None
        self.max_wait = 0.0
        if bulkhead is not False:
            spec_b = bulkhead if isinstance(bulkhead, Bulkhead) else Bulkhead()
            max_calls = _pick(spec_b.max_calls, settings.bulkhead_max_calls)
            self.max_wait = _pick(spec_b.max_wait, settings.bulkhead_max_wait)
            if max_calls:
                self._limit = asyncio.Semaphore(max_calls)
        self.max_calls = 0 if self._limit is None else self._limit._value
        spec_r = retry if isinstance(retry, RpcRetry) else RpcRetry()
        self.attempts = 1 if retry is False else _pick(spec_r.attempts, settings.rpc_retry_attempts)
        self.retry_delay = _pick(spec_r.delay, settings.rpc_retry_delay)
        self._idempotent = idempotent

    def describe(self) -> dict[str, Any]:
        """The breaker's state and the bulkhead's use, for the management API."""
        described: dict[str, Any] = (
            self.breaker.describe() if self.breaker is not None else {"state": "disabled"}
        )
        if self._limit is not None:
            described["in_flight"] = self.max_calls - self._limit._value
            described["max_calls"] = self.max_calls
        return described

    def idempotent(self, method: str) -> bool:
        flag = self._idempotent
        return flag if isinstance(flag, bool) else method in flag

    def _safe(self, exc: BaseException, method: str) -> bool:
        """Whether ``exc`` leaves a retry safe: nothing ran, or running again is harmless."""
        if isinstance(exc, RequestNotSent):
            return True
        if isinstance(exc, ServiceUnavailable):
            # The target has no instance, or was not running: no handler ran.  One that a
            # handler of the target passes on (about another service) is not safe.
            message = exc.message
            return repr(self.target) in message or message.startswith(f"{self.target} is ")
        return isinstance(exc, ConnectionLost) and self.idempotent(method)

    async def call(
        self, method: str, timeout: float, send: Callable[[float], Awaitable[Any]]
    ) -> Any:
        """``send(timeout)`` under the guard; ``timeout`` is the whole call's, retries
        included (a nested call's deadline is narrowed further by the RPC client)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt = 1
        while True:
            try:
                return await self._once(method, deadline, send)
            except Exception as exc:
                if attempt >= self.attempts or not self._safe(exc, method):
                    raise
                pause = self.retry_delay * 2 ** (attempt - 1)
                if loop.time() + pause >= deadline:
                    raise
                attempt += 1
                await asyncio.sleep(pause)

    async def _once(
        self, method: str, deadline: float, send: Callable[[float], Awaitable[Any]]
    ) -> Any:
        breaker = self.breaker
        if breaker is not None and not breaker.before():
            raise CircuitOpen(
                f"{self.caller} → {self.target}.{method}: the circuit is open after "
                f"{breaker.consecutive} failures; a probe goes in {breaker.retry_in():.3g} s"
            )
        limit = self._limit
        loop = asyncio.get_running_loop()
        try:
            if limit is not None:
                if limit.locked():
                    wait = min(self.max_wait, max(deadline - loop.time(), 0.0))
                    try:
                        await asyncio.wait_for(limit.acquire(), wait)
                    except TimeoutError:
                        raise BulkheadFull(
                            f"{self.caller} → {self.target}.{method}: {self.max_calls} calls "
                            f"in flight, no place free within {wait:.3g} s"
                        ) from None
                else:
                    await limit.acquire()
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RpcTimeout(f"{self.target}.{method}: the caller's deadline has passed")
                result = await send(remaining)
            finally:
                if limit is not None:
                    limit.release()
        except FAILURES:
            if breaker is not None:
                breaker.failure()
            raise
        except (BulkheadFull, ServiceUnavailable):
            if breaker is not None:
                breaker.abandoned()  # it never went, or found no instance
            raise
        except RpcError:
            if breaker is not None:
                breaker.success()  # the target answered (the caller's mistake)
            raise
        except BaseException:
            if breaker is not None:
                breaker.abandoned()
            raise
        if breaker is not None:
            breaker.success()
        return result


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


class GuardedProxy:
    """A ``Dependency``'s RPC proxy: ``await proxy.method(...)`` through its ``CallGuard``."""

    def __init__(
        self, client: RpcClient, service: str, timeout: float | None, guard: CallGuard
    ) -> None:
        self._client = client
        self._service = service
        self._timeout = timeout
        self.guard = guard

    def __getattr__(self, method: str) -> GuardedMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        proxy = GuardedMethod(self, method, self._timeout)
        self.__dict__[method] = proxy  # later lookups skip __getattr__
        return proxy

    def __repr__(self) -> str:
        return f"<GuardedProxy {self._service}>"


class GuardedMethod:
    """One remote method behind a guard; calling it returns an awaitable of the result."""

    __slots__ = ("_method", "_proxy", "_timeout")

    def __init__(self, proxy: GuardedProxy, method: str, timeout: float | None) -> None:
        self._proxy = proxy
        self._method = method
        self._timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        proxy = self._proxy
        client, service, method = proxy._client, proxy._service, self._method

        def send(timeout: float) -> Awaitable[Any]:
            return client.call(service, method, args, kwargs, timeout)

        return proxy.guard.call(method, self._timeout or client.timeout, send)

    def with_timeout(self, timeout: float) -> GuardedMethod:
        """The same method with a different per-call timeout (seconds)."""
        return GuardedMethod(self._proxy, self._method, timeout)

    def __repr__(self) -> str:
        return f"<GuardedMethod {self._proxy._service}.{self._method}>"


# The guards of each running service, by target: one breaker per (caller, target).
_guards: weakref.WeakKeyDictionary[object, dict[str, CallGuard]] = weakref.WeakKeyDictionary()


def guard_for(
    owner: object, caller: str, target: str, settings: Settings, **options: Any
) -> CallGuard:
    """The guard of ``owner`` (a container) for ``target``, made on first use."""
    guards = _guards.setdefault(owner, {})
    guard = guards.get(target)
    if guard is None:
        guard = guards[target] = CallGuard(caller, target, settings, **options)
    return guard


def guards_of(owner: object) -> dict[str, CallGuard]:
    """``owner``'s guards by target (for the management API)."""
    return dict(_guards.get(owner, {}))

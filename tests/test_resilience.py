"""Retry policies, circuit breakers, bulkheads, safe RPC retries, rate limits and HTTP
authentication (docs/resilience.md), as a user of services sees them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from basidia import (
    Dependency,
    NonRetryable,
    Retry,
    Service,
    ServiceRunner,
    connect,
    event_handler,
    http_endpoint,
    rpc,
)
from basidia.brokers import Broker
from basidia.errors import BulkheadFull, CircuitOpen, RateLimited, RemoteError, ServiceUnavailable
from basidia.http import HttpServer
from basidia.resilience import Breaker, Bulkhead, RpcRetry
from basidia.resilience.edge import ApiKeyAuth, BearerAuth

from .brokers.contract import REDIS_URL, dead_letters_of, delete_redis_keys, eventually
from .conftest import require_broker
from .faults.proxy import FaultProxy

pytestmark = pytest.mark.timeout(60)


# -- event retries --------------------------------------------------------------------------------


async def test_attempts_follow_the_backoff_and_other_handlers_keep_going(memory_url: str) -> None:
    times: list[float] = []
    other: list[int] = []

    class Shop(Service):
        name = "backoff_shop"
        max_workers = 1  # one slot: a retry that waited in it would stop the other handler

        @event_handler("order", retry=Retry(delay=0.3, multiplier=2.0, jitter=0.0))
        async def on_order(self, order: int) -> None:
            times.append(time.monotonic())
            if len(times) < 3:
                raise ConnectionError("the ledger is down")

        @event_handler("ping")
        async def on_ping(self, n: int) -> None:
            other.append(n)

    async with ServiceRunner([Shop], broker=memory_url) as runner:
        await runner.dispatch("order", 1)
        await eventually(lambda: len(times) == 1)
        for n in range(5):
            await runner.dispatch("ping", n)
        await eventually(lambda: len(other) == 5, timeout=0.25)  # during the first wait
        assert len(times) == 1
        await eventually(lambda: len(times) == 3)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert 0.28 <= gaps[0] < 0.6 and 0.58 <= gaps[1] < 1.0, gaps


async def test_jitter_spreads_the_waits_within_its_bounds() -> None:
    policy = Retry(delay=1.0, multiplier=2.0, max_delay=3.0, jitter=0.2).resolve(_settings(), None)
    waits = [policy.delay_after(2) for _ in range(200)]
    assert all(1.6 <= wait <= 2.4 for wait in waits) and len(set(waits)) > 100
    assert all(policy.delay_after(5) <= 3.0 for _ in range(50))  # capped at max_delay


def _settings() -> Any:
    from basidia.config import Settings

    return Settings()


async def test_non_retryable_failures_are_dead_lettered_at_once(memory_url: str) -> None:
    seen: list[str] = []

    class Strict(Service):
        name = "strict"

        @event_handler("strict.order", retry=Retry(delay=0.01, give_up_on=(KeyError,)))
        async def on_order(self, order: dict[str, str]) -> None:
            seen.append(order["kind"])
            if order["kind"] == "refused":
                raise NonRetryable("order refused: the customer is blocked")
            raise KeyError(order["kind"])

    async with ServiceRunner([Strict], broker=memory_url) as runner:
        await runner.dispatch("strict.order", {"kind": "refused"})
        await runner.dispatch("strict.order", {"kind": "missing"})
        letters = await dead_letters_of(runner.broker, "strict.on_order", 2)
    assert sorted(seen) == ["missing", "refused"]  # one attempt each
    reasons = sorted((letter.exception, letter.reason, letter.attempts) for letter in letters)
    assert reasons == [
        ("KeyError", "KeyError: 'missing'", 1),
        ("NonRetryable", "NonRetryable: order refused: the customer is blocked", 1),
    ]


def test_bad_retry_settings_are_refused_with_a_clear_error() -> None:
    from basidia.config import Config
    from basidia.errors import ConfigError

    with pytest.raises(ValueError, match="multiplier"):
        Retry(multiplier=0.5)
    with pytest.raises(ConfigError, match="event_retry_jitter"):
        _ = Config({"event_retry_jitter": 1.5}).settings
    with pytest.raises(ConfigError, match="dedup_store"):
        _ = Config({"dedup_store": "postgres://x"}).settings
    # YAML reads a bare ``off`` as false; the environment's "off" stays text.
    assert Config({"dedup_store": False}).settings.dedup_store == "off"
    environ = {"BASIDIA_DEDUP_STORE": "off"}
    assert Config.load(environ=environ).settings.dedup_store == "off"


# -- RPC: breaker, bulkhead, retries --------------------------------------------------------------


class Downstream(Service):
    name = "downstream"
    failing = True
    calls = 0

    @rpc
    async def work(self, n: int) -> int:
        type(self).calls += 1
        # A moment's work, so that a probe is still in flight when the calls gathered
        # with it ask the breaker (on memory:// a call that never waits ends at once).
        await asyncio.sleep(0.005)
        if type(self).failing:
            raise RuntimeError("the database is down")
        return n

    @rpc
    async def slow(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


def upstream(**options: Any) -> type[Service]:
    class Upstream(Service):
        name = "upstream"
        down = Dependency("downstream", **options)

        @rpc
        async def noop(self) -> None:
            return None

    return Upstream


def proxy_of(runner: ServiceRunner) -> Any:
    """The upstream service's injected proxy to downstream."""
    return runner.containers["upstream"].dependencies["down"].get_dependency(None)


class CountingSends:
    """Counts the requests handed to a broker (a spy on the real adapter)."""

    def __init__(self, broker: Broker) -> None:
        self.count = 0
        self._inside = False
        original = broker.send_request
        original_now = broker.send_request_now

        # A request goes by send_request_now when the adapter can send it at once, else
        # by send_request (which may use send_request_now itself: counted once).
        def send_request_now(service: str, body: bytes, correlation_id: int) -> bool:
            sent = original_now(service, body, correlation_id)
            if sent and not self._inside:
                self.count += 1
            return sent

        async def send_request(service: str, body: bytes, *, correlation_id: int) -> None:
            self.count += 1
            self._inside = True
            try:
                await original(service, body, correlation_id=correlation_id)
            finally:
                self._inside = False

        broker.send_request_now = send_request_now  # type: ignore[method-assign]
        broker.send_request = send_request  # type: ignore[method-assign]


@pytest.fixture(params=["memory", "nats", "amqp"])
def any_broker(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return str(request.getfixturevalue("memory_url"))
    return str(request.getfixturevalue(f"{request.param}_url"))


async def test_the_breaker_opens_fails_fast_probes_once_and_closes(any_broker: str) -> None:
    Downstream.failing, Downstream.calls = True, 0
    services = [Downstream, upstream(breaker=Breaker(failures=3, reset=0.5))]
    async with ServiceRunner(services, broker=any_broker) as runner:
        down = proxy_of(runner)
        for n in range(3):
            with pytest.raises(RemoteError):
                await down.work(n)
        assert Downstream.calls == 3
        sends = CountingSends(runner.broker)
        started = time.perf_counter()
        for n in range(100):
            with pytest.raises(CircuitOpen, match="circuit is open"):
                await down.work(n)
        per_call = (time.perf_counter() - started) / 100
        assert per_call < 0.001, per_call
        assert sends.count == 0 and Downstream.calls == 3
        state = runner.containers["upstream"]
        from basidia.http.management import describe

        breaker = describe(state)["breakers"]["downstream"]
        assert (breaker["state"], breaker["trips"], breaker["refused"]) == ("open", 1, 100)

        # Half-open: of ten calls at once exactly one goes through, and fails: open again.
        await asyncio.sleep(0.6)
        outcomes = await asyncio.gather(*(down.work(n) for n in range(10)), return_exceptions=True)
        assert sorted(type(outcome).__name__ for outcome in outcomes) == ["CircuitOpen"] * 9 + [
            "RemoteError"
        ]
        assert Downstream.calls == 4 and sends.count == 1

        # The downstream recovers: the next probe succeeds and the breaker closes.
        Downstream.failing = False
        await asyncio.sleep(0.6)
        outcomes = await asyncio.gather(*(down.work(n) for n in range(10)), return_exceptions=True)
        assert sum(isinstance(outcome, CircuitOpen) for outcome in outcomes) == 9
        assert await asyncio.gather(*(down.work(n) for n in range(5))) == list(range(5))
        assert describe(state)["breakers"]["downstream"]["state"] == "closed"


async def test_the_breaker_opens_on_the_failure_rate(memory_url: str) -> None:
    Downstream.failing, Downstream.calls = False, 0
    breaker = Breaker(failures=0, failure_rate=0.5, min_calls=6, window=10.0, reset=30.0)
    async with ServiceRunner([Downstream, upstream(breaker=breaker)], broker=memory_url) as runner:
        down = proxy_of(runner)
        for n in range(6):  # alternate: never two failures in a row, half of them failed
            Downstream.failing = n % 2 == 1
            with contextlib.suppress(RemoteError):
                await down.work(n)
        with pytest.raises(CircuitOpen):
            await down.work(7)


async def test_the_bulkhead_bounds_calls_in_flight_then_refuses(memory_url: str) -> None:
    bulkhead = Bulkhead(max_calls=2, max_wait=0.1)
    async with ServiceRunner([Downstream, upstream(bulkhead=bulkhead)], broker=memory_url) as r:
        down = proxy_of(r)
        calls = [asyncio.ensure_future(down.slow(0.5)) for _ in range(3)]
        await asyncio.sleep(0.2)
        from basidia.http.management import describe

        shown = describe(r.containers["upstream"])["breakers"]["downstream"]
        assert (shown["in_flight"], shown["max_calls"]) == (2, 2)
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert sorted(type(outcome).__name__ for outcome in done) == [
            "BulkheadFull",
            "float",
            "float",
        ]
        assert await down.slow(0.0) == 0.0  # places come free again
        with pytest.raises(BulkheadFull):
            await asyncio.gather(*(down.slow(0.3) for _ in range(3)))


async def test_calls_that_never_reached_a_handler_are_retried_within_the_deadline(
    memory_url: str,
) -> None:
    Downstream.failing, Downstream.calls = False, 0
    retry = RpcRetry(attempts=10, delay=0.05)
    async with ServiceRunner([upstream(retry=retry)], broker=memory_url) as runner:
        down = proxy_of(runner)
        # No instance yet: retried until one starts.
        later = ServiceRunner([Downstream], broker=memory_url)
        starting = asyncio.get_running_loop().call_later(0.15, asyncio.ensure_future, later.start())
        try:
            assert await down.work(5) == 5
        finally:
            starting.cancel()
            await later.stop()
        # Never past the deadline: with no instance at all it fails by then.
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await down.work.with_timeout(0.3)(1)
        assert time.monotonic() - started < 0.4
    # A handler that raised is not retried (it ran once).
    Downstream.failing, Downstream.calls = True, 0
    async with ServiceRunner([Downstream, upstream(retry=retry)], broker=memory_url) as runner:
        with pytest.raises(RemoteError):
            await proxy_of(runner).work(1)
        assert Downstream.calls == 1


# -- rate limits ----------------------------------------------------------------------------------


async def test_an_rpc_method_over_its_rate_limit_answers_rate_limited(memory_url: str) -> None:
    class Quotes(Service):
        name = "quotes"

        @rpc(rate_limit="3/s")
        async def quote(self, sku: str) -> float:
            return 1.5

        @rpc
        async def free(self) -> int:
            return 1

    async with ServiceRunner([Quotes], broker=memory_url), connect(memory_url) as cluster:
        quotes = cluster.rpc.quotes
        assert [await quotes.quote("a") for _ in range(3)] == [1.5] * 3
        with pytest.raises(RateLimited, match="rate limit reached"):
            await quotes.quote("a")
        assert [await quotes.free() for _ in range(10)] == [1] * 10  # other methods are free
        await asyncio.sleep(0.4)  # a token comes back every third of a second
        assert await quotes.quote("a") == 1.5


# -- the HTTP edge --------------------------------------------------------------------------------


class Gateway(Service):
    name = "gateway"
    caller = BearerAuth({"t-ops": "ops", "t-app": "mobile"})
    key = ApiKeyAuth({"k-partner": "partner"})

    @http_endpoint("GET", "/orders", allow={"ops", "partner"})
    async def orders(self, request: Any) -> dict[str, str]:
        return {"for": self.caller or self.key}

    @http_endpoint("GET", "/search", rate_limit="2/s")
    async def search(self, request: Any) -> list[str]:
        return []

    @http_endpoint("GET", "/ping", public=True)
    async def ping(self, request: Any) -> str:
        return "pong"


@pytest.fixture
async def gateway(memory_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with ServiceRunner([Gateway], broker=memory_url) as runner:
        async with HttpServer(runner, "127.0.0.1", 0) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                yield client


async def test_http_endpoints_need_credentials_and_an_allowed_principal(
    gateway: httpx.AsyncClient,
) -> None:
    missing = await gateway.get("/orders")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = await gateway.get("/orders", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    forbidden = await gateway.get("/orders", headers={"Authorization": "Bearer t-app"})
    assert forbidden.status_code == 403
    ops = await gateway.get("/orders", headers={"Authorization": "Bearer t-ops"})
    assert (ops.status_code, ops.json()) == (200, {"for": "ops"})
    partner = await gateway.get("/orders", headers={"X-API-Key": "k-partner"})
    assert (partner.status_code, partner.json()) == (200, {"for": "partner"})
    assert (await gateway.get("/ping")).json() == "pong"


async def test_http_rate_limits_answer_429_with_retry_after(gateway: httpx.AsyncClient) -> None:
    ops = {"Authorization": "Bearer t-ops"}
    app = {"Authorization": "Bearer t-app"}
    assert [(await gateway.get("/search", headers=ops)).status_code for _ in range(2)] == [200] * 2
    limited = await gateway.get("/search", headers=ops)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert (await gateway.get("/search", headers=app)).status_code == 200  # per principal


async def test_a_circuit_open_behind_an_endpoint_answers_503(memory_url: str) -> None:
    class Front(Service):
        name = "front"
        down = Dependency("downstream", breaker=Breaker(failures=1, reset=30))

        @http_endpoint("GET", "/work")
        async def work(self, request: Any) -> int:
            return int(await self.down.work(1))

    Downstream.failing = True
    async with ServiceRunner([Front, Downstream], broker=memory_url) as runner:
        async with HttpServer(runner, "127.0.0.1", 0) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                assert (await client.get("/work")).status_code == 502  # the handler raised
                assert (await client.get("/work")).status_code == 503  # the circuit is open
                services = (await client.get("/services")).json()
    front = next(service for service in services if service["name"] == "front")
    assert front["breakers"]["downstream"]["state"] == "open"


async def test_a_broadcast_reaches_every_instance_with_a_shared_dedup_store(
    memory_url: str,
) -> None:
    # One Redis store for both instances: the rule is once per key per instance for a
    # broadcast handler, not once for all of them.
    require_broker("redis", "127.0.0.1", 6379)
    seen: list[str] = []

    class Cache(Service):
        name = "dedup_cache"

        @event_handler("dedup_cache.flush", broadcast=True)
        async def on_flush(self, data: str) -> None:
            seen.append(data)

    config = {"dedup_store": REDIS_URL}
    try:
        async with (
            ServiceRunner([Cache], broker=memory_url, config=config),
            ServiceRunner([Cache], broker=memory_url, config=config) as second,
        ):
            await second.dispatch("dedup_cache.flush", "all", idempotency_key=memory_url)
            await eventually(lambda: len(seen) == 2)
    finally:
        await delete_redis_keys("basidia:dedup:dedup_cache.on_flush:*")


async def test_a_handler_in_flight_at_stop_finishes_and_is_remembered(
    memory_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    started, done = asyncio.Event(), asyncio.Event()

    class Slow(Service):
        name = "dedup_slow"

        @event_handler("dedup_slow.job")
        async def on_job(self, job: int) -> None:
            started.set()
            await asyncio.sleep(0.3)
            done.set()

    runner = ServiceRunner([Slow], broker=memory_url)
    await runner.start()
    try:
        await runner.dispatch("dedup_slow.job", 1)
        await asyncio.wait_for(started.wait(), 5)
    finally:
        await runner.stop()  # stops consuming, then drains the handler in flight
    assert done.is_set()
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


async def test_a_call_made_while_the_link_is_down_goes_once_it_is_back(amqp_url: str) -> None:
    # RabbitMQ fails a request at once while its connection is down (RequestNotSent): the
    # request never left, so the Dependency sends it again once the link is back.
    Downstream.failing, Downstream.calls = False, 0
    parts = urlsplit(amqp_url)
    assert parts.hostname and parts.port
    async with FaultProxy(parts.hostname, parts.port) as proxy:
        credentials, at, _ = parts.netloc.rpartition("@")
        via = urlunsplit(parts._replace(netloc=f"{credentials}{at}127.0.0.1:{proxy.port}"))
        config = {"broker_options": {"reconnect_wait": 0.05, "reconnect_wait_max": 0.3}}
        retry = RpcRetry(attempts=100, delay=0.05)
        # Without a breaker: it counts each attempt made while the link is down, so
        # depending on how soon the link is back it would open before the call goes
        # (the breaker's own tests cover that); this test is about the retry.
        guarded = upstream(retry=retry, breaker=False)
        async with (
            ServiceRunner([Downstream], broker=amqp_url),
            ServiceRunner([guarded], broker=via, config=config) as runner,
        ):
            down = proxy_of(runner)
            assert await down.work(1) == 1
            proxy.down()
            await eventually(lambda: not runner.broker.connected)
            call = asyncio.ensure_future(down.work.with_timeout(20)(2))
            await asyncio.sleep(0.5)
            assert not call.done()  # retrying: not failed, not sent
            proxy.pass_through()
            assert await asyncio.wait_for(call, 20) == 2
    assert Downstream.calls == 2  # each call ran once


async def test_the_openapi_document_says_what_authentication_and_limits_answer(
    gateway: httpx.AsyncClient,
) -> None:
    from openapi_spec_validator import validate

    document = (await gateway.get("/openapi.json")).json()
    validate(document)
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey.X-API-Key": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    orders = document["paths"]["/orders"]["get"]
    assert orders["security"] == [{"bearer": []}, {"apiKey.X-API-Key": []}]
    assert {"401", "403"} <= set(orders["responses"]) and "429" not in orders["responses"]
    search = document["paths"]["/search"]["get"]
    assert {"401", "429"} <= set(search["responses"]) and "403" not in search["responses"]
    ping = document["paths"]["/ping"]["get"]
    assert "security" not in ping and "401" not in ping["responses"]

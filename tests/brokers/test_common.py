"""The broker toolkit (basidia/brokers/_common.py), as a user of any adapter meets it:
URL errors, hidden credentials, TLS files, reconnection delays, worker pools."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from basidia.brokers import broker_from_url, redact_url
from basidia.brokers._common import Backoff, Names, RecentKeys, Secrets, WorkerPool, parse_url
from basidia.brokers.amqp import AmqpBroker
from basidia.brokers.memory import MemoryBroker
from basidia.brokers.nats import NatsBroker
from basidia.errors import BasidiaError, ConfigError

SECRET = "S3nt1nel-pw"

# -- URLs: one parser, one error type, never the password ----------------------------------------


@pytest.mark.parametrize(
    ("url", "part"),
    [
        (f"amqp://app:{SECRET}@rabbit:5672000/", "port"),
        (f"amqp://app:{SECRET}@rabbit:five/", "port"),
        (f"amqp://app:{SECRET}@:5672/", "host"),
        (f"nats://app:{SECRET}@nats:42229999", "port"),
        (f"nats://{SECRET}@:4222", "host"),
        (f"nats://n1:4222,nats://app:{SECRET}@n2:-1", "port"),
        (f"nats://n1:4222,http://app:{SECRET}@n2:4222", "scheme"),
        (f"http://{SECRET}@n2:4222", "scheme"),
        # A password with '/' ends the host part early: the rest must not be shown.
        (f"amqp://app:{SECRET}/x@rabbit:5672/", "percent-encode"),
        (f"nats://app:{SECRET}/x@nats:4222", "percent-encode"),
        (f"nats://app:{SECRET}[@nats:4222", "host"),
    ],
)
def test_a_bad_url_is_a_config_error_naming_the_bad_part(url: str, part: str) -> None:
    scheme = url.partition("://")[0]
    adapter = AmqpBroker if scheme == "amqp" else NatsBroker
    with pytest.raises(ConfigError, match=part) as raised:
        adapter(url)
    assert isinstance(raised.value, BasidiaError)
    assert SECRET not in str(raised.value) and SECRET not in repr(raised.value)
    assert ("AMQP" if adapter is AmqpBroker else "NATS") in str(raised.value)


def test_broker_from_url_reports_a_bad_url_the_same_way() -> None:
    for url in (f"amqps://app:{SECRET}@rabbit:99999/", f"tls://app:{SECRET}@nats:99999"):
        with pytest.raises(ConfigError, match="port") as raised:
            broker_from_url(url)
        assert SECRET not in str(raised.value)


def test_a_memory_url_of_another_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="memory://"):
        MemoryBroker("nats://127.0.0.1:4222")


def test_credentials_are_split_off_percent_decoded() -> None:
    parsed = parse_url("amqp://us%40er:p%2Fw@[::1]:5672/vhost", "AMQP", ("amqp",))
    assert (parsed.user, parsed.password, parsed.token) == ("us@er", "p/w", None)
    assert (parsed.host, parsed.port) == ("[::1]", 5672)
    assert parsed.safe == "amqp://us%40er:***@[::1]:5672/vhost"
    assert set(parsed.secrets) == {"p%2Fw", "p/w"}
    token = parse_url("nats://t%2Bk@nats", "NATS", ("nats",), token_user=True)
    assert (token.user, token.password, token.token) == (None, None, "t+k")
    assert token.safe == "nats://***@nats"


# -- redaction ------------------------------------------------------------------------------------


def test_safe_urls_hide_passwords_and_tokens() -> None:
    nats = NatsBroker(f"nats://alice:{SECRET}@n1:4222, nats://{SECRET}@n2, tls://n3:4443")
    assert nats.safe_url == "nats://alice:***@n1:4222,nats://***@n2,tls://n3:4443"
    assert SECRET not in repr(nats)
    amqp = AmqpBroker(f"amqps://app:{SECRET}@rabbit:5671/prod")
    assert amqp.safe_url == "amqps://app:***@rabbit:5671/prod"
    assert SECRET not in repr(amqp)


def test_redact_url_hides_a_token_where_asked() -> None:
    assert redact_url(f"nats://{SECRET}@nats:4222") == "nats://***@nats:4222"
    assert redact_url("amqp://guest@host/") == "amqp://guest@host/"  # a user, not a token
    assert redact_url(f"http://{SECRET}@host/", token_user=True) == "http://***@host/"


def test_secrets_are_scrubbed_from_error_text_in_both_forms() -> None:
    secrets = Secrets(["p%40ss", "p@ss", ""])
    error = ConnectionError("login p%40ss refused (p@ss)")
    assert secrets.describe(error) == "ConnectionError: login *** refused (***)"
    assert secrets.describe(TimeoutError()) == "timed out"
    assert secrets.describe(OSError()) == "OSError: OSError()"


# -- TLS ------------------------------------------------------------------------------------------


async def test_a_missing_tls_file_is_a_config_error_naming_it() -> None:
    missing = "/nonexistent/ca.pem"
    nats = NatsBroker("tls://127.0.0.1:1", tls_ca_file=missing, connect_timeout=1)
    with pytest.raises(ConfigError, match=r"ca\.pem"):
        await nats.connect()
    amqp = AmqpBroker("amqps://guest:guest@127.0.0.1:1/", tls_ca_file=missing, connect_timeout=1)
    with pytest.raises(ConfigError, match=r"ca\.pem"):
        await amqp.connect()
    client_cert = AmqpBroker("amqps://guest:guest@127.0.0.1:1/", tls_cert_file="/nonexistent/c.pem")
    with pytest.raises(ConfigError, match=r"client certificate '/nonexistent/c\.pem'"):
        await client_cert.connect()


# -- backoff --------------------------------------------------------------------------------------


def test_backoff_doubles_from_the_first_delay_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(first=0.1, cap=5.0)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (3, 0.8), (6, 5.0), (10_000, 5.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 100  # jittered: a fleet does not knock all at once


# -- names ----------------------------------------------------------------------------------------


def test_names_are_made_once_and_a_refused_name_is_not_kept() -> None:
    made: list[str] = []

    def make(service: str) -> str:
        if " " in service:
            raise ValueError(f"no spaces in {service!r}")
        made.append(service)
        return f"rpc.{service}"

    names = Names(make)
    assert names["a"] == names["a"] == "rpc.a"
    assert made == ["a"]
    with pytest.raises(ValueError, match="no spaces"):
        names["a b"]
    assert "a b" not in names


# -- worker pools ---------------------------------------------------------------------------------


class _Pool(WorkerPool[int]):
    def __init__(
        self, queue: asyncio.Queue[int], handle: Callable[[int], object], *, drain: bool
    ) -> None:
        async def run(item: int) -> None:
            result = handle(item)
            if asyncio.iscoroutine(result):
                await result

        logger = logging.getLogger("test")
        super().__init__(queue, run, 2, drain=drain, logger=logger, where="queue q")
        self.start_workers()


async def test_cancel_lets_busy_workers_finish_what_is_queued() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    release = asyncio.Event()
    handled: list[int] = []

    async def handle(item: int) -> None:
        await release.wait()
        handled.append(item)

    pool = _Pool(queue, handle, drain=True)
    for item in range(5):
        queue.put_nowait(item)
    await asyncio.sleep(0.01)  # both workers busy, three queued
    await pool.cancel()
    release.set()
    for _ in range(100):
        if not pool._workers:
            break
        await asyncio.sleep(0.01)
    assert sorted(handled) == [0, 1, 2, 3, 4]
    assert not pool._workers


async def test_cancel_without_drain_leaves_the_queue_to_other_consumers() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    release = asyncio.Event()
    handled: list[int] = []

    async def handle(item: int) -> None:
        await release.wait()
        handled.append(item)

    pool = _Pool(queue, handle, drain=False)
    for item in range(5):
        queue.put_nowait(item)
    await asyncio.sleep(0.01)
    await pool.cancel()
    release.set()
    await asyncio.gather(*pool._workers)
    assert sorted(handled) == [0, 1]
    assert queue.qsize() == 3


async def test_aclose_ends_busy_workers_and_a_failing_handler_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def handle(item: int) -> None:
        if item == 0:
            raise RuntimeError("bug")
        await asyncio.sleep(3600)

    pool = _Pool(queue, handle, drain=True)
    queue.put_nowait(0)
    queue.put_nowait(1)
    await asyncio.sleep(0.01)
    assert "delivery handler failed on queue q" in caplog.text
    await asyncio.wait_for(pool.aclose(), 1)
    assert not pool._workers


# -- idempotent publishing ------------------------------------------------------------------------


async def test_recent_keys_drop_a_repeat_within_the_window_and_only_then() -> None:
    keys = RecentKeys(window=0.2)
    sent: list[str] = []

    async def publish(key: str) -> bool:
        async def send() -> None:
            sent.append(key)

        return await keys.publish_once(key, send)

    assert await publish("a") and await publish("b")
    assert not await publish("a")
    assert keys.dropped == 1
    await asyncio.sleep(0.25)
    assert await publish("a")  # the window is over
    assert sent == ["a", "b", "a"]
    assert keys.first_time("c") and not keys.first_time("c")
    assert RecentKeys(window=0).first_time("c")  # 0: no de-duplication


async def test_recent_keys_remember_a_key_only_once_its_publish_succeeded() -> None:
    keys = RecentKeys()
    release = asyncio.Event()
    outcomes = iter([ConnectionError("no confirm"), None])
    sent = 0

    async def send() -> None:
        nonlocal sent
        sent += 1
        await release.wait()
        error = next(outcomes)
        if error is not None:
            raise error

    first = asyncio.ensure_future(keys.publish_once("k", send))
    await asyncio.sleep(0)
    # A repeat while the first is under way waits for it; the first fails, so it publishes.
    second = asyncio.ensure_future(keys.publish_once("k", send))
    await asyncio.sleep(0.01)
    assert sent == 1
    release.set()
    with pytest.raises(ConnectionError):
        await first
    assert await second is True
    assert sent == 2
    assert await keys.publish_once("k", send) is False  # confirmed now: dropped


def test_recent_keys_forget_the_oldest_past_their_bound() -> None:
    keys = RecentKeys(max_keys=3)
    for key in "abcd":
        assert keys.first_time(key)
    assert keys.first_time("a")  # forgotten early
    assert not keys.first_time("d")

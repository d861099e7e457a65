"""The NATS broker against the broker contract, plus what only NATS does.

Everything runs against the shared NATS server (``nats_url``), with names made
unique per test; the durable consumers a test creates are deleted after it.
TLS tests start a nats-server of their own with a throw-away certificate authority.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from basidia._speedups import Frame, Kind, decode_frame, encode_frame, env_flag
from basidia.brokers import Delivery, EventSubscription
from basidia.brokers.base import Failure
from basidia.brokers.nats import DLQ_STREAM, EVENTS_STREAM, NatsBroker
from basidia.errors import BrokerError

from .cleanup import delete_nats_consumers
from .contract import BrokerContract, dead_letters_of, eventually, exercise_examples

pytestmark = [pytest.mark.nats, pytest.mark.timeout(60)]

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class TestNatsBroker(BrokerContract):
    @pytest.fixture
    def broker_url(self, nats_url: str) -> str:
        return nats_url

    @pytest.fixture(autouse=True)
    async def _clean_up_consumers(self, nats_url: str, name: str) -> AsyncIterator[None]:
        yield
        await delete_nats_consumers(nats_url, name)


class TestNatsBrokerPublicApi(TestNatsBroker):
    """The contract again with ``fast_path=False``: requests, replies and publishes through
    nats-py's public API alone (basidia/brokers/_nats_fast.py is not used)."""

    @pytest.fixture
    def broker_options(self) -> dict[str, Any]:
        return {"fast_path": False}


# -- helpers for the NATS-only tests ------------------------------------------------------------


@pytest.fixture
async def make_broker(
    nats_url: str, unique: str
) -> AsyncIterator[Callable[..., Awaitable[NatsBroker]]]:
    """Connected brokers on the shared server, closed (and their consumers deleted) after."""
    brokers: list[NatsBroker] = []

    async def make(**options: Any) -> NatsBroker:
        broker = NatsBroker(nats_url, **options)
        await broker.connect()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.close()
    await delete_nats_consumers(nats_url, unique)


def _collect(into: list[Delivery] | Counter[bytes]) -> Callable[[Delivery], Awaitable[None]]:
    async def handle(delivery: Delivery) -> None:
        if isinstance(into, Counter):
            into[delivery.body] += 1
        else:
            into.append(delivery)
        await delivery.ack()

    return handle


# -- RPC ----------------------------------------------------------------------------------------


async def test_handlers_run_concurrently_although_nats_py_callbacks_do_not(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    server, client = await make_broker(), await make_broker()
    release = asyncio.Event()
    running = 0

    async def slow(delivery: Delivery) -> None:
        nonlocal running
        running += 1
        await release.wait()

    await server.serve_requests(f"slow_{unique}", slow, concurrency=20)
    await client.open_inbox(lambda body: None)
    for index in range(30):
        await client.send_request(f"slow_{unique}", b"x", correlation_id=index + 1)
    await eventually(lambda: running == 20)
    await asyncio.sleep(0.1)
    assert running == 20  # the rest wait in the subscription's bounded queue
    release.set()
    await eventually(lambda: running == 30)


@pytest.mark.parametrize("fast_path", [True, False])
async def test_bodies_up_to_max_payload_arrive_intact_in_any_mix(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str, fast_path: bool
) -> None:
    """Requests and replies of 0 bytes to the server's limit, many in flight at once: each
    arrives whole and to its caller, however the reads split and the writes batch them."""
    server = await make_broker(fast_path=fast_path)
    client = await make_broker(fast_path=fast_path)
    limit = client.max_body_size
    sizes = [0, 1, 16, 1000, 4095, 4096, 32767, 32768, 65536, 300_000, limit // 2, limit]
    replies: dict[int, bytes] = {}
    done = asyncio.Event()

    async def echo(delivery: Delivery) -> None:
        await server.send_reply(delivery.body[:40].decode().strip(), delivery.body)

    await server.serve_requests(f"echo_{unique}", echo, concurrency=8)
    address = await client.open_inbox(lambda body: None)

    def on_reply(body: bytes) -> None:
        replies[int(body[40:60])] = body
        if len(replies) == 3 * len(sizes):
            done.set()

    address = await client.open_inbox(on_reply)
    for round_ in range(3):
        for index, size in enumerate(sizes):
            key = round_ * len(sizes) + index
            head = address.ljust(40).encode() + str(key).rjust(20).encode()
            body = (head + bytes([key]) * size)[: max(size, len(head))]
            await client.send_request(f"echo_{unique}", body, correlation_id=key + 1)
    await asyncio.wait_for(done.wait(), 30)
    for round_ in range(3):
        for index, size in enumerate(sizes):
            key = round_ * len(sizes) + index
            body = replies[key]
            assert len(body) == max(size, 60)
            assert body[60:] == bytes([key]) * (len(body) - 60)


@pytest.mark.parametrize("fast_path", [True, False])
async def test_requests_over_max_pending_are_dropped_and_logged(
    make_broker: Callable[..., Awaitable[NatsBroker]],
    unique: str,
    fast_path: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Flow control: a service queues at most ``max_pending`` requests for its workers;
    beyond that NATS's slow-consumer rule drops them, with a warning."""
    server = await make_broker(max_pending=5, fast_path=fast_path)
    client = await make_broker(fast_path=fast_path)
    release = asyncio.Event()
    seen: list[bytes] = []

    async def slow(delivery: Delivery) -> None:
        seen.append(delivery.body)
        await release.wait()

    await server.serve_requests(f"slow_{unique}", slow, concurrency=1)
    await client.open_inbox(lambda body: None)
    with caplog.at_level(logging.WARNING, logger="basidia.brokers.nats"):
        for index in range(20):
            await client.send_request(f"slow_{unique}", b"%d" % index, correlation_id=index + 1)
        await eventually(lambda: "too slow" in caplog.text)
    release.set()
    await eventually(lambda: len(seen) >= 5)
    await asyncio.sleep(0.2)
    assert 5 <= len(seen) <= 6  # at most max_pending queued (and one handled); the rest dropped
    assert seen == sorted(seen, key=int)


async def test_replies_only_ever_go_to_an_inbox(
    make_broker: Callable[..., Awaitable[NatsBroker]], nats_url: str, unique: str
) -> None:
    """A forged request frame cannot make a service publish on an arbitrary subject."""
    broker = await make_broker()
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        seen = await nc.subscribe(f"victim.{unique}")
        await broker.send_reply(f"victim.{unique}", b"forged")
        await broker.send_reply("_INBOX.*", b"wildcard")
        with pytest.raises(nats.errors.TimeoutError):
            await seen.next_msg(timeout=0.3)
    finally:
        await nc.close()


async def test_invalid_names_are_refused_with_a_clear_error(
    make_broker: Callable[..., Awaitable[NatsBroker]],
) -> None:
    broker = await make_broker()

    async def handle(delivery: Delivery) -> None: ...

    with pytest.raises(ValueError, match="cannot be used in a NATS subject"):
        await broker.serve_requests("two words", handle, concurrency=1)
    with pytest.raises(ValueError, match="cannot be used in a NATS subject"):
        await broker.publish_event("orders.>", b"x", idempotency_key="k")
    with pytest.raises(ValueError, match="cannot be used in a NATS subject"):
        await broker.subscribe_events(EventSubscription("a..b", "g.h"), handle, concurrency=1)


async def test_calls_fail_fast_when_the_broker_is_closed(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    broker = await make_broker()
    await broker.close()
    with pytest.raises(BrokerError):
        await broker.send_request(f"svc_{unique}", b"x", correlation_id=1)


# -- events on JetStream ------------------------------------------------------------------------


async def test_publishes_with_one_idempotency_key_are_delivered_once(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    seen: Counter[bytes] = Counter()
    event = f"dedupe_{unique}.done"
    await consumer.subscribe_events(
        EventSubscription(event, f"dedupe_{unique}.on_done"), _collect(seen), concurrency=4
    )
    for _ in range(3):
        await publisher.publish_event(event, b"once", idempotency_key=f"{unique}-same")
    await publisher.publish_event(event, b"other", idempotency_key=f"{unique}-other")
    await eventually(lambda: sum(seen.values()) >= 2)
    await asyncio.sleep(0.3)
    assert seen == Counter({b"once": 1, b"other": 1})


async def test_unsettled_event_comes_back_after_ack_wait_with_the_next_attempt(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    consumer = await make_broker(ack_wait=1.0)
    publisher = await make_broker()
    attempts: list[int] = []
    event = f"stuck_{unique}.happened"

    async def forget(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt >= 2:
            await delivery.ack()
        # else: neither ack nor nack, as if the worker had died mid-handler

    await consumer.subscribe_events(
        EventSubscription(event, f"stuck_{unique}.on_it"), forget, concurrency=1
    )
    await publisher.publish_event(event, b"x", idempotency_key=f"{unique}-1")
    await eventually(lambda: attempts == [1, 2], timeout=5)


async def test_a_handler_slower_than_ack_wait_is_not_given_a_duplicate(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    first, second = await make_broker(ack_wait=1.0), await make_broker(ack_wait=1.0)
    publisher = await make_broker()
    event = f"long_{unique}.job"
    group = EventSubscription(event, f"long_{unique}.on_job")
    attempts: list[int] = []

    async def slow(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        await asyncio.sleep(2.5)
        await delivery.ack()

    await first.subscribe_events(group, slow, concurrency=1)
    await second.subscribe_events(group, slow, concurrency=1)
    await publisher.publish_event(event, b"x", idempotency_key=f"{unique}-1")
    await eventually(lambda: len(attempts) == 1)
    await asyncio.sleep(3.5)
    assert attempts == [1]


async def test_dead_letter_keeps_body_and_the_dead_letter_headers(
    make_broker: Callable[..., Awaitable[NatsBroker]], nats_url: str, unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event = f"poison_{unique}.arrived"
    group = f"poison_{unique}.on_arrived"
    seen: list[int] = []

    async def fail_twice(delivery: Delivery) -> None:
        seen.append(delivery.attempt)
        if delivery.attempt < 2:
            await delivery.nack(requeue=True)
        else:
            await asyncio.sleep(0.01)  # the last failure comes after the first
            await delivery.dead_letter(
                Failure("ValueError: not today", "ValueError", "poison", "on_arrived")
            )

    await consumer.subscribe_events(EventSubscription(event, group), fail_twice, concurrency=1)
    await publisher.publish_event(event, b"\x01poison", idempotency_key=f"{unique}-1")
    await eventually(lambda: seen == [1, 2])
    nc = await nats.connect(nats_url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        letter = None
        deadline = time.monotonic() + 5
        while letter is None:
            try:
                letter = await js.get_last_msg(DLQ_STREAM, f"basidia.dlq.{event}")
            except nats.js.errors.NotFoundError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert letter.data == b"\x01poison"
    headers = letter.headers or {}
    assert headers["basidia-reason"] == "ValueError: not today"
    assert headers["basidia-exception"] == "ValueError"
    assert headers["basidia-event"] == event
    assert headers["basidia-group"] == group
    assert headers["basidia-attempts"] == "2"
    assert (headers["basidia-service"], headers["basidia-handler"]) == ("poison", "on_arrived")
    assert headers["basidia-stream-sequence"].isdigit()
    # The first failure is remembered by the consumer that NAKed it (NAK carries nothing).
    first, last = int(headers["basidia-first-failure"]), int(headers["basidia-last-failure"])
    assert abs(time.time() * 1000 - last) < 10_000 and first < last
    assert "basidia-truncated-from" not in headers
    await asyncio.sleep(0.3)
    assert seen == [1, 2]  # terminated: not redelivered


async def test_a_redelivery_nobody_remembers_failing_dead_letters_with_first_equal_to_last(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    """The first failure of an event retried by another instance (or before a restart) is
    unknown here: the dead letter says first = last rather than make one up."""
    first_instance = await make_broker(ack_wait=1.0)
    publisher = await make_broker()
    event = f"forgot_{unique}.arrived"
    group = f"forgot_{unique}.on_arrived"
    seen: list[int] = []

    async def forget(delivery: Delivery) -> None:
        seen.append(delivery.attempt)  # never settled: back after ack_wait

    subscription = await first_instance.subscribe_events(
        EventSubscription(event, group), forget, concurrency=1
    )
    await publisher.publish_event(event, b"x", idempotency_key=f"{unique}-1")
    await eventually(lambda: seen == [1])
    await subscription.cancel()
    second_instance = await make_broker(ack_wait=1.0)

    async def give_up(delivery: Delivery) -> None:
        seen.append(delivery.attempt)
        await delivery.dead_letter(Failure("gave up", "RuntimeError"))

    await second_instance.subscribe_events(EventSubscription(event, group), give_up, concurrency=1)
    [letter] = await dead_letters_of(publisher, group, 1)
    assert seen == [1, 2]
    assert (letter.attempts, letter.exception, letter.reason) == (2, "RuntimeError", "gave up")
    assert letter.first_failure == letter.last_failure


async def test_event_handlers_run_concurrently_up_to_the_limit(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event = f"busy_{unique}.work"
    running = peak = done = 0

    async def work(delivery: Delivery) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        done += 1
        await delivery.ack()

    await consumer.subscribe_events(
        EventSubscription(event, f"busy_{unique}.on_work"), work, concurrency=3
    )
    for index in range(15):
        await publisher.publish_event(event, b"%d" % index, idempotency_key=f"{unique}-{index}")
    await eventually(lambda: done == 15)
    assert peak == 3


async def test_a_group_gets_no_event_published_before_it_existed(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event = f"early_{unique}.news"
    seen: Counter[bytes] = Counter()
    await publisher.publish_event(event, b"before", idempotency_key=f"{unique}-1")
    await consumer.subscribe_events(
        EventSubscription(event, f"early_{unique}.on_news"), _collect(seen), concurrency=1
    )
    await publisher.publish_event(event, b"after", idempotency_key=f"{unique}-2")
    await eventually(lambda: seen[b"after"] == 1)
    await asyncio.sleep(0.2)
    assert seen == Counter({b"after": 1})


async def test_groups_whose_names_differ_only_in_punctuation_stay_apart(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event = f"names_{unique}.changed"
    first: Counter[bytes] = Counter()
    second: Counter[bytes] = Counter()
    await consumer.subscribe_events(
        EventSubscription(event, f"svc_{unique}.a.b_c"), _collect(first), concurrency=1
    )
    await consumer.subscribe_events(
        EventSubscription(event, f"svc_{unique}.a_b.c"), _collect(second), concurrency=1
    )
    await publisher.publish_event(event, b"x", idempotency_key=f"{unique}-1")
    await eventually(lambda: first[b"x"] == 1 and second[b"x"] == 1)


async def test_a_broadcast_consumer_goes_away_with_its_subscription(
    make_broker: Callable[..., Awaitable[NatsBroker]], nats_url: str, unique: str
) -> None:
    broker = await make_broker()
    event = f"bcast_{unique}.ping"
    subscription = await broker.subscribe_events(
        EventSubscription(event, f"bcast_{unique}.on_ping", broadcast=True),
        _collect([]),
        concurrency=1,
    )

    async def consumers() -> int:
        nc = await nats.connect(nats_url, allow_reconnect=False)
        try:
            infos = await nc.jsm().consumers_info(EVENTS_STREAM)
            return sum(1 for info in infos if unique in (info.config.filter_subject or ""))
        finally:
            await nc.close()

    assert await consumers() == 1
    await subscription.cancel()
    assert await consumers() == 0


async def test_core_nats_events_are_at_most_once(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    consumer, publisher = await make_broker(), await make_broker()
    event = f"core_{unique}.tick"
    group = EventSubscription(event, f"core_{unique}.on_tick", durable=False)
    seen: Counter[bytes] = Counter()
    subscription = await consumer.subscribe_events(group, _collect(seen), concurrency=2)
    await publisher.publish_event(event, b"heard", idempotency_key=f"{unique}-1")
    await eventually(lambda: seen[b"heard"] == 1)
    await subscription.cancel()
    await publisher.publish_event(event, b"missed", idempotency_key=f"{unique}-2")
    await consumer.subscribe_events(group, _collect(seen), concurrency=2)
    await publisher.publish_event(event, b"heard again", idempotency_key=f"{unique}-3")
    try:
        await eventually(lambda: seen[b"heard again"] > 0)
    except AssertionError:
        raise AssertionError(f"'heard again' never came; seen: {dict(seen)}") from None
    await asyncio.sleep(0.1)  # room for a second copy, which must not come
    assert seen == Counter({b"heard": 1, b"heard again": 1})


# -- the connection -----------------------------------------------------------------------------


async def test_closing_with_handlers_in_flight_leaves_no_task_behind(
    make_broker: Callable[..., Awaitable[NatsBroker]], unique: str
) -> None:
    before = asyncio.all_tasks()
    server = await make_broker()
    client = await make_broker()
    hanging = 0

    async def hang(delivery: Delivery) -> None:
        nonlocal hanging
        hanging += 1
        await asyncio.sleep(3600)

    await server.serve_requests(f"hang_{unique}", hang, concurrency=4)
    await server.subscribe_events(
        EventSubscription(f"hang_{unique}.e", f"hang_{unique}.on_e"), hang, concurrency=2
    )
    await client.open_inbox(lambda body: None)
    await client.send_request(f"hang_{unique}", b"x", correlation_id=1)
    await client.publish_event(f"hang_{unique}.e", b"x", idempotency_key=f"{unique}-1")
    await eventually(lambda: hanging == 2)  # a request and an event in their handlers
    await server.close()
    await client.close()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()


async def test_no_password_in_reprs_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for url, secret in (
        (f"nats://alice:S3cret-pw@127.0.0.1:{port}", "S3cret-pw"),
        (f"nats://T0ken-value@127.0.0.1:{port}", "T0ken-value"),
    ):
        broker = NatsBroker(url, connect_timeout=0.5)
        assert secret not in repr(broker) and secret not in broker.safe_url
        with pytest.raises(BrokerError) as raised:
            await broker.connect()
        assert secret not in str(raised.value) and secret not in repr(raised.value)
        assert str(port) in str(raised.value)  # the error still says where it tried
    assert caplog.records
    assert all(
        "S3cret-pw" not in r.getMessage() and "T0ken-value" not in r.getMessage()
        for r in caplog.records
    )


async def test_a_tls_url_refuses_a_server_without_tls(nats_url: str) -> None:
    broker = NatsBroker(nats_url.replace("nats://", "tls://"), connect_timeout=2)
    with pytest.raises(BrokerError, match="does not offer TLS"):
        await broker.connect()
    assert not broker.connected


async def test_examples_run_on_nats(nats_url: str, unique: str) -> None:
    try:
        await exercise_examples(nats_url, unique)
    finally:
        await delete_nats_consumers(nats_url, unique)  # the groups of this test's services


# -- TLS and authentication, against nats-servers of our own ------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@contextlib.contextmanager
def _own_nats_server(*options: str) -> Iterator[int]:
    """A nats-server with ``options`` on a free loopback port; yields the port."""
    if not os.access(NATS_SERVER, os.X_OK):
        reason = f"needs {NATS_SERVER} (apt-get install nats-server)"
        if env_flag("BASIDIA_REQUIRE_BROKERS"):
            pytest.fail(f"{reason} and BASIDIA_REQUIRE_BROKERS=1 is set")
        pytest.skip(reason)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    process = subprocess.Popen(
        [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A nats-server with TLS, and the file of the CA that signed its certificate."""
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=basidia-test-ca", "-keyout", "ca.key", "-out", "ca.pem",
             cwd=tmp_path)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=tmp_path)  # fmt: skip
    (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out", "server.pem",
             cwd=tmp_path)  # fmt: skip
    tls = ("--tls", "--tlscert", str(tmp_path / "server.pem"),
           "--tlskey", str(tmp_path / "server.key"))  # fmt: skip
    with _own_nats_server(*tls) as port:
        yield f"tls://127.0.0.1:{port}", tmp_path / "ca.pem"


async def test_credentials_reach_the_server_and_never_a_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with _own_nats_server("--user", "alice", "--pass", "Pa55-w0rd") as port:
        broker = NatsBroker(f"nats://alice:Pa55-w0rd@127.0.0.1:{port}", connect_timeout=2)
        await broker.connect()
        assert broker.connected
        await broker.close()
        intruder = NatsBroker(f"nats://alice:Wr0ng-pw@127.0.0.1:{port}", connect_timeout=1)
        with pytest.raises(BrokerError, match=r"(?i)authorization") as raised:
            await intruder.connect()
        assert "Wr0ng-pw" not in str(raised.value)
    assert all(
        "Pa55-w0rd" not in record.getMessage() and "Wr0ng-pw" not in record.getMessage()
        for record in caplog.records
    )


async def test_tls_is_verified(tls_server: tuple[str, Path]) -> None:
    url, ca_file = tls_server
    untrusting = NatsBroker(url, connect_timeout=2)
    with pytest.raises(BrokerError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        await untrusting.connect()
    broker = NatsBroker(url, connect_timeout=5, tls_ca_file=str(ca_file))
    await broker.connect()
    try:
        replies: list[bytes] = []

        async def echo(delivery: Delivery) -> None:
            frame = decode_frame(delivery.body)
            reply = Frame(Kind.REPLY, frame.correlation_id, "", frame.payload)
            await broker.send_reply(frame.reply_to, encode_frame(reply))

        await broker.serve_requests("tls_echo", echo, concurrency=1)
        inbox = await broker.open_inbox(replies.append)
        request = Frame(Kind.REQUEST, 1, "tls_echo.echo", b"secret", inbox)
        await broker.send_request("tls_echo", encode_frame(request), correlation_id=1)
        await eventually(lambda: len(replies) == 1, timeout=5)
        assert decode_frame(replies[0]).payload == b"secret"
    finally:
        await broker.close()

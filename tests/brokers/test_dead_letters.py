"""Dead letters, one record on every broker (docs/dead-letters.md): the headers that carry
it, and the same failure dead-lettered on memory, RabbitMQ and NATS, compared."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import pytest

from basidia import ServiceRunner
from basidia.brokers import broker_from_url
from basidia.brokers.base import (
    DEAD_LETTER_HEADERS,
    DeadLetter,
    Failure,
    dead_letter_headers,
    make_dead_letter,
    read_dead_letter,
)

from .cleanup import delete_amqp, delete_nats_consumers
from .contract import dead_letters_of, picky_service

pytestmark = pytest.mark.timeout(60)

# -- the record and its headers -------------------------------------------------------------------


def test_the_headers_carry_every_field_as_text_and_read_back_equal() -> None:
    letter = DeadLetter(
        event="order.placed",
        group="billing.on_order",
        service="billing",
        handler="on_order",
        reason="ValueError: order 7 is not acceptable",
        exception="ValueError",
        attempts=3,
        first_failure=1_700_000_000.123,
        last_failure=1_700_000_004.5,
        frame=b"\x01frame",
        truncated_from=70_000,
    )
    headers = dead_letter_headers(letter)
    assert set(headers) == set(DEAD_LETTER_HEADERS)
    assert all(isinstance(value, str) for value in headers.values())
    assert headers["basidia-attempts"] == "3"
    assert headers["basidia-first-failure"] == "1700000000123"
    assert headers["basidia-last-failure"] == "1700000004500"
    assert headers["basidia-truncated-from"] == "70000"
    assert read_dead_letter(headers, letter.frame) == letter
    # Not cut: no truncation header at all.
    whole = dataclasses.replace(letter, truncated_from=0)
    assert "basidia-truncated-from" not in dead_letter_headers(whole)
    assert read_dead_letter(dead_letter_headers(whole), letter.frame) == whole


def test_typed_and_missing_values_are_read_and_earlier_names_too() -> None:
    typed: dict[str, Any] = {"basidia-attempts": 2, "basidia-reason": b"boom", "x": "y"}
    letter = read_dead_letter(typed, b"")
    assert (letter.attempts, letter.reason, letter.exception, letter.truncated_from) == (
        2,
        "boom",
        "",
        0,
    )
    rabbit = {
        "x-basidia-reason": "ValueError: old",
        "x-basidia-event": "e",
        "x-basidia-group": "svc.on_e",
        "x-basidia-queue": "basidia.events.svc.on_e",
        "x-basidia-attempt": 3,
        "x-basidia-dead-lettered-at": 1_700_000_000_000,
    }
    old = read_dead_letter(rabbit, b"body")
    assert (old.reason, old.event, old.group, old.service, old.handler) == (
        "ValueError: old",
        "e",
        "svc.on_e",
        "svc",
        "on_e",
    )
    assert (old.attempts, old.first_failure, old.last_failure) == (3, 1.7e9, 1.7e9)
    nats_headers = {
        "Basidia-Dead-Letter-Reason": "r",
        "Basidia-Event": "e",
        "Basidia-Group": "a.b.on_e",
        "Basidia-Attempts": "2",
        "Basidia-Truncated-From": "99",
    }
    old = read_dead_letter(nats_headers, b"")
    assert (old.reason, old.service, old.handler, old.attempts, old.truncated_from) == (
        "r",
        "a.b",
        "on_e",
        2,
        99,
    )


def test_the_record_is_made_the_same_way_for_every_broker() -> None:
    failure = Failure("line one\r\nline two\t" + "x" * 5000, "Value\nError")
    letter = make_dead_letter(
        failure, event="e", group="svc.on_e", attempts=0, frame=b"f", first_failure=10.0
    )
    # No control characters (a NATS header could not carry them), cut to 4096 characters.
    assert letter.reason.startswith("line one  line two ") and len(letter.reason) == 4096
    assert letter.exception == "Value Error"
    assert (letter.service, letter.handler, letter.attempts) == ("svc", "on_e", 1)
    assert letter.first_failure == 10.0 and abs(letter.last_failure - time.time()) < 5
    # Unknown (0) or later than the last failure (clock skew): the first is the last.
    late = make_dead_letter(
        Failure("r"), event="e", group="g.h", attempts=1, frame=b"", first_failure=0
    )
    assert late.first_failure == late.last_failure
    assert make_dead_letter(Failure(""), event="e", group="g.h", attempts=1, frame=b"").reason


# -- one failure, three brokers -------------------------------------------------------------------


async def _clean_up(amqp_url: str, nats_url: str, token: str, groups: list[str]) -> None:
    queues = [
        q for group in groups for q in (f"basidia.events.{group}", f"basidia.events.{group}.dlq")
    ]
    await delete_amqp(amqp_url, queues)
    await delete_nats_consumers(nats_url, token)


@pytest.mark.amqp
@pytest.mark.nats
async def test_the_same_failure_makes_the_same_dead_letter_on_every_broker(
    memory_url: str, amqp_url: str, nats_url: str
) -> None:
    name = f"everywhere_{uuid.uuid4().hex[:10]}"
    event, key = f"{name}.order", f"{name}-poison"
    seen: list[int] = []
    picky = picky_service(name, seen)
    group = f"{picky.name}.on_order"
    letters: dict[str, DeadLetter] = {}
    try:
        for url in (memory_url, amqp_url, nats_url):
            broker = broker_from_url(url)
            async with ServiceRunner([picky], broker=broker) as runner:
                await runner.dispatch(event, {"id": 7}, idempotency_key=key)
                [letters[url.partition(":")[0]]] = await dead_letters_of(broker, group, 1)
    finally:
        await _clean_up(amqp_url, nats_url, name, [group])
    assert seen == [1, 2, 3] * 3

    def comparable(letter: DeadLetter) -> dict[str, Any]:
        # Timestamps differ by nature, truncation and ids by broker: the rest is equal.
        fields = dataclasses.asdict(letter)
        for broker_dependent in ("first_failure", "last_failure", "truncated_from", "id"):
            del fields[broker_dependent]
        return fields

    memory, rabbit, jetstream = letters["memory"], letters["amqp"], letters["nats"]
    assert comparable(memory) == comparable(rabbit) == comparable(jetstream)
    assert comparable(memory) == {
        "event": event,
        "group": group,
        "service": picky.name,
        "handler": "on_order",
        "reason": "ValueError: order 7 is not acceptable",
        "exception": "ValueError",
        "attempts": 3,
        "frame": memory.frame,
    }
    for letter in letters.values():
        assert letter.truncated_from == 0
        assert 0 < letter.first_failure <= letter.last_failure <= time.time() + 1

"""Event schema versions (docs/events.md): the version travels in the ``ver`` header, a
handler accepts the versions it declares, upcasters lift older data, and an event of a
version nobody accepts is dead-lettered with the reason; on memory, RabbitMQ and NATS."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest

from basidia import Service, ServiceRunner, event_handler
from basidia._speedups import decode_frame
from basidia.brokers import broker_from_url
from basidia.versioning import VERSION_HEADER

from .brokers.cleanup import delete_amqp, delete_nats_consumers
from .brokers.contract import dead_letters_of, eventually

pytestmark = pytest.mark.timeout(60)


class UserV1(msgspec.Struct):
    name: str  # "Ada Lovelace"


class UserV2(msgspec.Struct):
    first_name: str
    last_name: str


def v1_to_v2(user: UserV1) -> UserV2:
    first, _, last = user.name.partition(" ")
    return UserV2(first, last)


def versioned_services(name: str, seen: list[Any]) -> tuple[type[Service], type[Service]]:
    """``<name>_users``, whose handler of ``<name>.user`` reads version 2 and upcasts 1,
    and ``<name>_any``, whose handler declares no versions."""

    class Users(Service):
        @event_handler(f"{name}.user", versions=(1, 2), upcasters={1: v1_to_v2}, max_attempts=1)
        async def on_user(self, user: UserV2) -> None:
            seen.append(("users", user))

    class Anything(Service):
        @event_handler(f"{name}.user")
        async def on_user(self, user: dict[str, Any]) -> None:
            seen.append(("any", user))

    Users.name, Anything.name = f"{name}_users", f"{name}_any"
    return Users, Anything


async def exercise(url: str, name: str) -> None:
    seen: list[Any] = []
    users, anything = versioned_services(name, seen)
    broker = broker_from_url(url)
    event = f"{name}.user"
    async with ServiceRunner([users, anything], broker=broker) as runner:
        await runner.dispatch(event, {"name": "Ada Lovelace"})  # no version: 1
        await runner.dispatch(event, {"first_name": "Alan", "last_name": "Turing"}, version=2)
        await runner.dispatch(event, {"full": "Grace Hopper"}, version=3)
        [letter] = await dead_letters_of(broker, f"{name}_users.on_user", 1)
        await eventually(lambda: len(seen) == 5)
    # The old version was upcast, the new one read as it is; the unknown one parked.
    assert sorted((user.first_name, user.last_name) for who, user in seen if who == "users") == [
        ("Ada", "Lovelace"),
        ("Alan", "Turing"),
    ]
    assert letter.reason == (
        f"{event} version 3 is not accepted by "
        f"versioned_services.<locals>.Users.on_user (it accepts versions 1, 2)"
    )
    assert (letter.exception, letter.attempts) == ("", 1)
    assert decode_frame(letter.frame).headers[VERSION_HEADER] == "3"
    # A handler without versions takes every event as it comes.
    assert sorted(str(user) for who, user in seen if who == "any") == sorted(
        str(data)
        for data in (
            {"name": "Ada Lovelace"},
            {"first_name": "Alan", "last_name": "Turing"},
            {"full": "Grace Hopper"},
        )
    )


async def test_versions_upcasters_and_dead_letters_on_memory(memory_url: str) -> None:
    await exercise(memory_url, f"ver_{uuid.uuid4().hex[:10]}")


@pytest.mark.amqp
async def test_versions_upcasters_and_dead_letters_on_rabbitmq(amqp_url: str) -> None:
    name = f"ver_{uuid.uuid4().hex[:10]}"
    try:
        await exercise(amqp_url, name)
    finally:
        groups = [f"{name}_users.on_user", f"{name}_any.on_user"]
        await delete_amqp(
            amqp_url,
            [q for g in groups for q in (f"basidia.events.{g}", f"basidia.events.{g}.dlq")],
        )


@pytest.mark.nats
async def test_versions_upcasters_and_dead_letters_on_nats(nats_url: str) -> None:
    name = f"ver_{uuid.uuid4().hex[:10]}"
    try:
        await exercise(nats_url, name)
    finally:
        await delete_nats_consumers(nats_url, name, purge_dlq=f"*.{name}_users.>")


async def test_a_bad_version_header_and_a_failing_upcaster_are_dead_lettered(
    memory_url: str,
) -> None:
    from basidia._speedups import Frame, Kind, encode_frame

    def broken(data: Any) -> Any:
        raise KeyError("name")

    class Strict(Service):
        name = "strict"

        @event_handler("thing", versions=(1, 2), upcasters={1: broken})
        async def on_thing(self, thing: dict[str, Any]) -> None:
            raise AssertionError("never reached")

    async with ServiceRunner([Strict], broker=memory_url) as runner:
        broker = runner.broker
        payload = msgspec.msgpack.encode({"a": 1})
        await broker.publish_event(
            "thing",
            encode_frame(Frame(Kind.EVENT, 0, "thing", payload, "", 0, {"ver": "02x"})),
            idempotency_key="bad-version",
        )
        await runner.dispatch("thing", {"a": 1}, version=1)
        letters = await dead_letters_of(broker, "strict.on_thing", 2)
    reasons = sorted(letter.reason for letter in letters)
    assert reasons == [
        "the event's version header is not a version: '02x'",
        "upcasting thing from version 1 failed in "
        "test_a_bad_version_header_and_a_failing_upcaster_are_dead_lettered.<locals>."
        "Strict.on_thing: KeyError: 'name'",
    ]


def test_declarations_are_checked_when_the_class_is_written() -> None:
    async def handler(self: Any, data: Any) -> None: ...

    with pytest.raises(ValueError, match="both must be in versions"):
        event_handler("e", versions=(2, 3), upcasters={1: dict})(handler)
    with pytest.raises(ValueError, match="upcasters need versions"):
        event_handler("e", upcasters={1: dict})(handler)
    with pytest.raises(ValueError, match="must be 1 to 9999"):
        event_handler("e", versions=(0, 1))(handler)
    with pytest.raises(TypeError, match="not callable"):
        event_handler("e", versions=(1, 2), upcasters={1: "nope"})(handler)  # type: ignore[dict-item]


async def test_dispatch_refuses_an_impossible_version(memory_url: str) -> None:
    async with ServiceRunner([], broker=memory_url) as runner:
        with pytest.raises(ValueError, match="must be 1 to 9999"):
            await runner.dispatch("e", {}, version=10_000)

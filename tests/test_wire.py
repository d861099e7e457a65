"""Payload formats: a serializer of your own, named in frames, and remote tracebacks."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from basidia import (
    RemoteError,
    Service,
    ServiceRunner,
    ValidationError,
    connect,
    event_handler,
    register_serializer,
    rpc,
)
from basidia._speedups import Frame, Kind, decode_frame, encode_frame
from basidia.brokers.memory import MemoryBroker

from .brokers.contract import eventually

pytestmark = pytest.mark.timeout(30)


class Mirror:
    """A format of our own: JSON written backwards (bytes as lists of ints)."""

    name = "tests.mirror"

    def encode(self, value: Any) -> bytes:
        return json.dumps(msgspec.to_builtins(value))[::-1].encode()

    def decode(self, data: bytes) -> Any:
        try:
            return json.loads(data.decode()[::-1])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(str(exc)) from None


register_serializer(Mirror())


class Point(msgspec.Struct):
    x: int
    y: int


seen: list[Point] = []


class Geometry(Service):
    name = "geometry"

    @rpc
    async def norm(self, point: Point, scale: int = 1) -> dict[str, int]:
        return {"norm": (abs(point.x) + abs(point.y)) * scale}

    @rpc
    async def fail(self) -> None:
        raise ArithmeticError("no such point")

    @event_handler("point.seen")
    async def on_seen(self, point: Point) -> None:
        seen.append(point)


MIRROR = {"serializer": "tests.mirror"}


async def test_a_registered_serializer_carries_calls_results_and_events(memory_url: str) -> None:
    seen.clear()
    async with (
        ServiceRunner([Geometry], broker=memory_url, config=MIRROR),
        connect(memory_url, config=MIRROR) as cluster,
    ):
        assert await cluster.rpc.geometry.norm({"x": 3, "y": -4}) == {"norm": 7}
        assert await cluster.rpc.geometry.norm({"x": 1, "y": 1}, scale=5) == {"norm": 10}
        # Validated against the hints as with the built-in formats.
        with pytest.raises(ValidationError, match="point"):
            await cluster.rpc.geometry.norm({"x": "three", "y": 4})
        await cluster.dispatch("point.seen", {"x": 1, "y": 2})
        await eventually(lambda: seen == [Point(1, 2)])


async def test_frames_name_their_format_and_a_reader_without_it_says_so(memory_url: str) -> None:
    async with (
        ServiceRunner([Geometry], broker=memory_url),
        connect(memory_url) as cluster,
    ):
        broker = cluster.broker
        assert isinstance(broker, MemoryBroker)
        replies: list[bytes] = []
        inbox = await broker.open_inbox(replies.append)
        request = Frame(
            Kind.REQUEST, 7, "geometry.norm", b"??", inbox, 0, {"ct": "tests.unknown"}, 0
        )
        await broker.send_request("geometry", encode_frame(request), correlation_id=7)
        await eventually(lambda: len(replies) == 1)
        error = decode_frame(replies[0])
        assert error.kind == Kind.ERROR
        assert b"tests.unknown" in error.payload and b"not registered" in error.payload


async def test_remote_tracebacks_are_sent_only_when_the_config_allows(memory_url: str) -> None:
    async with (
        ServiceRunner([Geometry], broker=memory_url),
        connect(memory_url) as cluster,
    ):
        with pytest.raises(RemoteError) as hidden:
            await cluster.rpc.geometry.fail()
        assert hidden.value.traceback is None
    async with (
        ServiceRunner([Geometry], broker=memory_url, config={"remote_tracebacks": True}),
        connect(memory_url) as cluster,
    ):
        with pytest.raises(RemoteError) as shown:
            await cluster.rpc.geometry.fail()
        trace = shown.value.traceback
        assert trace is not None
        assert "Traceback" in trace and "in fail" in trace and "no such point" in trace


def test_serializer_names_are_checked() -> None:
    class Nameless:
        name = "has space"

        def encode(self, value: Any) -> bytes:
            return b""

        def decode(self, data: bytes) -> Any:
            return None

    with pytest.raises(ValueError, match="a serializer needs a name"):
        register_serializer(Nameless())
    Nameless.name = "json"
    with pytest.raises(ValueError, match="built in"):
        register_serializer(Nameless())

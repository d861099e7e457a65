"""Size limits between caller and service: every one ends in a typed error, never a hang."""

from __future__ import annotations

import logging

import pytest

from basidia import (
    MessageTooLarge,
    RemoteError,
    Service,
    ServiceRunner,
    ValidationError,
    connect,
    rpc,
)
from basidia.log import ThrottledLog

pytestmark = pytest.mark.timeout(30)

SMALL = 64 * 1024
LARGE = 4 * 1024 * 1024

ran: list[int] = []


class Blobs(Service):
    name = "blobs"

    @rpc
    async def size(self, blob: bytes) -> int:
        ran.append(len(blob))
        return len(blob)

    @rpc
    async def make(self, size: int) -> bytes:
        return b"x" * size

    @rpc
    async def shout(self, size: int) -> None:
        raise ValueError("!" * size)


async def test_a_request_over_the_services_limit_is_message_too_large_and_never_handled(
    memory_url: str,
) -> None:
    ran.clear()
    async with (
        ServiceRunner([Blobs], broker=memory_url, config={"max_frame_size": SMALL}),
        connect(memory_url, config={"max_frame_size": LARGE}, timeout=5) as cluster,
    ):
        with pytest.raises(MessageTooLarge, match=f"frame limit of {SMALL} bytes"):
            await cluster.rpc.blobs.size(b"x" * (2 * SMALL))
        assert ran == []
        assert await cluster.rpc.blobs.size(b"x" * 100) == 100


async def test_a_reply_over_the_callers_limit_fails_that_call_at_once(memory_url: str) -> None:
    async with (
        ServiceRunner([Blobs], broker=memory_url, config={"max_frame_size": LARGE}),
        connect(memory_url, config={"max_frame_size": SMALL}, timeout=5) as cluster,
    ):
        with pytest.raises(MessageTooLarge, match=f"client's frame limit of {SMALL} bytes"):
            await cluster.rpc.blobs.make(2 * SMALL)
        assert await cluster.rpc.blobs.make(10) == b"x" * 10


async def test_a_result_over_the_services_own_limit_is_message_too_large(memory_url: str) -> None:
    async with (
        ServiceRunner([Blobs], broker=memory_url, config={"max_frame_size": SMALL}),
        connect(memory_url, config={"max_frame_size": LARGE}, timeout=5) as cluster,
    ):
        with pytest.raises(MessageTooLarge, match="cannot be sent"):
            await cluster.rpc.blobs.make(2 * SMALL)


async def test_huge_error_messages_reach_the_caller_cut_short_and_typed(memory_url: str) -> None:
    async with (
        ServiceRunner([Blobs], broker=memory_url),
        connect(memory_url, timeout=5) as cluster,
    ):
        with pytest.raises(RemoteError) as raised:
            await cluster.rpc.blobs.shout(2 * 1024 * 1024)
        assert raised.value.exc_type == "ValueError"
        assert raised.value.message.startswith("!" * 8192)
        assert raised.value.message.endswith("more characters)")
        assert len(raised.value.message) < 9000
        # An unknown keyword argument 1 MiB long: its validation error is cut the same way.
        with pytest.raises(ValidationError) as invalid:
            await cluster.rpc.blobs.size(b"", **{"k" * (1000 * 1000): 1})
        assert len(invalid.value.message) < 9000
        assert await cluster.rpc.blobs.size(b"ok") == 2


def test_throttled_log_says_how_many_lines_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    log = ThrottledLog(logging.getLogger("tests.limits"), interval=3600)
    with caplog.at_level(logging.WARNING, "tests.limits"):
        for n in range(1000):
            log.log(logging.WARNING, "garbage", "bad frame %d", n)
        log.log(logging.WARNING, "other", "another kind")
    assert [r.getMessage() for r in caplog.records] == ["bad frame 0", "another kind"]
    assert log.counts == {"garbage": 1000, "other": 1}
    log._next["garbage"] = 0.0  # the interval has passed
    with caplog.at_level(logging.WARNING, "tests.limits"):
        log.log(logging.WARNING, "garbage", "bad frame %d", 1000)
    assert caplog.records[-1].getMessage() == (
        "bad frame 1000 (and 999 more like it in the last 3600 s)"
    )

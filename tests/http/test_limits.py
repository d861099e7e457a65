"""Limits a client meets: body size (413 before reading it), malformed JSON (400),
header size, header and idle timeouts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from basidia.http import HttpServer
from tests.http.conftest import MAX_BODY, CatalogService

pytestmark = pytest.mark.timeout(30)


async def _raw_exchange(server: HttpServer, request: bytes, *, wait: float = 5.0) -> bytes:
    """Send ``request`` bytes on a fresh connection; everything read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_declared_oversized_body_gets_413_before_any_of_it_is_sent(
    server: HttpServer,
) -> None:
    # Ten times the limit declared, not one byte sent: the answer must not wait for it.
    head = (
        b"POST /upload HTTP/1.1\r\nHost: test\r\n"
        + f"Content-Length: {MAX_BODY * 10}\r\n".encode()
        + b"Content-Type: application/octet-stream\r\n\r\n"
    )
    answer = await _raw_exchange(server, head)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large" or b" 413 " in status_line
    assert b"connection: close" in rest.lower()
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"] == "content_too_large"
    assert CatalogService.calls == []  # the endpoint never ran


async def test_streamed_body_is_cut_off_at_the_limit(client: httpx.AsyncClient) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(MAX_BODY // 16384 + 1):  # just past the limit, no Content-Length
            sent += 16384
            yield b"x" * 16384

    response = await client.post("/upload", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"] == "content_too_large"
    assert sent > MAX_BODY


async def test_body_at_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post("/upload", content=b"x" * MAX_BODY)
    assert response.status_code == 200
    assert response.json() == {"size": MAX_BODY}


async def test_endpoint_swallowing_the_limit_error_still_answers_413(
    client: httpx.AsyncClient,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY // 16384 + 1):
            yield b"x" * 16384

    response = await client.post("/upload-swallow", content=chunks())
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body",
    [b'{"name": "lamp"', b"\xff\xfe{not json", b"[" * 50_000, b""],
    ids=["truncated", "not-utf8", "nested-too-deep", "empty"],
)
async def test_malformed_json_gets_400_never_500(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post(
        "/items", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    payload = response.json()
    assert payload["error"] == "bad_request"
    assert "not valid JSON" in payload["detail"]
    assert "Traceback" not in response.text


async def test_oversized_headers_are_refused_with_431(server: HttpServer) -> None:
    # 40 kB of headers against the 16 KiB default, arriving at once.
    request = b"GET /items/1 HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    answer = await _raw_exchange(server, request)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "headers_too_large"


async def test_oversized_headers_trickling_in_are_refused(server: HttpServer) -> None:
    # Headers that never end: refused once 16 KiB are buffered, without waiting for more.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /items/1 HTTP/1.1\r\nHost: test\r\n")
        for index in range(17):
            writer.write(f"X-Header-{index:02}: ".encode() + b"a" * 1000 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]


async def test_connection_sending_nothing_is_closed_after_the_header_timeout(
    server: HttpServer,
) -> None:
    answer = await _raw_exchange(server, b"", wait=5.0)  # header_timeout is 0.5 s
    assert answer == b""


async def test_slow_headers_are_cut_off_even_while_bytes_trickle_in(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        closed = False
        for byte in b"GET /items/1 HTTP/1.1\r\nHost: slowloris\r\n":
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
            if reader.at_eof() or writer.is_closing():
                closed = True
                break
            try:
                if await asyncio.wait_for(reader.read(1), 0.01) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed
        assert loop.time() - began < 3.0
    finally:
        writer.close()
        await writer.wait_closed()


async def test_idle_keep_alive_connection_is_closed(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        # Kept alive, then closed by the server after idle_timeout (0.5 s).
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_prompt_client_is_not_hurried(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(3):  # several requests on one connection, each well inside the timeouts
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            await asyncio.sleep(0.2)
    finally:
        writer.close()
        await writer.wait_closed()

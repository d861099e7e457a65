"""Limits on what a client may make the server hold: body size, header time, idle time.

* ``RequestLimitMiddleware`` answers 413 as soon as a request declares a body
  over the limit (before reading any of it), stops a chunked body the moment it
  passes the limit, and answers 431 to a request line plus headers over their
  limit (h11 refuses those with 400 only while they arrive in pieces).
* ``TimedH11Protocol`` closes connections whose request headers do not arrive in
  time (slow-loris clients, connections that never send anything), which
  uvicorn's keep-alive timeout alone does not cover.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from basidia.http.errors import BodyTooLarge, error_response

__all__ = ["RequestLimitMiddleware", "TimedH11Protocol"]

# The rest of an oversized body is never read: the connection cannot carry another request.
_CLOSE = {"connection": "close"}


class RequestLimitMiddleware:
    """ASGI middleware: bodies over ``max_body_size`` bytes get 413 Content Too Large,
    request lines plus headers over ``max_header_size`` bytes get 431.

    A declared ``Content-Length`` over the limit is refused before the endpoint
    runs.  A body without one (chunked) is counted as the endpoint reads it;
    the read that passes the limit raises ``BodyTooLarge``, and whatever the
    endpoint does with that, the client gets 413.
    """

    def __init__(self, app: ASGIApp, max_body_size: int, max_header_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size
        self.max_header_size = max_header_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _head_size(scope) > self.max_header_size:
            detail = f"the request line and headers are over {self.max_header_size} bytes"
            await error_response(431, detail, _CLOSE)(scope, receive, send)
            return
        limit = self.max_body_size
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                if exceeded:  # the endpoint swallowed BodyTooLarge: answer 413 regardless
                    replaced = True
                    await self._refuse(scope, receive, send)
                    return
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if started:
                raise
            if not replaced:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, str(BodyTooLarge(self.max_body_size).detail), _CLOSE)
        await response(scope, receive, send)


def _head_size(scope: Scope) -> int:
    """Bytes of the request line and headers, as sent (give or take the spaces)."""
    size = len(scope.get("raw_path") or b"") + len(scope["query_string"]) + 16
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # h11 refuses these before the app runs
                return None
    return None


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a sub-second idle timeout.

    ``header_timeout``: seconds a client has to send a request's headers, from
    the moment the connection opens or the request's first byte arrives.
    ``idle_timeout``: seconds a kept-alive connection may wait for its next
    request.  Use ``configured`` to get a subclass with both set.
    """

    header_timeout: ClassVar[float] = 10.0
    idle_timeout: ClassVar[float] = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's Config types this as whole seconds; the timer takes any float.
        self.timeout_keep_alive = self.idle_timeout  # type: ignore[assignment]
        self._header_timer: asyncio.TimerHandle | None = None

    @classmethod
    def configured(cls, header_timeout: float, idle_timeout: float) -> type[TimedH11Protocol]:
        """A subclass with these timeouts (uvicorn builds protocols from a class)."""
        attributes = {"header_timeout": header_timeout, "idle_timeout": idle_timeout}
        return type(cls.__name__, (cls,), attributes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first byte of the next request on this connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # headers complete (or the connection failed)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.logger.debug(
                "closing a connection: no request headers in %g s", self.header_timeout
            )
            self.transport.close()

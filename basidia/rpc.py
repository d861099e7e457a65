"""The RPC client: proxies, requests, reply routing and typed errors on the caller."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import msgspec

from basidia._speedups import (
    CompiledCall,
    CompiledClientCore,
    CompiledInbox,
    CompiledMethodProxy,
    Frame,
    Kind,
    ReplyRouter,
    decode_frame,
    encode_frame,
)
from basidia._wire import Codec, decode_over_limit, decode_result, error_from_frame
from basidia.brokers.base import Broker
from basidia.context import CALL_STACK_HEADER, current_call
from basidia.errors import (
    BrokerError,
    ConnectionLost,
    FrameError,
    MessageTooLarge,
    RemoteError,
    RequestNotSent,
    RpcTimeout,
    ValidationError,
)
from basidia.log import ThrottledLog
from basidia.middleware import Middleware, OutgoingCall, call_chain

__all__ = ["ClusterProxy", "MethodProxy", "RpcClient", "ServiceProxy", "error_from_frame"]

logger = logging.getLogger("basidia.rpc")


_REQUEST, _REPLY = int(Kind.REQUEST), int(Kind.REPLY)  # plain ints compare faster


class RpcClient:
    """Sends requests and routes replies for one process (one inbox, one router).

    Calls made while an entrypoint handles a call inherit its deadline and
    call-id stack.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        timeout: float = 30.0,
        codec: Codec | None = None,
        max_frame_size: int,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self._broker = broker
        self.timeout = timeout
        self._codec = codec or Codec()
        self._codec_headers = self._codec.headers
        self._max_frame_size = max_frame_size
        self._router: ReplyRouter | None = None
        self._core: Any = None
        # One call: ``_call``, or its compiled twin (basidia/_speedups/_calls_c.pyx).
        self._new_call: Callable[..., Awaitable[Any]] = (
            self._call if CompiledCall is None else partial(CompiledCall, self)
        )
        self._chain = call_chain(middleware, self._send_call)
        self.reply_to = ""
        self.malformed_replies = 0
        self._bad_replies = ThrottledLog(logger)

    @property
    def router(self) -> ReplyRouter:
        """The reply router (its counters tell late replies and timeouts)."""
        if self._router is None:
            raise RuntimeError("the RPC client is not started")
        return self._router

    async def start(self) -> None:
        """Open the reply inbox."""
        self._router = ReplyRouter(asyncio.get_running_loop())
        self._broker.add_disconnect_callback(self._on_disconnect)
        # The compiled core's inbox is _on_reply in C (basidia/_speedups/_calls_c.pyx).
        inbox = self._on_reply if CompiledInbox is None else CompiledInbox(self)
        self.reply_to = await self._broker.open_inbox(inbox)
        if CompiledClientCore is not None:
            # What the compiled core's calls read (basidia/_speedups/_calls_c.pyx).
            self._core = CompiledClientCore(self)

    async def close(self) -> None:
        """Fail calls still waiting; their replies can no longer arrive."""
        if self._router is not None:
            self._router.fail_all(ConnectionLost("the RPC client was closed"))

    def _on_reply(self, body: bytes) -> None:
        try:
            frame = decode_frame(body, self._max_frame_size)
        except FrameError as exc:
            self.malformed_replies += 1
            oversized = decode_over_limit(body, self._max_frame_size)
            if oversized is not None:
                # Over this client's limit (the service's is larger): fail that call now
                # with a typed error rather than let it wait for its deadline.
                too_large = MessageTooLarge(
                    f"a reply of {len(body)} bytes exceeds this client's frame limit of "
                    f"{self._max_frame_size} bytes (max_frame_size)"
                )
                if self.router.fail(oversized.correlation_id, too_large):
                    return
            self._bad_replies.log(
                logging.WARNING, "malformed reply", "dropped a malformed reply frame: %s", exc
            )
            return
        router = self._router
        if router is not None:
            router.resolve(frame.correlation_id, frame)

    def _on_disconnect(self, exc: ConnectionLost) -> None:
        if self._router is not None and self._router.pending:
            count = self._router.fail_all(exc)
            logger.warning("connection lost: failed %d pending calls", count)

    def proxy(self, service: str, *, timeout: float | None = None) -> ServiceProxy:
        """A proxy whose attributes call the RPC methods of ``service``."""
        return ServiceProxy(self, service, timeout)

    def call(
        self,
        service: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> Awaitable[Any]:
        """Call ``service.method(*args, **kwargs)`` and return its result."""
        if self._chain is not None:
            return self._chain(OutgoingCall(service, method, args, kwargs, timeout or self.timeout))
        return self._new_call(service, method, args, kwargs, timeout or self.timeout, None)

    def _send_call(self, call: OutgoingCall) -> Awaitable[Any]:
        return self._new_call(
            call.service, call.method, call.args, call.kwargs, call.timeout, call.headers
        )

    async def _call(  # the compiled core's twin: basidia/_speedups/_calls_c.pyx (Call)
        self,
        service: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
        headers: dict[str, str] | None,
    ) -> Any:
        router = self._router
        if router is None:
            raise RuntimeError("the RPC client is not started")
        now = time.time()
        ctx = current_call.get()
        if ctx is not None:
            if ctx.deadline:
                remaining = ctx.deadline - now
                if remaining <= 0:
                    raise RpcTimeout(f"{service}.{method}: the caller's deadline has passed")
                if remaining < timeout:
                    timeout = remaining
            headers = dict(headers) if headers else {}
            headers[CALL_STACK_HEADER] = " ".join(ctx.call_id_stack)
        if self._codec_headers:
            headers = {**headers, **self._codec_headers} if headers else self._codec_headers
        try:
            payload, flags = self._codec.encode_args(args, kwargs)
        except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
            raise ValidationError(
                f"{service}.{method}: arguments cannot be encoded: {exc}"
            ) from None
        correlation_id = router.register(timeout)
        try:
            body = encode_frame(
                Frame(
                    _REQUEST,
                    correlation_id,
                    f"{service}.{method}",
                    payload,
                    self.reply_to,
                    int((now + timeout) * 1000),
                    headers or {},
                    flags,
                ),
                self._max_frame_size,
            )
            try:
                broker = self._broker
                if not broker.send_request_now(service, body, correlation_id):
                    await broker.send_request(service, body, correlation_id=correlation_id)
            except BrokerError as exc:  # never sent: safe to retry (basidia/resilience)
                raise RequestNotSent(str(exc)) from None
            # A reply that came while the request was sent (a memory broker's handler
            # that did not suspend) needs no future.
            reply: Frame | None = router.take(correlation_id)
            if reply is None:
                reply = await router.wait(correlation_id)
        except RpcTimeout:
            raise RpcTimeout(f"{service}.{method}: no reply within {timeout:.3g} s") from None
        except BaseException:
            router.discard(correlation_id)
            raise
        if reply.kind == _REPLY:
            try:
                return decode_result(reply)
            except (msgspec.DecodeError, ValidationError, RecursionError) as exc:
                raise RemoteError(
                    "MalformedReply", f"{service}.{method} sent an unreadable reply: {exc}"
                ) from None
        raise error_from_frame(reply)


class MethodProxy:
    """One remote method; calling it returns an awaitable of the result."""

    __slots__ = ("_client", "_method", "_service", "_timeout")

    def __init__(self, client: RpcClient, service: str, method: str, timeout: float | None) -> None:
        self._client = client
        self._service = service
        self._method = method
        self._timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        client = self._client
        # The pure-Python core's proxy (the compiled core's is _calls_c.MethodProxy).
        if client._chain is None:  # no middleware: skip a layer
            return client._call(
                self._service, self._method, args, kwargs, self._timeout or client.timeout, None
            )
        return client.call(self._service, self._method, args, kwargs, self._timeout)

    def with_timeout(self, timeout: float) -> MethodProxy:
        """The same method with a different per-call timeout (seconds)."""
        return MethodProxy(self._client, self._service, self._method, timeout)

    def __repr__(self) -> str:
        return f"<MethodProxy {self._service}.{self._method}>"


#: What ``ServiceProxy`` makes: on the compiled core, MethodProxy in C
#: (basidia/_speedups/_calls_c.pyx), the same methods.
_method_proxy: type[MethodProxy] = CompiledMethodProxy or MethodProxy


class ServiceProxy:
    """Attribute access gives the remote methods: ``await proxy.get_user(1)``."""

    def __init__(self, client: RpcClient, service: str, timeout: float | None = None) -> None:
        self._client = client
        self._service = service
        self._timeout = timeout

    def __getattr__(self, method: str) -> MethodProxy:
        if method.startswith("_"):
            raise AttributeError(method)
        proxy = _method_proxy(self._client, self._service, method, self._timeout)
        self.__dict__[method] = proxy  # later lookups skip __getattr__
        return proxy

    def __repr__(self) -> str:
        return f"<ServiceProxy {self._service}>"


class ClusterProxy:
    """``rpc.<service>.<method>(...)`` for any service on the broker."""

    def __init__(self, client: RpcClient, timeout: float | None = None) -> None:
        self._client = client
        self._timeout = timeout

    def __getattr__(self, service: str) -> ServiceProxy:
        if service.startswith("_"):
            raise AttributeError(service)
        proxy = ServiceProxy(self._client, service, self._timeout)
        self.__dict__[service] = proxy
        return proxy

    def __getitem__(self, service: str) -> ServiceProxy:
        """For service names that are not identifiers (``rpc["billing-v2"]``)."""
        return self.__getattr__(service)

    def __repr__(self) -> str:
        return "<ClusterProxy>"

"""Exceptions a Basidia user can meet, on the caller and on the service side."""

from __future__ import annotations

import sys

__all__ = [
    "BasidiaError",
    "BrokerError",
    "BulkheadFull",
    "CircuitOpen",
    "ConfigError",
    "ConnectionLost",
    "FrameError",
    "MessageTooLarge",
    "MethodNotFound",
    "RateLimited",
    "RemoteError",
    "RequestNotSent",
    "RpcError",
    "RpcTimeout",
    "ServiceUnavailable",
    "ValidationError",
    "http_status",
    "register_error",
]


class BasidiaError(Exception):
    """Base class of every exception Basidia raises."""


class FrameError(BasidiaError, ValueError):
    """A wire frame is malformed, truncated or over a limit."""


class ConfigError(BasidiaError):
    """The configuration is invalid or a required value is missing."""


class BrokerError(BasidiaError):
    """The broker refused an operation or could not be reached."""


class ConnectionLost(BrokerError):
    """The broker connection dropped while the operation was pending."""


class RequestNotSent(ConnectionLost):
    """The request never left this process (the link was lost, or the broker refused it):
    no handler can have run it, so it is safe to send again."""


class RpcError(BasidiaError):
    """Base class of the errors an RPC caller receives.

    ``code`` is the wire name of the error; every subclass travels in an error frame
    and is raised again, as the same type, on the caller.
    """

    code = "rpc_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class ServiceUnavailable(RpcError):
    """No instance of the target service is consuming requests."""

    code = "service_unavailable"


class MethodNotFound(RpcError):
    """The target service has no RPC entrypoint of that name."""

    code = "method_not_found"


class RpcTimeout(RpcError):
    """The call's deadline passed before a reply arrived."""

    code = "timeout"


class ValidationError(RpcError):
    """The arguments do not match the entrypoint's signature or type hints."""

    code = "validation_error"


class MessageTooLarge(RpcError):
    """A request or its reply is over a frame or broker size limit on its way.

    Raised on the caller when its request was too large for the service, or the reply too
    large for the caller's ``max_frame_size`` or the broker; docs/protocol.md ("Limits").
    """

    code = "message_too_large"


class RemoteError(RpcError):
    """The remote handler raised; carries the remote exception's type name and message."""

    code = "remote_error"

    def __init__(self, exc_type: str, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.traceback = traceback

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.message}"


class CircuitOpen(RpcError):
    """The caller's circuit breaker for the target service is open: calls fail at once,
    without reaching the broker, until it lets a probe through (docs/resilience.md)."""

    code = "circuit_open"


class BulkheadFull(RpcError):
    """As many calls to the target as the caller's bulkhead allows are in flight, and no
    place came free within its wait (docs/resilience.md)."""

    code = "bulkhead_full"


class RateLimited(RpcError):
    """The method's rate limit is used up; try again after ``retry_after`` seconds (also
    at the end of the message)."""

    code = "rate_limited"

    def __init__(self, message: str = "", retry_after: float = 0.0) -> None:
        if retry_after:
            message = f"{message} (retry after {retry_after:.3g} s)"
        super().__init__(message)
        self.retry_after = retry_after


# Error codes and the classes raised for them on the caller.  Custom errors are
# registered by users with ``register_error`` and travel under their own code.
ERROR_TYPES: dict[str, type[RpcError]] = {
    cls.code: cls
    for cls in (
        RpcError,
        ServiceUnavailable,
        MethodNotFound,
        RpcTimeout,
        ValidationError,
        MessageTooLarge,
        CircuitOpen,
        BulkheadFull,
        RateLimited,
    )
}


def register_error(cls: type[RpcError]) -> type[RpcError]:
    """Class decorator: raise ``cls`` on callers when a handler raises it.

    The class needs a unique ``code`` class attribute and must accept a single
    message argument.
    """
    if not (isinstance(cls, type) and issubclass(cls, RpcError)):
        raise TypeError("register_error takes a subclass of basidia.errors.RpcError")
    existing = ERROR_TYPES.get(cls.code)
    if existing is not None and existing is not cls:
        owner = existing.__qualname__
        raise ValueError(f"error code {cls.code!r} is already registered by {owner}")
    ERROR_TYPES[cls.code] = cls
    return cls


def http_status(exc: BaseException) -> int:
    """The status an HTTP endpoint answers when its handler raised ``exc``: the one table
    that the HTTP server's error responses and the telemetry's records share
    (docs/http.md)."""
    # Starlette's HTTPException carries its status; only an HTTP server imports it.
    starlette = sys.modules.get("starlette.exceptions")
    if starlette is not None and isinstance(exc, starlette.HTTPException):
        return int(exc.status_code)
    if isinstance(exc, ValidationError):
        return 422
    if isinstance(exc, RateLimited):  # a service behind it is over its rate limit
        return 429
    if isinstance(exc, (ServiceUnavailable, BrokerError, CircuitOpen, BulkheadFull)):
        return 503
    if isinstance(exc, (RpcTimeout, TimeoutError)):
        return 504
    if isinstance(exc, (RemoteError, MethodNotFound)):
        # The HTTP handler worked; a service behind it failed.
        return 502
    return 500

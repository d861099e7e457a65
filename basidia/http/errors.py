"""How failures become HTTP responses: a status, a small JSON body, never a traceback.

Every error body has the same shape, ``{"error": "<code>", "detail": "<message>"}``.
Internal details (exception messages, remote tracebacks, service names) stay in
the server's log; the client gets a stable code and a message written for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from basidia.errors import ValidationError, http_status

__all__ = ["BodyTooLarge", "MalformedJson", "error_response", "response_for_exception"]

logger = logging.getLogger("basidia.http")

# Stable codes for the statuses Basidia sends; ``HTTPStatus.phrase`` changes between
# Python versions (413 became "Content Too Large" in 3.13), these do not.
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "content_too_large",
    415: "unsupported_media_type",
    421: "misdirected_request",
    422: "validation_error",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}


class MalformedJson(HTTPException):
    """The request body is not valid JSON (a client error: 400, never 500)."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, f"the request body is not valid JSON: {reason}")


class BodyTooLarge(HTTPException):
    """The request body is over the server's ``max_body_size``."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


def error_response(
    status: int, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON error response for ``status``."""
    code = _CODES.get(status, "http_error")
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def response_for_exception(exc: BaseException, where: str) -> JSONResponse:
    """Map an exception raised while handling a request to a response, logging it.

    ``where`` names the handler in the log (``api_service.get_user``).

    A ``RemoteError`` (a service called over RPC raised) and ``MethodNotFound``
    become 502 Bad Gateway rather than 500: the HTTP handler itself worked, a
    service behind it failed, and operators alert on the two differently.
    """
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, exc.detail, exc.headers)
    status = http_status(exc)
    if status == 422:
        assert isinstance(exc, ValidationError)
        return error_response(422, exc.message or "invalid arguments")
    if status == 429:
        retry_after = getattr(exc, "retry_after", 1.0)
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
        return error_response(429, "too many requests; slow down", headers)
    if status == 503:
        logger.warning("%s: %s: %s", where, type(exc).__name__, exc)
        return error_response(503, "a service needed to answer is unavailable; retry later")
    if status == 504:
        logger.warning("%s: no answer before the deadline (%s)", where, type(exc).__name__)
        return error_response(504, "no answer before the deadline")
    if status == 502:
        logger.warning("%s: a service it called failed: %s", where, exc)
        return error_response(502, "a service behind this endpoint failed")
    logger.error("%s raised %s", where, type(exc).__name__, exc_info=exc)
    return error_response(500, "internal server error")

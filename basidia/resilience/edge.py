"""Authentication at the edge: a dependency that guards a service's HTTP endpoints.

Declare one on a service and every ``@http_endpoint`` of it needs credentials (unless
declared ``public=True``)::

    class ApiService(Service):
        name = "api_service"
        user = BearerAuth(config_key="api.tokens")   # {"<token>": "<principal>"}

        @http_endpoint("GET", "/orders", allow={"ops"}, rate_limit="10/s")
        async def orders(self, request): return {"for": self.user}

Missing or unknown credentials answer 401 (with ``WWW-Authenticate``), a principal not in
the endpoint's ``allow`` 403.  The injected value is the principal's name (docs/resilience.md).
"""

from __future__ import annotations

import contextvars
import hmac
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from basidia.dependencies import DependencyProvider
from basidia.errors import ConfigError
from basidia.resilience.ratelimit import RateLimiter

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from basidia.container import ServiceContainer
    from basidia.context import CallContext
    from basidia.service import HttpEndpoint

__all__ = ["ApiKeyAuth", "BearerAuth", "EdgeGuard", "HttpAuth", "current_principal", "edge_guard"]

#: The principal of the HTTP request being handled ("" when none).
current_principal: contextvars.ContextVar[str] = contextvars.ContextVar(
    "basidia_principal", default=""
)


class HttpAuth(DependencyProvider):
    """Base class: ``credential(request)`` finds the secret a request carries; the secrets
    map to principals (``secrets``, or a mapping at config key ``config_key``)."""

    per_call = True
    #: The ``WWW-Authenticate`` challenge of a 401.
    challenge = "Bearer"

    def __init__(
        self, secrets: Mapping[str, str] | None = None, *, config_key: str | None = None
    ) -> None:
        if secrets is None and config_key is None:
            raise ValueError("give the accepted secrets, or the config key that holds them")
        self._secrets = dict(secrets or {})
        self.config_key = config_key

    def __repr__(self) -> str:  # never the secrets
        return f"{type(self).__name__}(config_key={self.config_key!r})"

    def secrets(self) -> dict[str, str]:
        """Accepted secret → principal name."""
        if self.config_key is None:
            return self._secrets
        found = self.container.runtime.config.get(self.config_key)
        if not isinstance(found, Mapping):
            raise ConfigError(f"{self.config_key} must map secrets to principal names")
        return {str(key): str(value) for key, value in found.items()}

    def credential(self, request: Request) -> str | None:
        raise NotImplementedError

    def authenticate(self, request: Request) -> str | None:
        """The principal ``request`` proves to be, or None."""
        given = self.credential(request)
        if not given:
            return None
        found = None
        for secret, principal in self.secrets().items():
            # Compare every one in constant time: the answer's timing tells nothing.
            if hmac.compare_digest(secret.encode(), given.encode()):
                found = principal
        return found

    def get_dependency(self, ctx: CallContext | None) -> Any:
        return current_principal.get()


class BearerAuth(HttpAuth):
    """``Authorization: Bearer <token>``."""

    def credential(self, request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None


class ApiKeyAuth(HttpAuth):
    """An API key in a header (``X-API-Key`` by default)."""

    challenge = "ApiKey"

    def __init__(
        self,
        secrets: Mapping[str, str] | None = None,
        *,
        config_key: str | None = None,
        header: str = "X-API-Key",
    ) -> None:
        super().__init__(secrets, config_key=config_key)
        self.header = header

    def credential(self, request: Request) -> str | None:
        return request.headers.get(self.header)


class EdgeGuard:
    """What an HTTP endpoint checks before its handler runs: authentication (the service's
    ``HttpAuth`` dependencies), the endpoint's ``allow`` list, its rate limit."""

    def __init__(
        self,
        auths: list[HttpAuth],
        allow: frozenset[str] | None,
        limiter: RateLimiter | None,
    ) -> None:
        self.auths = auths
        self.allow = allow
        self.limiter = limiter

    def check(self, request: Request) -> Response | None:
        """An error response for a refused ``request``; None to let it through (with
        ``current_principal`` set)."""
        from basidia.http.errors import error_response

        principal = ""
        if self.auths:
            for auth in self.auths:
                principal = auth.authenticate(request) or ""
                if principal:
                    break
            if not principal:
                response = error_response(401, "missing or unknown credentials")
                response.headers["WWW-Authenticate"] = self.auths[0].challenge
                return response
            if self.allow is not None and principal not in self.allow:
                return error_response(403, f"{principal} may not use this endpoint")
            current_principal.set(principal)
        if self.limiter is not None:
            client = principal or (request.client.host if request.client else "")
            wait = self.limiter.take(client)
            if wait:
                response = error_response(429, "too many requests; slow down")
                response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return response
        return None


def edge_guard(container: ServiceContainer, endpoint: HttpEndpoint) -> EdgeGuard | None:
    """The guard of ``endpoint`` in ``container``; None when it has nothing to check."""
    auths = (
        []
        if endpoint.public
        else [
            provider
            for provider in container.dependencies.values()
            if isinstance(provider, HttpAuth)
        ]
    )
    limiter = None if endpoint.rate_limit is None else RateLimiter(endpoint.rate_limit)
    if not auths and limiter is None:
        return None
    return EdgeGuard(auths, endpoint.allow, limiter)

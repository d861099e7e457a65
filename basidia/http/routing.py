"""Routes for every ``@http_endpoint`` of the services a runner hosts.

Each endpoint runs like any other entrypoint: on a fresh service instance with
its dependencies injected, through the container (so shutdown waits for it and
middleware sees it), under a ``CallContext`` whose deadline (``rpc_timeout``) the
RPC calls it makes inherit.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from basidia._speedups import Frame, Kind
from basidia.container import ServiceContainer, State
from basidia.context import CallContext
from basidia.errors import ValidationError
from basidia.http.errors import MalformedJson, error_response, response_for_exception
from basidia.resilience.edge import edge_guard
from basidia.service import HttpEndpoint

__all__ = ["EndpointApp", "Request", "RouteSpec", "check_conflicts", "service_routes"]

# Frames of HTTP calls carry this as their reply address; call ids read
# ``api_service.get_user.http:<n>``.
HTTP_ORIGIN = "http"

_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(:[A-Za-z_][A-Za-z0-9_]*)?}")


class Request(StarletteRequest):
    """A Starlette ``Request`` whose ``json()`` raises ``MalformedJson`` (400) on bad input.

    Endpoints receive this class, so ``await request.json()`` on a malformed,
    non-UTF-8 or absurdly nested body answers 400, never 500.
    """

    async def json(self) -> Any:
        """The body parsed as JSON; ``MalformedJson`` when it is not JSON."""
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body)
            except json.JSONDecodeError as exc:
                raise MalformedJson(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
            except UnicodeDecodeError:
                raise MalformedJson("it is not UTF-8 text") from None
            except RecursionError:
                raise MalformedJson("it is nested too deeply") from None
        return self._json


class EndpointApp:
    """The ASGI app behind one ``@http_endpoint`` route."""

    _ids: Iterator[int] = itertools.count(1)

    def __init__(self, container: ServiceContainer, key: str, endpoint: HttpEndpoint) -> None:
        self.container = container
        self.key = key  # the entrypoint's attribute name on the service class
        self.endpoint = endpoint
        self.target = f"{container.service_name}.{key}"
        # An argument after the request is the JSON body, validated against its hint.
        body_type = endpoint.body_type
        self._body = None if body_type is None else msgspec.json.Decoder(body_type).decode
        self._guard = edge_guard(container, endpoint)  # authentication, rate limit

    def __repr__(self) -> str:
        return f"<EndpointApp {self.target}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.respond(Request(scope, receive))
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        """Run the endpoint for ``request``; every failure becomes an error response."""
        container = self.container
        if container.state is not State.RUNNING:
            return error_response(503, "this endpoint's service is not running; retry later")
        if self._guard is not None:
            refused = self._guard.check(request)
            if refused is not None:
                return refused
        timeout = container.runtime.settings.rpc_timeout
        frame = Frame(Kind.REQUEST, next(self._ids), self.target, b"", HTTP_ORIGIN)
        ctx = CallContext(container.service_name, self.key, frame, time.time() + timeout)
        # A task of its own: the deadline and a shutdown past its grace period cancel
        # the handler, not the server's connection task.
        task = asyncio.create_task(self._handle(ctx, request), name=self.target)
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.cancelled():
            return error_response(503, "the service stopped before answering; retry later")
        failure = task.exception()
        if failure is not None:
            return response_for_exception(failure, self.target)
        result = task.result()
        if isinstance(result, Response):
            return result
        try:  # msgspec: Structs, dataclasses and datetimes too, as the OpenAPI document says
            return Response(_encode_json(result), media_type="application/json")
        except (TypeError, ValueError) as exc:
            return response_for_exception(exc, self.target)

    async def _handle(self, ctx: CallContext, request: Request) -> Any:
        """Run the handler as the container runs any entrypoint: counted as work in
        flight (a stop waits for it), under its deadline, through the middleware."""
        if self._body is None:
            args: tuple[Any, ...] = (request,)
        else:
            args = (request, await self._read_body(request))
        return await self.container.run_call(ctx, self.endpoint.func, args)

    async def _read_body(self, request: Request) -> Any:
        """The request body decoded into the endpoint's body type: 400 when it is not
        JSON, 422 when it does not match the type."""
        assert self._body is not None
        body = await request.body()
        try:
            return self._body(body)
        except msgspec.ValidationError as exc:
            raise ValidationError(f"invalid request body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise MalformedJson(str(exc)) from None
        except RecursionError:
            raise MalformedJson("it is nested too deeply") from None


_encode_json = msgspec.json.Encoder().encode


class RouteSpec:
    """A route's identity for conflict checks: methods and path, parameter names ignored."""

    def __init__(self, methods: Iterable[str], path: str, owner: str) -> None:
        self.methods = {method.upper() for method in methods}
        if "GET" in self.methods:
            self.methods.add("HEAD")
        self.path = path
        self.shape = _PARAM.sub(lambda m: "{" + (m.group(2) or ":str") + "}", path)
        self.owner = owner


def check_conflicts(specs: Iterable[RouteSpec]) -> None:
    """Raise ``ValueError`` when two routes answer the same method on the same path."""
    seen: dict[tuple[str, str], RouteSpec] = {}
    for spec in specs:
        for method in sorted(spec.methods):
            other = seen.setdefault((method, spec.shape), spec)
            if other is not spec:
                raise ValueError(
                    f"{spec.owner} and {other.owner} both serve {method} {spec.path}; "
                    "give one of them another path"
                )


def service_routes(containers: Iterable[ServiceContainer]) -> tuple[list[Route], list[RouteSpec]]:
    """A Starlette route per HTTP endpoint of every container, and their specs."""
    routes: list[Route] = []
    specs: list[RouteSpec] = []
    for container in containers:
        for key, entrypoint in container.service_cls.__entrypoints__.items():
            if not isinstance(entrypoint, HttpEndpoint):
                continue
            app = EndpointApp(container, key, entrypoint)
            routes.append(Route(entrypoint.path, app, methods=entrypoint.methods, name=app.target))
            specs.append(RouteSpec(entrypoint.methods, entrypoint.path, app.target))
    return routes, specs

"""Services with HTTP endpoints, a runner hosting them and a real server on a free port."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from basidia import (
    Dependency,
    Middleware,
    Service,
    ServiceRunner,
    current_context,
    event_handler,
    http_endpoint,
    rpc,
)
from basidia.context import CallContext
from basidia.http import HttpServer

# httpx loads the CA bundle for every client unless given a context: load it once.
TLS = ssl.create_default_context()
# Small limits so that tests cross them quickly.
MAX_BODY = 64 * 1024
RPC_TIMEOUT = 1.5
# Without a token, the management API takes state changes only as JSON (cross-site guard).
JSON = {"Content-Type": "application/json"}


class Resource:
    """Something a service needs at start; ``FLAKY`` makes getting it fail or wait."""


class FlakyState:
    """Switches the tests flip: fail the next start, or hold it until released."""

    def __init__(self) -> None:
        self.fail = False
        self.gate: asyncio.Event | None = None


FLAKY = FlakyState()


async def resource_provider() -> AsyncIterator[Resource]:
    """Provider of ``Resource``: fails or waits as ``FLAKY`` says."""
    if FLAKY.gate is not None:
        await FLAKY.gate.wait()
    if FLAKY.fail:
        raise RuntimeError("the resource is down")
    yield Resource()


class PricingService(Service):
    """Prices of catalogue items."""

    name = "pricing"
    resource = Dependency(Resource)

    @rpc
    async def price(self, item_id: int) -> float:
        return item_id * 1.5

    @rpc
    async def broken(self) -> None:
        raise ValueError("database password=hunter2 rejected")

    @rpc
    async def remaining(self) -> float | None:
        ctx = current_context()
        return ctx.remaining if ctx else None

    @http_endpoint("GET", "/prices/{item_id:int}")
    async def get_price(self, request: Request) -> Response:
        """The price of one item."""
        item_id = request.path_params["item_id"]
        return JSONResponse({"id": item_id, "price": await self.price(item_id)})


class CatalogService(Service):
    """The catalogue: items, uploads and endpoints that fail in every documented way."""

    name = "catalog"
    pricing = Dependency("pricing")
    nobody = Dependency("nobody_runs_this")

    calls: list[str] = []  # noqa: RUF012 - shared record of what ran

    @http_endpoint("GET", "/items/{item_id:int}")
    async def get_item(self, request: Request) -> Response:
        """One item with its price.

        The price comes from the pricing service over RPC.
        """
        item_id = request.path_params["item_id"]
        price = await self.pricing.price(item_id)
        return JSONResponse({"id": item_id, "price": price})

    @http_endpoint("POST", "/items")
    async def create_item(self, request: Request) -> dict[str, Any]:
        data = await request.json()
        return {"created": data}

    @http_endpoint("POST,PUT", "/upload")
    async def upload(self, request: Request) -> dict[str, int]:
        self.calls.append("upload")
        body = await request.body()
        return {"size": len(body)}

    @http_endpoint("POST", "/upload-swallow")
    async def upload_swallow(self, request: Request) -> dict[str, bool]:
        try:
            await request.body()
        except Exception:
            return {"ok": True}
        return {"ok": True}

    @http_endpoint("GET", "/fail")
    async def fail(self, request: Request) -> Response:
        raise RuntimeError("internal detail: /srv/secret/config.yaml")

    @http_endpoint("GET", "/invalid")
    async def invalid(self, request: Request) -> Response:
        await self.pricing.price("not a number")
        return Response()

    @http_endpoint("GET", "/remote-fail")
    async def remote_fail(self, request: Request) -> Response:
        await self.pricing.broken()
        return Response()

    @http_endpoint("GET", "/unavailable")
    async def unavailable(self, request: Request) -> Response:
        await self.nobody.anything()
        return Response()

    @http_endpoint("GET", "/teapot")
    async def teapot(self, request: Request) -> Response:
        raise HTTPException(418, "short and stout")

    @http_endpoint("GET", "/slow")
    async def slow(self, request: Request) -> dict[str, float]:
        seconds = float(request.query_params.get("seconds", "10"))
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @http_endpoint("GET", "/context")
    async def context(self, request: Request) -> dict[str, Any]:
        ctx = current_context()
        assert ctx is not None
        return {
            "call_id": ctx.call_id,
            "remaining": ctx.remaining,
            "nested_remaining": await self.pricing.remaining(),
        }


class AuditService(Service):
    """Records events: shows that stopping a service stops its event consumers."""

    name = "audit"
    seen: list[dict[str, Any]] = []  # noqa: RUF012

    @event_handler("item.viewed")
    async def on_item_viewed(self, data: dict[str, Any]) -> None:
        self.seen.append(data)


class Recorder(Middleware):
    """Middleware recording the entrypoints it sees handled."""

    def __init__(self) -> None:
        self.handled: list[str] = []

    async def handle(
        self,
        ctx: CallContext,
        args: tuple[Any, ...],
        call_next: Callable[[CallContext, tuple[Any, ...]], Awaitable[Any]],
    ) -> Any:
        self.handled.append(f"{ctx.service}.{ctx.entrypoint}")
        return await call_next(ctx, args)


SERVICES = [CatalogService, PricingService, AuditService]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"still not true after {timeout} s")


@pytest.fixture(autouse=True)
def _reset_shared_state() -> None:
    FLAKY.fail = False
    FLAKY.gate = None
    CatalogService.calls.clear()
    AuditService.seen.clear()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def runner(memory_url: str, recorder: Recorder) -> AsyncIterator[ServiceRunner]:
    """The test services, running on a private memory broker."""
    runner = ServiceRunner(
        SERVICES,
        broker=memory_url,
        config={"rpc_timeout": RPC_TIMEOUT, "shutdown_grace": 2},
        providers={Resource: resource_provider},
        middleware=[recorder],
    )
    await runner.start()
    yield runner
    await runner.stop()


@pytest.fixture
async def server(runner: ServiceRunner) -> AsyncIterator[HttpServer]:
    """A real HTTP server on a free loopback port, management API open (loopback)."""
    async with HttpServer(
        runner, "127.0.0.1", 0, max_body_size=MAX_BODY, header_timeout=0.5, idle_timeout=0.5
    ) as server:
        yield server


@pytest.fixture
async def client(server: HttpServer) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to ``server`` over TCP."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10, verify=TLS) as client:
        yield client

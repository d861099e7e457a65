"""``@http_endpoint`` routes over a real socket: parameters, injection, errors, deadlines."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from basidia import Dependency, Service, ServiceRunner, http_endpoint
from basidia.http import HttpServer
from tests.http.conftest import RPC_TIMEOUT, TLS, CatalogService, Recorder, until

pytestmark = pytest.mark.timeout(30)


async def test_path_parameters_and_injected_rpc_dependency(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/7")
    assert response.status_code == 200
    assert response.json() == {"id": 7, "price": 10.5}


async def test_routes_of_several_services_on_one_server(client: httpx.AsyncClient) -> None:
    catalog = await client.get("/items/2")
    pricing = await client.get("/prices/2")
    assert catalog.json() == {"id": 2, "price": 3.0}
    assert pricing.json() == {"id": 2, "price": 3.0}


async def test_a_plain_return_value_is_sent_as_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/items", json={"name": "lamp", "tags": ["a"]})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"created": {"name": "lamp", "tags": ["a"]}}


async def test_several_methods_on_one_route(client: httpx.AsyncClient) -> None:
    assert (await client.put("/upload", content=b"abc")).json() == {"size": 3}
    assert (await client.post("/upload", content=b"abcd")).json() == {"size": 4}


async def test_unknown_path_and_method_get_json_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nothing/here")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    wrong_method = await client.delete("/items/1")
    assert wrong_method.status_code == 405
    assert "GET" in wrong_method.headers["allow"]


async def test_path_converter_rejects_what_it_does_not_match(client: httpx.AsyncClient) -> None:
    assert (await client.get("/items/abc")).status_code == 404


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/invalid", 422, "validation_error"),
        ("/unavailable", 503, "service_unavailable"),
        ("/remote-fail", 502, "bad_gateway"),
        ("/fail", 500, "internal_error"),
    ],
)
async def test_errors_map_to_statuses_without_internals(
    client: httpx.AsyncClient, path: str, status: int, code: str
) -> None:
    response = await client.get(path)
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == code
    for leak in ("Traceback", "hunter2", "/srv/secret", "nobody_runs_this", 'File "'):
        assert leak not in response.text


async def test_http_exception_keeps_its_status_and_detail(client: httpx.AsyncClient) -> None:
    response = await client.get("/teapot")
    assert response.status_code == 418
    assert response.json() == {"error": "http_error", "detail": "short and stout"}


async def test_handler_past_its_deadline_gets_504(client: httpx.AsyncClient) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    response = await client.get("/slow", params={"seconds": 20})
    elapsed = loop.time() - began
    assert response.status_code == 504
    assert response.json()["error"] == "timeout"
    assert elapsed < RPC_TIMEOUT + 1.0


async def test_handler_runs_in_a_call_context_whose_deadline_nested_calls_inherit(
    client: httpx.AsyncClient,
) -> None:
    first = (await client.get("/context")).json()
    second = (await client.get("/context")).json()
    assert first["call_id"].startswith("catalog.context.http:")
    assert first["call_id"] != second["call_id"]
    assert 0 < first["remaining"] <= RPC_TIMEOUT
    assert 0 < first["nested_remaining"] <= first["remaining"]


async def test_http_calls_go_through_the_middleware(
    client: httpx.AsyncClient, recorder: Recorder
) -> None:
    await client.get("/items/1")
    assert recorder.handled == ["catalog.get_item", "pricing.price"]


async def test_a_stopped_service_answers_503_and_its_siblings_still_serve(
    runner: ServiceRunner, client: httpx.AsyncClient
) -> None:
    await runner.stop_service("catalog")
    stopped = await client.get("/items/1")
    assert stopped.status_code == 503
    assert stopped.json()["error"] == "service_unavailable"
    assert (await client.get("/prices/1")).status_code == 200
    await runner.start_service("catalog")
    assert (await client.get("/items/1")).status_code == 200


async def test_requests_in_flight_finish_when_the_server_stops(
    runner: ServiceRunner, server: HttpServer
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10, verify=TLS) as client:
        request = asyncio.create_task(client.get("/slow", params={"seconds": 0.5}))
        await until(lambda: runner.containers["catalog"].in_flight > 0)
        await server.stop(grace=5)
        response = await request
        assert response.status_code == 200
        assert response.json() == {"slept": 0.5}
        with pytest.raises(httpx.ConnectError):
            await client.get("/items/1")


async def test_two_services_claiming_one_route_are_refused(memory_url: str) -> None:
    class First(Service):
        name = "first"

        @http_endpoint("GET", "/things/{thing_id}")
        async def get(self, request: Request) -> Response:
            return JSONResponse({})

    class Second(Service):
        name = "second"

        @http_endpoint("GET,POST", "/things/{other_name}")
        async def get(self, request: Request) -> Response:
            return JSONResponse({})

    runner = ServiceRunner([First, Second], broker=memory_url)
    with pytest.raises(ValueError, match=r"second\.get and first\.get both serve GET"):
        HttpServer(runner, port=0)


async def test_a_route_shadowing_the_management_api_is_refused(memory_url: str) -> None:
    class Shadow(Service):
        name = "shadow"
        other = Dependency("other")

        @http_endpoint("GET", "/services")
        async def services(self, request: Request) -> Response:
            return JSONResponse([])

    runner = ServiceRunner([Shadow], broker=memory_url)
    with pytest.raises(ValueError, match="the management API"):
        HttpServer(runner, port=0)
    HttpServer(runner, port=0, management=False)  # the route is free without the API


async def test_endpoints_see_a_fresh_instance_per_request(client: httpx.AsyncClient) -> None:
    await asyncio.gather(*(client.put("/upload", content=b"x") for _ in range(5)))
    assert CatalogService.calls == ["upload"] * 5

"""The ApiService of docs/architecture.md, in process, over a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from basidia import ServiceRunner
from basidia.http import HttpServer
from examples.api_service import ApiService
from examples.user_service import DatabaseService, UserService
from tests.http.conftest import TLS

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def api(memory_url: str) -> AsyncIterator[httpx.AsyncClient]:
    runner = ServiceRunner([ApiService, UserService, DatabaseService], broker=memory_url)
    async with runner, HttpServer(runner, "127.0.0.1", 0) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10, verify=TLS) as client:
            yield client


async def test_get_user_answers_through_the_user_and_database_services(
    api: httpx.AsyncClient,
) -> None:
    response = await api.get("/users/1")
    assert response.status_code == 200
    assert response.json() == {"message": "Hello, User 1!"}


async def test_a_user_id_that_is_not_a_number_is_a_500_without_details(
    api: httpx.AsyncClient,
) -> None:
    # The example converts with int() itself: its ValueError is a server error, told tersely.
    response = await api.get("/users/one")
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error", "detail": "internal server error"}


async def test_the_openapi_document_lists_the_example_route(api: httpx.AsyncClient) -> None:
    document = (await api.get("/openapi.json")).json()
    assert document["paths"]["/users/{user_id}"]["get"]["operationId"] == "api_service.get_user"

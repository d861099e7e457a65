"""The OpenAPI document describes the services' HTTP endpoints, and only them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def document(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


async def test_document_is_openapi_3_with_every_endpoint(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] and document["info"]["version"]
    paths = document["paths"]
    assert set(paths["/items/{item_id}"]) == {"get"}
    assert set(paths["/upload"]) == {"post", "put"}
    assert set(paths["/prices/{item_id}"]) == {"get"}
    # Management, health and the document itself are not the services' API.
    for builtin in ("/", "/services", "/services/{name}/stop", "/health/ready", "/openapi.json"):
        assert builtin not in paths


async def test_operations_carry_ids_tags_docs_and_typed_path_parameters(
    document: dict[str, Any],
) -> None:
    operation = document["paths"]["/items/{item_id}"]["get"]
    assert operation["operationId"] == "catalog.get_item"
    assert operation["tags"] == ["catalog"]
    assert operation["summary"] == "One item with its price."
    assert operation["description"] == "The price comes from the pricing service over RPC."
    assert operation["parameters"] == [
        {
            "name": "item_id",
            "in": "path",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        }
    ]
    assert operation["responses"]["200"]["description"]
    error = operation["responses"]["503"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/Error"}
    assert document["components"]["schemas"]["Error"]["required"] == ["error", "detail"]


async def test_service_docstrings_describe_tags(document: dict[str, Any]) -> None:
    tags = {tag["name"]: tag for tag in document["tags"]}
    assert set(tags) == {"catalog", "pricing"}  # audit has no HTTP endpoints
    assert tags["pricing"]["description"] == "Prices of catalogue items."


async def test_operation_ids_are_unique(document: dict[str, Any]) -> None:
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert "catalog.upload.put" in ids and "catalog.upload.post" in ids

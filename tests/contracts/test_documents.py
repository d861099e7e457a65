"""The AsyncAPI and OpenAPI documents, checked by the ecosystem's own validators:
``@asyncapi/parser`` (npm, installed by .ci/run into .ci/node_modules) and
``openapi-spec-validator`` (PyPI, the ``test`` extra)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from basidia import ServiceRunner
from basidia._speedups import env_flag
from basidia.asyncapi import asyncapi_document
from basidia.cli import app
from basidia.http.openapi import openapi_document
from basidia.loader import load_services

from ..conftest import REQUIRE_BROKERS
from .shop import Billing, Shop

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / ".ci" / "node_modules"
VALIDATOR = Path(__file__).with_name("validate_asyncapi.js")


def asyncapi_problems(documents: dict[str, dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    """Run @asyncapi/parser on ``documents``; its verdict per document name."""
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "@asyncapi" / "parser").is_dir():
        reason = (
            "the AsyncAPI parser is not installed: node and .ci/node_modules/@asyncapi/parser "
            "are needed (npm ci --prefix .ci, as .ci/run does)"
        )
        if REQUIRE_BROKERS:
            pytest.fail(f"{reason}, and BASIDIA_REQUIRE_BROKERS=1 is set")
        pytest.skip(reason)
    files = []
    for name, document in documents.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        files.append(str(path))
    done = subprocess.run(
        [node, str(VALIDATOR), *files],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    assert done.returncode in (0, 1), done.stderr
    verdicts = [json.loads(line) for line in done.stdout.splitlines()]
    return {Path(v["file"]).stem: v for v in verdicts}


@pytest.mark.skipif(
    env_flag("BASIDIA_NO_EXTENSIONS"),
    reason="the documents do not depend on the core: node validates them once, in the "
    "compiled-core run",
)
def test_asyncapi_documents_of_the_examples_and_typed_services_pass_the_parser(
    tmp_path: Path,
) -> None:
    examples = load_services([str(ROOT / "examples")])
    documents = {
        "examples": asyncapi_document(examples),
        "shop": asyncapi_document([Shop, Billing], broker="amqp://u:secret@rabbit:5672/prod"),
        "nats": asyncapi_document(examples, broker="nats://127.0.0.1:4222"),
    }
    assert documents["shop"]["servers"] == {
        "broker": {"host": "rabbit:5672", "protocol": "amqp", "pathname": "/prod"}
    }
    assert "secret" not in json.dumps(documents["shop"])
    verdicts = asyncapi_problems(documents, tmp_path)
    assert {name: (v["errors"], v["warnings"]) for name, v in verdicts.items()} == {
        "examples": ([], []),
        "shop": ([], []),
        "nats": ([], []),
    }


def test_asyncapi_describes_methods_events_versions_and_types() -> None:
    document = asyncapi_document([Shop, Billing])
    assert document["asyncapi"] == "3.0.0"
    channels, operations = document["channels"], document["operations"]
    schemas = document["components"]["schemas"]
    # An RPC method: its arguments in order, its result, its error frame.
    place = channels["rpc.shop.place"]
    assert place["address"] == "shop.place"
    request = place["messages"]["request"]["payload"]
    assert request["items"] == [
        {"type": "array", "items": {"$ref": "#/components/schemas/Item"}, "title": "items"},
        {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "note"},
    ]
    assert (request["minItems"], request["maxItems"]) == (1, 2)
    reply = channels["rpc.shop.place.reply"]["messages"]
    assert reply["result"]["payload"] == {"$ref": "#/components/schemas/Order"}
    assert reply["error"]["payload"]["required"] == ["code", "type", "message"]
    assert operations["shop.place"]["summary"] == "Place an order."
    assert operations["shop.place"]["reply"]["channel"] == {
        "$ref": "#/channels/rpc.shop.place.reply"
    }
    assert "items" not in channels["rpc.shop.ping"]["messages"]["request"]["payload"]
    assert channels["rpc.shop.ping.reply"]["messages"]["result"]["payload"] == {"type": "null"}
    # The types, as components.
    assert schemas["Order"]["required"] == ["id", "items"]
    assert schemas["Size"]["enum"] == ["large", "small"]
    # A versioned event: one message per version, the version in the ver header, the
    # older one shaped like its upcaster's argument.
    placed = channels["event.order.placed"]["messages"]
    assert set(placed) == {"v1", "v2"}
    assert placed["v1"]["payload"] == {"$ref": "#/components/schemas/OrderPlacedV1"}
    assert placed["v2"]["payload"] == {"$ref": "#/components/schemas/OrderPlaced"}
    assert placed["v2"]["headers"]["properties"]["ver"]["const"] == "2"
    assert schemas["OrderPlacedV1"]["required"] == ["order_id"]
    handler = operations["billing.on_order_placed"]
    assert handler["action"] == "receive"
    assert handler["messages"] == [
        {"$ref": "#/channels/event.order.placed/messages/v1"},
        {"$ref": "#/channels/event.order.placed/messages/v2"},
    ]
    # An unversioned event has one message, without a ver header.
    flushed = channels["event.stock.flushed"]["messages"]["data"]
    assert "ver" not in flushed["headers"]["properties"]
    assert "broadcast" in operations["billing.on_flush"]["description"]


def test_basidia_asyncapi_writes_json_and_yaml(tmp_path: Path) -> None:
    import yaml

    runner = CliRunner()
    out = tmp_path / "asyncapi.json"
    result = runner.invoke(app, ["asyncapi", str(ROOT / "examples"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert set(document["operations"]) >= {
        "greeting_service.hello",
        "notification_service.on_user_created",
        "user_service.create_user",
    }
    as_yaml = tmp_path / "asyncapi.yaml"
    result = runner.invoke(app, ["asyncapi", str(ROOT / "examples"), "-o", str(as_yaml)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(as_yaml.read_text()) == document
    result = runner.invoke(app, ["asyncapi", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "error:" in result.output
    result = runner.invoke(app, ["asyncapi", str(ROOT / "examples"), "-b", "memory://"])
    assert result.exit_code == 2 and "needs an amqp://" in result.output
    result = runner.invoke(app, ["asyncapi", str(ROOT / "examples"), "-b", "nats://n:4222"])
    assert json.loads(result.stdout)["servers"]["broker"] == {"host": "n:4222", "protocol": "nats"}


def openapi_of(services: list[Any]) -> dict[str, Any]:
    runner = ServiceRunner(services)
    return openapi_document(runner.containers.values())


def test_openapi_documents_pass_openapi_spec_validator() -> None:
    from openapi_spec_validator import validate

    examples = openapi_of(load_services([str(ROOT / "examples")]))
    shop = openapi_of([Shop, Billing])
    validate(examples)
    validate(shop)
    assert set(examples["paths"]) == {"/users/{user_id}"}


def test_openapi_has_request_and_response_schemas_from_the_hints() -> None:
    document = openapi_of([Shop, Billing])
    create = document["paths"]["/orders"]["post"]
    assert create["requestBody"] == {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}}
            }
        },
    }
    ok = create["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Order"}
    assert "requestBody" not in document["paths"]["/orders/{order_id}"]["get"]
    assert set(document["components"]["schemas"]) >= {"Item", "Order", "Size", "Error"}


async def test_a_typed_body_is_validated_and_a_struct_result_sent_as_json() -> None:
    from basidia.http import HttpServer

    async with ServiceRunner([Shop]) as runner, HttpServer(runner, port=0) as server:
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base) as client:
            created = await client.post("/orders", json=[{"sku": "tea", "size": "large"}])
            wrong = await client.post("/orders", json=[{"quantity": 2}])
            garbage = await client.post("/orders", content=b"not json")
            shown = await client.get("/orders/3")
    assert created.status_code == 200
    assert created.json() == {
        "id": 7,
        "items": [{"sku": "tea", "quantity": 1, "size": "large"}],
        "note": None,
    }
    assert wrong.status_code == 422
    assert wrong.json()["error"] == "validation_error"
    assert "sku" in wrong.json()["detail"]
    assert garbage.status_code == 400
    assert shown.json() == {"id": 3, "items": [], "note": None}

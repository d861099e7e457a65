"""An OpenAPI 3.1 document for the ``@http_endpoint`` routes of a runner's services.

Endpoints take a Starlette ``Request``, so the document describes what the
declaration tells: path, methods, path parameters (typed by their Starlette
convertor), the service as a tag, the docstring as summary and description,
and the error responses every endpoint may give.  An argument after the request
is the JSON request body and the return type hint the 200 response: both get
JSON Schemas from msgspec (docs/http.md, "Typed bodies").
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from basidia import __version__
from basidia.container import ServiceContainer
from basidia.resilience.edge import ApiKeyAuth, BearerAuth
from basidia.schemas import SchemaSet
from basidia.service import HttpEndpoint

__all__ = ["OPENAPI_PATH", "openapi_document", "openapi_route"]

OPENAPI_PATH = "/openapi.json"

_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_][A-Za-z0-9_]*))?}")
# Starlette's path convertors and the JSON schema of what each matches.
_CONVERTOR_SCHEMAS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "path": {"type": "string"},
    "int": {"type": "integer", "minimum": 0},  # Starlette's int matches [0-9]+
    "float": {"type": "number", "minimum": 0},
    "uuid": {"type": "string", "format": "uuid"},
}
_ERROR_REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ERRORS = {
    "400": "Malformed request body (e.g. invalid JSON)",
    "413": "Request body over the size limit",
    "422": "Arguments rejected by a service",
    "500": "The endpoint failed",
    "502": "A service behind the endpoint failed",
    "503": "The service, or one it needs, is unavailable",
    "504": "No answer before the deadline",
}


def openapi_document(
    containers: Iterable[ServiceContainer], title: str = "Basidia services"
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every HTTP endpoint of ``containers``."""
    paths: dict[str, dict[str, Any]] = {}
    tags: list[dict[str, str]] = []
    schemas = SchemaSet()
    security_schemes: dict[str, Any] = {}
    for container in containers:
        service = container.service_name
        # The service's authentication dependencies (docs/resilience.md), as schemes.
        auths = security_of(container, security_schemes)
        endpoints = [
            (key, entrypoint)
            for key, entrypoint in container.service_cls.__entrypoints__.items()
            if isinstance(entrypoint, HttpEndpoint)
        ]
        if not endpoints:
            continue
        tag = {"name": service}
        description = _docstring(container.service_cls)[0]
        if description:
            tag["description"] = description
        tags.append(tag)
        for key, endpoint in endpoints:
            path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", endpoint.path)
            for method in endpoint.methods:
                operation = _operation(service, key, endpoint, schemas)
                _guarded(operation, endpoint, auths)
                if len(endpoint.methods) > 1:  # operation ids are unique per document
                    operation["operationId"] += f".{method.lower()}"
                paths.setdefault(path, {})[method.lower()] = operation
    components: dict[str, Any] = {"securitySchemes": security_schemes} if security_schemes else {}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__},
        "tags": tags,
        "paths": paths,
        "components": {
            **components,
            "schemas": {
                **dict(sorted(schemas.components.items())),
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {
                        "error": {"type": "string", "description": "A stable error code"},
                        "detail": {"type": "string", "description": "What went wrong"},
                    },
                },
            },
        },
    }


def security_of(container: ServiceContainer, schemes: dict[str, Any]) -> list[str]:
    """The names of ``container``'s authentication schemes, added to ``schemes``."""
    names = []
    for provider in container.dependencies.values():
        if isinstance(provider, ApiKeyAuth):
            name = f"apiKey.{provider.header}"
            schemes[name] = {"type": "apiKey", "in": "header", "name": provider.header}
        elif isinstance(provider, BearerAuth):
            name = "bearer"
            schemes[name] = {"type": "http", "scheme": "bearer"}
        else:
            continue
        names.append(name)
    return names


def _guarded(operation: dict[str, Any], endpoint: HttpEndpoint, auths: list[str]) -> None:
    """What authentication and a rate limit add to an operation: its security
    requirements (any one scheme) and the answers 401, 403 and 429."""
    responses = operation["responses"]
    if auths and not endpoint.public:
        operation["security"] = [{name: []} for name in auths]
        responses["401"] = {"description": "Missing or unknown credentials", **_ERROR_REF}
        if endpoint.allow is not None:
            responses["403"] = {"description": "A principal not allowed here", **_ERROR_REF}
    if endpoint.rate_limit is not None:
        responses["429"] = {"description": "Over the rate limit (see Retry-After)", **_ERROR_REF}
    operation["responses"] = dict(sorted(responses.items()))


def _operation(
    service: str, key: str, endpoint: HttpEndpoint, schemas: SchemaSet
) -> dict[str, Any]:
    summary, description = _docstring(endpoint.func)
    operation: dict[str, Any] = {
        "operationId": f"{service}.{key}",
        "tags": [service],
        "summary": summary or key.replace("_", " "),
    }
    if description:
        operation["description"] = description
    parameters = [
        {
            "name": match.group(1),
            "in": "path",
            "required": True,
            "schema": dict(_CONVERTOR_SCHEMAS.get(match.group(2) or "str", {"type": "string"})),
        }
        for match in _PARAM.finditer(endpoint.path)
    ]
    if parameters:
        operation["parameters"] = parameters
    body_type = endpoint.body_type
    if body_type is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.schema(body_type)}},
        }
    success: dict[str, Any] = {"description": "Successful response"}
    result_type = endpoint.result_type
    is_response = isinstance(result_type, type) and issubclass(result_type, Response)
    if result_type is not Any and not is_response:  # else nothing to say about the body
        success["content"] = {"application/json": {"schema": schemas.schema(result_type)}}
    responses: dict[str, Any] = {"200": success}
    for status, text in _ERRORS.items():
        responses[status] = {"description": text, **_ERROR_REF}
    operation["responses"] = responses
    return operation


def _docstring(obj: object) -> tuple[str, str]:
    """(first line, the rest) of ``obj``'s own docstring, not one it inherits."""
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return "", ""
    first, _, rest = inspect.cleandoc(doc).partition("\n")
    return first.strip(), rest.strip()


def openapi_route(containers: Iterable[ServiceContainer]) -> Route:
    """``GET /openapi.json``, built once from ``containers``."""
    document = openapi_document(list(containers))

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    return Route(OPENAPI_PATH, openapi, methods=["GET"], name="openapi")

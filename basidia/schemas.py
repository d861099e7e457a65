"""JSON Schemas from type hints, for the AsyncAPI and OpenAPI documents.

msgspec writes them (``msgspec.json.schema_components``): Structs, dataclasses,
TypedDicts and enums become named components referenced with ``$ref``; a type
msgspec cannot describe (a Starlette ``Request``, a plain class) gets an empty
schema with a description saying so, rather than failing the whole document.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["SchemaSet", "signature_types"]


class SchemaSet:
    """Collects the schemas of types; ``components`` holds the named ones they refer to."""

    def __init__(self, ref_template: str = "#/components/schemas/{name}") -> None:
        self.ref_template = ref_template
        self.components: dict[str, Any] = {}

    def schema(self, hint: Any) -> dict[str, Any]:
        """The JSON Schema of ``hint`` (``{}`` for ``Any`` or no hint)."""
        if hint is Any or hint is inspect.Parameter.empty:
            return {}
        if hint is None or hint is type(None):
            return {"type": "null"}
        try:
            (schema,), components = msgspec.json.schema_components(
                (hint,), ref_template=self.ref_template
            )
        except (TypeError, ValueError) as exc:
            name = getattr(hint, "__qualname__", repr(hint))
            return {"description": f"{name}: not described ({exc})"}
        for name, component in components.items():
            self.components.setdefault(name, component)
        return dict(schema)


def signature_types(
    func: Callable[..., Any], skip: int = 1
) -> tuple[list[tuple[str, Any, bool]], Any]:
    """``([(name, hint, required), ...], return hint)`` of ``func``, its first ``skip``
    parameters (``self``) left out; ``Any`` where a hint is missing."""
    try:
        hints = typing.get_type_hints(func)
    except (NameError, TypeError):
        hints = {}
    params = list(inspect.signature(func).parameters.values())[skip:]
    described = [
        (param.name, hints.get(param.name, Any), param.default is param.empty) for param in params
    ]
    return described, hints.get("return", Any)

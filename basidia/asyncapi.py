"""An AsyncAPI 3.0 document of services' RPC methods and events (``basidia asyncapi``).

Each RPC method is a channel (address ``service.method``, the frame's target) with a
``receive`` operation whose reply is the result or an error frame; each event is a
channel (address: the event name) with one message per schema version and a
``receive`` operation per handler.  Payload schemas come from the type hints
(msgspec); docs/contracts.md tells how to read the document.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from basidia import __version__
from basidia.context import IDEMPOTENCY_HEADER, SOURCE_HEADER
from basidia.schemas import SchemaSet, signature_types
from basidia.service import EventHandler, Rpc, Service
from basidia.versioning import VERSION_HEADER, upcaster_input

__all__ = ["ASYNCAPI_VERSION", "asyncapi_document", "server_of"]

ASYNCAPI_VERSION = "3.0.0"

_ERROR_PAYLOAD = {
    "type": "object",
    "required": ["code", "type", "message"],
    "properties": {
        "code": {"type": "string", "description": "selects the exception raised on the caller"},
        "type": {"type": "string", "description": "the remote exception's class name"},
        "message": {"type": "string"},
        "traceback": {"type": "string"},
    },
}


def _doc(obj: object) -> tuple[str, str]:
    doc = inspect.getdoc(obj) if not isinstance(obj, type) else vars(obj).get("__doc__")
    if not isinstance(doc, str) or not doc.strip():
        return "", ""
    first, _, rest = inspect.cleandoc(doc).partition("\n")
    return first.strip(), rest.strip()


def _described(target: dict[str, Any], obj: object) -> dict[str, Any]:
    summary, description = _doc(obj)
    if summary:
        target["summary"] = summary
    if description:
        target["description"] = description
    return target


def _event_headers(version: int | None) -> dict[str, Any]:
    properties: dict[str, Any] = {
        IDEMPOTENCY_HEADER: {"type": "string", "description": "idempotency key of the event"},
        SOURCE_HEADER: {"type": "string", "description": "the service that dispatched it"},
    }
    if version is not None:
        properties[VERSION_HEADER] = {
            "type": "string",
            "const": str(version),
            "description": "schema version of the data (absent: 1)",
        }
    return {"type": "object", "properties": properties}


def server_of(url: str) -> dict[str, Any]:
    """An AsyncAPI server object for broker ``url`` (amqp(s)://, nats://, tls://); its
    user name and password are left out."""
    parts = urlsplit(url)
    protocol = {"amqp": "amqp", "amqps": "amqps", "nats": "nats", "tls": "nats"}.get(
        parts.scheme.lower()
    )
    if protocol is None or not parts.hostname:
        raise ValueError(f"a server needs an amqp://, amqps://, nats:// or tls:// URL, got {url!r}")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    server: dict[str, Any] = {"host": host, "protocol": protocol}
    if parts.path not in ("", "/"):
        server["pathname"] = parts.path  # the RabbitMQ virtual host
    return server


def asyncapi_document(
    services: Sequence[type[Service]],
    title: str = "Basidia services",
    broker: str | None = None,
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every RPC method and event of ``services``; with a
    ``broker`` URL, that broker as its server."""
    schemas = SchemaSet()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for service in sorted(services, key=lambda cls: cls.service_name()):
        name = service.service_name()
        for key, entrypoint in service.__entrypoints__.items():
            if isinstance(entrypoint, Rpc):
                _rpc(schemas, channels, operations, name, key, entrypoint)
            elif isinstance(entrypoint, EventHandler):
                _event(schemas, channels, operations, name, key, entrypoint)
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": __version__,
            "description": "RPC methods and events of Basidia services. Every message is a "
            "Basidia frame (docs/protocol.md); payloads are MessagePack, or JSON when the "
            "frame's JSON flag is set.",
        },
        "defaultContentType": "application/msgpack",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": dict(sorted(schemas.components.items()))},
    }
    if broker is not None:
        document["servers"] = {"broker": server_of(broker)}
    return document


def _rpc(
    schemas: SchemaSet,
    channels: dict[str, Any],
    operations: dict[str, Any],
    service: str,
    key: str,
    method: Rpc,
) -> None:
    params, returns = signature_types(method.func)
    items = [dict(schemas.schema(hint), title=param) for param, hint, _ in params]
    request_payload: dict[str, Any] = {
        "type": "array",
        "description": "the positional arguments, in order (a call with keywords sends "
        "[arguments, {name: value}] with the frame's KWARGS flag)",
        "minItems": sum(1 for _, _, required in params if required),
        "maxItems": len(params),
    }
    if items:  # JSON Schema draft 7's tuple form, which AsyncAPI's schema format reads
        request_payload["items"] = items
    target = f"{service}.{method.name}"
    channel_id, reply_id = f"rpc.{target}", f"rpc.{target}.reply"
    channels[channel_id] = {
        "address": target,
        "title": f"{target} requests",
        "description": f"requests for {service}'s RPC method {method.name}, consumed from the "
        f"service's request queue by one of its instances",
        "messages": {"request": {"name": f"{target}.request", "payload": request_payload}},
    }
    channels[reply_id] = {
        "address": None,
        "title": f"{target} replies",
        "description": "the caller's reply inbox, named by the request frame's reply_to",
        "messages": {
            "result": {"name": f"{target}.result", "payload": schemas.schema(returns)},
            "error": {"name": f"{target}.error", "payload": _ERROR_PAYLOAD},
        },
    }
    operations[target] = _described(
        {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/request"}],
            "reply": {
                "channel": {"$ref": f"#/channels/{reply_id}"},
                "messages": [
                    {"$ref": f"#/channels/{reply_id}/messages/result"},
                    {"$ref": f"#/channels/{reply_id}/messages/error"},
                ],
            },
            "tags": [{"name": service}],
        },
        method.func,
    )


def _event(
    schemas: SchemaSet,
    channels: dict[str, Any],
    operations: dict[str, Any],
    service: str,
    key: str,
    handler: EventHandler,
) -> None:
    channel_id = f"event.{handler.event}"
    channel = channels.setdefault(
        channel_id,
        {
            "address": handler.event,
            "title": f"event {handler.event}",
            "description": "each subscribing service gets every event once (one of its "
            "instances handles it); broadcast handlers get it on every instance",
            "messages": {},
        },
    )
    messages: dict[str, Any] = channel["messages"]
    # (version, payload hint): the newest version is what the handler reads; an older one
    # looks like its upcaster's argument, or like the newest when it has no upcaster.
    data_type = handler.data_type
    if handler.versions is None:
        shapes: list[tuple[int | None, Any]] = [(None, data_type)]
    else:
        shapes = [
            (version, upcaster_input(handler.upcasters[version]))
            if version in handler.upcasters
            else (version, data_type)
            for version in handler.versions
        ]
    refs = []
    for version, hint in shapes:
        message_id = "data" if version is None else f"v{version}"
        message = {
            "name": handler.event if version is None else f"{handler.event}.v{version}",
            "title": handler.event if version is None else f"{handler.event} version {version}",
            "headers": _event_headers(version),
            "payload": schemas.schema(hint),
        }
        existing = messages.get(message_id)
        if existing is not None and existing["payload"] != message["payload"]:
            # Another handler reads this version differently: keep both, named apart.
            message_id = f"{message_id}.{service}.{key}"
            message["name"] = f"{message['name']}.{service}.{key}"
        messages.setdefault(message_id, message)
        refs.append({"$ref": f"#/channels/{channel_id}/messages/{message_id}"})
    operation: dict[str, Any] = {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "messages": refs,
        "tags": [{"name": service}],
    }
    if handler.broadcast:
        operation["description"] = "broadcast: every instance of the service handles each event"
    operations[f"{service}.{key}"] = _described(operation, handler.func)

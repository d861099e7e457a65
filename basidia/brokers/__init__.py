"""Broker adapters, chosen by URL scheme."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from basidia.brokers._common import redact_url
from basidia.brokers.base import (
    Broker,
    DeadLetter,
    Delivery,
    EventSubscription,
    Failure,
    Subscription,
)
from basidia.errors import ConfigError

__all__ = [
    "Broker",
    "DeadLetter",
    "Delivery",
    "EventSubscription",
    "Failure",
    "Subscription",
    "broker_from_url",
    "redact_url",
]

# scheme → (module, class, pip extra)
_ADAPTERS: dict[str, tuple[str, str, str]] = {
    "memory": ("basidia.brokers.memory", "MemoryBroker", ""),
    "amqp": ("basidia.brokers.amqp", "AmqpBroker", "amqp"),
    "amqps": ("basidia.brokers.amqp", "AmqpBroker", "amqp"),
    "nats": ("basidia.brokers.nats", "NatsBroker", "nats"),
    "tls": ("basidia.brokers.nats", "NatsBroker", "nats"),
    "redis": ("basidia.brokers.redis", "RedisBroker", "redis"),
    "rediss": ("basidia.brokers.redis", "RedisBroker", "redis"),
}


def broker_from_url(url: str, options: Mapping[str, Any] | None = None) -> Broker:
    """Build the adapter for ``url`` (``memory://``, ``amqp://``, ``nats://``, ...).

    ``options`` are keyword arguments for the adapter (timeouts, heartbeats).
    A missing client library raises ``ImportError`` naming the extra to install.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    try:
        module_name, class_name, extra = _ADAPTERS[scheme]
    except KeyError:
        known = ", ".join(f"{name}://" for name in _ADAPTERS)
        raise ConfigError(
            f"unsupported broker URL {redact_url(url)!r}: expected one of {known}"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"the {scheme}:// broker needs an extra: pip install 'basidia[{extra}]' ({exc})"
        ) from exc
    broker_class: type[Broker] = getattr(module, class_name)
    return broker_class(url, **dict(options or {}))  # type: ignore[call-arg]

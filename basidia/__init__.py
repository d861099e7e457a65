"""Basidia: Nameko-style microservices for asyncio, with a compiled messaging core."""

from basidia._speedups import IMPLEMENTATION
from basidia._version import __version__
from basidia._wire import Serializer, register_serializer
from basidia.config import Config
from basidia.container import ServiceContainer, State
from basidia.context import CallContext, current_context
from basidia.dependencies import (
    ConfigDependency,
    Dependency,
    DependencyProvider,
    EventDispatcher,
    provides,
)
from basidia.errors import (
    BasidiaError,
    BrokerError,
    ConfigError,
    ConnectionLost,
    FrameError,
    MessageTooLarge,
    MethodNotFound,
    RemoteError,
    RpcError,
    RpcTimeout,
    ServiceUnavailable,
    ValidationError,
    register_error,
)
from basidia.middleware import Middleware, OutgoingCall
from basidia.resilience import NonRetryable, Retry
from basidia.runner import Cluster, ServiceRunner, connect
from basidia.service import Service, event_handler, http_endpoint, rpc
from basidia.timers import timer

__all__ = [
    "IMPLEMENTATION",
    "BasidiaError",
    "BrokerError",
    "CallContext",
    "Cluster",
    "Config",
    "ConfigDependency",
    "ConfigError",
    "ConnectionLost",
    "Dependency",
    "DependencyProvider",
    "EventDispatcher",
    "FrameError",
    "MessageTooLarge",
    "MethodNotFound",
    "Middleware",
    "NonRetryable",
    "OutgoingCall",
    "RemoteError",
    "Retry",
    "RpcError",
    "RpcTimeout",
    "Service",
    "ServiceContainer",
    "ServiceRunner",
    "Serializer",
    "ServiceUnavailable",
    "State",
    "ValidationError",
    "__version__",
    "connect",
    "current_context",
    "event_handler",
    "http_endpoint",
    "provides",
    "register_error",
    "register_serializer",
    "rpc",
    "timer",
]

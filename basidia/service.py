"""Services and their entrypoints: ``Service``, ``@rpc``, ``@event_handler``, ``@http_endpoint``."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from basidia._wire import ArgumentSpec, TypedDecoder
from basidia.resilience.ratelimit import RateLimit
from basidia.resilience.retry import Retry
from basidia.versioning import Upcaster, VersionedDecoder, check_versions

if TYPE_CHECKING:
    from typing import Self

    from basidia.brokers.base import Subscription
    from basidia.container import ServiceContainer

__all__ = [
    "Entrypoint",
    "EventHandler",
    "HttpEndpoint",
    "Rpc",
    "Service",
    "event_handler",
    "http_endpoint",
    "mark",
    "rpc",
]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_EVENT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_MARK = "__basidia_entrypoint__"
# A semantic version (semver.org's expression), as service directories expect.
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


class Entrypoint:
    """Something that makes a service do work: an RPC method, an event handler, a route.

    Entrypoints are declared with decorators and collected when the service class
    is created.  Each kind knows how to serve itself: when a container starts, it
    hands every kind the service's entrypoints of that kind (``attach``), and each
    call they take runs through ``container.handle``, which applies deadlines,
    middleware, the concurrency limit and the counters.  The container knows no
    kind; a new kind is one subclass (docs/architecture.md shows ``@timer``).
    """

    #: Where the management API lists this kind in a service's entrypoints.
    group: ClassVar[str] = "other"

    def __init__(self, func: Callable[..., Awaitable[Any]]) -> None:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"{func.__qualname__}: entrypoints must be 'async def' methods")
        self.func = func
        self.name = func.__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.func.__qualname__}>"

    def describe(self) -> Any:
        """What the management API shows of this entrypoint (JSON-able)."""
        return self.name

    @classmethod
    def sources(cls, entrypoints: Sequence[Self]) -> int:
        """How many independent sources of calls ``entrypoints`` open, each bounded by the
        service's ``max_workers`` on its own (a queue's prefetch, say).  With more than
        one source in a service, the container bounds them together."""
        return len(entrypoints)

    @classmethod
    async def attach(
        cls, container: ServiceContainer, entrypoints: Sequence[Self]
    ) -> list[Subscription]:
        """Start serving ``entrypoints`` (all of this kind in one service) for
        ``container``; return what to cancel when it stops."""
        return []


class Rpc(Entrypoint):
    """An RPC method; its arguments are validated against its type hints."""

    group = "rpc"
    _spec: ArgumentSpec | None = None

    def __init__(
        self, func: Callable[..., Awaitable[Any]], rate_limit: RateLimit | None = None
    ) -> None:
        super().__init__(func)
        #: Calls per second it takes, per calling service (None: unlimited).
        self.rate_limit = rate_limit

    @classmethod
    def sources(cls, entrypoints: Sequence[Self]) -> int:
        return 1 if entrypoints else 0  # one request queue for all the methods

    @classmethod
    async def attach(
        cls, container: ServiceContainer, entrypoints: Sequence[Self]
    ) -> list[Subscription]:
        from basidia._serving import RequestServer

        return [await RequestServer(container, entrypoints).start()]

    @property
    def spec(self) -> ArgumentSpec:
        """The argument validator, built on first use so forward references resolve."""
        if self._spec is None:
            self._spec = ArgumentSpec(self.func, self.func.__qualname__)
        return self._spec


class EventHandler(Entrypoint):
    """Handles an event; see ``event_handler``."""

    group = "events"

    def __init__(
        self,
        func: Callable[..., Awaitable[Any]],
        event: str,
        *,
        broadcast: bool,
        durable: bool,
        max_attempts: int | None,
        versions: Sequence[int] | None = None,
        upcasters: Mapping[int, Upcaster] | None = None,
        retry: Retry | None = None,
        dedup: bool | None = None,
    ) -> None:
        super().__init__(func)
        if not _EVENT.match(event):
            raise ValueError(f"{func.__qualname__}: invalid event name {event!r}")
        params = list(inspect.signature(func).parameters)
        if len(params) != 2:
            raise TypeError(f"{func.__qualname__}: an event handler takes one argument, the event")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"{func.__qualname__}: max_attempts must be at least 1")
        self.event = event
        self.broadcast = broadcast
        self.durable = durable
        self.max_attempts = max_attempts
        #: The retry policy (None: the configured defaults; docs/resilience.md).
        self.retry = retry
        #: Run once per idempotency key (None: as config ``dedup_store`` says).
        self.dedup = dedup
        #: The schema versions accepted (None: any, unchecked) and the upcasters that lift
        #: an older version's data one version up (basidia/versioning.py).
        self.versions, self.upcasters = check_versions(func.__qualname__, versions, upcasters)
        self._decoder: TypedDecoder | VersionedDecoder | None = None

    def describe(self) -> Any:
        described = {"name": self.name, "event": self.event, "broadcast": self.broadcast}
        if self.versions is not None:
            described["versions"] = list(self.versions)
        return described

    @classmethod
    async def attach(
        cls, container: ServiceContainer, entrypoints: Sequence[Self]
    ) -> list[Subscription]:
        from basidia._serving import serve_events

        return [await serve_events(container, handler) for handler in entrypoints]

    @property
    def data_type(self) -> Any:
        """The type hint of the handler's event argument (``Any`` without one)."""
        hints = typing.get_type_hints(self.func)
        return hints.get(list(inspect.signature(self.func).parameters)[1], Any)

    @property
    def decoder(self) -> TypedDecoder | VersionedDecoder:
        """Reads an event's data, validated against the handler's type hint (and, when
        the handler declares versions, checked and upcast: basidia/versioning.py)."""
        if self._decoder is None:
            if self.versions is None:
                self._decoder = TypedDecoder(self.data_type)
            else:
                where = self.func.__qualname__
                self._decoder = VersionedDecoder(
                    self.data_type, self.versions, self.upcasters, where
                )
        return self._decoder


class HttpEndpoint(Entrypoint):
    """An HTTP route served by the runner's HTTP server (``basidia.http``), which calls
    ``container.run_call``: nothing to attach to the broker."""

    group = "http"

    def __init__(
        self,
        func: Callable[..., Awaitable[Any]],
        method: str,
        path: str,
        *,
        rate_limit: RateLimit | None = None,
        allow: frozenset[str] | None = None,
        public: bool = False,
    ) -> None:
        super().__init__(func)
        if not path.startswith("/"):
            raise ValueError(f"{func.__qualname__}: HTTP paths start with '/', got {path!r}")
        self.methods = [part.strip().upper() for part in method.split(",") if part.strip()]
        self.path = path
        #: Requests per second it takes, per client (None: unlimited); 429 past it.
        self.rate_limit = rate_limit
        #: The principals allowed (None: any authenticated one); 403 for the others.
        self.allow = allow
        #: Served without the service's authentication (``HttpAuth``).
        self.public = public

    def describe(self) -> Any:
        return {"name": self.name, "methods": self.methods, "path": self.path}

    @property
    def body_type(self) -> Any:
        """The type hint of the argument after the request (the JSON body, decoded and
        validated for the endpoint), or None when the endpoint takes the request alone."""
        params = list(inspect.signature(self.func).parameters)
        if len(params) < 3:
            return None
        return self._hints().get(params[2], Any)

    @property
    def result_type(self) -> Any:
        """The endpoint's return type hint (``Any`` without one)."""
        return self._hints().get("return", Any)

    def _hints(self) -> dict[str, Any]:
        # A hint that cannot be resolved (a name imported only for type checkers) is
        # left out, as if it were not there: the endpoint still serves.
        try:
            return typing.get_type_hints(self.func)
        except (NameError, TypeError):
            return {}

    @classmethod
    def sources(cls, entrypoints: Sequence[Self]) -> int:
        return 1 if entrypoints else 0  # one HTTP server for all the routes


def mark(func: F, entrypoint: Entrypoint) -> F:
    """Declare ``func`` an entrypoint of its service class (for entrypoint decorators)."""
    setattr(func, _MARK, entrypoint)
    return func


@typing.overload
def rpc(func: F, /) -> F: ...


@typing.overload
def rpc(*, rate_limit: str | float | RateLimit | None = None) -> Callable[[F], F]: ...


def rpc(
    func: F | None = None, /, *, rate_limit: str | float | RateLimit | None = None
) -> F | Callable[[F], F]:
    """Expose an ``async def`` method to RPC callers: ``await proxy.<service>.<method>(...)``.

    ``@rpc(rate_limit="100/s")`` bounds the calls it takes per calling service (a token
    bucket); a caller past it gets ``RateLimited`` (docs/resilience.md).
    """
    limit = None if rate_limit is None else RateLimit.parse(rate_limit)
    if func is None:
        return lambda inner: mark(inner, Rpc(inner, limit))
    return mark(func, Rpc(func, limit))


def event_handler(
    event: str,
    *,
    broadcast: bool = False,
    durable: bool = True,
    max_attempts: int | None = None,
    versions: Sequence[int] | None = None,
    upcasters: Mapping[int, Upcaster] | None = None,
    retry: Retry | None = None,
    dedup: bool | None = None,
) -> Callable[[F], F]:
    """Handle every event named ``event``.

    Each subscribing service gets every event once: one of its instances handles
    it.  With ``broadcast=True`` every instance gets it.  ``durable=False`` opts
    into at-most-once delivery where the broker distinguishes (events published
    while no instance runs are lost).  A handler that raises is retried until
    ``max_attempts`` (default from config ``event_max_attempts``), then the event
    is dead-lettered with the error as the reason.  Attempts are spaced by exponential
    backoff with jitter; ``retry=Retry(...)`` overrides the configured policy, and
    ``NonRetryable`` (or ``Retry(give_up_on=...)``) dead-letters at once.  ``dedup``
    turns the once-per-idempotency-key rule on or off for this handler (default: config
    ``dedup_store``); docs/resilience.md.

    ``versions`` are the event schema versions the handler accepts (default: any,
    unchecked); an event of another version is dead-lettered with the reason.
    ``upcasters`` map an older version to a function that turns its data into the
    next version's, so the handler reads its newest version (docs/events.md).
    """

    def decorate(func: F) -> F:
        return mark(
            func,
            EventHandler(
                func,
                event,
                broadcast=broadcast,
                durable=durable,
                max_attempts=max_attempts,
                versions=versions,
                upcasters=upcasters,
                retry=retry,
                dedup=dedup,
            ),
        )

    return decorate


def http_endpoint(
    method: str,
    path: str,
    *,
    rate_limit: str | float | RateLimit | None = None,
    allow: Collection[str] | None = None,
    public: bool = False,
) -> Callable[[F], F]:
    """Serve ``method`` (or ``"GET,POST"``) requests to ``path`` (Starlette syntax).

    ``rate_limit`` (``"10/s"``) answers 429 with ``Retry-After`` past it, per client.  When
    the service declares an ``HttpAuth`` dependency the endpoint needs credentials (401),
    from one of the ``allow`` principals if given (403), unless ``public``
    (docs/resilience.md).
    """
    limit = None if rate_limit is None else RateLimit.parse(rate_limit)
    allowed = None if allow is None else frozenset(allow)

    def decorate(func: F) -> F:
        endpoint = HttpEndpoint(func, method, path, rate_limit=limit, allow=allowed, public=public)
        return mark(func, endpoint)

    return decorate


class Service:
    """Base class of Basidia services.

    Subclasses set ``name`` (how callers address the service) and declare
    entrypoints with decorators and dependencies as class attributes.  An
    instance is created for every call and carries its dependencies; keep
    long-lived state in dependency providers, not on ``self``.
    """

    name: ClassVar[str]
    #: Calls handled at once by one instance of the service (None: config ``max_workers``).
    max_workers: ClassVar[int | None] = None
    #: The service's version (semver), announced where brokers list services (NATS ``$SRV``).
    version: ClassVar[str | None] = None

    __entrypoints__: ClassVar[dict[str, Entrypoint]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        entrypoints: dict[str, Entrypoint] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                entrypoint = getattr(value, _MARK, None)
                if isinstance(entrypoint, Entrypoint):
                    entrypoints[attr] = entrypoint
                elif attr in entrypoints:  # overridden without a decorator
                    del entrypoints[attr]
        cls.__entrypoints__ = entrypoints
        name = cls.__dict__.get("name")
        if name is not None and not (isinstance(name, str) and _NAME.match(name)):
            raise TypeError(
                f"{cls.__qualname__}.name must be an identifier-like string, got {name!r}"
            )
        version = cls.__dict__.get("version")
        if version is not None and not (isinstance(version, str) and SEMVER.match(version)):
            raise TypeError(
                f"{cls.__qualname__}.version must be a semantic version (1.2.3), got {version!r}"
            )

    @classmethod
    def service_name(cls) -> str:
        """The service's name, or a clear error if the class has none."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str):
            raise TypeError(f"{cls.__qualname__} has no 'name'; set name = \"my_service\"")
        return name

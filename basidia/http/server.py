"""The HTTP server: service endpoints, management API and health probes on one uvicorn.

uvicorn runs on the runner's event loop, started and stopped from code (no
signal handlers of its own, no logging configuration of its own)::

    runner = ServiceRunner([ApiService, UserService, DatabaseService])
    await runner.start()
    async with HttpServer(runner, port=8000):
        ...
    await runner.stop()

``serve(runner, server)`` does the same until SIGTERM, as ``basidia run`` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from basidia.config import Config
from basidia.errors import ConfigError
from basidia.http.crosssite import normalize_host
from basidia.http.errors import error_response
from basidia.http.limits import RequestLimitMiddleware, TimedH11Protocol
from basidia.http.management import Management, health_routes
from basidia.http.openapi import OPENAPI_PATH, openapi_route
from basidia.http.routing import RouteSpec, check_conflicts, service_routes
from basidia.runner import ServiceRunner

__all__ = [
    "HttpServer",
    "HttpSettings",
    "build_app",
    "http_server_for",
    "is_loopback",
    "parse_listen",
    "serve",
]

logger = logging.getLogger("basidia.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP server's settings; config keys ``http.<field>`` (``BASIDIA_HTTP__<FIELD>``)."""

    #: Interface to listen on; anything but loopback needs a ``token`` for management.
    host: str = DEFAULT_HOST
    #: TCP port; 0 picks a free one (see ``HttpServer.port``).
    port: int = DEFAULT_PORT
    #: Serve the management API (``/``, ``/services...``) beside the endpoints.
    management: bool = True
    #: Bearer token the management API requires when set (a secret: never logged).
    #: Always text, compared exactly; empty means none.
    token: str | None = None
    #: Without a token, names besides loopback ones the management API answers for
    #: (Host header) and whose pages may call it (Origin): a reverse proxy's name.
    allowed_hosts: tuple[str, ...] = ()
    #: Largest request body accepted, in bytes; larger ones get 413.
    max_body_size: int = 1 << 20
    #: Largest request line plus headers, in bytes; larger ones get 431 (or 400).
    max_header_size: int = 16 << 10
    #: Seconds a client has to send a request's headers.
    header_timeout: float = 10.0
    #: Seconds a kept-alive connection may wait for its next request.
    idle_timeout: float = 5.0
    #: Connections (and requests) at once; beyond, new requests get 503.
    max_connections: int = 1000

    def __repr__(self) -> str:
        token = "'***'" if self.token else "None"
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name != "token"
        )
        return f"HttpSettings({fields}, token={token})"

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> HttpSettings:
        """Settings from the ``http`` section of ``config``, then non-None ``overrides``."""
        section = config.get("http", {})
        if not isinstance(section, Mapping):
            raise ConfigError("the 'http' setting must be a mapping (http.listen, http.token...)")
        section = {str(key).lower(): value for key, value in section.items()}
        values: dict[str, Any] = {}
        listen = section.get("listen")
        if listen is not None:
            address = parse_listen(listen)
            if address is not None:
                values["host"], values["port"] = address
        for field in dataclasses.fields(cls):
            if field.name in section:
                values[field.name] = section[field.name]
        values.update({key: value for key, value in overrides.items() if value is not None})
        try:
            settings = cls(
                host=str(values.get("host", cls.host)),
                port=int(values.get("port", cls.port)),
                management=_flag(values.get("management", cls.management)),
                token=_token(values.get("token")),
                allowed_hosts=_hosts(values.get("allowed_hosts")),
                max_body_size=int(values.get("max_body_size", cls.max_body_size)),
                max_header_size=int(values.get("max_header_size", cls.max_header_size)),
                header_timeout=float(values.get("header_timeout", cls.header_timeout)),
                idle_timeout=float(values.get("idle_timeout", cls.idle_timeout)),
                max_connections=int(values.get("max_connections", cls.max_connections)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid HTTP setting: {exc}") from None
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ``ConfigError`` for out-of-range values and an unprotected exposed API."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"http port must be 0 to 65535, got {self.port}")
        if self.max_body_size < 0:
            raise ConfigError("http.max_body_size must be >= 0 bytes")
        if self.max_header_size < 1024:
            raise ConfigError("http.max_header_size must be at least 1024 bytes")
        for name in ("header_timeout", "idle_timeout"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise ConfigError(f"http.{name} must be in (0, 3600] seconds, got {value}")
        if self.max_connections < 1:
            raise ConfigError("http.max_connections must be at least 1")
        if self.token is not None and (
            self.token != self.token.strip() or not all(" " <= c <= "~" for c in self.token)
        ):
            # Never shown: it is a secret. Clients could not send it as set anyway
            # (HTTP strips blanks around header values; non-ASCII is not portable).
            raise ConfigError(
                "http.token must be printable ASCII without blanks around it "
                "(a trailing newline from a secret file?)"
            )
        for host in self.allowed_hosts:
            try:
                normalize_host(host)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.management and not self.token and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to serve the management API on {self.host}, beyond loopback, "
                "without a token: set one (BASIDIA_HTTP__TOKEN, http.token in the config file "
                "or --management-token), listen on 127.0.0.1, or turn the API off "
                "(--no-management / http.management: false)"
            )


def _token(value: Any) -> str | None:
    """The token as set: text, never a number (``"0"`` is a token); empty means none."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        # A config file's unquoted 0123 or 1e3 is a number whose text is lost: refuse.
        raise ConfigError(
            f"http.token must be text, not a {type(value).__name__}: quote it in the config "
            'file (token: "..."), or set BASIDIA_HTTP__TOKEN'
        )
    return value


def _hosts(value: Any) -> tuple[str, ...]:
    """``http.allowed_hosts``: a list, or a comma-separated string (the environment)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(h, str) for h in value):
        raise ValueError(
            "http.allowed_hosts must be a list of host names or a comma-separated string"
        )
    return tuple(normalize_host(host) for host in value if host.strip())


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


def parse_listen(value: Any) -> tuple[str, int] | None:
    """``"HOST:PORT"``, ``"[::1]:PORT"``, ``":PORT"`` or ``"PORT"`` → (host, port);
    ``"off"`` (or ``false``) → None."""
    text = str(value).strip()
    if value is False or text.lower() in ("off", "false", "no", "none", ""):
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"expected HOST:PORT or 'off' as HTTP address, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"HTTP port must be 0 to 65535, got {port}")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: assume it is reachable from outside


def build_app(runner: ServiceRunner, settings: HttpSettings) -> Starlette:
    """The ASGI app: OpenAPI, health, management (when on), then every service's routes.

    Raises ``ValueError`` when two routes would answer the same method and path.
    """
    builtin: list[BaseRoute] = [openapi_route(runner.containers.values())]
    specs = [RouteSpec(["GET"], OPENAPI_PATH, "the OpenAPI document")]
    health = health_routes(runner)
    builtin.extend(health)
    specs.extend(
        RouteSpec(route.methods or (), route.path, "the health probes") for route in health
    )
    if settings.management:
        management_routes = Management(runner, settings.token, settings.allowed_hosts).routes()
        builtin.extend(management_routes)
        specs.extend(
            RouteSpec(route.methods or (), route.path, "the management API")
            for route in management_routes
        )
    routes, service_specs = service_routes(runner.containers.values())
    check_conflicts([*specs, *service_specs])
    return Starlette(
        routes=[*builtin, *routes],
        middleware=[
            Middleware(
                RequestLimitMiddleware,
                max_body_size=settings.max_body_size,
                max_header_size=settings.max_header_size,
            )
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail, exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal server error")


class HttpServer:
    """Serves a runner's HTTP endpoints, management API and health probes.

    Arguments left ``None`` come from the runner's config (``http.*``), else the
    ``HttpSettings`` defaults.  Binding beyond loopback with the management API
    on and no token raises ``ConfigError`` here, before anything listens.
    """

    def __init__(
        self,
        runner: ServiceRunner,
        host: str | None = None,
        port: int | None = None,
        *,
        management: bool | None = None,
        token: str | None = None,
        allowed_hosts: Sequence[str] | None = None,
        max_body_size: int | None = None,
        max_header_size: int | None = None,
        header_timeout: float | None = None,
        idle_timeout: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.runner = runner
        self.settings = HttpSettings.from_config(
            runner.config,
            host=host,
            port=port,
            management=management,
            token=token,
            allowed_hosts=allowed_hosts,
            max_body_size=max_body_size,
            max_header_size=max_header_size,
            header_timeout=header_timeout,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
        )
        self.app = build_app(runner, self.settings)
        self._server: uvicorn.Server | None = None
        self._sockets: list[socket.socket] = []
        self._bound_port = 0
        self._main_loop: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "serving" if self._server is not None else "stopped"
        return f"<HttpServer {self.url} {state}>"

    @property
    def host(self) -> str:
        """The interface the server listens on."""
        return self.settings.host

    @property
    def port(self) -> int:
        """The bound port once started (the real one when asked for port 0)."""
        return self._bound_port or self.settings.port

    @property
    def url(self) -> str:
        """``http://host:port``, for clients and logs."""
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen and serve; ``ConfigError`` when the address cannot be bound."""
        if self._server is not None:
            return
        settings = self.settings
        self._sockets = await _bind(settings.host, settings.port)
        self._bound_port = self._sockets[0].getsockname()[1]
        grace = self.runner.runtime.settings.shutdown_grace
        config = uvicorn.Config(
            self.app,
            host=settings.host,
            port=self.port,
            http=TimedH11Protocol.configured(settings.header_timeout, settings.idle_timeout),
            ws="none",
            lifespan="off",
            log_config=None,
            proxy_headers=False,
            server_header=False,
            h11_max_incomplete_event_size=settings.max_header_size,
            limit_concurrency=settings.max_connections,
            timeout_keep_alive=max(1, math.ceil(settings.idle_timeout)),
            timeout_graceful_shutdown=math.ceil(grace),
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=self._sockets)
        except BaseException:
            _close(self._sockets)
            self._sockets = []
            raise
        self._server = server
        self._main_loop = asyncio.create_task(server.main_loop(), name="basidia-http")
        management = "off"
        if settings.management:
            management = "token required" if settings.token else "open (loopback only)"
            if not settings.token and settings.allowed_hosts:
                management = f"open (loopback and {', '.join(settings.allowed_hosts)})"
        logger.info("HTTP on %s (management API: %s)", self.url, management)

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening, let requests in flight finish within ``grace`` seconds
        (default: config ``shutdown_grace``), then cancel the rest."""
        server, self._server = self._server, None
        if server is None:
            return
        if grace is not None:
            server.config.timeout_graceful_shutdown = math.ceil(grace)
        server.should_exit = True
        main_loop, self._main_loop = self._main_loop, None
        if main_loop is not None:
            main_loop.cancel()  # it only refreshes the Date header; no need to wait for its tick
            await asyncio.wait((main_loop,))
        try:
            await server.shutdown(sockets=self._sockets)
            # Requests cancelled at the end of the grace period answer and close now.
            if server.server_state.tasks:
                await asyncio.wait(list(server.server_state.tasks), timeout=1.0)
        finally:
            _close(self._sockets)
            logger.info("HTTP server on %s stopped", self.url)
            self._sockets = []

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


async def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (``localhost``: IPv4 and IPv6)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"cannot listen for HTTP on {host}: {exc}") from None
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    both = {socket.AF_INET, socket.AF_INET6} <= {info[0] for info in infos}
    try:
        for family, kind, proto, _, address in infos:
            if address[0] in seen:
                continue
            seen.add(address[0])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if both and family == socket.AF_INET6:  # the IPv4 address gets its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Every address gets the port the first one got (port 0 picks it).
            bound_port = sockets[0].getsockname()[1] if len(sockets) > 1 else port
            sock.bind((address[0], bound_port, *address[2:]))
            sock.setblocking(False)
    except OSError as exc:
        _close(sockets)
        raise ConfigError(
            f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}; choose another "
            "address (basidia run --http HOST:PORT) or turn HTTP off (--http off)"
        ) from None
    return sockets


def _close(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def http_server_for(runner: ServiceRunner) -> HttpServer | None:
    """The HTTP server ``runner``'s config asks for (``http.listen``, default
    127.0.0.1:8000), or None when it says ``off``."""
    listen = runner.config.get("http.listen")
    if listen is not None and parse_listen(listen) is None:
        return None
    return HttpServer(runner)


async def serve(
    runner: ServiceRunner,
    server: HttpServer,
    stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """``runner.run()`` with HTTP: start the services, then the server; on a stop
    signal, stop the server (requests in flight finish), then the services, all
    within one ``shutdown_grace``."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in stop_signals:
        try:
            loop.add_signal_handler(sig, stopping.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            pass
    grace = runner.runtime.settings.shutdown_grace
    try:
        await runner.start()
        try:
            await server.start()
            await stopping.wait()
            logger.info("stopping: finishing requests and calls in flight")
        finally:
            began = time.monotonic()
            await server.stop(grace)
            grace = max(0.0, grace - (time.monotonic() - began))
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.stop(grace)

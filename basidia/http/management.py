"""The lifecycle management API and the health probes.

Management (token-protected when a token is set; without one, cross-site requests
are refused, see ``basidia.http.crosssite``)::

    GET  /                          application status
    GET  /services                  every service: state, error, entrypoints, in-flight work
    GET  /services/{name}           one service
    POST /services/{name}/start     STOPPED/ERROR → STARTING → RUNNING
    POST /services/{name}/stop      RUNNING/ERROR → STOPPING → STOPPED (?grace=seconds)
    POST /services/{name}/restart   stop (if RUNNING), then start; the others keep serving
    GET  /cluster                   every instance on the broker (the service directory)
    GET  /sagas                     the sagas of the services here (?status=, ?limit=)
    GET  /sagas/{id}                one saga with its steps (docs/sagas.md)
    GET  /metrics                   Prometheus text, with the Prometheus exporter on
                                    (docs/observability.md)

Health (never behind the token, so that Kubernetes probes work; they reveal
nothing but the verdict)::

    GET  /health/live               200 while the process answers
    GET  /health/ready              200 when the broker is connected and every service
                                    is RUNNING, else 503
    GET  /health/ready/{name}       200 when the broker is connected and service ``name``
                                    is RUNNING, else 503 (404 for an unknown name)
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from basidia import IMPLEMENTATION, __version__
from basidia.container import ServiceContainer, State
from basidia.http.crosssite import CrossSiteGuard
from basidia.http.errors import error_response
from basidia.resilience.breaker import guards_of
from basidia.runner import ServiceRunner

__all__ = ["Management", "health_routes", "is_ready"]

logger = logging.getLogger("basidia.http.management")

Endpoint = Callable[[Request], Awaitable[Response]]


def is_ready(runner: ServiceRunner) -> bool:
    """Ready for traffic: the broker is connected and every service is RUNNING."""
    return runner.broker.connected and all(
        container.state is State.RUNNING for container in runner.containers.values()
    )


def health_routes(runner: ServiceRunner) -> list[Route]:
    """``/health/live`` and ``/health/ready``."""

    async def live(request: Request) -> Response:
        # A broker connection closed for good cannot come back: only a restart helps
        # (docs/security.md).  One that is reconnecting keeps the process alive.
        if not runner.broker.alive:
            return JSONResponse(
                {"status": "dead", "reason": "the broker connection is closed for good"},
                status_code=503,
            )
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> Response:
        if is_ready(runner):
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def service_ready(request: Request) -> Response:
        # Per service, so that a probe (or a load balancer) can follow the one it needs.
        container = runner.containers.get(request.path_params["name"])
        if container is None:
            return _unknown(request)
        if runner.broker.connected and container.state is State.RUNNING:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    return [
        Route("/health/live", live, methods=["GET"], name="health.live"),
        Route("/health/ready", ready, methods=["GET"], name="health.ready"),
        Route("/health/ready/{name}", service_ready, methods=["GET"], name="health.ready_service"),
    ]


class Management:
    """The management endpoints of one runner.

    With a ``token``, every call needs ``Authorization: Bearer <token>``. Without
    one, calls that a browser page from another site could make are refused
    (``CrossSiteGuard``): a foreign Host (DNS rebinding), a foreign Origin or
    ``Sec-Fetch-Site``, a state change without ``Content-Type: application/json``.
    ``allowed_hosts`` are the names, besides loopback ones, the API answers for then.
    """

    def __init__(
        self, runner: ServiceRunner, token: str | None, allowed_hosts: Iterable[str] = ()
    ) -> None:
        self.runner = runner
        self._expected = f"Bearer {token}".encode() if token else None
        self._cross_site = CrossSiteGuard(allowed_hosts)
        self._started = time.time()

    def routes(self) -> list[Route]:
        """The management routes, each behind the token check (or the cross-site one)."""
        guard = self._guarded
        return [
            Route("/", guard(self.status), methods=["GET"], name="management.status"),
            Route("/services", guard(self.services), methods=["GET"], name="management.services"),
            Route(
                "/services/{name}",
                guard(self.service),
                methods=["GET"],
                name="management.service",
            ),
            Route(
                "/services/{name}/start",
                guard(self.start),
                methods=["POST"],
                name="management.start",
            ),
            Route(
                "/services/{name}/stop",
                guard(self.stop),
                methods=["POST"],
                name="management.stop",
            ),
            Route(
                "/services/{name}/restart",
                guard(self.restart),
                methods=["POST"],
                name="management.restart",
            ),
            Route("/cluster", guard(self.cluster), methods=["GET"], name="management.cluster"),
            Route("/sagas", guard(self.sagas), methods=["GET"], name="management.sagas"),
            Route("/sagas/{id}", guard(self.saga), methods=["GET"], name="management.saga"),
            Route("/metrics", guard(self.metrics), methods=["GET"], name="management.metrics"),
        ]

    def _guarded(self, endpoint: Endpoint) -> Endpoint:
        expected = self._expected
        if expected is None:
            cross_site = self._cross_site

            async def same_site_only(request: Request) -> Response:
                refusal = cross_site.refusal(request)
                if refusal is not None:
                    return refusal
                return await endpoint(request)

            return same_site_only

        async def guarded(request: Request) -> Response:
            given = request.headers.get("authorization", "").encode()
            # Constant-time comparison: the answer time must not leak the token.
            if not hmac.compare_digest(given, expected):
                return error_response(
                    401,
                    "the management API needs 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": 'Bearer realm="basidia"'},
                )
            return await endpoint(request)

        return guarded

    async def status(self, request: Request) -> Response:
        """``GET /``: version, broker, readiness and the state of every service."""
        runner = self.runner
        return JSONResponse(
            {
                "name": "basidia",
                "version": __version__,
                "implementation": IMPLEMENTATION,
                "uptime": round(time.time() - self._started, 3),
                "ready": is_ready(runner),
                "broker": {"url": runner.broker.safe_url, "connected": runner.broker.connected},
                "services": {
                    name: container.state.value for name, container in runner.containers.items()
                },
            }
        )

    async def services(self, request: Request) -> Response:
        """``GET /services``: every service in detail."""
        return JSONResponse([describe(c) for c in self.runner.containers.values()])

    async def service(self, request: Request) -> Response:
        """``GET /services/{name}``."""
        container = self._container(request)
        if container is None:
            return _unknown(request)
        return JSONResponse(describe(container))

    async def start(self, request: Request) -> Response:
        """``POST /services/{name}/start``: start a STOPPED or ERROR service.

        Starting a RUNNING service changes nothing (200); one that is STARTING or
        STOPPING gets 409; a failed start answers 500 with the reason, and the
        service shows ERROR.
        """
        container = self._container(request)
        if container is None:
            return _unknown(request)
        if container.state is State.RUNNING:
            return JSONResponse(describe(container))
        if container.state not in (State.INITIALIZED, State.STOPPED, State.ERROR):
            return _busy(container)
        logger.info("starting %s (management API)", container.service_name)
        try:
            await self.runner.start_service(container.service_name)
        except Exception as exc:
            logger.error("%s failed to start: %s", container.service_name, _reason(exc))
            return JSONResponse(
                {"error": "start_failed", "detail": _reason(exc), "service": describe(container)},
                status_code=500,
            )
        return JSONResponse(describe(container))

    async def stop(self, request: Request) -> Response:
        """``POST /services/{name}/stop``: stop consuming, drain in-flight calls, stop.

        ``?grace=<seconds>`` bounds the drain (default: ``shutdown_grace``).
        Stopping a STOPPED service changes nothing (200); STARTING or STOPPING
        gets 409.
        """
        container = self._container(request)
        if container is None:
            return _unknown(request)
        grace = _grace(request)
        if isinstance(grace, Response):
            return grace
        if container.state in (State.STOPPED, State.INITIALIZED):
            return JSONResponse(describe(container))
        if container.state not in (State.RUNNING, State.ERROR):
            return _busy(container)
        logger.info("stopping %s (management API)", container.service_name)
        await self.runner.stop_service(container.service_name, grace)
        return JSONResponse(describe(container))

    async def restart(self, request: Request) -> Response:
        """``POST /services/{name}/restart``: stop the service (draining its calls within
        ``?grace=<seconds>``) if it runs, then start it; its neighbours keep serving.

        STARTING or STOPPING gets 409; a failed start answers 500 with the reason, and
        the service shows ERROR.
        """
        container = self._container(request)
        if container is None:
            return _unknown(request)
        grace = _grace(request)
        if isinstance(grace, Response):
            return grace
        if container.state in (State.STARTING, State.STOPPING):
            return _busy(container)
        logger.info("restarting %s (management API)", container.service_name)
        try:
            await self.runner.restart_service(container.service_name, grace)
        except Exception as exc:
            logger.error("%s failed to restart: %s", container.service_name, _reason(exc))
            return JSONResponse(
                {"error": "start_failed", "detail": _reason(exc), "service": describe(container)},
                status_code=500,
            )
        return JSONResponse(describe(container))

    async def cluster(self, request: Request) -> Response:
        """``GET /cluster``: every service instance the directory knows, on every host
        (``basidia services``); the first call waits up to a second for their answers."""
        instances = await self.runner.services()
        return JSONResponse([instance.to_dict() for instance in instances])

    async def sagas(self, request: Request) -> Response:
        """``GET /sagas``: the sagas in the databases of the services here, newest first."""
        from basidia.data.saga import running_sagas

        try:
            limit = int(request.query_params.get("limit", "100"))
            found = await running_sagas(
                self.runner.containers.values(),
                status=request.query_params.get("status"),
                limit=limit,
            )
        except ValueError as exc:
            return error_response(400, str(exc))
        return JSONResponse(found)

    async def saga(self, request: Request) -> Response:
        """``GET /sagas/{id}``: one saga, its data and its steps."""
        from basidia.data.saga import find_saga

        saga_id = request.path_params["id"]
        found = await find_saga(self.runner.containers.values(), saga_id)
        if found is None:
            return error_response(404, f"no saga {saga_id!r} in the databases of this process")
        return JSONResponse(found)

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``: the metrics in Prometheus's text format; 404 when the
        Prometheus exporter is off."""
        from basidia.telemetry import prometheus_text

        found = prometheus_text()
        if found is None:
            return error_response(
                404,
                "metrics are off: set OTEL_METRICS_EXPORTER=prometheus or "
                "telemetry.metrics_exporter (docs/observability.md)",
            )
        body, content_type = found
        return Response(body, media_type=content_type)

    def _container(self, request: Request) -> ServiceContainer | None:
        return self.runner.containers.get(request.path_params["name"])


def _entrypoints(container: ServiceContainer) -> dict[str, list[Any]]:
    """A service's entrypoints by kind, as each kind describes itself."""
    kinds: dict[str, list[Any]] = {"rpc": [], "events": [], "http": []}
    for entrypoint in container.service_cls.__entrypoints__.values():
        kinds.setdefault(entrypoint.group, []).append(entrypoint.describe())
    return kinds


def describe(container: ServiceContainer) -> dict[str, Any]:
    """What the management API shows of one service."""
    stats = container.stats
    return {
        "name": container.service_name,
        "state": container.state.value,
        "error": _reason(container.error) if container.error is not None else None,
        "started_at": container.started_at or None,
        "max_workers": container.max_workers,
        "in_flight": container.in_flight,
        "entrypoints": _entrypoints(container),
        "stats": {
            "handled": stats.handled,
            "errors": stats.errors,
            "expired": stats.expired,
            "malformed": stats.malformed,
            "dead_lettered": stats.dead_lettered,
            "duplicates": stats.duplicates,
            "last_error": stats.last_error or None,
            "processing_time": round(stats.processing_time, 6),
        },
        # Circuit breaker and bulkhead of each RPC dependency, by target (docs/resilience.md).
        "breakers": {target: guard.describe() for target, guard in guards_of(container).items()},
    }


def _grace(request: Request) -> float | Response | None:
    """``?grace=<seconds>``, None when absent, or the 400 answer to a bad value."""
    if "grace" not in request.query_params:
        return None
    try:
        grace = float(request.query_params["grace"])
    except ValueError:
        grace = math.nan
    if not 0 <= grace <= 24 * 3600:  # also refuses NaN
        return error_response(400, "grace must be a number of seconds, 0 to 86400")
    return grace


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unknown(request: Request) -> Response:
    return error_response(404, f"no service named {request.path_params['name']!r} runs here")


def _busy(container: ServiceContainer) -> Response:
    return error_response(
        409, f"{container.service_name} is {container.state.value}; try again when it settles"
    )

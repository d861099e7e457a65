"""Orchestrated sagas: steps with an action and a compensation, their state persisted in the
service's database, resumed after a crash, compensated in reverse order on failure or
timeout (docs/sagas.md).

::

    class PlaceOrder(Saga):
        name = "place_order"
        timeout = 30.0

        @step
        async def charge(self, data: dict, key: str) -> None:
            data["payment"] = await self.service.payments.charge(data["order"], key)

        @charge.compensate
        async def refund(self, data: dict, key: str) -> None:
            await self.service.payments.refund(data["order"], key)

    class Orders(Service):
        name = "orders"
        payments = Dependency("payments")
        sagas = Sagas(PlaceOrder)

        @rpc
        async def place(self, order: int) -> str:
            saga = await self.sagas.run(PlaceOrder, {"order": order})
            return saga["status"]

Each action and compensation gets an idempotency ``key`` of its own, the same on every
attempt: a participant that records it (``Outbox.inbox(key)``) does the work once however
often a crash makes the saga repeat the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec

from basidia.container import State
from basidia.data.db import Connection, Database, DatabaseError
from basidia.data.outbox import Backoff, DatabaseProvider
from basidia.errors import (
    BasidiaError,
    BrokerError,
    ConfigError,
    RpcTimeout,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from basidia.container import ServiceContainer
    from basidia.context import CallContext

__all__ = ["STATUSES", "Saga", "SagaNotFound", "Sagas", "get_saga", "list_sagas", "step"]

logger = logging.getLogger("basidia.data.saga")

StepFunction = Callable[[Any, dict[str, Any], str], Awaitable[Any]]
F = TypeVar("F", bound=StepFunction)

#: A saga's statuses: ``running`` and ``compensating`` are unfinished; ``completed``,
#: ``compensated`` and ``failed`` (a compensation kept failing) are final.
STATUSES = ("running", "compensating", "completed", "compensated", "failed")
UNFINISHED = ("running", "compensating")

# Errors after which a step's outcome is unknown and the call is worth repeating.
TRANSIENT = (ServiceUnavailable, RpcTimeout, BrokerError, DatabaseError, TimeoutError, OSError)

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


class SagaNotFound(BasidiaError, LookupError):
    """No saga has that id in the database."""


class _NotOwner(Exception):
    """This instance's lease on a saga ran out and another instance claimed it."""


class Step:
    """One step of a saga: an action and an optional compensation (``@step``)."""

    def __init__(self, action: StepFunction) -> None:
        self.action = action
        self.name = action.__name__
        self.compensation: StepFunction | None = None

    def compensate(self, func: F) -> F:
        """Declare ``func`` as this step's compensation."""
        self.compensation = func
        return func

    def __repr__(self) -> str:
        return f"<Step {self.name}>"


def step(func: StepFunction) -> Step:
    """Declare a step; steps run in the order they are declared in the class."""
    return Step(func)


class Saga:
    """Base class of a saga: ``name``, ``timeout`` (seconds, from start to completion) and
    its ``@step`` methods.  ``self.service`` is an instance of the service running it,
    with its dependencies (RPC proxies, the outbox) injected."""

    name: ClassVar[str] = ""
    timeout: ClassVar[float] = 60.0
    #: How many times a compensation is tried before the saga is marked ``failed``.
    compensation_attempts: ClassVar[int] = 20
    steps: ClassVar[tuple[Step, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            cls.name = cls.__name__
        found = [value for value in vars(cls).values() if isinstance(value, Step)]
        cls.steps = tuple(base for base in cls.steps if base not in found) + tuple(found)
        if not cls.steps:
            raise TypeError(f"saga {cls.__name__} declares no @step")
        if not cls.timeout > 0:
            raise TypeError(f"saga {cls.__name__}: timeout must be positive")

    def __init__(self, service: Any) -> None:
        self.service = service


class Sagas(DatabaseProvider):
    """Runs a service's sagas and keeps their state in its database.

    Declared with the saga classes it runs; the database is chosen like the outbox's
    (``url``, else config ``config_key``, else ``sqlite:///<service>.db``).  At start it
    resumes the unfinished sagas of this service whose owner is gone: an instance owns a
    saga while it renews its ``lease`` (seconds).
    """

    def __init__(
        self,
        *sagas: type[Saga],
        url: str | None = None,
        config_key: str = "database.url",
        schema: str | None = None,
        lease: float = 15.0,
        backoff_cap: float = 5.0,
    ) -> None:
        super().__init__(url, config_key=config_key, schema=schema)
        self.sagas = {saga.name: saga for saga in sagas}
        if len(self.sagas) != len(sagas):
            raise ConfigError("two sagas with the same name")
        if not lease > 0:
            raise ConfigError("lease must be positive")
        self.lease = lease
        self.backoff_cap = backoff_cap
        self.owner = ""
        self._running: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._maintainer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Sagas({', '.join(self.sagas)})"

    @property
    def service_name(self) -> str:
        return self.container.service_name

    async def setup(self) -> None:
        self.db = await self.open()
        self.owner = f"{self.service_name}/{uuid.uuid4().hex[:12]}"
        self._running = {}
        self._waiters = {}
        self._maintainer = asyncio.create_task(
            self._maintain(), name=f"basidia-sagas-{self.service_name}"
        )

    async def stop(self) -> None:
        self.owner, owner = "", self.owner
        tasks = [t for t in (self._maintainer, *self._running.values()) if t is not None]
        self._maintainer = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Give the sagas up at once, so another instance resumes them without waiting.
        with contextlib.suppress(Exception):
            await self.db.execute(
                "UPDATE basidia_sagas SET lease_until = 0, owner = NULL WHERE owner = $1",
                owner,
            )
        await self.db.close()

    def get_dependency(self, ctx: CallContext | None) -> SagaHandle:
        return SagaHandle(self)

    # -- starting and resuming -----------------------------------------------------

    def _saga_class(self, saga: type[Saga] | str) -> type[Saga]:
        name = saga if isinstance(saga, str) else saga.name
        found = self.sagas.get(name)
        if found is None:
            known = ", ".join(self.sagas) or "none"
            raise ConfigError(f"{self.service_name} runs no saga {name!r} (it runs: {known})")
        return found

    async def start(
        self, saga: type[Saga] | str, data: dict[str, Any], *, saga_id: str | None = None
    ) -> str:
        """Persist a new saga and start running it; return its id.

        With a ``saga_id`` that exists already, nothing new starts: the id is returned
        (so a retried request does not start a second saga)."""
        cls = self._saga_class(saga)
        saga_id = saga_id or uuid.uuid4().hex
        now = time.time()
        async with self.db.transaction() as conn:
            created = await conn.execute(
                "INSERT INTO basidia_sagas (id, name, service, status, step, data, created_at, "
                "updated_at, deadline, owner, lease_until) "
                "VALUES ($1, $2, $3, 'running', 0, $4, $5, $5, $6, $7, $8) "
                "ON CONFLICT DO NOTHING",
                saga_id,
                cls.name,
                self.service_name,
                _json_encode(data).decode(),
                now,
                now + cls.timeout,
                self.owner,
                now + self.lease,
            )
            if created:
                await conn.executemany(
                    "INSERT INTO basidia_saga_steps (saga_id, position, name, status, updated_at) "
                    "VALUES ($1, $2, $3, 'pending', $4)",
                    [(saga_id, i, s.name, now) for i, s in enumerate(cls.steps)],
                )
        if created:
            self._launch(saga_id)
        return saga_id

    async def wait(self, saga_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The saga once it has finished (completed, compensated or failed)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(saga_id, []).append(future)
        try:
            record = await get_saga(self.db, saga_id)
            if record is None:
                raise SagaNotFound(f"no saga {saga_id!r} in {self.db.safe_url}")
            if record["status"] not in UNFINISHED:
                return record
            async with asyncio.timeout(timeout):
                return await future
        finally:
            waiters = self._waiters.get(saga_id, [])
            if future in waiters:
                waiters.remove(future)

    def _launch(self, saga_id: str) -> None:
        if saga_id in self._running:
            return
        task = asyncio.create_task(self._execute(saga_id), name=f"basidia-saga-{saga_id}")
        self._running[saga_id] = task
        task.add_done_callback(lambda _: self._running.pop(saga_id, None))

    async def _maintain(self) -> None:
        """Renew the leases of the sagas run here; claim orphans whose lease ran out."""
        # Resumed sagas need the service's other dependencies: wait until it runs.
        while self.container.state is not State.RUNNING:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.02)
        interval = self.lease / 3
        while True:
            try:
                now = time.time()
                async with self.db.transaction() as conn:
                    # Only the sagas running here: one whose task ended on an error (a
                    # database outage, say) lets its lease run out and is resumed.
                    if self._running:
                        await conn.executemany(
                            "UPDATE basidia_sagas SET lease_until = $1 "
                            "WHERE id = $2 AND owner = $3",
                            [(now + self.lease, saga_id, self.owner) for saga_id in self._running],
                        )
                    orphans = await conn.fetch(
                        "SELECT id FROM basidia_sagas WHERE service = $1 AND status IN "
                        "('running', 'compensating') AND lease_until < $2 ORDER BY created_at",
                        self.service_name,
                        now,
                    )
                for (saga_id,) in orphans:
                    if await self._claim(saga_id):
                        logger.info("%s: resuming saga %s", self.service_name, saga_id)
                        self._launch(saga_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("%s: saga upkeep failed: %s", self.service_name, exc)
            await asyncio.sleep(interval)

    async def _claim(self, saga_id: str) -> bool:
        now = time.time()
        claimed = await self.db.execute(
            "UPDATE basidia_sagas SET owner = $1, lease_until = $2 "
            "WHERE id = $3 AND lease_until < $4 AND status IN ('running', 'compensating')",
            self.owner,
            now + self.lease,
            saga_id,
            now,
        )
        return claimed == 1

    # -- running ------------------------------------------------------------------

    async def _execute(self, saga_id: str) -> None:
        try:
            record = await self._run_saga(saga_id)
        except asyncio.CancelledError:
            raise
        except _NotOwner:
            logger.info("%s: saga %s is run by another instance now", self.service_name, saga_id)
            return
        except Exception:
            logger.exception("%s: saga %s stopped on an error", self.service_name, saga_id)
            return
        if record is not None:
            for future in self._waiters.pop(saga_id, []):
                if not future.done():
                    future.set_result(record)

    async def _run_saga(self, saga_id: str) -> dict[str, Any] | None:
        row = await self._load(saga_id)
        if row is None:
            return None
        cls = self._saga_class(row["name"])
        saga = cls(self.container.make_instance(None))
        data: dict[str, Any] = _json_decode(row["data"])
        status: str = row["status"]
        position: int = row["step"]
        deadline: float = row["deadline"]
        steps = cls.steps
        backoff = Backoff(cap=self.backoff_cap)
        error: str | None = row["error"]

        while status == "running":
            if position >= len(steps):
                status = "completed"
                await self._save(saga_id, status=status, step=position, data=data)
                break
            current = steps[position]
            remaining = deadline - time.time()
            if remaining <= 0:
                error = f"timed out after {cls.timeout:g} s at step {current.name}"
                status, position = "compensating", await self._last_touched(saga_id, position)
                await self._save(saga_id, status=status, step=position, error=error)
                break
            await self._step_status(saga_id, position, "started", count=True)
            key = f"{saga_id}:{current.name}"
            try:
                async with asyncio.timeout(remaining):
                    await current.action(saga, data, key)
            except TRANSIENT as exc:
                delay = backoff.next()
                logger.warning(
                    "saga %s: step %s: %s; again in %.2f s", saga_id, current.name, exc, delay
                )
                await self._step_status(saga_id, position, "started", error=_text(exc))
                await asyncio.sleep(min(delay, max(deadline - time.time(), 0)))
                continue
            except Exception as exc:
                error = f"step {current.name} failed: {_text(exc)}"
                await self._step_status(saga_id, position, "failed", error=_text(exc))
                status, position = "compensating", position - 1
                await self._save(saga_id, status=status, step=position, data=data, error=error)
                break
            backoff.reset()
            position += 1
            await self._step_status(saga_id, position - 1, "done")
            await self._save(saga_id, status=status, step=position, data=data)

        attempts = 0
        while status == "compensating":
            if position < 0:
                status = "compensated"
                await self._save(saga_id, status=status, step=0, data=data)
                break
            current = steps[position]
            key = f"{saga_id}:{current.name}:compensate"
            if current.compensation is not None:
                try:
                    await current.compensation(saga, data, key)
                except Exception as exc:
                    attempts += 1
                    await self._step_status(saga_id, position, "compensating", error=_text(exc))
                    if attempts >= cls.compensation_attempts:
                        status = "failed"
                        error = f"compensation of {current.name} failed: {_text(exc)}"
                        await self._save(saga_id, status=status, step=position, error=error)
                        break
                    delay = backoff.next()
                    logger.warning(
                        "saga %s: compensation of %s: %s; again in %.2f s",
                        saga_id,
                        current.name,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
            attempts = 0
            backoff.reset()
            await self._step_status(saga_id, position, "compensated")
            position -= 1
            await self._save(saga_id, status=status, step=position, data=data)
        return await get_saga(self.db, saga_id)

    async def _load(self, saga_id: str) -> Any:
        async with self.db.transaction() as conn:
            return await conn.fetchrow(
                "SELECT name, status, step, data, deadline, error FROM basidia_sagas "
                "WHERE id = $1 AND owner = $2",
                saga_id,
                self.owner,
            )

    async def _last_touched(self, saga_id: str, position: int) -> int:
        """Where compensation starts: the current step if it was started (its outcome is
        unknown), else the one before it."""
        async with self.db.transaction() as conn:
            status = await conn.fetchval(
                "SELECT status FROM basidia_saga_steps WHERE saga_id = $1 AND position = $2",
                saga_id,
                position,
            )
        return position if status == "started" else position - 1

    async def _save(
        self,
        saga_id: str,
        *,
        status: str,
        step: int,
        data: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        now = time.time()
        async with self.db.transaction() as conn:
            changed = await conn.execute(
                "UPDATE basidia_sagas SET status = $1, step = $2, "
                "data = COALESCE($3, data), error = COALESCE($4, error), updated_at = $5, "
                "lease_until = $6 WHERE id = $7 AND owner = $8",
                status,
                step,
                None if data is None else _json_encode(data).decode(),
                error,
                now,
                now + self.lease,
                saga_id,
                self.owner,
            )
        if changed != 1:
            # Another instance took the saga over (our lease ran out): it goes on there.
            raise _NotOwner(saga_id)

    async def _step_status(
        self,
        saga_id: str,
        position: int,
        status: str,
        *,
        error: str | None = None,
        count: bool = False,
    ) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE basidia_saga_steps SET status = $1, error = $2, updated_at = $3, "
                "attempts = attempts + $4 WHERE saga_id = $5 AND position = $6",
                status,
                error,
                time.time(),
                1 if count else 0,
                saga_id,
                position,
            )


def _text(exc: BaseException) -> str:
    text = str(exc)
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:1000]


class SagaHandle:
    """What a service instance sees of its ``Sagas``."""

    __slots__ = ("_provider",)

    def __init__(self, provider: Sagas) -> None:
        self._provider = provider

    async def start(
        self, saga: type[Saga] | str, data: dict[str, Any], *, saga_id: str | None = None
    ) -> str:
        """Start a saga in the background; return its id (see ``Sagas.start``)."""
        return await self._provider.start(saga, data, saga_id=saga_id)

    async def run(
        self,
        saga: type[Saga] | str,
        data: dict[str, Any],
        *,
        saga_id: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Start a saga and wait until it has finished; return it (``get``)."""
        provider = self._provider
        saga_id = await provider.start(saga, data, saga_id=saga_id)
        return await provider.wait(saga_id, timeout)

    async def get(self, saga_id: str) -> dict[str, Any] | None:
        """One saga with its steps, or None."""
        return await get_saga(self._provider.db, saga_id)

    async def list(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """This database's sagas, newest first."""
        return await list_sagas(self._provider.db, status=status, limit=limit)


# -- reading, for the management API and ``basidia sagas`` --------------------------------

_SUMMARY = "id, name, service, status, step, error, created_at, updated_at, deadline, owner"


def _summary(row: Any) -> dict[str, Any]:
    return {key: row[key] for key in _SUMMARY.split(", ")}


async def list_sagas(
    db: Database, *, status: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Sagas newest first, optionally only those with ``status``."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown saga status {status!r}: one of {', '.join(STATUSES)}")
    if not 0 < limit <= 10_000:
        raise ValueError("limit must be 1 to 10000")
    async with db.transaction() as conn:
        if status is None:
            rows = await conn.fetch(
                f"SELECT {_SUMMARY} FROM basidia_sagas ORDER BY created_at DESC LIMIT $1", limit
            )
        else:
            rows = await conn.fetch(
                f"SELECT {_SUMMARY} FROM basidia_sagas WHERE status = $1 "
                "ORDER BY created_at DESC LIMIT $2",
                status,
                limit,
            )
    return [_summary(row) for row in rows]


async def get_saga(db: Database, saga_id: str) -> dict[str, Any] | None:
    """One saga: its summary, its data and its steps in order."""
    async with db.transaction() as conn:
        return await _get(conn, saga_id)


async def _get(conn: Connection, saga_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(f"SELECT {_SUMMARY}, data FROM basidia_sagas WHERE id = $1", saga_id)
    if row is None:
        return None
    steps = await conn.fetch(
        "SELECT position, name, status, attempts, error, updated_at FROM basidia_saga_steps "
        "WHERE saga_id = $1 ORDER BY position",
        saga_id,
    )
    record = _summary(row)
    record["data"] = _json_decode(row["data"])
    record["steps"] = [
        {key: s[key] for key in ("name", "status", "attempts", "error", "updated_at")}
        for s in steps
    ]
    return record


# -- the management API's view (basidia/http/management.py) -------------------------------


def _coordinators(containers: Iterable[ServiceContainer]) -> list[Sagas]:
    """The ``Sagas`` of running services (those whose database is open)."""
    return [
        provider
        for container in containers
        for provider in container.dependencies.values()
        if isinstance(provider, Sagas) and provider.owner and "db" in vars(provider)
    ]


async def running_sagas(
    containers: Iterable[ServiceContainer], *, status: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The sagas in the databases of these services, newest first."""
    found: dict[str, dict[str, Any]] = {}
    for provider in _coordinators(containers):
        for saga in await list_sagas(provider.db, status=status, limit=limit):
            found.setdefault(saga["id"], saga)
    return sorted(found.values(), key=lambda saga: saga["created_at"], reverse=True)[:limit]


async def find_saga(containers: Iterable[ServiceContainer], saga_id: str) -> dict[str, Any] | None:
    """One saga from the databases of these services, or None."""
    for provider in _coordinators(containers):
        saga = await get_saga(provider.db, saga_id)
        if saga is not None:
            return saga
    return None

"""One view of the cluster on every broker: who runs which service where (docs/operations.md).

Each runner announces its services on the broker (service, instance, host, pid, version,
state, entrypoints, broker) and renews the announcement with a heartbeat; whoever watches
the directory (``basidia services``, ``Cluster.services``, an adapter that cannot tell "no
responders") keeps the latest record of each instance and forgets it once its heartbeat is
overdue.  Everything travels as ordinary events through the broker contract
(``publish_event`` and a broadcast, non-durable ``subscribe_events``), so every adapter
that passes the contract suite carries the directory without code of its own:

* ``announce``: a process's services, sent at start, on every change of state and every
  ``directory_heartbeat`` seconds; it holds for ``directory_expiry`` seconds;
* ``leave``: the process stops (its records go at once);
* ``ping``: a new watcher asks every process to announce now, so that a fresh view is
  complete within one round trip rather than one heartbeat.

Announcements and goodbyes go out on ``basidia.directory``, which only watchers consume;
pings on ``basidia.directory.ping``, which every announcing process consumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from basidia._speedups import Frame, Kind, decode_frame, encode_frame
from basidia.brokers.base import Delivery, EventSubscription, Subscription
from basidia.context import IDEMPOTENCY_HEADER
from basidia.errors import BasidiaError, FrameError
from basidia.log import ThrottledLog

if TYPE_CHECKING:
    from basidia.brokers.base import Broker

__all__ = ["DIRECTORY_EVENT", "Directory", "Instance", "format_table"]

logger = logging.getLogger("basidia.directory")

#: The event names the directory travels on (reserved: services should not use them).
DIRECTORY_EVENT = "basidia.directory"
PING_EVENT = "basidia.directory.ping"
# Announcements are small; a record this large is refused rather than sent.
_MAX_FRAME = 1024 * 1024
# Seconds ``close`` waits for the heartbeat to end.
_CLOSE_TIMEOUT = 2.0


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One running (or stopped, or failed) service instance as the directory shows it."""

    service: str
    #: The process that hosts it; a service has at most one instance per process.
    instance: str
    host: str
    pid: int
    version: str
    #: INITIALIZED, STARTING, RUNNING, STOPPING, STOPPED or ERROR.
    state: str
    #: Why it is in ERROR; "" otherwise.
    error: str = ""
    #: Entrypoint names by kind (``rpc``, ``events``, ``http``, ``timers``...).
    entrypoints: dict[str, list[str]] = {}
    #: The broker URL, without credentials.
    broker: str = ""
    #: Seconds since the epoch when it last started; 0 if never.
    started_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``basidia services --json``)."""
        return {name: getattr(self, name) for name in self.__struct_fields__}


class _Message(msgspec.Struct, kw_only=True, omit_defaults=True):
    op: str
    process: str
    #: Seconds the announcement holds without a renewal.
    ttl: float = 0.0
    instances: list[Instance] = []


_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.Decoder(_Message).decode


class _Seen:
    __slots__ = ("expires", "instances")

    def __init__(self, instances: list[Instance], expires: float) -> None:
        self.instances = instances
        self.expires = expires


class Directory:
    """The directory as one process takes part in it: announcing its own services (once
    ``announce`` is given a source of them) and, once ``watch`` runs, keeping the view of
    every process on the broker."""

    def __init__(
        self,
        broker: Broker,
        *,
        heartbeat: float = 5.0,
        expiry: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self.heartbeat = heartbeat
        self.expiry = expiry
        self._clock = clock
        #: This process's id in the directory: the ``instance`` of its services.
        self.process = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._source: Callable[[], Sequence[Instance]] | None = None
        self._seen: dict[str, _Seen] = {}
        self._subscription: Subscription | None = None
        self._pings: Subscription | None = None
        self._watch_lock = asyncio.Lock()
        self._watching_since = 0.0
        self._beat: asyncio.Task[None] | None = None
        self._closing = False
        self._wake = asyncio.Event()
        self._failures = ThrottledLog(logger)

    def __repr__(self) -> str:
        return f"<Directory {self.process} on {self._broker.safe_url}>"

    # -- announcing ----------------------------------------------------------------------------

    def announce(self, source: Callable[[], Sequence[Instance]]) -> None:
        """Announce the instances ``source()`` returns now, on every ``changed()`` and every
        heartbeat, until ``close``."""
        self._source = source
        if self._beat is None:
            self._closing = False
            self._beat = asyncio.get_running_loop().create_task(
                self._heartbeat(), name="basidia-directory-heartbeat"
            )

    def changed(self) -> None:
        """Something announced changed (a state): announce again soon."""
        self._wake.set()

    async def _heartbeat(self) -> None:
        while not self._closing:
            self._wake.clear()
            try:
                if self._pings is None:
                    await self._listen_for_pings()
                await self._send_announcement()
            except Exception:  # the heartbeat must outlive any one failure
                logger.exception("the service directory's heartbeat failed; retrying")
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the
            # cancellation that ``close`` sends when the wake-up comes at the same time.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat):
                    await self._wake.wait()

    async def _send_announcement(self) -> None:
        if self._source is None:
            return
        instances = list(self._source())
        message = _Message(
            op="announce", process=self.process, ttl=self.expiry, instances=instances
        )
        # Our own view needs no round trip through the broker.
        self._remember(message)
        await self._publish(message)

    async def _listen_for_pings(self) -> None:
        subscription = EventSubscription(PING_EVENT, PING_EVENT, broadcast=True, durable=False)
        try:
            self._pings = await self._broker.subscribe_events(
                subscription, self._on_delivery, concurrency=1
            )
        except (BasidiaError, OSError) as exc:
            # The broker is down: the next heartbeat tries again.
            self._failures.log(
                logging.WARNING, "directory", "could not join the service directory: %s", exc
            )

    async def _publish(self, message: _Message) -> None:
        key = uuid.uuid4().hex
        event = PING_EVENT if message.op == "ping" else DIRECTORY_EVENT
        frame = Frame(Kind.EVENT, 0, event, _encode(message), "", 0, {IDEMPOTENCY_HEADER: key}, 0)
        try:
            body = encode_frame(frame, _MAX_FRAME)
            await self._broker.publish_event(event, body, idempotency_key=key)
        except (BasidiaError, OSError) as exc:
            # The broker is down or refuses: the next heartbeat tries again.
            self._failures.log(
                logging.WARNING,
                "directory",
                "could not publish to the service directory (%s): %s",
                message.op,
                exc,
            )

    # -- watching ------------------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """Whether this process keeps the view of the cluster."""
        return self._subscription is not None

    async def watch(self) -> None:
        """Start keeping the view of every process on the broker and ask them all to
        announce themselves now (idempotent)."""
        async with self._watch_lock:
            if self._subscription is not None:
                return
            subscription = EventSubscription(
                DIRECTORY_EVENT, DIRECTORY_EVENT, broadcast=True, durable=False
            )
            self._subscription = await self._broker.subscribe_events(
                subscription, self._on_delivery, concurrency=1
            )
            self._watching_since = self._clock()
        await self._publish(_Message(op="ping", process=self.process))

    async def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message = _decode(decode_frame(delivery.body, _MAX_FRAME).payload)
        except (FrameError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._failures.log(
                logging.WARNING, "bad record", "ignored a malformed directory message: %s", exc
            )
        else:
            self._receive(message)
        await delivery.ack()

    def _receive(self, message: _Message) -> None:
        if message.op == "announce":
            if message.process != self.process:  # our own is remembered when sent
                self._remember(message)
        elif message.op == "leave":
            self._seen.pop(message.process, None)
        elif message.op == "ping" and self._source is not None:
            self.changed()

    def _remember(self, message: _Message) -> None:
        ttl = max(0.0, min(message.ttl, 24 * 3600.0))
        self._seen[message.process] = _Seen(message.instances, self._clock() + ttl)

    def instances(self, service: str | None = None) -> list[Instance]:
        """The instances whose announcement still holds (of ``service``, or all), by
        service name and host; expired ones are forgotten."""
        now = self._clock()
        for process in [p for p, seen in self._seen.items() if seen.expires < now]:
            del self._seen[process]
        found = [
            instance
            for seen in self._seen.values()
            for instance in seen.instances
            if service is None or instance.service == service
        ]
        return sorted(found, key=lambda i: (i.service, i.host, i.pid, i.instance))

    @property
    def complete(self) -> bool:
        """Whether the view holds every live instance: it has watched for a heartbeat."""
        return self.watching and self._clock() - self._watching_since >= self.heartbeat

    def has_live_instance(self, service: str) -> bool | None:
        """True when a RUNNING instance of ``service`` is announced, False when the view is
        complete and none is, None while the directory cannot tell (not watching, or
        watching for less than a heartbeat).  Adapters whose broker cannot say "no
        responders" raise ``ServiceUnavailable`` on False (``Broker.no_live_instance``)."""
        if any(instance.state == "RUNNING" for instance in self.instances(service)):
            return True
        return False if self.complete else None

    async def snapshot(self, wait: float = 1.0) -> list[Instance]:
        """Every instance on the broker: starts watching if need be, then gives the
        processes ``wait`` seconds to answer (none once the view is complete)."""
        await self.watch()
        remaining = self._watching_since + wait - self._clock()
        if remaining > 0 and not self.complete:
            await asyncio.sleep(remaining)
        return self.instances()

    # -- closing -------------------------------------------------------------------------------

    async def close(self, *, leave: bool = True) -> None:
        """Stop the heartbeat (and say goodbye when ``leave``) and stop watching."""
        beat, self._beat = self._beat, None
        if beat is not None:
            # A client library may swallow the cancellation in the middle of a publish
            # (redis-py does): the loop also ends on ``_closing``, and is not awaited for
            # longer than a publish takes to fail.
            self._closing = True
            self._wake.set()
            beat.cancel()
            await asyncio.wait({beat}, timeout=_CLOSE_TIMEOUT)
            if leave and self._broker.connected:
                await self._publish(_Message(op="leave", process=self.process))
        for subscription in (self._subscription, self._pings):
            if subscription is not None:
                with contextlib.suppress(BasidiaError, OSError):
                    await subscription.cancel()
        self._subscription = self._pings = None
        self._seen.clear()
        self._source = None


# -- the table ------------------------------------------------------------------------------------


def _entrypoints(entrypoints: Mapping[str, Iterable[str]]) -> str:
    parts = [f"{kind}:{len(list(names))}" for kind, names in sorted(entrypoints.items()) if names]
    return " ".join(parts) or "-"


def format_table(instances: Sequence[Instance], *, now: float | None = None) -> str:
    """``basidia services``'s table: one line per instance."""
    now = time.time() if now is None else now
    header = ("SERVICE", "INSTANCE", "HOST", "PID", "VERSION", "STATE", "UP", "ENTRYPOINTS")
    rows = [header]
    for item in instances:
        state = item.state if not item.error else f"{item.state} ({item.error})"
        up = (
            _duration(now - item.started_at) if item.started_at and item.state == "RUNNING" else "-"
        )
        rows.append(
            (
                item.service,
                item.instance,
                item.host,
                str(item.pid),
                item.version,
                state,
                up,
                _entrypoints(item.entrypoints),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"

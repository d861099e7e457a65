"""The broker interface: what an adapter must do, and nothing of RPC or event semantics.

Adapters move opaque frames (``bytes``).  Everything about requests, replies,
errors, retries and dead-lettering policy lives above them, in the framework,
so that every broker behaves the same.  An adapter offers four channels:

* **requests**: one queue per service, competing consumers (``serve_requests``,
  ``send_request``);
* **replies**: one inbox per process (``open_inbox``, ``send_reply``);
* **events**: durable, at-least-once where the broker allows, one consumer group
  per (service, handler) or one private subscription per instance for
  broadcast handlers (``subscribe_events``, ``publish_event``);
* **health**: ``connected``.

Dead letters look the same on every broker: a ``DeadLetter`` record, kept in the
headers named here (``dead_letter_headers``, ``read_dead_letter``) beside the original
frame, and listed with ``Broker.dead_letters`` (docs/dead-letters.md).

Every method that awaits the network must finish or fail within a deadline;
none may hang while the broker is down.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from basidia._speedups import HARD_MAX_FRAME_SIZE
from basidia.errors import ConnectionLost

if TYPE_CHECKING:
    from basidia.directory import Directory

__all__ = [
    "DEAD_LETTER_HEADERS",
    "Broker",
    "DeadLetter",
    "Delivery",
    "DeliveryHandler",
    "DisconnectCallback",
    "EndpointStats",
    "EventSubscription",
    "Failure",
    "InboxHandler",
    "ServiceInfo",
    "Subscription",
    "dead_letter_headers",
    "make_dead_letter",
    "read_dead_letter",
]


# -- dead letters -------------------------------------------------------------------------------

#: A dead letter's headers, the same on every broker (docs/dead-letters.md): lower-case
#: names, string values, times in milliseconds since the epoch.
REASON_HEADER = "basidia-reason"
EXCEPTION_HEADER = "basidia-exception"
ATTEMPTS_HEADER = "basidia-attempts"
FIRST_FAILURE_HEADER = "basidia-first-failure"
LAST_FAILURE_HEADER = "basidia-last-failure"
SERVICE_HEADER = "basidia-service"
HANDLER_HEADER = "basidia-handler"
EVENT_HEADER = "basidia-event"
GROUP_HEADER = "basidia-group"
#: Only on a dead letter whose frame was cut to fit the broker (NATS ``max_payload``).
TRUNCATED_FROM_HEADER = "basidia-truncated-from"
DEAD_LETTER_HEADERS = (
    REASON_HEADER,
    EXCEPTION_HEADER,
    ATTEMPTS_HEADER,
    FIRST_FAILURE_HEADER,
    LAST_FAILURE_HEADER,
    SERVICE_HEADER,
    HANDLER_HEADER,
    EVENT_HEADER,
    GROUP_HEADER,
    TRUNCATED_FROM_HEADER,
)
#: The names earlier releases wrote (``x-basidia-*`` on RabbitMQ, ``Basidia-*`` on NATS):
#: still read, never written, so that letters parked before an upgrade can be listed.
_LEGACY_NAMES: dict[str, tuple[str, ...]] = {
    REASON_HEADER: ("x-basidia-reason", "Basidia-Dead-Letter-Reason"),
    ATTEMPTS_HEADER: ("x-basidia-attempt", "Basidia-Attempts"),
    LAST_FAILURE_HEADER: ("x-basidia-dead-lettered-at",),
    EVENT_HEADER: ("x-basidia-event", "Basidia-Event"),
    GROUP_HEADER: ("x-basidia-group", "Basidia-Group"),
    TRUNCATED_FROM_HEADER: ("Basidia-Truncated-From",),
}

#: Longest reason kept (tracebacks can be long), and longest name (exception type,
#: service, handler).
MAX_REASON_CHARS = 4096
_MAX_NAME_CHARS = 256
# Control characters cannot travel in a NATS header (nats-py turns CR and LF into
# blanks and strips the ends): every broker's record gets the same text.
_CONTROLS = {code: " " for code in (*range(32), 127)}


def _clean(text: str, limit: int) -> str:
    return text[: limit * 2].translate(_CONTROLS).strip()[:limit]


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the framework gives up on an event (``Delivery.dead_letter``).

    ``exception`` is the type name of what the handler raised; "" when the failure was
    not the handler's (a malformed frame, invalid data, a crash loop).
    """

    reason: str
    exception: str = ""
    service: str = ""
    handler: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event parked after its last attempt, the same on every broker.

    Times are seconds since the epoch (milliseconds where the broker keeps them in
    headers).  ``frame`` is the original frame as the broker kept it: whole, unless
    ``truncated_from`` (its original size) says it had to be cut to fit the broker.
    """

    event: str
    #: The consumer group, ``service.handler``.
    group: str
    service: str
    handler: str
    reason: str
    #: The exception's type name; "" when the failure was not the handler's.
    exception: str
    attempts: int
    first_failure: float
    last_failure: float
    frame: bytes
    truncated_from: int = 0
    #: The broker's own handle on this letter (a message sequence, a stream entry id),
    #: used to show, replay or purge one letter; "" where the adapter has none.
    id: str = ""


def make_dead_letter(
    failure: Failure,
    *,
    event: str,
    group: str,
    attempts: int,
    frame: bytes,
    first_failure: float | None = None,
    last_failure: float | None = None,
) -> DeadLetter:
    """The record of ``failure``, as every adapter makes it: the text cleaned and cut the
    same way everywhere, the service and handler taken from the group when the failure
    does not name them, ``last_failure`` now by default, ``first_failure`` no later than it
    (``last_failure`` when the broker could not carry it)."""
    last = time.time() if last_failure is None else last_failure
    first = last if first_failure is None or first_failure <= 0 else min(first_failure, last)
    service, handler = failure.service, failure.handler
    if not (service and handler):
        group_service, _, group_handler = group.rpartition(".")
        service, handler = service or group_service, handler or group_handler
    return DeadLetter(
        event=event,
        group=group,
        service=_clean(service, _MAX_NAME_CHARS),
        handler=_clean(handler, _MAX_NAME_CHARS),
        reason=_clean(failure.reason, MAX_REASON_CHARS) or "unknown",
        exception=_clean(failure.exception, _MAX_NAME_CHARS),
        attempts=max(1, attempts),
        first_failure=first,
        last_failure=last,
        frame=frame,
    )


def _millis(seconds: float) -> str:
    return str(int(seconds * 1000))


def dead_letter_headers(letter: DeadLetter) -> dict[str, str]:
    """The headers that carry ``letter`` beside its frame (all values strings).

    ``basidia-truncated-from`` is written only for a frame that was cut.
    """
    headers = {
        REASON_HEADER: letter.reason,
        EXCEPTION_HEADER: letter.exception,
        ATTEMPTS_HEADER: str(letter.attempts),
        FIRST_FAILURE_HEADER: _millis(letter.first_failure),
        LAST_FAILURE_HEADER: _millis(letter.last_failure),
        SERVICE_HEADER: letter.service,
        HANDLER_HEADER: letter.handler,
        EVENT_HEADER: letter.event,
        GROUP_HEADER: letter.group,
    }
    if letter.truncated_from:
        headers[TRUNCATED_FROM_HEADER] = str(letter.truncated_from)
    return headers


def _header(headers: Mapping[str, Any], name: str) -> str:
    value = headers.get(name)
    if value is None:
        for legacy in _LEGACY_NAMES.get(name, ()):
            value = headers.get(legacy)
            if value is not None:
                break
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _number(headers: Mapping[str, Any], name: str) -> int:
    try:
        return int(_header(headers, name).strip() or 0)
    except ValueError:
        return 0


def read_dead_letter(headers: Mapping[str, Any], body: bytes) -> DeadLetter:
    """The record carried by a dead letter's ``headers`` and ``body`` (its frame).

    Values may be strings, bytes or numbers (AMQP headers are typed); a missing or
    unreadable value reads as "" or 0.  Letters written by earlier releases
    (``x-basidia-*``, ``Basidia-*``) are read too.
    """
    group = _header(headers, GROUP_HEADER)
    group_service, _, group_handler = group.rpartition(".")
    last = _number(headers, LAST_FAILURE_HEADER) / 1000
    first = _number(headers, FIRST_FAILURE_HEADER) / 1000
    return DeadLetter(
        event=_header(headers, EVENT_HEADER),
        group=group,
        service=_header(headers, SERVICE_HEADER) or group_service,
        handler=_header(headers, HANDLER_HEADER) or group_handler,
        reason=_header(headers, REASON_HEADER),
        exception=_header(headers, EXCEPTION_HEADER),
        attempts=_number(headers, ATTEMPTS_HEADER),
        first_failure=first or last,
        last_failure=last,
        frame=body,
        truncated_from=_number(headers, TRUNCATED_FROM_HEADER),
    )


class Delivery:
    """One message handed to a consumer, with its settlement operations.

    Exactly one of ``ack``, ``nack`` or ``dead_letter`` is called per delivery
    for event deliveries; for requests, ``ack`` is called once the reply is sent.
    Settlement never raises: on a lost connection the broker redelivers.  The
    defaults suit brokers with nothing to settle (requests in memory).
    """

    __slots__ = ("body",)

    body: bytes

    @property
    def attempt(self) -> int:
        """1 for a first delivery, 2 for the first redelivery, and so on."""
        return 1

    async def ack(self) -> None:
        """The message is handled; the broker may forget it."""

    async def nack(self, *, requeue: bool = True, delay: float = 0.0) -> None:
        """The handler failed; redeliver the message if ``requeue``, after ``delay``
        seconds.  Waiting never blocks the consumer (other deliveries keep flowing), and
        where the broker can hold the message (delay queues, a NAK with delay, a
        scheduled set) a pending retry survives a restart of the consumer
        (``docs/resilience.md``)."""

    async def dead_letter(self, failure: Failure) -> None:
        """Park the message where operators can inspect it (``Broker.dead_letters``), as a
        ``DeadLetter`` of ``failure`` with the adapter's attempt count and failure times."""


DeliveryHandler = Callable[[Delivery], Awaitable[None]]
InboxHandler = Callable[[bytes], None]
DisconnectCallback = Callable[[ConnectionLost], None]


class Subscription(abc.ABC):
    """A running consumer; ``cancel`` stops taking new deliveries."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop consuming.  In-flight handlers keep running; unsettled deliveries stay
        with the broker (requeued when the consumer goes)."""


@dataclass(frozen=True, slots=True)
class EventSubscription:
    """Where and how a handler consumes an event.

    ``group`` names the consumer group (``service.handler``): each event goes to
    one member of the group.  ``broadcast`` gives every instance its own
    transient subscription instead.  ``durable=False`` asks for at-most-once
    delivery where the broker distinguishes (core NATS).
    """

    event: str
    group: str
    broadcast: bool = False
    durable: bool = True


@dataclass(slots=True)
class EndpointStats:
    """Counters of one RPC method of a running service, kept by its container."""

    num_requests: int = 0
    num_errors: int = 0
    #: Nanoseconds spent in the handler, summed over the requests.
    processing_time: int = 0
    #: ``"Type: message"`` of the last error, "" when none.
    last_error: str = ""


@dataclass(frozen=True)
class ServiceInfo:
    """A running service instance, as a container announces it to its broker."""

    name: str
    version: str
    description: str
    methods: Sequence[str]
    #: The RPC methods' counters, read when someone asks (NATS ``$SRV.STATS``).
    stats: Mapping[str, EndpointStats] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)


class Broker(abc.ABC):
    """A connection to one message broker, shared by every service of a process."""

    #: The URL with any password replaced by ``***``; safe to log.
    safe_url: str
    #: Whether ``send_request`` learns from the broker itself that a service has no
    #: instance (memory, RabbitMQ's returned message, NATS "no responders").  Adapters
    #: without it ask the directory instead (``no_live_instance``); the framework keeps
    #: the directory watching for them.
    reports_no_responders: bool = False
    #: The process's view of the cluster (docs/operations.md), set by the framework once
    #: the connection is open; None for a bare adapter.
    directory: Directory | None = None

    def __init__(self) -> None:
        self._disconnect_callbacks: list[DisconnectCallback] = []

    def no_live_instance(self, service: str) -> bool:
        """True when the directory knows for certain that no instance of ``service`` is
        RUNNING: an adapter that cannot say "no responders" raises ``ServiceUnavailable``
        from ``send_request`` then, instead of letting the call wait for its deadline."""
        directory = self.directory
        return directory is not None and directory.has_live_instance(service) is False

    def add_disconnect_callback(self, callback: DisconnectCallback) -> None:
        """Call ``callback`` whenever the connection is lost (pending calls fail fast)."""
        self._disconnect_callbacks.append(callback)

    def _notify_disconnect(self, exc: ConnectionLost) -> None:
        """Adapters call this as soon as they notice the connection is gone."""
        for callback in self._disconnect_callbacks:
            callback(exc)

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the connection is up (health checks use it)."""

    @property
    def alive(self) -> bool:
        """False once the connection is closed for good and will not be reopened: the
        process cannot serve again, so ``/health/live`` fails and the orchestrator
        restarts it.  A connection that is down but reconnecting is still alive."""
        return True

    @property
    def max_body_size(self) -> int:
        """The largest message body the broker carries, as far as the adapter knows
        (NATS: the server's ``max_payload``).  Replies are kept under it."""
        return HARD_MAX_FRAME_SIZE

    def reply_to_problem(self, reply_to: str) -> str | None:
        """Why a request's reply address cannot be answered on this broker, or None.

        The address comes from the request frame, written by whoever published it: an
        adapter refuses what it could not publish to (too long for the protocol, not an
        inbox), so that such a request is dropped when it is accepted, not when its
        reply would break the connection.
        """
        return None

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection, within the connect timeout."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection and every subscription.  Never raises."""

    @abc.abstractmethod
    async def serve_requests(
        self, service: str, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        """Consume the request queue of ``service`` as one competing consumer.

        At most ``concurrency`` handler calls run at once, and the adapter takes
        no more than that many unsettled deliveries from the broker where it can
        (prefetch).
        """

    @abc.abstractmethod
    async def send_request(self, service: str, body: bytes, *, correlation_id: int) -> None:
        """Publish a request frame to the queue of ``service``.

        Raise ``ServiceUnavailable`` when the broker knows at once that the service
        has no consumer; an adapter that learns it later (NATS "no responders")
        delivers an error frame for ``correlation_id`` to the inbox instead.  An adapter
        whose broker cannot tell raises it when ``self.no_live_instance(service)``.
        """

    def send_request_now(self, service: str, body: bytes, correlation_id: int) -> bool:
        """``send_request`` without suspending, where the adapter can (memory, NATS's
        fast path): True once sent; False, having done nothing, when the caller must
        await ``send_request`` instead.  Raises what ``send_request`` raises.  The
        compiled call path uses it to finish a call without a coroutine per step
        (docs/benchmarks.md#the-compiled-call-path)."""
        return False

    @abc.abstractmethod
    async def open_inbox(self, handler: InboxHandler) -> str:
        """Start this process's reply inbox and return its address.

        ``handler`` is called synchronously with each reply frame; it must not block.
        """

    @abc.abstractmethod
    async def send_reply(self, reply_to: str, body: bytes) -> None:
        """Send a reply frame to the inbox at ``reply_to``; a vanished inbox is not an error."""

    def send_reply_now(self, reply_to: str, body: bytes) -> bool:
        """``send_reply`` without suspending, where the adapter can: True once sent;
        False, having done nothing, when the caller must await ``send_reply``."""
        return False

    @abc.abstractmethod
    async def publish_event(
        self, event: str, body: bytes, *, idempotency_key: str, key: str | None = None
    ) -> None:
        """Publish an event frame; return once the broker has taken responsibility
        for it (publisher confirm, JetStream ack) or raise ``BrokerError``.

        ``idempotency_key`` is unique per event (also in the frame's ``idem``
        header); brokers that de-duplicate publishes (JetStream) use it.  ``key``
        (``dispatch(..., key=...)``) orders events: a broker that partitions its topics
        (Kafka) keeps the events of one key in order; the others ignore it.
        """

    async def register_service(self, info: ServiceInfo) -> None:  # noqa: B027 - optional hook
        """A service starts serving on this connection: announce it where the broker
        keeps a directory of services (NATS: the ``$SRV`` service API).  Called again
        after a restart of the service; the default announces nothing."""

    def unregister_service(self, name: str) -> None:  # noqa: B027 - optional hook
        """Service ``name`` stops serving on this connection: withdraw its announcement."""

    @abc.abstractmethod
    async def dead_letters(self, group: str, *, limit: int = 100) -> list[DeadLetter]:
        """The dead letters of consumer group ``group`` (``service.handler``), oldest
        first, at most ``limit``, WITHOUT removing them from the broker."""

    async def dead_letter_groups(self) -> list[str]:
        """The consumer groups (``service.handler``) that have dead letters, as far as the
        broker can list them; the default knows none."""
        return []

    async def replay_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        """Re-deliver dead letters of ``group`` (all, or those whose ``DeadLetter.id`` is
        in ``ids``) to that group's handler once, as a first attempt with the original
        frame (so the original idempotency key), and remove them from the dead letters.
        Returns how many were replayed."""
        raise NotImplementedError(f"{type(self).__name__} cannot replay dead letters")

    async def purge_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        """Delete dead letters of ``group`` (all, or those in ``ids``); returns how many."""
        raise NotImplementedError(f"{type(self).__name__} cannot purge dead letters")

    @abc.abstractmethod
    async def subscribe_events(
        self, subscription: EventSubscription, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        """Consume events named ``subscription.event`` for ``subscription.group``.

        Events published while no member of a durable group is running wait for it.
        """

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

Every method that awaits the network must finish or fail within a deadline;
none may hang while the broker is down.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from basidia._speedups import HARD_MAX_FRAME_SIZE
from basidia._wire import error_reply, no_responders
from basidia.errors import ConnectionLost

__all__ = [
    "Broker",
    "DisconnectCallback",
    "Delivery",
    "DeliveryHandler",
    "EndpointStats",
    "EventSubscription",
    "InboxHandler",
    "ServiceInfo",
    "Subscription",
    "error_reply",
    "no_responders",
]


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

    async def nack(self, *, requeue: bool = True) -> None:
        """The handler failed; redeliver the message if ``requeue``."""

    async def dead_letter(self, reason: str) -> None:
        """Park the message, with ``reason``, where operators can inspect it."""


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

    def __init__(self) -> None:
        self._disconnect_callbacks: list[DisconnectCallback] = []

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
        delivers an error frame for ``correlation_id`` to the inbox instead.
        """

    @abc.abstractmethod
    async def open_inbox(self, handler: InboxHandler) -> str:
        """Start this process's reply inbox and return its address.

        ``handler`` is called synchronously with each reply frame; it must not block.
        """

    @abc.abstractmethod
    async def send_reply(self, reply_to: str, body: bytes) -> None:
        """Send a reply frame to the inbox at ``reply_to``; a vanished inbox is not an error."""

    @abc.abstractmethod
    async def publish_event(self, event: str, body: bytes, *, idempotency_key: str) -> None:
        """Publish an event frame; return once the broker has taken responsibility
        for it (publisher confirm, JetStream ack) or raise ``BrokerError``.

        ``idempotency_key`` is unique per event (also in the frame's ``idem``
        header); brokers that de-duplicate publishes (JetStream) use it.
        """

    async def register_service(self, info: ServiceInfo) -> None:  # noqa: B027 - optional hook
        """A service starts serving on this connection: announce it where the broker
        keeps a directory of services (NATS: the ``$SRV`` service API).  Called again
        after a restart of the service; the default announces nothing."""

    def unregister_service(self, name: str) -> None:  # noqa: B027 - optional hook
        """Service ``name`` stops serving on this connection: withdraw its announcement."""

    @abc.abstractmethod
    async def subscribe_events(
        self, subscription: EventSubscription, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        """Consume events named ``subscription.event`` for ``subscription.group``.

        Events published while no member of a durable group is running wait for it.
        """

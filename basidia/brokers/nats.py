"""The NATS broker, through nats-py: core NATS for RPC, JetStream for events.

Subjects (``docs/nats.md`` has the full picture):

* requests for a service go to ``basidia.rpc.<service>``, queue group ``<service>``;
* each process has one inbox, ``_INBOX.<nuid>``, and one wildcard subscription
  ``_INBOX.<nuid>.>``: replies arrive on ``<inbox>.r`` and every request carries
  the reply subject ``<inbox>.<correlation id>.<service>``, so the server's
  "no responders" status (503) tells which call it answers;
* events go to ``basidia.events.<event>``, on JetStream (``_nats_jetstream``), or
  on core NATS for ``durable=False`` handlers; dead letters to ``basidia.dlq.<event>``;
* every registered service answers the NATS service API (ADR-32) on ``$SRV.>``
  (``_nats_service_api``).

nats-py runs the callback of a subscription one message at a time
(nats-io/nats.py#447).  Request and core-event subscriptions here have no
callback: ``concurrency`` worker tasks take messages straight from the
subscription's pending queue, so handlers run concurrently with no extra hop
and no task per message.

On the request and reply path, Basidia reads the messages of its request and
inbox subscriptions itself and batches its publishes per loop iteration
(``_nats_fast``); ``fast_path=False``, or a nats-py without the internals it
uses, leaves everything to nats-py's public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.client import Server as NatsServer
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.nuid import NUID

from basidia._speedups import DEFAULT_MAX_FRAME_SIZE
from basidia._wire import no_responders
from basidia.brokers import _nats_fast
from basidia.brokers._common import Backoff, Names, Secrets, WorkerPool, parse_url, tls_context
from basidia.brokers._nats_jetstream import (
    DLQ_STREAM,
    EVENT_PREFIX,
    EVENTS_STREAM,
    REPLAY_GROUP_HEADER,
    EventOrigin,
    JetStreamEvents,
    consumer_name,
    round_trip,
    withdraw,
)
from basidia.brokers._nats_service_api import ServiceRecord, announceable, new_record
from basidia.brokers.base import (
    Broker,
    DeadLetter,
    Delivery,
    DeliveryHandler,
    EventSubscription,
    Failure,
    InboxHandler,
    ServiceInfo,
    Subscription,
    make_dead_letter,
)
from basidia.errors import BrokerError, ConnectionLost
from basidia.log import ThrottledLog

__all__ = ["DLQ_STREAM", "EVENTS_STREAM", "NatsBroker"]

logger = logging.getLogger("basidia.brokers.nats")

RPC_PREFIX = "basidia.rpc."
INBOX_PREFIX = "_INBOX."
SERVICE_API_PREFIX = "$SRV"

# A subscription buffers at most this many bytes for its workers (with ``max_pending``
# messages); beyond either, nats-py drops messages as a slow consumer.
_MAX_PENDING_BYTES = 64 * 1024 * 1024
_NO_RESPONDERS = "503"
_NO_RESPONDERS_HEADER = b"NATS/1.0 503"
# Names put into subjects: dot-separated tokens without blanks or wildcards.
_SUBJECT_RE = re.compile(r"^[^\s*>.]+(\.[^\s*>.]+)*$")
# A reply address Basidia answers to: an inbox subject of printable ASCII, no wildcards.
_REPLY_SUBJECT_RE = re.compile(r"^_INBOX(\.[!-)+-\-/-=?-~]+)+$")
# nats-server refuses a protocol line longer than its max_control_line (4096 bytes by
# default) with -ERR and closes the connection.  A publish line is "HPUB <subject>
# <reply> <header bytes> <total bytes>": subjects, names in them and reply addresses are
# kept well under it.
_MAX_SUBJECT_BYTES = 1024
_MAX_NAME_BYTES = 256
# Server errors after which the server keeps the connection, or that reconnecting cannot
# cure (nats-py's own handling is kept for those).
_ERRORS_NATS_PY_HANDLES = ("authorization violation", "permissions violation", "stale connection")


# -- deliveries ---------------------------------------------------------------------------------


class _RequestDelivery(Delivery):
    """A core-NATS request: nothing to settle."""

    __slots__ = ()

    def __init__(self, body: bytes) -> None:
        self.body = body


class _CoreEventDelivery(Delivery):
    """A core-NATS event (at-most-once): nothing to settle, but dead letters are kept."""

    __slots__ = ("_origin",)

    def __init__(self, body: bytes, origin: EventOrigin) -> None:
        self.body = body
        self._origin = origin

    async def dead_letter(self, failure: Failure) -> None:
        origin = self._origin
        letter = make_dead_letter(
            failure, event=origin.event, group=origin.group, attempts=1, frame=self.body
        )
        await origin.events.dead_letter(letter, 0)


# -- subscriptions ------------------------------------------------------------------------------


class _QueueWorkers(WorkerPool[Msg]):
    """``concurrency`` workers taking messages from one core-NATS subscription's pending queue.

    The subscription has no callback, so nats-py only queues messages (bounded by
    ``max_pending``); the idle workers wait on that queue themselves.  Requests when
    ``origin`` is None, core events of ``origin`` otherwise.  With ``parser`` (the fast
    path), the request bodies are queued by a sink of the parser instead, as bytes, in
    a ``_nats_fast.Pending`` with the same bounds.
    """

    def __init__(
        self,
        sub: NatsSubscription,
        handler: DeliveryHandler,
        concurrency: int,
        *,
        flush_timeout: float,
        origin: EventOrigin | None = None,
        parser: _nats_fast.FastParser | None = None,
        on_slow: Callable[[str], None] | None = None,
    ) -> None:
        queue: asyncio.Queue[Msg] = sub._pending_queue
        where = f"subject {sub.subject}"
        serve = self._serve_request if origin is None else self._serve_event
        pending = None
        if parser is not None:
            pending = _nats_fast.Pending(sub._pending_msgs_limit, sub._pending_bytes_limit)
            while not queue.empty():  # queued by nats-py before the sink is in place
                pending.offer(queue.get_nowait().data)
            serve = self._serve_request_body  # type: ignore[assignment]
        source: Any = queue if pending is None else pending
        super().__init__(source, serve, concurrency, drain=True, logger=logger, where=where)
        self._sub = sub
        self._flush_timeout = flush_timeout
        self._handler = handler
        self._origin = origin
        self._cancelled = False
        self._parser = parser
        if parser is not None and pending is not None:
            if on_slow is not None:
                pending.on_full = lambda: on_slow(sub.subject)
            parser.sinks[sub._id] = pending.sink
        self.start_workers()

    def _serve_request_body(self, body: bytes) -> Awaitable[None]:
        return self._handler(_RequestDelivery(body))

    def _serve_request(self, msg: Msg) -> Awaitable[None]:
        body = msg.data
        # nats-py counts queued bytes against the pending limit; its consumers subtract.
        self._sub._pending_size -= len(body)
        return self._handler(_RequestDelivery(body))

    async def _serve_event(self, msg: Msg) -> None:
        body = msg.data
        self._sub._pending_size -= len(body)
        origin = self._origin
        assert origin is not None
        headers = msg.headers
        if headers is not None and headers.get(REPLAY_GROUP_HEADER, origin.group) != origin.group:
            return  # a dead letter replayed for another group
        await self._handler(_CoreEventDelivery(body, origin))

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        # Every message the server routed here before the UNSUB is queued, and handled,
        # rather than dropped: busy workers finish what is queued, then stop; idle ones
        # stop now if nothing is.
        await withdraw(self._sub, self._flush_timeout)
        if self._parser is not None:
            self._parser.sinks.pop(self._sub._id, None)
        await self._stop()


# -- the broker ---------------------------------------------------------------------------------


class NatsBroker(Broker):
    """A connection to NATS (``nats://`` or ``tls://`` URLs, several separated by commas).

    Options (keyword arguments, also accepted as ``broker_options`` in the config):

    * ``name``: connection name shown by NATS monitoring;
    * ``connect_timeout``: seconds for the first connection, retries included;
    * ``ping_interval``, ``max_outstanding_pings``: a silent link is declared dead after
      about ``ping_interval * (max_outstanding_pings + 1)`` seconds;
    * ``reconnect_wait``, ``reconnect_wait_max``: capped exponential backoff, with jitter,
      between reconnection attempts; ``max_reconnect_attempts`` (-1: forever);
    * ``outbound_buffer``: bytes of publishes held while reconnecting (over it, publishing
      raises ``BrokerError``);
    * ``publish_timeout``: seconds to wait for JetStream to confirm an event;
    * ``api_timeout``: seconds for JetStream management requests;
    * ``max_pending``: messages a subscription may queue for its workers;
    * ``ack_wait``, ``max_deliver``: JetStream redelivers an unsettled event after
      ``ack_wait`` seconds, at most ``max_deliver`` times (keep it above the framework's
      ``event_max_attempts``);
    * ``max_ack_pending``: events of one group out with its consumers at once, those
      waiting for a delayed retry included (docs/resilience.md);
    * ``pull_expires``: seconds a pull request waits for events;
    * ``duplicate_window``: seconds JetStream remembers idempotency keys;
    * ``stream_max_age``: seconds events and dead letters are kept at most;
    * ``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``: TLS trust and client
      certificate; any of them (or a ``tls://`` URL) requires TLS, always verified;
    * ``fast_path``: read requests and replies and write publishes through Basidia's own
      code (``_nats_fast``); False leaves all of it to nats-py's public API.
    """

    reports_no_responders = True

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        name: str | None = None,
        connect_timeout: float = 5.0,
        ping_interval: float = 5.0,
        max_outstanding_pings: int = 2,
        reconnect_wait: float = 0.1,
        reconnect_wait_max: float = 5.0,
        max_reconnect_attempts: int = -1,
        outbound_buffer: int = 8 * 1024 * 1024,
        publish_timeout: float = 5.0,
        api_timeout: float = 5.0,
        max_pending: int = 65_536,
        ack_wait: float = 30.0,
        max_deliver: int = 20,
        max_ack_pending: int = 10_000,
        pull_expires: float = 30.0,
        duplicate_window: float = 120.0,
        stream_max_age: float = 7 * 24 * 3600.0,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        fast_path: bool = True,
    ) -> None:
        super().__init__()
        self._user: str | None = None
        self._password: str | None = None
        self._token: str | None = None
        urls = [
            parse_url(part.strip(), "NATS", ("nats", "tls"), token_user=True)
            for part in url.split(",")
        ]
        for parsed in urls:
            # Credentials go to nats-py as options, not inside URLs it may log or expose.
            if parsed.password is not None:
                self._user, self._password = parsed.user, parsed.password
            elif parsed.token is not None:
                self._token = parsed.token
        # The URL itself is not kept: only its redacted form, and the credentials apart.
        self.safe_url = ",".join(parsed.safe for parsed in urls)
        self._servers = [
            f"{parsed.parts.scheme}://{parsed.host}:{parsed.port or 4222}" for parsed in urls
        ]
        self._secrets = Secrets(secret for parsed in urls for secret in parsed.secrets)
        schemes = {parsed.parts.scheme for parsed in urls}
        self._wants_tls = "tls" in schemes or any((tls_ca_file, tls_cert_file, tls_key_file))
        self._tls_files = (tls_ca_file, tls_cert_file, tls_key_file)
        self._name = name
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._max_outstanding_pings = max_outstanding_pings
        self._reconnect_wait = reconnect_wait
        self._backoff = Backoff(reconnect_wait, reconnect_wait_max)
        self._max_reconnect_attempts = max_reconnect_attempts
        self._outbound_buffer = outbound_buffer
        self._publish_timeout = publish_timeout
        self._api_timeout = api_timeout
        self._max_pending = max_pending
        self._fast_path = fast_path
        self._events = JetStreamEvents(
            self,
            publish_timeout=publish_timeout,
            api_timeout=api_timeout,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
            pull_expires=pull_expires,
            duplicate_window=duplicate_window,
            stream_max_age=stream_max_age,
            max_pending=max_pending,
            max_pending_bytes=_MAX_PENDING_BYTES,
        )

        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        #: The fast path's parser and publisher, while connected with it.
        self._parser: _nats_fast.FastParser | None = None
        self._outbox: _nats_fast.Outbox | None = None
        self._closing = False
        self._up = asyncio.Event()
        self._inbox = ""
        self._inbox_bytes = b""
        self._inbox_sub: NatsSubscription | None = None
        self._inbox_task: asyncio.Task[None] | None = None
        self._inbox_handlers: dict[str, InboxHandler] = {}
        self._inbox_sinks: dict[bytes, InboxHandler] = {}
        self._request_subjects = Names(
            lambda service: RPC_PREFIX + _checked_name(service, "service name")
        )
        # Service -> the request subject and the end of reply subjects, as bytes.
        self._request_wire: dict[str, tuple[bytes, bytes]] = {}
        self._event_subjects = Names(
            lambda event: EVENT_PREFIX + _checked_name(event, "event name")
        )
        self._workers: list[_QueueWorkers] = []
        self._services: dict[str, ServiceRecord] = {}
        self._service_api_sub: NatsSubscription | None = None
        self._last_error: BaseException | None = None
        self._closed_for_good = False
        #: Recurring conditions (a slow subscription, errors, failing pulls), throttled.
        self._throttled_log = ThrottledLog(logger)
        #: Reconnection attempts so far (each one waited its backoff first).
        self.reconnect_attempts = 0
        #: Times the connection came back.
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"NatsBroker({self.safe_url!r})"

    # -- connection ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def alive(self) -> bool:
        return not self._closed_for_good

    @property
    def max_body_size(self) -> int:
        nc = self._nc
        # nats-py keeps the last server's max_payload while reconnecting.
        return int(nc.max_payload) if nc is not None and nc.max_payload else DEFAULT_MAX_FRAME_SIZE

    def reply_to_problem(self, reply_to: str) -> str | None:
        # Only ever answer into an inbox, never on a subject a forged frame picked (a
        # JetStream API subject, say), and never with a publish line the server refuses.
        if len(reply_to) > _MAX_SUBJECT_BYTES:
            return f"reply address of {len(reply_to)} characters (at most {_MAX_SUBJECT_BYTES})"
        if not _REPLY_SUBJECT_RE.fullmatch(reply_to):
            return f"reply address {reply_to[:64]!r} is not an _INBOX subject"
        return None

    def _client(self) -> Client:
        if self._nc is None:
            raise BrokerError(f"{self!r} is not connected")
        return self._nc

    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise BrokerError(f"{self!r} is not connected")
        return self._js

    async def connect(self) -> None:
        if self._nc is not None:
            return
        self._closing = False
        nc = Client()
        parser = None
        if self._fast_path and _nats_fast.supported(nc):
            parser = nc._ps = _nats_fast.FastParser(nc)
        options: dict[str, Any] = {
            "servers": self._servers,
            "name": self._name,
            "connect_timeout": self._connect_timeout,
            "ping_interval": self._ping_interval,
            "max_outstanding_pings": self._max_outstanding_pings,
            "allow_reconnect": True,
            "reconnect_time_wait": self._reconnect_wait,
            "max_reconnect_attempts": self._max_reconnect_attempts,
            "reconnect_to_server_handler": self._choose_server,
            "pending_size": self._outbound_buffer,
            "flush_timeout": self._publish_timeout,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
            "user": self._user,
            "password": self._password,
            "token": self._token,
        }
        if self._wants_tls:
            options["tls"] = tls_context(*self._tls_files)
        self._last_error = None
        try:
            await asyncio.wait_for(nc.connect(**options), self._connect_timeout)
            self._check_tls(nc)
        except BaseException as exc:
            self._closing = True
            await self._close_client(nc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            reason = exc if not isinstance(exc, asyncio.TimeoutError) else self._last_error
            detail = self._secrets.describe(reason) if reason else "timed out"
            raise BrokerError(
                f"could not connect to {self.safe_url} within {self._connect_timeout:g} s "
                f"({detail})"
            ) from None
        self._reconnect_on_server_errors(nc)
        self._closed_for_good = False
        self._nc = nc
        self._js = nc.jetstream(timeout=self._api_timeout)
        self._inbox = nc.new_inbox()
        self._inbox_bytes = self._inbox.encode()
        self._parser = parser
        self._outbox = _nats_fast.Outbox(nc) if parser is not None else None
        self._up.set()
        if self._services:
            await self._subscribe_service_api()
        logger.info("connected to %s", self.safe_url)

    def _reconnect_on_server_errors(self, nc: Client) -> None:
        """Treat a server's ``-ERR`` as a lost link, not as the end of the connection.

        nats-py closes the connection for good on most ``-ERR`` lines (a publish over
        ``max_payload``, a control line too long, a parser error), and the server has
        closed it anyway; but a service must not stop serving because one message was
        refused.  Reconnecting, as for a broken link, keeps every subscription.
        """
        process_err = nc._process_err

        async def on_server_error(err_msg: str) -> None:
            text = err_msg.strip().strip("'")
            if any(known in text.lower() for known in _ERRORS_NATS_PY_HANDLES) or not (
                nc.is_connected
            ):
                await process_err(err_msg)
                return
            self._last_error = nats.errors.Error(f"nats: {text}")
            logger.warning("%s refused a message (%s); reconnecting", self.safe_url, text[:200])
            await nc._process_op_err(self._last_error)

        nc._process_err = on_server_error  # type: ignore[method-assign]
        self._report_giving_up(nc)

    def _report_giving_up(self, nc: Client) -> None:
        """Make sure giving up on reconnection reaches ``closed_cb`` (``/health/live``).

        When reconnection runs out of attempts, nats-py closes the client from inside its
        reconnection task and first writes what was published meanwhile (the directory's
        heartbeat, a handler's dispatch) into the socket of the last failed attempt; that
        write raises, the task dies, and ``closed_cb`` is never called, so the process
        would stay "alive" with no connection.  Nothing buffered can be delivered once the
        client gives up, so it is dropped first (docs/nats.md, reconnection).
        """
        close = nc.close

        async def close_for_good() -> None:
            reconnection = nc._reconnection_task
            if reconnection is not None and asyncio.current_task() is reconnection:
                nc._pending = []
                nc._pending_data_size = 0
                try:
                    await close()
                except Exception as exc:  # the socket of a failed attempt
                    logger.debug("closing %s after giving up: %r", self.safe_url, exc)
                    await self._on_closed()
                return
            await close()

        nc.close = close_for_good  # type: ignore[method-assign]

    def _check_tls(self, nc: Client) -> None:
        # nats-py upgrades to TLS only when the server's INFO requires it: a server (or a
        # man in the middle) that does not would get a plaintext connection.  Refuse it.
        if self._wants_tls and not nc._server_info.get("tls_required"):
            raise BrokerError(f"{self.safe_url} does not offer TLS; refusing to connect in clear")

    def _choose_server(
        self, servers: list[NatsServer], info: dict[str, Any]
    ) -> tuple[NatsServer | None, float]:
        """nats-py asks before each reconnection attempt: which server, after what delay."""
        server = min(servers, key=lambda candidate: candidate.reconnects)
        self.reconnect_attempts += 1
        nc = self._nc
        if nc is not None and nc._transport is not None:
            # nats-py reuses its transport object and overwrites the socket of a failed
            # attempt (one that connected but got no INFO) without closing it: close it here
            # so a long outage behind a half-open link does not leak a socket per attempt.
            nc._transport.close()  # type: ignore[no-untyped-call]
        return server, self._backoff.delay(server.reconnects)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._slow_consumer(exc.subject)
            return
        if not isinstance(self._last_error, nats.errors.Error):
            # What the server said (an authorization violation, say) explains a failed
            # connection better than the resets that follow it: once there is one, keep it.
            self._last_error = exc
        if self.connected:
            text = self._secrets.scrub(str(exc) or repr(exc))
            self._throttled_log.log(
                logging.WARNING, "error", "NATS error on %s: %s", self.safe_url, text
            )
        else:
            logger.debug("NATS error on %s: %s", self.safe_url, self._secrets.scrub(repr(exc)))

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        self._up.clear()
        logger.warning("lost the connection to %s; reconnecting", self.safe_url)
        self._events.connection_changed()
        self._notify_disconnect(ConnectionLost(f"lost the connection to {self.safe_url}"))

    async def _on_reconnected(self) -> None:
        nc = self._nc
        if nc is None or self._closing:
            return
        try:
            self._check_tls(nc)
        except BrokerError as exc:
            logger.error("%s", exc)
            await nc.close()
            return
        self.reconnects += 1
        logger.info("reconnected to %s", self.safe_url)
        self._up.set()
        self._events.connection_changed()

    async def _on_closed(self) -> None:
        if self._closing:
            return
        self._up.clear()
        # Reconnection gave up (max_reconnect_attempts) or the server refused the
        # credentials: this process can no longer serve, and says so (/health/live).
        self._closed_for_good = True
        logger.error("the connection to %s is closed for good", self.safe_url)
        self._notify_disconnect(ConnectionLost(f"the connection to {self.safe_url} is closed"))

    async def _until_connected(self) -> None:
        await self._up.wait()

    async def close(self) -> None:
        nc = self._nc
        if nc is None:
            return
        self._closing = True
        self._up.clear()
        workers, self._workers = self._workers, []
        for subscription in workers:
            try:
                await subscription.aclose()
            except Exception:
                logger.exception("could not stop a subscription")
        await self._events.close()
        if self._inbox_task is not None:
            self._inbox_task.cancel()
            await asyncio.gather(self._inbox_task, return_exceptions=True)
            self._inbox_task = None
        self._inbox_sub = None
        self._inbox_handlers.clear()
        self._inbox_sinks.clear()
        self._service_api_sub = None
        self._nc = None
        self._js = None
        self._parser = None
        self._outbox = None
        await self._close_client(nc)
        logger.info("closed the connection to %s", self.safe_url)

    async def _close_client(self, nc: Client) -> None:
        try:
            # nats-py flushes pending publishes on close; a dead link must not hold us.
            await asyncio.wait_for(nc.close(), self._publish_timeout)
        except Exception as exc:
            logger.debug("closing the NATS client: %s", self._secrets.scrub(repr(exc)))

    async def _subscribe(self, subject: str, **options: Any) -> NatsSubscription:
        """Subscribe, and return once the server has the interest (other connections'
        messages published from then on reach it)."""
        nc = self._client()
        sub = await nc.subscribe(subject, **options)
        try:
            await round_trip(nc, self._publish_timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            raise BrokerError(f"could not subscribe to {subject} on {self.safe_url}") from exc
        return sub

    # -- RPC -----------------------------------------------------------------------------------

    async def serve_requests(
        self, service: str, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        subject = self._request_subjects[service]
        sub = await self._subscribe(
            subject,
            queue=service,
            pending_msgs_limit=self._max_pending,
            pending_bytes_limit=_MAX_PENDING_BYTES,
        )
        workers = _QueueWorkers(
            sub,
            handler,
            concurrency,
            flush_timeout=self._publish_timeout,
            parser=self._parser,
            on_slow=self._slow_consumer,
        )
        self._workers.append(workers)
        return workers

    def _slow_consumer(self, subject: str) -> None:
        self._throttled_log.log(
            logging.WARNING,
            "slow consumer",
            "a NATS subscription on %s is too slow; messages dropped (raise max_pending "
            "or concurrency)",
            subject,
        )

    def send_request_now(self, service: str, body: bytes, correlation_id: int) -> bool:
        nc = self._nc
        if nc is None or not nc.is_connected:
            # Fail fast instead of buffering a call that would wait for its deadline.
            raise ConnectionLost(f"not connected to {self.safe_url}")
        outbox = self._outbox
        if outbox is None:
            return False
        wire = self._request_wire.get(service)
        if wire is None:
            wire = self._request_wire[service] = (
                self._request_subjects[service].encode(),
                service.encode(),
            )
        reply = b"%b.%d.%b" % (self._inbox_bytes, correlation_id, wire[1])
        return outbox.publish(wire[0], reply, body)

    async def send_request(self, service: str, body: bytes, *, correlation_id: int) -> None:
        if self.send_request_now(service, body, correlation_id):
            return
        nc = self._client()
        subject = self._request_subjects[service]
        try:
            await nc.publish(subject, body, reply=f"{self._inbox}.{correlation_id}.{service}")
        except nats.errors.MaxPayloadError:
            raise BrokerError(
                f"a request of {len(body)} bytes exceeds the server's limit of "
                f"{nc.max_payload} bytes"
            ) from None
        except nats.errors.Error as exc:
            raise ConnectionLost(f"could not send a request to {service!r}: {exc!r}") from None

    async def open_inbox(self, handler: InboxHandler) -> str:
        if self._inbox_sub is None:
            self._inbox_sub = await self._subscribe(
                f"{self._inbox}.>",
                pending_msgs_limit=self._max_pending,
                pending_bytes_limit=_MAX_PENDING_BYTES,
            )
            if self._parser is not None:
                self._parser.sinks[self._inbox_sub._id] = self._on_inbox_message
            else:
                self._inbox_task = asyncio.ensure_future(self._read_inbox(self._inbox_sub))
        address = f"{self._inbox}.r{len(self._inbox_handlers) or ''}"
        self._inbox_handlers[address] = handler
        self._inbox_sinks[address.encode()] = handler
        return address

    def _on_inbox_message(self, subject: bytes, headers: bytes | None, body: bytes) -> None:
        # The fast path's sink for the inbox: replies are routed in the read loop.
        handler = self._inbox_sinks.get(subject)
        if handler is not None:
            handler(body)
        elif headers is not None and headers.startswith(_NO_RESPONDERS_HEADER):
            self._route_no_responders(subject.decode())

    async def _read_inbox(self, sub: NatsSubscription) -> None:
        # Replies are routed synchronously: a plain loop on the queue beats a callback.
        queue: asyncio.Queue[Msg] = sub._pending_queue
        handlers = self._inbox_handlers
        while True:
            msg = await queue.get()
            data = msg.data
            sub._pending_size -= len(data)
            try:
                handler = handlers.get(msg.subject)
                if handler is not None:
                    handler(data)
                elif msg.headers is not None and msg.headers.get("Status") == _NO_RESPONDERS:
                    self._route_no_responders(msg.subject)
            except Exception:
                logger.exception("the reply handler failed")

    def _route_no_responders(self, subject: str) -> None:
        # <inbox>.<correlation id>.<service>: the request reached no member of the queue group.
        correlation_id, _, service = subject[len(self._inbox) + 1 :].partition(".")
        if not correlation_id.isdigit():
            return
        frame = no_responders(int(correlation_id), service)
        for handler in list(self._inbox_handlers.values()):
            handler(frame)

    def send_reply_now(self, reply_to: str, body: bytes) -> bool:
        # reply_to comes from a request frame, checked in full with reply_to_problem when
        # the request was accepted (basidia/_serving.py).  Here, on every reply, only what
        # keeps a caller of this method from publishing anywhere but into an inbox.
        if not reply_to.startswith(INBOX_PREFIX) or "*" in reply_to or ">" in reply_to:
            logger.debug("dropped a reply to a non-inbox subject")
            return True
        outbox = self._outbox
        return outbox is not None and outbox.publish(reply_to.encode(), b"", body)

    async def send_reply(self, reply_to: str, body: bytes) -> None:
        if self.send_reply_now(reply_to, body):
            return
        nc = self._client()
        try:
            await nc.publish(reply_to, body)
        except nats.errors.MaxPayloadError:
            raise BrokerError(
                f"a reply of {len(body)} bytes exceeds the server's limit of {nc.max_payload} bytes"
            ) from None
        except nats.errors.Error as exc:
            raise ConnectionLost(f"could not send a reply: {exc!r}") from None

    # -- events --------------------------------------------------------------------------------

    async def publish_event(
        self, event: str, body: bytes, *, idempotency_key: str, key: str | None = None
    ) -> None:
        subject = self._event_subjects[event]
        # JetStream drops a second publish with the same Nats-Msg-Id (duplicate_window).
        headers = {"Nats-Msg-Id": idempotency_key}
        await self._events.publish(subject, body, headers, f"event {event!r}")

    async def dead_letters(self, group: str, *, limit: int = 100) -> list[DeadLetter]:
        """Read ``group``'s dead letters from the stream ``BASIDIA_DLQ`` (nothing is removed);
        a letter's ``id`` is its sequence there."""
        return await self._events.dead_letters(group, limit)

    async def dead_letter_groups(self) -> list[str]:
        return await self._events.dead_letter_groups()

    async def replay_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        return await self._events.replay_dead_letters(group, ids)

    async def purge_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        return await self._events.purge_dead_letters(group, ids)

    async def subscribe_events(
        self, subscription: EventSubscription, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        subject = self._event_subjects[subscription.event]
        if subscription.durable:
            return await self._events.subscribe(
                subscription, subject, handler, concurrency, _nuid()
            )
        # Core NATS, at most once: whoever listens at publish time gets it.
        queue = "" if subscription.broadcast else consumer_name(subscription.group, subject)
        sub = await self._subscribe(
            subject,
            queue=queue,
            pending_msgs_limit=self._max_pending,
            pending_bytes_limit=_MAX_PENDING_BYTES,
        )
        origin = EventOrigin(self._events, subscription.event, subscription.group)
        workers = _QueueWorkers(
            sub, handler, concurrency, flush_timeout=self._publish_timeout, origin=origin
        )
        self._workers.append(workers)
        return workers

    # -- the NATS service API (ADR-32) ---------------------------------------------------------

    async def register_service(self, info: ServiceInfo) -> None:
        """Answer ``$SRV.PING/INFO/STATS`` for the service of ``info``: its RPC methods as
        endpoints, their counters read from ``info.stats`` (the container's) when asked.

        A name the service API cannot carry is served all the same, unannounced (with a
        warning).  Called again, it replaces the record (a new instance id).
        """
        if not announceable(info.name):
            logger.warning(
                "service %r is not announced on the NATS service API: names there may only "
                "use letters, digits, '-' and '_'",
                info.name,
            )
            return
        record = new_record(info, _nuid(), subject=self._request_subjects[info.name])
        self.unregister_service(info.name)
        self._services[record.id] = record
        if self._nc is not None:
            await self._subscribe_service_api()

    def unregister_service(self, name: str) -> None:
        for service_id in [key for key, rec in self._services.items() if rec.name == name]:
            del self._services[service_id]

    async def _subscribe_service_api(self) -> None:
        if self._service_api_sub is None:
            self._service_api_sub = await self._subscribe(
                f"{SERVICE_API_PREFIX}.>", cb=self._on_service_api
            )

    async def _on_service_api(self, msg: Msg) -> None:
        # $SRV.<verb>, $SRV.<verb>.<name> or $SRV.<verb>.<name>.<id>
        tokens = msg.subject.split(".")
        if not msg.reply or not 2 <= len(tokens) <= 4:
            return
        verb = tokens[1]
        name = tokens[2] if len(tokens) > 2 else None
        service_id = tokens[3] if len(tokens) > 3 else None
        for record in list(self._services.values()):
            if record.matches(name, service_id):
                response = record.response(verb)
                if response is None:
                    return
                try:
                    await self._client().publish(msg.reply, response)
                except nats.errors.Error:
                    return


def _checked_name(name: str, what: str) -> str:
    if len(name.encode()) > _MAX_NAME_BYTES:
        raise ValueError(
            f"{what} {name[:64]!r}... is {len(name.encode())} bytes long; at most "
            f"{_MAX_NAME_BYTES} fit a NATS subject"
        )
    if not _SUBJECT_RE.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} cannot be used in a NATS subject: use dot-separated tokens "
            "without spaces, '*' or '>'"
        )
    return name


_ids = NUID()


def _nuid() -> str:
    """A unique id (service instance ids, broadcast consumer names)."""
    return _ids.next().decode()

"""The broker toolkit: what every adapter needs and no adapter should write again.

* URLs: ``parse_url`` checks a broker URL and splits its credentials off, raising
  ``ConfigError`` that names the bad part; ``redact_url`` shows a URL without them, and
  ``Secrets`` keeps them out of error text from the client library or the broker.
* ``tls_context``: the verifying client context of every TLS connection.
* ``Backoff``: capped exponential delays with jitter, for reconnections and retries.
* ``WorkerPool``: the subscription behind every consumer, ``concurrency`` tasks taking
  deliveries straight from the adapter's own queue.
* ``RecentKeys``: the idempotency keys a publisher sent lately, so that a repeat publish
  is dropped where the broker itself does not de-duplicate (RabbitMQ, memory).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from basidia.brokers.base import Subscription
from basidia.errors import ConfigError

__all__ = [
    "Backoff",
    "BrokerUrl",
    "Names",
    "RecentKeys",
    "Secrets",
    "Source",
    "WorkerPool",
    "parse_url",
    "redact_url",
    "tls_context",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

# Schemes on which a user part without a password is itself the secret (a NATS token).
_TOKEN_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})
_HIDDEN = "***"


# -- URLs and secrets ---------------------------------------------------------------------------


def redact_url(url: str, *, token_user: bool | None = None) -> str:
    """``url`` with its credentials hidden, safe for logs and reprs.

    A password becomes ``***``; so does a user part without one where it is a token:
    with ``token_user``, or by default on NATS URLs.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    credentials, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    if token_user is None:
        token_user = parts.scheme in _TOKEN_SCHEMES
    user, colon, _password = credentials.partition(":")
    if colon:
        credentials = f"{user}:{_HIDDEN}"
    elif token_user:
        credentials = _HIDDEN
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}"))


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """A checked broker URL: where to connect, with which credentials, and how to show it."""

    #: The URL as written, credentials included: never log it.
    parts: SplitResult
    #: The URL with its credentials hidden, for logs, reprs and errors.
    safe: str
    user: str | None
    password: str | None
    #: A user part without a password, where the scheme makes it a token (NATS).
    token: str | None

    @property
    def host(self) -> str:
        """The host name, an IPv6 address in brackets."""
        hostname = self.parts.hostname or ""
        return f"[{hostname}]" if ":" in hostname else hostname

    @property
    def port(self) -> int | None:
        return self.parts.port

    @property
    def secrets(self) -> list[str]:
        """The password or token, as written and percent-decoded."""
        raw = self.parts.password if self.token is None else self.parts.username
        return [secret for secret in {raw, self.password, self.token} if secret]


def parse_url(
    url: str, kind: str, schemes: tuple[str, ...], *, token_user: bool = False
) -> BrokerUrl:
    """Check ``url``, a ``kind`` URL (``"AMQP"``) with one of ``schemes``, and split off its
    credentials (percent-decoded).  With ``token_user``, a user part without a password is a
    token.

    A malformed URL raises ``ConfigError`` naming the bad part; the message never shows
    the password or token.
    """
    expected = " or ".join(f"{scheme}://" for scheme in schemes)
    safe = redact_url(url, token_user=token_user)
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit's own message may quote the credentials; say what is wrong instead.
        raise ConfigError(
            f"invalid {kind} URL: its host part cannot be parsed (unbalanced brackets or "
            "characters not allowed in a host name)"
        ) from None
    problem = ""
    if parts.scheme not in schemes:
        problem = f"the scheme must be {expected}"
    else:
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            problem = "the port must be a number from 0 to 65535"
        else:
            if not parts.hostname:
                problem = "the host is missing"
    if problem:
        if "@" in url.partition("://")[2] and "@" not in parts.netloc:
            # A password with '/', '?' or '#' ends the host part early: the rest of the URL,
            # shown, would show the password.
            safe = f"{parts.scheme}://{_HIDDEN}"
            problem += " (percent-encode '/', '?' and '#' in a user name or password)"
        raise ConfigError(f"invalid {kind} URL {safe!r}: {problem}")
    user = password = token = None
    if parts.password is not None:
        user, password = unquote(parts.username or ""), unquote(parts.password)
    elif parts.username:
        if token_user:
            token = unquote(parts.username)
        else:
            user = unquote(parts.username)
    return BrokerUrl(parts, safe, user, password, token)


class Secrets:
    """The credentials of a connection, kept out of every text shown (logs, errors)."""

    __slots__ = ("_values",)

    def __init__(self, values: Iterable[str]) -> None:
        # Longest first: a percent-encoded form goes whole, not around its decoded core.
        self._values = sorted({value for value in values if value}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced by ``***``."""
        for secret in self._values:
            text = text.replace(secret, _HIDDEN)
        return text

    def describe(self, exc: BaseException) -> str:
        """``exc`` for an error message or a log line: its type and text, secrets removed."""
        if isinstance(exc, asyncio.TimeoutError):
            return "timed out"
        text = str(exc) if str(exc) not in ("", "()") else repr(exc)
        return self.scrub(f"{type(exc).__name__}: {text}")


# -- TLS ----------------------------------------------------------------------------------------


def tls_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client TLS context that verifies the server's certificate chain and host name.

    It trusts ``ca_file`` (default: the system's CAs) and presents ``cert_file`` with
    ``key_file`` when given.  A file that cannot be loaded raises ``ConfigError`` naming it.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS CA file {ca_file!r}: {type(exc).__name__}: {exc}"
        ) from None
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            files = f"{cert_file!r}" + (f" and key {key_file!r}" if key_file else "")
            raise ConfigError(
                f"cannot load the TLS client certificate {files}: {type(exc).__name__}: {exc}"
            ) from None
    return context


# -- backoff ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with "equal jitter".

    Attempt ``n`` (0-based) waits a random time between half and all of
    ``min(cap, first * 2**n)``: never close to zero, so retries do not bunch up, and
    spread, so that a fleet of clients does not knock all at once.
    """

    first: float
    cap: float

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt``."""
        ceiling = min(self.cap, self.first * 2.0 ** min(attempt, 30))
        return ceiling * random.uniform(0.5, 1.0)


# -- names ------------------------------------------------------------------------------------


class Names(dict[str, str]):
    """Broker names made from framework names (a service's request queue, an event's
    subject), each made and checked once: ``names[service]``.

    A hit is a plain dict lookup.  ``make`` raises for a name the broker cannot carry,
    and nothing is kept; past ``MAX`` names (made from dynamic event names, say), the
    cache starts over.
    """

    __slots__ = ("_make",)

    MAX = 4096

    def __init__(self, make: Callable[[str], str]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: str) -> str:
        name = self._make(key)
        if len(self) >= self.MAX:
            self.clear()
        self[key] = name
        return name


# -- idempotent publishing ---------------------------------------------------------------------


class RecentKeys:
    """The idempotency keys published in the last ``window`` seconds (at most ``max_keys``).

    JetStream drops a second publish with the same ``Nats-Msg-Id`` within its duplicate
    window; brokers without that (RabbitMQ, memory) get the same guarantee for the
    publishes of one publisher from this: a repeat of a key confirmed within the window is
    not sent again, and the publish returns as if confirmed.  A key is remembered only
    once its publish is confirmed: after a failed one (outcome unknown) publishing again
    does publish.  Past ``max_keys`` keys within the window the oldest are forgotten early.
    """

    __slots__ = ("_confirmed", "_in_flight", "dropped", "max_keys", "window")

    def __init__(self, window: float = 120.0, max_keys: int = 100_000) -> None:
        self.window = float(window)
        self.max_keys = max(1, int(max_keys))
        #: Publishes dropped as repeats.
        self.dropped = 0
        # key -> monotonic time of its confirm; insertion order is time order.
        self._confirmed: dict[str, float] = {}
        # key -> the outcome (confirmed or not) of the publish under way.
        self._in_flight: dict[str, asyncio.Future[bool]] = {}

    def seen(self, key: str) -> bool:
        """Whether ``key`` was confirmed within the window."""
        confirmed = self._confirmed
        if not confirmed:
            return False
        horizon = time.monotonic() - self.window
        while confirmed:
            oldest = next(iter(confirmed))
            if confirmed[oldest] > horizon:
                break
            del confirmed[oldest]
        return key in confirmed

    def remember(self, key: str) -> None:
        """``key`` was confirmed now."""
        confirmed = self._confirmed
        while len(confirmed) >= self.max_keys:
            del confirmed[next(iter(confirmed))]
        confirmed[key] = time.monotonic()

    def first_time(self, key: str) -> bool:
        """For a publish that cannot fail (memory): True, and ``key`` remembered, unless it
        is a repeat within the window."""
        if not self.window or not key:
            return True
        if self.seen(key):
            self.dropped += 1
            return False
        self.remember(key)
        return True

    async def publish_once(self, key: str, publish: Callable[[], Awaitable[None]]) -> bool:
        """Await ``publish()`` unless ``key`` was confirmed within the window; False when
        dropped as a repeat.  A repeat that comes while the first publish of ``key`` is under
        way waits for it, and publishes itself only if that one failed."""
        if not self.window or not key:
            await publish()
            return True
        while True:
            if self.seen(key):
                self.dropped += 1
                return False
            pending = self._in_flight.get(key)
            if pending is None:
                break
            if await asyncio.shield(pending):
                self.dropped += 1
                return False
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = outcome
        confirmed = False
        try:
            await publish()
            confirmed = True
        finally:
            del self._in_flight[key]
            if confirmed:
                self.remember(key)
            outcome.set_result(confirmed)
        return True


# -- worker pools -------------------------------------------------------------------------------


class Source(Protocol[T_co]):
    """Where a pool's workers wait for deliveries (``asyncio.Queue`` is one)."""

    def get(self) -> Awaitable[T_co]: ...

    def empty(self) -> bool: ...


class WorkerPool(Subscription, Generic[T]):
    """``concurrency`` worker tasks, each taking one delivery at a time from ``queue`` and
    awaiting ``handle`` with it.

    The workers wait on the adapter's own queue (a NATS subscription's pending queue, the
    one an AMQP channel's reader fills, a memory queue): no task per message and no queue
    in between.

    ``cancel`` (after the adapter has stopped the flow, where it has one) is graceful:
    idle workers end at once, busy ones after their delivery, or, with ``drain``, once
    ``queue`` is empty, so that what the broker handed over is still handled.  ``aclose``
    ends them all at once.
    """

    def __init__(
        self,
        queue: Source[T],
        handle: Callable[[T], Awaitable[None]],
        concurrency: int,
        *,
        drain: bool,
        logger: logging.Logger,
        where: str,
    ) -> None:
        self.concurrency = max(1, int(concurrency))
        #: Where the deliveries come from, for log lines (``queue basidia.rpc.x``).
        self.where = where
        #: True once ``cancel`` began: no worker takes a delivery it would not drain.
        self.stopping = False
        self._source = queue
        self._handle = handle
        self._drain = drain
        self._logger = logger
        self._workers: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()

    def start_workers(self) -> None:
        """Start workers until there are ``concurrency`` of them."""
        while len(self._workers) < self.concurrency and not self.stopping:
            worker = self._spawn()
            self._workers.add(worker)
            worker.add_done_callback(self._worker_done)

    def _spawn(self) -> asyncio.Task[None]:
        """One worker task."""
        return asyncio.ensure_future(self._work())

    async def _work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        source = self._source
        get, empty = source.get, source.empty
        handle = self._handle
        idle = self._idle
        drain = self._drain
        while not (self.stopping and (not drain or empty())):
            idle.add(task)
            try:
                item = await get()
            finally:
                idle.discard(task)
            try:
                await handle(item)
            except Exception:  # the framework settles and logs its own errors: a bug
                self._logger.exception("delivery handler failed on %s", self.where)
        # The others wait on a queue that nothing fills any more.
        self._stop_idle()

    def _stop_idle(self) -> list[asyncio.Task[None]]:
        idle = list(self._idle)
        for task in idle:
            task.cancel()
        return idle

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        self._workers.discard(worker)
        if self.stopping and not self._workers:
            self._stopped()

    def _stopped(self) -> None:
        """Called once every worker has ended after ``cancel``."""

    async def cancel(self) -> None:
        await self._stop()

    async def _stop(self) -> None:
        """Stop the workers gracefully (see the class)."""
        if self.stopping:
            return
        self.stopping = True
        if not self._workers:
            self._stopped()
        elif not self._drain or self._source.empty():
            # Idle workers hold nothing; wait for them, so that a delivery handed to one as
            # it was cancelled is back in its queue when this returns.
            await asyncio.gather(*self._stop_idle(), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel, then end every worker, busy or not (broker close)."""
        await self.cancel()
        workers = list(self._workers)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

"""Deduplication stores: an event handler runs once per idempotency key within a window.

The rule is the same on every broker (docs/resilience.md): before a handler runs, its
group *claims* the event's key; a key already done is acknowledged without running the
handler again, a key claimed by a handler still at work comes back later (a retry), and a
failed attempt gives its claim up so that the retry runs.  A claim held by a process that
died lapses after ``lease`` seconds.

``MemoryDedupStore`` serves one process (the default); ``RedisDedupStore`` (the ``redis``
extra) is shared by every instance of a service.
"""

from __future__ import annotations

import abc
import enum
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from basidia.config import dedup_off
from basidia.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from basidia.brokers.base import Broker

__all__ = ["Claim", "DedupStore", "MemoryDedupStore", "RedisDedupStore", "open_store"]


class Claim(enum.Enum):
    """What claiming a key found."""

    #: Nobody handled it: run the handler.
    NEW = "new"
    #: Handled within the window: acknowledge, do not run again.
    DONE = "done"
    #: Another handler holds it right now: try again later.
    BUSY = "busy"


class DedupStore(abc.ABC):
    """Where handled idempotency keys are kept, by consumer group (``scope``)."""

    def __init__(self, *, window: float, lease: float) -> None:
        #: Seconds a handled key is remembered.
        self.window = window
        #: Seconds a claim lasts while its handler runs (a dead process's claim lapses).
        self.lease = lease

    @abc.abstractmethod
    async def claim(self, scope: str, key: str) -> Claim:
        """Claim ``key`` for ``scope``'s handler."""

    @abc.abstractmethod
    async def complete(self, scope: str, key: str) -> None:
        """The handler succeeded: remember ``key`` as done for ``window`` seconds."""

    @abc.abstractmethod
    async def release(self, scope: str, key: str) -> None:
        """The handler failed: give the claim up, so the retry runs."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class MemoryDedupStore(DedupStore):
    """Keys kept in this process (at most ``max_keys``; the oldest go first)."""

    def __init__(self, *, window: float, lease: float, max_keys: int = 100_000) -> None:
        super().__init__(window=window, lease=lease)
        self.max_keys = max_keys
        # (scope, key) -> (done?, expiry on the monotonic clock); insertion order ~ age.
        self._keys: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()

    async def claim(self, scope: str, key: str) -> Claim:
        now = time.monotonic()
        keys = self._keys
        entry = keys.get((scope, key))
        if entry is not None and entry[1] > now:
            return Claim.DONE if entry[0] else Claim.BUSY
        while len(keys) >= self.max_keys:
            keys.popitem(last=False)
        keys[(scope, key)] = (False, now + self.lease)
        return Claim.NEW

    async def complete(self, scope: str, key: str) -> None:
        item = (scope, key)
        self._keys[item] = (True, time.monotonic() + self.window)
        self._keys.move_to_end(item)

    async def release(self, scope: str, key: str) -> None:
        self._keys.pop((scope, key), None)


class RedisDedupStore(DedupStore):
    """Keys kept in Redis (``SET NX PX``), shared by every process that uses the same URL
    and ``prefix``: ``<prefix>:<scope>:<key>`` holds ``busy`` or ``done``."""

    def __init__(self, url: str, *, window: float, lease: float, prefix: str = "basidia:dedup"):
        super().__init__(window=window, lease=lease)
        try:
            import redis.asyncio
        except ImportError:
            raise ConfigError(
                "a Redis deduplication store needs redis-py: pip install 'basidia[redis]'"
            ) from None
        self.prefix = prefix
        self._client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def _name(self, scope: str, key: str) -> str:
        return f"{self.prefix}:{scope}:{key}"

    async def claim(self, scope: str, key: str) -> Claim:
        name = self._name(scope, key)
        try:
            if await self._client.set(name, b"busy", nx=True, px=int(self.lease * 1000)):
                return Claim.NEW
            value = await self._client.get(name)
        except self._errors as exc:
            raise BrokerError(f"the deduplication store is unreachable: {exc}") from None
        if value is None:  # lapsed between the two commands: try once more
            return await self.claim(scope, key)
        return Claim.DONE if value == b"done" else Claim.BUSY

    async def complete(self, scope: str, key: str) -> None:
        try:
            await self._client.set(self._name(scope, key), b"done", px=int(self.window * 1000))
        except self._errors as exc:
            raise BrokerError(f"the deduplication store is unreachable: {exc}") from None

    async def release(self, scope: str, key: str) -> None:
        try:
            await self._client.delete(self._name(scope, key))
        except self._errors as exc:
            raise BrokerError(f"the deduplication store is unreachable: {exc}") from None

    async def close(self) -> None:
        await self._client.aclose()


def open_store(spec: str, *, window: float, lease: float) -> DedupStore | None:
    """The store ``spec`` names: ``"memory"``, a ``redis://`` or ``rediss://`` URL, or
    ``""``/``"off"`` for none."""
    text = spec.strip()
    if dedup_off(text):
        return None
    if text.lower() == "memory":
        return MemoryDedupStore(window=window, lease=lease)
    if text.startswith(("redis://", "rediss://", "unix://")):
        return RedisDedupStore(text, window=window, lease=lease)
    raise ConfigError(f"dedup_store must be 'memory', 'off' or a redis:// URL, got {spec!r}")


class _Shared:
    __slots__ = ("store", "users")

    def __init__(self, store: DedupStore) -> None:
        self.store = store
        self.users = 0


# One store per broker connection (so per runner) and store spec, closed with its last user.
_shared: weakref.WeakKeyDictionary[Broker, dict[str, _Shared]] = weakref.WeakKeyDictionary()


def acquire(broker: Broker, spec: str, *, window: float, lease: float) -> DedupStore | None:
    """The store ``spec`` names for the runner of ``broker``, shared by its handlers;
    ``release_store`` it when done."""
    stores = _shared.setdefault(broker, {})
    shared = stores.get(spec)
    if shared is None:
        store = open_store(spec, window=window, lease=lease)
        if store is None:
            return None
        shared = stores[spec] = _Shared(store)
    shared.users += 1
    return shared.store


async def release_store(broker: Broker, spec: str) -> None:
    """One user fewer of ``spec``'s store for ``broker``; the last closes it."""
    stores = _shared.get(broker, {})
    shared = stores.get(spec)
    if shared is None:
        return
    shared.users -= 1
    if shared.users <= 0:
        del stores[spec]
        await shared.store.close()

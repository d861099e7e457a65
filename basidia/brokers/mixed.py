"""One service on two brokers: RPC on one, events on another (``docs/brokers.md``).

``MixedBroker`` is a ``Broker`` made of two: requests, replies and the service
directory go to ``rpc``, events and their dead letters to ``events``.  The framework sees
one broker, so a service, a runner and a client need nothing else; ``ServiceRunner``,
``connect`` and ``basidia run`` build one when given ``event_broker``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from basidia.brokers.base import (
    Broker,
    DeadLetter,
    DeliveryHandler,
    DisconnectCallback,
    EventSubscription,
    InboxHandler,
    ServiceInfo,
    Subscription,
)

__all__ = ["MixedBroker"]


class MixedBroker(Broker):
    """RPC on ``rpc``, events on ``events``; it owns both and closes both."""

    def __init__(self, rpc: Broker, events: Broker) -> None:
        super().__init__()
        self.rpc = rpc
        self.events = events
        self.safe_url = f"{rpc.safe_url} (events: {events.safe_url})"

    def __repr__(self) -> str:
        return f"MixedBroker({self.rpc!r}, events={self.events!r})"

    def add_disconnect_callback(self, callback: DisconnectCallback) -> None:
        # What waits on a connection is RPC calls; a lost event connection fails none of
        # them (publishes fail on their own, consumers come back with the connection).
        self.rpc.add_disconnect_callback(callback)

    @property
    def connected(self) -> bool:
        return self.rpc.connected and self.events.connected

    @property
    def alive(self) -> bool:
        return self.rpc.alive and self.events.alive

    @property
    def max_body_size(self) -> int:
        return min(self.rpc.max_body_size, self.events.max_body_size)

    def reply_to_problem(self, reply_to: str) -> str | None:
        return self.rpc.reply_to_problem(reply_to)

    async def connect(self) -> None:
        await self.rpc.connect()
        try:
            await self.events.connect()
        except BaseException:
            await self.rpc.close()
            raise

    async def close(self) -> None:
        await asyncio.gather(self.rpc.close(), self.events.close())

    # -- RPC -------------------------------------------------------------------------------

    async def serve_requests(
        self, service: str, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        return await self.rpc.serve_requests(service, handler, concurrency=concurrency)

    async def send_request(self, service: str, body: bytes, *, correlation_id: int) -> None:
        await self.rpc.send_request(service, body, correlation_id=correlation_id)

    async def open_inbox(self, handler: InboxHandler) -> str:
        return await self.rpc.open_inbox(handler)

    async def send_reply(self, reply_to: str, body: bytes) -> None:
        await self.rpc.send_reply(reply_to, body)

    async def register_service(self, info: ServiceInfo) -> None:
        await self.rpc.register_service(info)

    def unregister_service(self, name: str) -> None:
        self.rpc.unregister_service(name)

    # -- events ----------------------------------------------------------------------------

    async def publish_event(self, event: str, body: bytes, *, idempotency_key: str) -> None:
        await self.events.publish_event(event, body, idempotency_key=idempotency_key)

    async def subscribe_events(
        self, subscription: EventSubscription, handler: DeliveryHandler, *, concurrency: int
    ) -> Subscription:
        return await self.events.subscribe_events(subscription, handler, concurrency=concurrency)

    async def dead_letters(self, group: str, *, limit: int = 100) -> list[DeadLetter]:
        return await self.events.dead_letters(group, limit=limit)

    async def dead_letter_groups(self) -> list[str]:
        return await self.events.dead_letter_groups()

    async def replay_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        return await self.events.replay_dead_letters(group, ids)

    async def purge_dead_letters(self, group: str, ids: Sequence[str] | None = None) -> int:
        return await self.events.purge_dead_letters(group, ids)

"""Sends a welcome note when a user is created (here: logs it and keeps it in memory)."""

from __future__ import annotations

import logging

from basidia import Service, current_context, event_handler, rpc

logger = logging.getLogger("examples.notifications")


class NotificationService(Service):
    name = "notification_service"
    sent: list[dict] = []  # noqa: RUF012 - shared on purpose: the example's "outbox"
    seen_keys: set[str] = set()  # noqa: RUF012

    @event_handler("user.created")
    async def on_user_created(self, user_data: dict) -> None:
        ctx = current_context()
        key = ctx.idempotency_key if ctx else None
        if key in self.seen_keys:  # a redelivery: the welcome note has gone already
            return
        self.seen_keys.add(key or "")
        logger.info("welcome note to %s", user_data.get("email"))
        self.sent.append(user_data)

    @rpc
    async def sent_notes(self) -> list[dict]:
        return self.sent

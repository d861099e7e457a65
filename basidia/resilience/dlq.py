"""Dead letters for operators: list, show, replay and purge them on any broker.

``basidia dlq ACTION`` runs these against a broker URL; ``basidia shell`` offers the same as
``await dlq.list()`` and friends, which is how the dead letters of a memory broker (kept in
its process) are reached (docs/resilience.md).
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from basidia._speedups import decode_frame
from basidia.brokers.base import Broker, DeadLetter
from basidia.errors import ConfigError, FrameError

__all__ = ["ACTIONS", "DeadLetterTool"]

ACTIONS = ("list", "show", "replay", "purge")


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else "-"


def _frame_view(letter: DeadLetter) -> dict[str, Any]:
    """The letter's event frame, decoded as far as it goes."""
    try:
        frame = decode_frame(letter.frame)
    except FrameError as exc:
        return {"error": f"not a readable frame: {exc}", "size": len(letter.frame)}
    data: Any
    try:
        data = msgspec.msgpack.decode(frame.payload)
    except msgspec.DecodeError:
        try:
            data = msgspec.json.decode(frame.payload)
        except msgspec.DecodeError:
            data = f"<{len(frame.payload)} bytes>"
    return {"target": frame.target, "headers": dict(frame.headers), "data": data}


def record(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as JSON-able data, its frame decoded (``show``)."""
    return {
        "id": letter.id,
        "group": letter.group,
        "event": letter.event,
        "service": letter.service,
        "handler": letter.handler,
        "reason": letter.reason,
        "exception": letter.exception,
        "attempts": letter.attempts,
        "first_failure": _when(letter.first_failure),
        "last_failure": _when(letter.last_failure),
        "truncated_from": letter.truncated_from,
        "frame": _frame_view(letter),
    }


class DeadLetterTool:
    """The four actions on one broker, for the groups a service and handler select."""

    def __init__(self, broker: Broker, out: Callable[[str], object] = print) -> None:
        self.broker = broker
        self.out = out

    async def groups(self, service: str | None = None, handler: str | None = None) -> list[str]:
        """The groups with dead letters, of ``service`` and ``handler`` when given."""
        if service and handler:
            return [f"{service}.{handler}"]
        found = await self.broker.dead_letter_groups()
        return [
            group
            for group in found
            if (not service or group.rpartition(".")[0] == service)
            and (not handler or group.rpartition(".")[2] == handler)
        ]

    async def list(
        self, service: str | None = None, handler: str | None = None, *, limit: int = 100
    ) -> builtins.list[DeadLetter]:
        """Print one line per dead letter (oldest first, ``limit`` per group)."""
        letters: builtins.list[DeadLetter] = []
        for group in await self.groups(service, handler):
            letters += await self.broker.dead_letters(group, limit=limit)
        if not letters:
            self.out("no dead letters")
        for letter in letters:
            reason = letter.reason if len(letter.reason) <= 80 else letter.reason[:77] + "..."
            self.out(
                f"{letter.id or '-'}  {letter.group}  {letter.event}  "
                f"attempts={letter.attempts}  last={_when(letter.last_failure)}  {reason}"
            )
        return letters

    async def show(
        self,
        ids: Sequence[str] = (),
        service: str | None = None,
        handler: str | None = None,
        *,
        limit: int = 100,
    ) -> builtins.list[dict[str, Any]]:
        """Print the whole record of each chosen dead letter (all when no ``ids``), as JSON."""
        shown = []
        for group in await self.groups(service, handler):
            for letter in await self.broker.dead_letters(group, limit=limit):
                if not ids or letter.id in ids:
                    shown.append(record(letter))
        self.out(json.dumps(shown, indent=2, ensure_ascii=False, default=str))
        return shown

    async def replay(
        self, ids: Sequence[str] = (), service: str | None = None, handler: str | None = None
    ) -> int:
        """Re-deliver the chosen dead letters (all of the groups when no ``ids``) to their
        handlers, once each, as a first attempt with the original idempotency key."""
        return await self._each_group(
            "replayed", self.broker.replay_dead_letters, ids, service, handler
        )

    async def purge(
        self,
        ids: Sequence[str] = (),
        service: str | None = None,
        handler: str | None = None,
        *,
        everything: bool = False,
    ) -> int:
        """Delete the chosen dead letters; all of the groups' only with ``everything``."""
        if not ids and not everything:
            raise ConfigError("name the dead letters to purge, or confirm purging them all")
        return await self._each_group(
            "purged", self.broker.purge_dead_letters, ids, service, handler
        )

    async def _each_group(
        self,
        done: str,
        action: Callable[[str, builtins.list[str] | None], Awaitable[int]],
        ids: Sequence[str],
        service: str | None,
        handler: str | None,
    ) -> int:
        """``action`` on the chosen dead letters of each group, saying what was ``done``."""
        total = 0
        for group in await self.groups(service, handler):
            count = await action(group, list(ids) or None)
            if count:
                self.out(f"{done} {count} dead letter(s) of {group}")
            total += count
        self.out(f"{done} {total} in all")
        return total

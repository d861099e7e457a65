"""The context of the call being handled: who is handling what, until when, for whom."""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from basidia._speedups import Frame

__all__ = ["CallContext", "current_call", "current_context"]

#: Header carrying the chain of call ids that led to a request.
CALL_STACK_HEADER = "call"
#: Header carrying an event's idempotency key.
IDEMPOTENCY_HEADER = "idem"
#: Header naming the service that sent an event.
SOURCE_HEADER = "src"
# The call-id stack is capped so that a runaway recursion cannot grow headers forever.
MAX_CALL_STACK = 16


class CallContext:
    """What an entrypoint is handling right now (Nameko's worker context).

    ``deadline`` is in seconds since the epoch (``0.0``: none); nested RPC calls
    made while handling inherit it.  ``data`` is free for middleware.
    """

    __slots__ = ("_call_id", "attempt", "data", "deadline", "entrypoint", "frame", "service")

    # The compiled request path sets these slots itself, without __init__
    # (basidia/_speedups/_calls_c.pyx, _Serving._prepare): keep the two in step.
    def __init__(
        self, service: str, entrypoint: str, frame: Frame, deadline: float, attempt: int = 1
    ) -> None:
        self.service = service
        self.entrypoint = entrypoint
        self.frame = frame
        self.deadline = deadline
        #: Delivery attempt of an event: 1, or more when it is being redelivered.
        self.attempt = attempt
        self.data: dict[str, Any] = {}
        self._call_id: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The headers of the frame being handled."""
        return self.frame.headers

    @property
    def call_id(self) -> str:
        """A process-independent id of this call, e.g. ``greeting_service.hello.inbox.1:42``.

        Built on first use only: most calls never log.
        """
        if self._call_id is None:
            frame = self.frame
            origin = (
                frame.headers.get(IDEMPOTENCY_HEADER) or f"{frame.reply_to}:{frame.correlation_id}"
            )
            self._call_id = f"{self.service}.{self.entrypoint}.{origin}"
        return self._call_id

    @property
    def call_id_stack(self) -> list[str]:
        """The call ids from the outermost call down to this one."""
        parent = self.frame.headers.get(CALL_STACK_HEADER)
        stack = parent.split(" ") if parent else []
        stack.append(self.call_id)
        return stack[-MAX_CALL_STACK:]

    @property
    def idempotency_key(self) -> str | None:
        """The event's idempotency key (``None`` for RPC calls)."""
        return self.frame.headers.get(IDEMPOTENCY_HEADER)

    @property
    def remaining(self) -> float | None:
        """Seconds left before the deadline, ``None`` without one."""
        if not self.deadline:
            return None
        return self.deadline - time.time()

    def __repr__(self) -> str:
        return f"<CallContext {self.call_id}>"


current_call: ContextVar[CallContext | None] = ContextVar("basidia_current_call", default=None)


def current_context() -> CallContext | None:
    """The context of the entrypoint call running in this task, if any."""
    return current_call.get()

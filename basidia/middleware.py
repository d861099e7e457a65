"""The one seam around outgoing calls and incoming handlers.

Tracing, metrics, retries and circuit breaking plug in here.  A middleware
overrides ``call`` (outgoing RPC), ``handle`` (an entrypoint handling a
request or event) or both, and continues with ``call_next``.  Hooks nobody
overrides are not in the chain, so an empty seam costs nothing per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from basidia.context import CallContext

__all__ = ["CallNext", "HandleNext", "Middleware", "OutgoingCall"]


@dataclass(slots=True)
class OutgoingCall:
    """An RPC call about to be sent; middleware may change ``timeout`` and ``headers``."""

    service: str
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timeout: float
    headers: dict[str, str] = field(default_factory=dict)


CallNext = Callable[[OutgoingCall], Awaitable[Any]]
HandleNext = Callable[["CallContext", tuple[Any, ...]], Awaitable[Any]]


class Middleware:
    """Base class: both hooks pass straight through."""

    async def call(self, call: OutgoingCall, call_next: CallNext) -> Any:
        """Wrap an outgoing RPC call."""
        return await call_next(call)

    async def handle(self, ctx: CallContext, args: tuple[Any, ...], call_next: HandleNext) -> Any:
        """Wrap an entrypoint handling a request or an event."""
        return await call_next(ctx, args)


def call_chain(middleware: Sequence[Middleware], last: CallNext) -> CallNext | None:
    """Compose the ``call`` hooks around ``last``; None when no middleware has one."""
    hooks = [m for m in middleware if type(m).call is not Middleware.call]
    if not hooks:
        return None
    chain = last
    for hook in reversed(hooks):

        def link(call: OutgoingCall, _hook: Middleware = hook, _next: CallNext = chain) -> Any:
            return _hook.call(call, _next)

        chain = link
    return chain


def handle_chain(middleware: Sequence[Middleware], last: HandleNext) -> HandleNext | None:
    """Compose the ``handle`` hooks around ``last``; None when no middleware has one."""
    hooks = [m for m in middleware if type(m).handle is not Middleware.handle]
    if not hooks:
        return None
    chain = last
    for hook in reversed(hooks):

        def link(
            ctx: CallContext,
            args: tuple[Any, ...],
            _hook: Middleware = hook,
            _next: HandleNext = chain,
        ) -> Any:
            return _hook.handle(ctx, args, _next)

        chain = link
    return chain

"""The RabbitMQ adapter's hot path, beside aiormq's channel API.

aiormq spends a task per delivered message (it runs every consumer callback in a
task of its own, and cancels those tasks when the channel closes) and, on every
publish, a lock, a timeout scope and a cancellation guard.  An RPC round trip has
two publishes and two deliveries, so on the request and reply path Basidia:

* takes deliveries in the channel's reader, synchronously (``DirectDeliveries``):
  a request goes straight to the consumer's worker pool, a reply straight to the
  router, with no task in between and nothing that a closing channel cancels; a
  message over the consumer's size bound is not gathered at all (its body frames
  are dropped as they are read), so a publisher cannot make a consumer buffer
  prefetch times RabbitMQ's 128 MiB;
* queues a publish on a channel without publisher confirms with one call that
  never suspends (``publish_nowait``), and leaves anything else (a full write
  queue, a closed channel, a channel with confirms) to ``basic_publish``.

Both rely on aiormq 7 internals, which ``pyproject.toml`` pins (``aiormq>=7.2,<8``):
the channel's ``_on_deliver_frame``, ``_read_content``, its name-mangled
``__get_content_header``, its ``number``, ``write_queue`` and ``_split_body``, and
``ChannelFrame.marshall``.  ``supported`` tells whether they are all there; when
they are not, the adapter uses the public API alone, slower but the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiormq import Channel
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

__all__ = [
    "DirectDeliveries",
    "Sink",
    "direct_deliveries",
    "oversized",
    "publish_nowait",
    "supported",
]

logger = logging.getLogger("basidia.brokers.amqp")

#: Takes a delivered message synchronously, in the channel's reader task.
Sink = Callable[[DeliveredMessage], None]

_CHANNEL_INTERNALS = (
    "_on_deliver_frame",
    "_read_content",
    "_Channel__get_content_header",
    "_split_body",
    "write_queue",
    "number",
    "publisher_confirms",
)


# What publish_nowait needs of the classes (the instance attributes it checks per call).
_PUBLISH_INTERNALS = hasattr(Channel, "_split_body") and hasattr(ChannelFrame, "marshall")


def supported(channel: Channel) -> bool:
    """Whether ``channel`` has the aiormq internals this module uses."""
    return all(hasattr(channel, name) for name in _CHANNEL_INTERNALS)


def direct_deliveries(channel: Channel) -> DirectDeliveries | None:
    """The ``DirectDeliveries`` of ``channel``, installed on first use; None when this
    aiormq lacks the internals it needs."""
    impl: Any = channel
    direct: DirectDeliveries | None = getattr(impl, "_basidia_direct", None)
    if direct is None and supported(channel):
        direct = impl._basidia_direct = DirectDeliveries(channel)
    return direct


class DirectDeliveries:
    """Hands a channel's deliveries to synchronous sinks, by consumer tag.

    Installed on a channel, it replaces aiormq's delivery handler.  The message is
    read exactly as aiormq reads it; a consumer tag with a sink gets it at once, in
    the channel's reader task (a sink must not block, and must not raise); any other
    consumer tag is served as aiormq serves it, in a task of its own.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel: Any = channel
        self._sinks: dict[str, tuple[Sink, int]] = {}
        self._aiormq_handler = channel._on_deliver_frame
        setattr(channel, "_on_deliver_frame", self._on_deliver_frame)  # noqa: B010

    def add(self, consumer_tag: str, sink: Sink, max_body: int = 0) -> None:
        """Send the deliveries of ``consumer_tag`` to ``sink`` (before consuming with it).

        With ``max_body``, a message whose body is larger reaches ``sink`` with an empty
        body (its ``header.body_size`` tells the real size): see ``oversized``.
        """
        self._sinks[consumer_tag] = (sink, max_body)

    def discard(self, consumer_tag: str) -> None:
        self._sinks.pop(consumer_tag, None)

    async def _on_deliver_frame(self, frame: spec.Basic.Deliver) -> None:
        entry = self._sinks.get(frame.consumer_tag or "")
        if entry is None:
            await self._aiormq_handler(frame)
            return
        sink, max_body = entry
        channel = self._channel
        header = await channel._Channel__get_content_header()
        message: DeliveredMessage
        if max_body and header.body_size > max_body:
            await self._skip_body(header.body_size)
            message = DeliveredMessage(delivery=frame, header=header, body=b"", channel=channel)
        else:
            message = await channel._read_content(frame, header)
        try:
            sink(message)
        except Exception:  # a bug; the reader must go on, or the channel would close
            logger.exception("a delivery sink failed on channel %s", channel.number)

    async def _skip_body(self, size: int) -> None:
        """Read and drop the body frames of a message of ``size`` bytes."""
        channel = self._channel
        remaining = size
        while remaining > 0:
            content = await channel._get_frame()
            if not isinstance(content, ContentBody):
                raise ValueError(f"unexpected frame {content!r} in a message body")
            remaining -= len(content.value)


def oversized(message: DeliveredMessage) -> bool:
    """Whether ``message`` came without its body, being over its consumer's size bound."""
    return message.header.body_size > len(message.body)


def publish_nowait(
    channel: Channel,
    body: bytes,
    routing_key: str,
    properties: spec.Basic.Properties,
    *,
    mandatory: bool = False,
) -> bool:
    """Queue a publish to the default exchange without suspending.

    Only for a channel without publisher confirms.  Returns False, having done
    nothing, when the channel is closed, the connection's write queue is full, or
    this aiormq lacks the internals used here: the caller then publishes through
    ``basic_publish``, which waits for room and raises the channel's error.
    """
    impl: Any = channel
    queue = getattr(impl, "write_queue", None)
    number = getattr(impl, "number", None)
    if (
        queue is None
        or number is None
        or not _PUBLISH_INTERNALS
        or getattr(impl, "publisher_confirms", True)
        or channel.is_closed
        or queue.full()
    ):
        return False
    frames: list[Any] = [
        spec.Basic.Publish(exchange="", routing_key=routing_key, mandatory=mandatory),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    frames += impl._split_body(body)
    queue.put_nowait(ChannelFrame.marshall(channel_number=number, frames=frames))
    return True

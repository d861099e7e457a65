"""Publishing events: one frame per event, with an idempotency key."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from basidia._speedups import Frame, Kind, encode_frame
from basidia._wire import Codec
from basidia.brokers.base import Broker
from basidia.context import IDEMPOTENCY_HEADER, SOURCE_HEADER
from basidia.versioning import VERSION_HEADER, check_version

if TYPE_CHECKING:
    from basidia.telemetry import Instrumentation

__all__ = ["EventPublisher"]


class EventPublisher:
    """Encodes and publishes events on a broker."""

    def __init__(self, broker: Broker, codec: Codec, max_frame_size: int) -> None:
        self._broker = broker
        self._codec = codec
        self._max_frame_size = max_frame_size
        #: PRODUCER spans and trace context, when telemetry is on (docs/observability.md).
        self.telemetry: Instrumentation | None = None

    async def publish(
        self,
        event: str,
        data: Any,
        *,
        source: str = "",
        idempotency_key: str | None = None,
        version: int | None = None,
    ) -> str:
        """Publish ``data`` as event ``event``; return its idempotency key once the
        broker has confirmed it.

        Pass the same ``idempotency_key`` when re-publishing the same business
        event so that handlers (and de-duplicating brokers) can recognise it.
        ``version`` is the schema version ``data`` follows (none: version 1); it
        travels in the ``ver`` header (docs/events.md).
        """
        if self.telemetry is not None:
            return await self.telemetry.publish(
                self._publish, event, data, source, idempotency_key, version
            )
        return await self._publish(event, data, source, idempotency_key, version, None)

    async def _publish(
        self,
        event: str,
        data: Any,
        source: str,
        idempotency_key: str | None,
        version: int | None,
        trace_headers: dict[str, str] | None,
    ) -> str:
        key = idempotency_key or uuid.uuid4().hex
        codec = self._codec
        headers = {IDEMPOTENCY_HEADER: key, **codec.headers}
        if trace_headers:
            headers.update(trace_headers)
        if source:
            headers[SOURCE_HEADER] = source
        if version is not None:
            headers[VERSION_HEADER] = str(check_version(version))
        frame = Frame(Kind.EVENT, 0, event, codec.encode(data), "", 0, headers, codec.flags)
        await self._broker.publish_event(
            event, encode_frame(frame, self._max_frame_size), idempotency_key=key
        )
        return key

    def bound(self, source: str) -> _Dispatch:
        """A dispatch function that marks events as coming from ``source``."""
        return _Dispatch(self, source)


class _Dispatch:
    __slots__ = ("_publisher", "_source")

    def __init__(self, publisher: EventPublisher, source: str) -> None:
        self._publisher = publisher
        self._source = source

    async def __call__(
        self,
        event: str,
        data: Any,
        *,
        idempotency_key: str | None = None,
        version: int | None = None,
    ) -> str:
        """Publish ``data`` as event ``event``; see ``EventPublisher.publish``."""
        return await self._publisher.publish(
            event, data, source=self._source, idempotency_key=idempotency_key, version=version
        )

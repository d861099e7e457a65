"""W3C trace context in frames and HTTP requests: written for the next hop, read within
bounds from the last one (docs/protocol.md, docs/observability.md)."""

from __future__ import annotations

import logging
import re

from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags, TraceState

from basidia.log import ThrottledLog

__all__ = [
    "BAGGAGE_HEADER",
    "EMPTY",
    "MAX_BAGGAGE_ENTRIES",
    "MAX_TRACE_CONTEXT",
    "TRACEPARENT_HEADER",
    "TRACESTATE_HEADER",
    "TraceContextReader",
    "current_ids",
    "parse_traceparent",
    "trace_headers",
]

logger = logging.getLogger("basidia.telemetry")

#: Frame headers carrying W3C trace context (docs/protocol.md).
TRACEPARENT_HEADER = "tp"
TRACESTATE_HEADER = "ts"
BAGGAGE_HEADER = "bg"
#: Bytes of untrusted trace context (traceparent, tracestate and baggage together)
#: and baggage entries read from a frame or an HTTP request; beyond, it is dropped.
MAX_TRACE_CONTEXT = 8192
MAX_BAGGAGE_ENTRIES = 180
#: W3C Trace Context: tracestate has at most 32 members (512 characters is the
#: length a vendor may rely on being propagated).
_MAX_TRACESTATE = 512

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# W3C Baggage: key is a token, value baggage-octets or percent-encoded, properties after ';'.
_BAGGAGE_ENTRY = re.compile(
    r"\s*[!#$%&'*+\-.^_`|~0-9A-Za-z]+\s*=\s*[!#$%&'()*+\-./0-9:<=>?@A-Z\[\]^_`a-z{|}~]*\s*(;.*)?"
)
# W3C Trace Context: a tracestate member is ``key=value``; checked here, so that a
# malformed one is counted once rather than logged by the SDK for every member.
_TRACESTATE_MEMBER = re.compile(
    r"\s*(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\s*"
)
_MAX_TRACESTATE_MEMBERS = 32
_BAGGAGE = W3CBaggagePropagator()
EMPTY = Context()

# -- trace context ------------------------------------------------------------------------------


def parse_traceparent(value: str) -> SpanContext | None:
    """The remote span context a W3C ``traceparent`` names; None when it is malformed."""
    if len(value) < 55:
        return None
    version = value[:2]
    if version == "00":
        if len(value) != 55:
            return None
    elif version == "ff" or (len(value) > 55 and value[55] != "-"):
        return None  # a later version may add fields after a dash; ff is never valid
    head = value[:55]
    if _TRACEPARENT.fullmatch(head) is None:
        return None
    trace_id, span_id = int(head[3:35], 16), int(head[36:52], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(head[53:55], 16) & 0x01)
    )


class TraceContextReader:
    """Reads untrusted trace context, within bounds; what it drops it counts and logs."""

    def __init__(self) -> None:
        #: Trace contexts dropped, by reason.
        self.dropped: dict[str, int] = {}
        self._log = ThrottledLog(logger)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self._log.log(logging.WARNING, reason, "dropped untrusted trace context: %s", reason)

    def read(
        self, traceparent: str | None, tracestate: str | None, baggage_: str | None
    ) -> Context:
        """The context to continue: the remote parent and baggage, or an empty context."""
        size = len(traceparent or "") + len(tracestate or "") + len(baggage_ or "")
        if size > MAX_TRACE_CONTEXT:
            self._drop("oversized")
            return EMPTY
        ctx = EMPTY
        if traceparent is not None:
            parent = parse_traceparent(traceparent)
            if parent is None:
                self._drop("malformed traceparent")
            else:
                if tracestate:
                    parent = self._with_state(parent, tracestate)
                ctx = trace.set_span_in_context(NonRecordingSpan(parent), ctx)
        if baggage_:
            entries = baggage_.split(",")
            if len(entries) > MAX_BAGGAGE_ENTRIES:
                self._drop("too many baggage entries")
            elif not all(_BAGGAGE_ENTRY.fullmatch(entry) for entry in entries):
                self._drop("malformed baggage")
            else:
                ctx = _BAGGAGE.extract({"baggage": baggage_}, ctx)
        return ctx

    def _with_state(self, parent: SpanContext, tracestate: str) -> SpanContext:
        members = [member for member in tracestate.split(",") if member.strip()]
        state = None
        if (
            len(tracestate) <= _MAX_TRACESTATE
            and len(members) <= _MAX_TRACESTATE_MEMBERS
            and all(_TRACESTATE_MEMBER.fullmatch(member) for member in members)
        ):
            state = TraceState.from_header([tracestate])
        if not state:
            self._drop("malformed tracestate")
            return parent
        return SpanContext(
            parent.trace_id,
            parent.span_id,
            is_remote=True,
            trace_flags=parent.trace_flags,
            trace_state=state,
        )


def trace_headers(span: Span, ctx: Context) -> dict[str, str]:
    """The frame headers that carry ``span`` (and ``ctx``'s baggage) to the next hop."""
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return {}
    headers = {
        TRACEPARENT_HEADER: (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
            f"{int(span_context.trace_flags):02x}"
        )
    }
    if span_context.trace_state:
        headers[TRACESTATE_HEADER] = span_context.trace_state.to_header()
    if baggage.get_all(ctx):
        carrier: dict[str, str] = {}
        _BAGGAGE.inject(carrier, ctx)
        if "baggage" in carrier:
            headers[BAGGAGE_HEADER] = carrier["baggage"]
    return headers


def current_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids, for log records (``basidia.log``)."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"

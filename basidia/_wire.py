"""Payloads: arguments, results, events and errors, into frame payloads and back.

The only module that writes or reads a frame's payload (docs/protocol.md, "What each
kind carries"); brokers move frames without looking into them.  Payloads are
MessagePack by default, JSON with ``FLAG_JSON``, or a serializer registered with
``register_serializer`` and named in the frame's ``ct`` header (docs/serialization.md).
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from basidia._speedups import (
    FLAG_JSON,
    FLAG_KWARGS,
    HARD_MAX_FRAME_SIZE,
    Frame,
    Kind,
    decode_frame,
    encode_frame,
)
from basidia.errors import (
    ERROR_TYPES,
    FrameError,
    RemoteError,
    RpcError,
    ServiceUnavailable,
    ValidationError,
)
from basidia.log import shorten

__all__ = [
    "CONTENT_TYPE_HEADER",
    "ArgumentSpec",
    "Codec",
    "Serializer",
    "TypedDecoder",
    "decode_over_limit",
    "decode_result",
    "error_from_frame",
    "error_reply",
    "error_text",
    "no_responders",
    "register_serializer",
    "reply_frame",
]

#: Frame header naming a registered serializer; absent for MessagePack and JSON.
CONTENT_TYPE_HEADER = "ct"
#: Characters of an error message sent back to a caller; the rest is cut (docs/protocol.md).
MAX_ERROR_MESSAGE = 8192
#: Characters of a remote traceback sent back to a caller.
MAX_TRACEBACK = 16384
#: Characters of an exception type name or of the echoed target in an error frame.
_MAX_ERROR_NAME = 256

_REPLY, _ERROR = int(Kind.REPLY), int(Kind.ERROR)
_MSGPACK_DECODE = msgspec.msgpack.Decoder().decode
_JSON_DECODE = msgspec.json.Decoder().decode
_msgpack_encode = msgspec.msgpack.Encoder().encode
_json_encode = msgspec.json.Encoder().encode


# -- serializers --------------------------------------------------------------------------------


class Serializer(Protocol):
    """A payload format of your own (Protocol Buffers, CBOR, ...), for ``register_serializer``.

    ``encode`` turns arguments (a list, or ``[args, kwargs]``), results and event data
    into bytes; ``decode`` turns bytes back into plain values (lists, dicts, strings,
    numbers, bytes), which Basidia then validates against the handler's type hints.
    ``decode`` raises ``ValueError`` on bytes it cannot read.
    """

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


_REGISTERED: dict[str, Serializer] = {}
_BUILT_IN = ("msgpack", "json")


def register_serializer(serializer: Serializer) -> Serializer:
    """Make ``serializer`` available to every process that registers it under its
    ``name``: choose it with the ``serializer`` setting; frames written with it say so
    in their ``ct`` header, so any reader that has it registered reads them."""
    name = getattr(serializer, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", name):
        raise ValueError(f"a serializer needs a name of 1 to 64 letters, digits or _.+-: {name!r}")
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is built in")
    _REGISTERED[name] = serializer
    return serializer


def known_serializer(name: str) -> bool:
    """Whether ``name`` is built in or registered."""
    return name in _BUILT_IN or name in _REGISTERED


def _registered(name: str) -> Serializer:
    serializer = _REGISTERED.get(name)
    if serializer is None:
        raise ValidationError(
            f"the payload is in format {name[:64]!r}, which this process has not registered"
        )
    return serializer


def _decode_untyped(payload: bytes, flags: int, content_type: str | None) -> Any:
    """Plain values from a payload, whatever its format."""
    if content_type is not None:
        try:
            return _registered(content_type).decode(payload)
        except ValidationError:
            raise
        except Exception as exc:
            raise msgspec.DecodeError(f"unreadable {content_type} payload: {exc}") from None
    return _JSON_DECODE(payload) if flags & FLAG_JSON else _MSGPACK_DECODE(payload)


class Codec:
    """How one process writes payloads: the ``serializer`` setting, built in or registered."""

    __slots__ = ("_encode", "flags", "headers", "name")

    def __init__(self, name: str = "msgpack") -> None:
        self.name = name
        #: Frame flags and headers that say how payloads are written.
        self.flags = FLAG_JSON if name == "json" else 0
        self.headers: dict[str, str] = {}
        if name == "json":
            self._encode: Callable[[Any], bytes] = _json_encode
        elif name == "msgpack":
            self._encode = _msgpack_encode
        else:
            self._encode = _registered(name).encode
            self.headers = {CONTENT_TYPE_HEADER: name}

    def __repr__(self) -> str:
        return f"Codec({self.name!r})"

    def encode(self, value: Any) -> bytes:
        """An event's data or a result, as a payload."""
        return self._encode(value)

    def encode_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, int]:
        """Call arguments as a payload, and its frame flags."""
        if kwargs:
            return self._encode((args, kwargs)), self.flags | FLAG_KWARGS
        return self._encode(args), self.flags


def _content_type(frame: Frame) -> str | None:
    headers = frame.headers
    return headers.get(CONTENT_TYPE_HEADER) if headers else None


# -- arguments ----------------------------------------------------------------------------------

# msgspec reports where a value failed as a path: ``$[0]`` (array) or ``$.name`` (map).
_PATH = re.compile(r"(?: - at `\$(?:\[(\d+)\]|\.(\w+))(.*)`)$")


class ArgumentSpec:
    """Validates and converts the arguments of one entrypoint, built once from its hints.

    Positional-only calls decode straight into an array-like msgspec Struct
    (one C call does parsing, type checks and defaults); calls with keyword
    arguments, or in a registered format, are bound by name and converted.
    Failures become ``ValidationError`` naming the parameter.
    """

    def __init__(self, func: Callable[..., Any], qualname: str, skip_self: bool = True) -> None:
        self.qualname = qualname
        hints = typing.get_type_hints(func)
        params = list(inspect.signature(func).parameters.values())
        if skip_self:
            params = params[1:]
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        for param in params:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"{qualname}: *args and **kwargs are not supported in entrypoints")
            hint = hints.get(param.name, Any)
            if param.default is param.empty:
                fields.append((param.name, hint))
            else:
                fields.append((param.name, hint, param.default))
        self.names = [field[0] for field in fields]
        by_position = msgspec.defstruct("Args", fields, array_like=True, forbid_unknown_fields=True)
        by_name = msgspec.defstruct("Kwargs", fields, forbid_unknown_fields=True)
        self._by_name = by_name
        self._msgpack = msgspec.msgpack.Decoder(by_position).decode
        self._json = msgspec.json.Decoder(by_position).decode
        self._astuple = msgspec.structs.astuple

    def decode(self, frame: Frame) -> tuple[Any, ...]:
        """The positional arguments for the handler, validated; or ``ValidationError``."""
        flags = frame.flags
        headers = frame.headers
        try:
            if not (flags & FLAG_KWARGS or (headers and CONTENT_TYPE_HEADER in headers)):
                # The common call: positional arguments in a built-in format, one C call.
                decode = self._json if flags & FLAG_JSON else self._msgpack
                return self._astuple(decode(frame.payload))
            content_type = _content_type(frame)
            if flags & FLAG_KWARGS:
                return self._bind(_decode_untyped(frame.payload, flags, content_type))
            return self._bind([_decode_untyped(frame.payload, flags, content_type), {}])
        except msgspec.ValidationError as exc:
            raise self._error(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise ValidationError(f"{self.qualname}: undecodable arguments ({exc})") from None
        except RecursionError:
            raise ValidationError(f"{self.qualname}: arguments are nested too deeply") from None

    def _bind(self, value: Any) -> tuple[Any, ...]:
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise ValidationError(f"{self.qualname}: keyword call payload must be [args, kwargs]")
        args, kwargs = value
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise ValidationError(f"{self.qualname}: keyword call payload must be [args, kwargs]")
        if len(args) > len(self.names):
            raise ValidationError(
                f"{self.qualname}: takes {len(self.names)} arguments, {len(args)} given"
            )
        bound = dict(zip(self.names, args, strict=False))
        for name, item in kwargs.items():
            if name in bound:
                raise ValidationError(f"{self.qualname}: got multiple values for argument {name!r}")
            bound[name] = item
        return self._astuple(msgspec.convert(bound, self._by_name))

    def _error(self, message: str) -> ValidationError:
        match = _PATH.search(message)
        if match is None:
            return ValidationError(f"{self.qualname}: invalid arguments: {message}")
        index, name, rest = match.groups()
        if index is not None:
            position = int(index)
            name = self.names[position] if position < len(self.names) else f"#{position}"
        detail = message[: match.start()]
        where = f" (at {name}{rest})" if rest else ""
        return ValidationError(f"{self.qualname}: invalid argument {name!r}: {detail}{where}")


# -- event data ---------------------------------------------------------------------------------


class TypedDecoder:
    """Reads a payload (an event's data) into the type ``hint``; raises ``ValueError``
    (msgspec's ``DecodeError``/``ValidationError``) or ``RecursionError`` on bad data."""

    __slots__ = ("_hint", "_json", "_msgpack")

    def __init__(self, hint: Any) -> None:
        self._hint = hint
        self._msgpack = msgspec.msgpack.Decoder(hint).decode
        self._json = msgspec.json.Decoder(hint).decode

    def decode(self, frame: Frame) -> Any:
        content_type = _content_type(frame)
        if content_type is not None:
            try:
                value = _decode_untyped(frame.payload, frame.flags, content_type)
            except ValidationError as exc:
                raise msgspec.DecodeError(exc.message) from None
            return msgspec.convert(value, self._hint)
        return (self._json if frame.flags & FLAG_JSON else self._msgpack)(frame.payload)


# -- replies ------------------------------------------------------------------------------------


def reply_frame(request: Frame, result: Any, limit: int) -> bytes:
    """The reply frame carrying ``result``, in the request's format, at most ``limit``
    bytes; raises ``FrameError`` (too large) or what encoding raises (``TypeError``,
    ``msgspec.EncodeError``)."""
    flags = request.flags & FLAG_JSON
    request_headers = request.headers
    headers: dict[str, str] = {}
    if request_headers and CONTENT_TYPE_HEADER in request_headers:
        content_type = request_headers[CONTENT_TYPE_HEADER]
        payload = _registered(content_type).encode(result)
        headers[CONTENT_TYPE_HEADER] = content_type
    else:
        payload = _json_encode(result) if flags else _msgpack_encode(result)
    return encode_frame(
        Frame(_REPLY, request.correlation_id, "", payload, "", 0, headers, flags), limit
    )


def decode_result(reply: Frame) -> Any:
    """The result a reply frame carries; raises ``msgspec.DecodeError`` on bad bytes."""
    headers = reply.headers
    if headers and CONTENT_TYPE_HEADER in headers:
        return _decode_untyped(reply.payload, reply.flags, headers[CONTENT_TYPE_HEADER])
    return (
        _JSON_DECODE(reply.payload) if reply.flags & FLAG_JSON else _MSGPACK_DECODE(reply.payload)
    )


# -- errors -------------------------------------------------------------------------------------


class _ErrorPayload(msgspec.Struct):
    code: str = "remote_error"
    type: str = "Exception"
    message: str = ""
    traceback: str | None = None


_decode_error = msgspec.msgpack.Decoder(_ErrorPayload).decode


def error_reply(
    correlation_id: int, error: Exception, target: str = "", traceback: str | None = None
) -> bytes:
    """An error frame answering ``correlation_id``, as a service sends it.

    A ``RemoteError`` keeps the remote exception's type name.  The message is cut to
    ``MAX_ERROR_MESSAGE`` characters and the traceback to ``MAX_TRACEBACK``, so an
    error frame stays a few KiB whatever the exception said: it always fits the frame
    and broker limits.
    """
    if isinstance(error, RemoteError):
        exc_type, message = error.exc_type, error.message
        traceback = traceback or error.traceback
    else:
        exc_type, message = type(error).__name__, str(error)
    payload: dict[str, str] = {
        "code": shorten(getattr(error, "code", "remote_error"), _MAX_ERROR_NAME),
        "type": shorten(exc_type, _MAX_ERROR_NAME),
        "message": shorten(message, MAX_ERROR_MESSAGE),
    }
    if traceback:
        payload["traceback"] = shorten(traceback, MAX_TRACEBACK)
    if len(target) > _MAX_ERROR_NAME:
        target = ""  # callers match errors by correlation id; the target is informative
    return encode_frame(Frame(_ERROR, correlation_id, target, _msgpack_encode(payload)))


def no_responders(correlation_id: int, service: str) -> bytes:
    """The error frame for a request that reached no instance of ``service`` (brokers
    that learn it after sending: NATS "no responders", a RabbitMQ ``basic.return``)."""
    return error_reply(
        correlation_id, ServiceUnavailable(f"no instance of service {service!r} is running")
    )


def error_from_frame(frame: Frame) -> RpcError:
    """The exception an error frame describes, as the caller should see it."""
    try:
        error = _decode_error(frame.payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return RemoteError("MalformedError", "the service sent an unreadable error frame")
    kind = ERROR_TYPES.get(error.code)
    if kind is None or error.code == RemoteError.code:
        return RemoteError(error.type, error.message, error.traceback)
    return kind(error.message)


def decode_over_limit(body: bytes, limit: int) -> Frame | None:
    """The frame in ``body``, which is over ``limit`` but may be under the hard ceiling:
    decoded only to answer its correlation id with ``MessageTooLarge`` rather than let
    the other side wait for its deadline.  None when it is malformed or larger still."""
    if not limit < len(body) <= HARD_MAX_FRAME_SIZE:
        return None
    try:
        return decode_frame(body, HARD_MAX_FRAME_SIZE)
    except FrameError:
        return None


def error_text(body: bytes) -> str:
    """``"Type: message"`` of an error frame's bytes (for operators' views)."""
    try:
        error = error_from_frame(decode_frame(body))
    except FrameError:
        return "unreadable error frame"
    return f"{getattr(error, 'exc_type', type(error).__name__)}: {error.message}"

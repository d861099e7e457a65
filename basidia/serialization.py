"""Payload encoding (msgspec MessagePack or JSON) and argument validation against type hints."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from basidia._speedups import FLAG_JSON, FLAG_KWARGS
from basidia.errors import ValidationError

__all__ = ["ArgumentSpec", "Serializer", "decode_any"]


class Serializer:
    """Encodes payloads in one format; decodes either, as the frame's flags say."""

    def __init__(self, name: str = "msgpack") -> None:
        if name not in ("msgpack", "json"):
            raise ValueError(f"unknown serializer {name!r}: choose 'msgpack' or 'json'")
        self.name = name
        self.flags = FLAG_JSON if name == "json" else 0
        encoder = msgspec.json.Encoder() if name == "json" else msgspec.msgpack.Encoder()
        self.encode: Callable[[Any], bytes] = encoder.encode

    def __repr__(self) -> str:
        return f"Serializer({self.name!r})"

    def encode_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, int]:
        """Encode call arguments; return the payload and its frame flags."""
        if kwargs:
            return self.encode((args, kwargs)), self.flags | FLAG_KWARGS
        return self.encode(args), self.flags


_MSGPACK_DECODE = msgspec.msgpack.Decoder().decode
_JSON_DECODE = msgspec.json.Decoder().decode


def decode_any(payload: bytes, flags: int) -> Any:
    """Decode a payload without a schema."""
    return _JSON_DECODE(payload) if flags & FLAG_JSON else _MSGPACK_DECODE(payload)


# msgspec reports where a value failed as a path: ``$[0]`` (array) or ``$.name`` (map).
_PATH = re.compile(r"(?: - at `\$(?:\[(\d+)\]|\.(\w+))(.*)`)$")


class ArgumentSpec:
    """Validates and converts the arguments of one entrypoint, built once from its hints.

    Positional-only calls decode straight into an array-like msgspec Struct
    (one C call does parsing, type checks and defaults); calls with keyword
    arguments are bound by name and converted.  Failures become
    ``ValidationError`` naming the parameter.
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

    def decode(self, payload: bytes, flags: int) -> tuple[Any, ...]:
        """The positional arguments for the handler, validated; or ``ValidationError``."""
        try:
            if flags & FLAG_KWARGS:
                return self._bind(decode_any(payload, flags))
            decode = self._json if flags & FLAG_JSON else self._msgpack
            return self._astuple(decode(payload))
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

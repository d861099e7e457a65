"""Event schema versions: the ``ver`` header, the versions a handler accepts, upcasters.

A dispatcher says which schema version its data follows
(``dispatch("user.created", data, version=2)``); the version travels in the
event frame's ``ver`` header (no header: version 1).  A handler declares the
versions it accepts and, for older ones, upcasters that lift data one version up
(an upcaster's argument is converted to its type hint first, when it has one)::

    @event_handler("user.created", versions=(1, 2), upcasters={1: v1_to_v2})
    async def on_user_created(self, user: UserV2) -> None: ...

A handler that declares no versions takes every event as it comes: that path
reads no header at all.  docs/events.md has the whole story.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from basidia._wire import TypedDecoder

if TYPE_CHECKING:
    from basidia._speedups import Frame

__all__ = [
    "MAX_VERSION",
    "VERSION_HEADER",
    "EventVersionError",
    "VersionedDecoder",
    "check_version",
]

#: Frame header carrying an event's schema version, in decimal (docs/protocol.md).
VERSION_HEADER = "ver"
#: Largest schema version: four decimal digits keep the header tiny and easy to check.
MAX_VERSION = 9999

Upcaster = Callable[[Any], Any]


class EventVersionError(ValueError):
    """An event whose schema version its handler does not accept (it is dead-lettered)."""


def check_version(version: int, where: str = "version") -> int:
    """``version`` if it is a valid schema version (1 to ``MAX_VERSION``), else ``ValueError``."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"{where} must be an integer, got {version!r}")
    if not 1 <= version <= MAX_VERSION:
        raise ValueError(f"{where} must be 1 to {MAX_VERSION}, got {version}")
    return version


def frame_version(frame: Frame) -> int:
    """The schema version an event frame declares (1 without a ``ver`` header)."""
    headers = frame.headers
    text = headers.get(VERSION_HEADER) if headers else None
    if text is None:
        return 1
    if not (text.isdigit() and text.isascii() and 1 <= len(text) <= 4 and text[0] != "0"):
        raise EventVersionError(f"the event's version header is not a version: {text[:16]!r}")
    return int(text)


class VersionedDecoder:
    """Reads the data of a handler that declares versions: checks the frame's version,
    runs the upcasters from it up to a version the handler reads, then validates the
    result against the handler's type hint."""

    __slots__ = ("_accepted", "_any", "_hint", "_typed", "_upcasters", "where")

    def __init__(
        self, hint: Any, versions: Sequence[int], upcasters: Mapping[int, Upcaster], where: str
    ) -> None:
        self._hint = hint
        self._typed = TypedDecoder(hint)
        self._any = TypedDecoder(Any)
        self._accepted = frozenset(versions)
        # Each upcaster with the type its argument is converted to first (Any: as decoded).
        self._upcasters = {v: (f, upcaster_input(f)) for v, f in upcasters.items()}
        self.where = where

    def decode(self, frame: Frame) -> Any:
        version = frame_version(frame)
        if version not in self._accepted:
            accepted = ", ".join(str(v) for v in sorted(self._accepted))
            raise EventVersionError(
                f"{frame.target} version {version} is not accepted by {self.where} "
                f"(it accepts versions {accepted})"
            )
        upcasters = self._upcasters
        if version not in upcasters:
            return self._typed.decode(frame)
        data = self._any.decode(frame)
        while version in upcasters:
            upcaster, hint = upcasters[version]
            if hint is not Any:
                data = msgspec.convert(data, hint, from_attributes=True)
            try:
                data = upcaster(data)
            except Exception as exc:
                raise EventVersionError(
                    f"upcasting {frame.target} from version {version} failed in {self.where}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            version += 1
        return msgspec.convert(data, self._hint, from_attributes=True)


def check_versions(
    qualname: str, versions: Sequence[int] | None, upcasters: Mapping[int, Upcaster] | None
) -> tuple[tuple[int, ...] | None, dict[int, Upcaster]]:
    """Validate what ``@event_handler`` was given: sorted versions and the upcasters,
    each of which must lift an accepted version to the next accepted one."""
    if versions is None:
        if upcasters:
            raise ValueError(f"{qualname}: upcasters need versions=(...) to say which to accept")
        return None, {}
    if isinstance(versions, int):
        versions = (versions,)
    checked = tuple(sorted({check_version(v, f"{qualname}: a version") for v in versions}))
    if not checked:
        raise ValueError(f"{qualname}: versions=() accepts nothing; leave it out to accept all")
    steps = dict(upcasters or {})
    for version, upcaster in steps.items():
        if version not in checked or version + 1 not in checked:
            raise ValueError(
                f"{qualname}: the upcaster for version {version} lifts it to {version + 1}; "
                f"both must be in versions={checked}"
            )
        if not callable(upcaster):
            raise TypeError(f"{qualname}: the upcaster for version {version} is not callable")
    return checked, steps


def upcaster_input(upcaster: Upcaster) -> Any:
    """The type hint of an upcaster's argument (what the older version looks like), or
    ``Any`` (for documents such as AsyncAPI)."""
    try:
        hints = typing.get_type_hints(upcaster)
        params = list(inspect.signature(upcaster).parameters)
    except (TypeError, ValueError, NameError):
        return Any
    return hints.get(params[0], Any) if params else Any

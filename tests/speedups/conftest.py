"""Both implementations of the compiled core, as one parametrised fixture.

Every case in ``tests/speedups`` that takes ``impl`` runs against the pure-Python
twin (id ``py``) and the compiled one (id ``c``).  The ``c`` case is skipped when
the compiled core is not available here (not built, or ``BASIDIA_NO_EXTENSIONS``
is set) and fails instead under ``BASIDIA_REQUIRE_EXTENSIONS=1``, as CI runs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from basidia import _speedups
from basidia._speedups import Frame, env_flag

# An explicit BASIDIA_NO_EXTENSIONS=1 asks for the pure-Python core: it wins over the requirement.
REQUIRE_EXTENSIONS = env_flag("BASIDIA_REQUIRE_EXTENSIONS") and not env_flag(
    "BASIDIA_NO_EXTENSIONS"
)


@dataclass(frozen=True)
class Implementation:
    """The codec and router of one implementation, taken from its own modules."""

    tag: str
    encode_frame: Callable[..., bytes]
    decode_frame: Callable[..., Frame]
    ReplyRouter: Callable[..., Any]

    @classmethod
    def load(cls, tag: str) -> Implementation:
        frames = importlib.import_module(f"basidia._speedups._frames_{tag}")
        router = importlib.import_module(f"basidia._speedups._router_{tag}")
        return cls(tag, frames.encode_frame, frames.decode_frame, router.ReplyRouter)


PY = Implementation.load("py")


def _load_c() -> Implementation | str:
    """The compiled implementation, or why it is not available."""
    if _speedups.NO_EXTENSIONS:
        return "the compiled core is switched off (BASIDIA_NO_EXTENSIONS or not CPython)"
    try:
        return Implementation.load("c")
    except ImportError as exc:
        return f"the compiled core is not built ({exc}); run `python setup.py build_ext --inplace`"


_C = _load_c()


def require_c() -> Implementation:
    """The compiled implementation; skip without it, or fail under BASIDIA_REQUIRE_EXTENSIONS=1."""
    if isinstance(_C, str):
        if REQUIRE_EXTENSIONS:
            pytest.fail(f"{_C}, and BASIDIA_REQUIRE_EXTENSIONS=1 is set")
        pytest.skip(_C)
    return _C


@pytest.fixture(scope="session", params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> Implementation:
    """Each implementation in turn."""
    return PY if request.param == "py" else require_c()


@pytest.fixture(scope="session")
def py_impl() -> Implementation:
    """The pure-Python reference implementation."""
    return PY


@pytest.fixture(scope="session")
def c_impl() -> Implementation:
    """The compiled implementation, for differential tests against the reference."""
    return require_c()


def outcome(function: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """What a call gives, comparable across implementations: its result, or its error's
    type and text."""
    try:
        return ("ok", function(*args))
    except Exception as exc:  # the point is to compare any error
        return ("error", type(exc), str(exc))

"""The selector: which implementation runs, the switch that forces the fallback, twin parity."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import subprocess
import sys
from types import ModuleType

import pytest

import basidia
from basidia import _speedups
from basidia._speedups import env_flag
from tests.speedups.conftest import PY, REQUIRE_EXTENSIONS, require_c


def _implementation_in_subprocess(**env: str) -> str:
    """``IMPLEMENTATION`` as a fresh interpreter sees it with ``env`` added."""
    code = "import basidia._speedups as s; print(s.IMPLEMENTATION)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_no_extensions_switch_forces_pure_python(value: str) -> None:
    assert _implementation_in_subprocess(BASIDIA_NO_EXTENSIONS=value) == "py"


@pytest.mark.parametrize("value", ["0", "", "false", "no"])
def test_no_extensions_switch_off_values(value: str) -> None:
    require_c()
    assert _implementation_in_subprocess(BASIDIA_NO_EXTENSIONS=value) == "c"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), (" On ", True), ("0", False), ("", False), ("off", False)],
)
def test_env_flag(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("BASIDIA_TEST_FLAG", value)
    assert env_flag("BASIDIA_TEST_FLAG") is expected


def test_compiled_core_is_loaded() -> None:
    """Skipped where the compiled core is unavailable, unless BASIDIA_REQUIRE_EXTENSIONS=1."""
    if _speedups.IMPLEMENTATION != "c":
        reason = f"the pure-Python core is in use: {_speedups._FALLBACK_REASON}"
        if REQUIRE_EXTENSIONS:
            pytest.fail(f"{reason}, and BASIDIA_REQUIRE_EXTENSIONS=1 is set")
        pytest.skip(reason)
    assert _speedups._FALLBACK_REASON is None
    assert basidia.IMPLEMENTATION == "c"


def test_selector_exports_one_implementation_throughout() -> None:
    tag = _speedups.IMPLEMENTATION
    frames = importlib.import_module(f"basidia._speedups._frames_{tag}")
    router = importlib.import_module(f"basidia._speedups._router_{tag}")
    assert _speedups.encode_frame is frames.encode_frame
    assert _speedups.decode_frame is frames.decode_frame
    assert _speedups.ReplyRouter is router.ReplyRouter
    assert tag == basidia.IMPLEMENTATION


def _public(module: ModuleType) -> dict[str, object]:
    """Names a twin module defines for others to use."""
    return {name: getattr(module, name) for name in module.__all__}


def _members(obj: object) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


def _parameters(function: object) -> list[tuple[str, object, object]]:
    """Names, kinds and defaults of the parameters (annotations differ in compiled code)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("name", ["frames", "router"])
def test_twins_export_the_same_names_and_signatures(name: str) -> None:
    require_c()
    py = importlib.import_module(f"basidia._speedups._{name}_py")
    c = importlib.import_module(f"basidia._speedups._{name}_c")
    assert sorted(c.__all__) == sorted(py.__all__)
    for module in (py, c):  # everything public that a module defines is in __all__
        defined = {
            attr
            for attr, value in vars(module).items()
            if not attr.startswith("_") and getattr(value, "__module__", None) == module.__name__
        }
        assert defined <= set(module.__all__)
    for attr, py_value in _public(py).items():
        c_value = getattr(c, attr)
        assert (c_value.__doc__ or "").strip(), f"{attr} has no docstring"
        if not isinstance(py_value, type):
            assert _parameters(c_value) == _parameters(py_value), attr
            continue
        # A compiled class shows its constructor's signature in its docstring only;
        # attributes are compared on instances (below).
        methods = {m for m in _members(py_value) if inspect.isroutine(getattr(py_value, m))}
        assert methods == {m for m in _members(c_value) if inspect.isroutine(getattr(c_value, m))}
        for method in methods:
            assert _parameters(getattr(c_value, method)) == _parameters(
                getattr(py_value, method)
            ), method


def test_instances_have_the_same_public_attributes() -> None:
    c = require_c()
    loop = asyncio.new_event_loop()
    try:
        assert _members(c.ReplyRouter(loop=loop)) == _members(PY.ReplyRouter(loop=loop))
    finally:
        loop.close()

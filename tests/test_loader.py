"""Finding services: in a directory, a file, a module or ``module:Class``."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from basidia import ConfigError
from basidia.loader import load_services


@pytest.fixture(autouse=True)
def isolated_imports() -> Iterator[None]:
    """The loader imports files as top-level modules and extends sys.path: undo both."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        del sys.modules[name]


@pytest.fixture
def tag() -> str:
    """A suffix that keeps this test's module names apart from every other test's."""
    return uuid.uuid4().hex[:8]


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def service_source(*names: str) -> str:
    classes = "\n".join(
        textwrap.dedent(f"""
        class {name.title().replace("_", "")}(Service):
            name = "{name}"

            @rpc
            async def ping(self) -> str:
                return "{name}"
        """)
        for name in names
    )
    return "from basidia import Service, rpc\n" + classes


def names(services: list[type]) -> list[str]:
    return [service.name for service in services]  # type: ignore[attr-defined]


def test_directory_loads_every_named_service_defined_in_its_files(tmp_path: Path, tag: str) -> None:
    write(tmp_path / f"a_orders_{tag}.py", service_source("orders", "payments"))
    write(
        tmp_path / f"b_shipping_{tag}.py",
        f"""
        from basidia import Service, rpc
        from a_orders_{tag} import Orders  # imported, not defined here: not loaded twice
        from c_helpers_{tag} import TAX

        class Base(Service):  # no name: a base class, not a service
            @rpc
            async def ping(self) -> str:
                return "base"

        class Shipping(Base):
            name = "shipping"

            @rpc
            async def tax(self) -> float:
                return TAX
        """,
    )
    write(tmp_path / f"c_helpers_{tag}.py", "TAX = 0.2\n")
    write(tmp_path / f"_private_{tag}.py", service_source("private"))
    write(tmp_path / f"test_orders_{tag}.py", service_source("from_a_test"))
    write(tmp_path / "notes.txt", "not python")
    write(tmp_path / "sub" / f"nested_{tag}.py", service_source("nested"))

    services = load_services([str(tmp_path)])

    assert names(services) == ["orders", "payments", "shipping"]


def test_single_file(tmp_path: Path, tag: str) -> None:
    path = write(tmp_path / f"greeting_{tag}.py", service_source("greeting", "farewell"))
    services = load_services([str(path)])
    assert names(services) == ["greeting", "farewell"]
    assert services[0].__module__ == f"greeting_{tag}"


def test_single_file_can_import_its_siblings(tmp_path: Path, tag: str) -> None:
    write(tmp_path / f"shared_{tag}.py", "GREETING = 'Hi'\n")
    path = write(
        tmp_path / f"svc_{tag}.py",
        f"""
        from basidia import Service, rpc
        from shared_{tag} import GREETING

        class Greeter(Service):
            name = "greeter"

            @rpc
            async def hello(self) -> str:
                return GREETING
        """,
    )
    assert names(load_services([str(path)])) == ["greeter"]


def test_module_and_module_colon_class(
    tmp_path: Path, tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = f"services_{tag}"
    write(tmp_path / package / "__init__.py", "")
    write(tmp_path / package / "billing.py", service_source("invoices", "refunds"))
    monkeypatch.syspath_prepend(str(tmp_path))

    assert names(load_services([f"{package}.billing"])) == ["invoices", "refunds"]
    [refunds] = load_services([f"{package}.billing:Refunds"])
    assert refunds.name == "refunds"  # type: ignore[attr-defined]


def test_module_colon_class_from_the_working_directory(
    tmp_path: Path, tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``basidia run services.greeting:GreetingService`` from the project directory."""
    write(tmp_path / f"proj_{tag}" / "__init__.py", "")
    write(tmp_path / f"proj_{tag}" / "greeting.py", service_source("greeting"))
    monkeypatch.chdir(tmp_path)
    [service] = load_services([f"proj_{tag}.greeting:Greeting"])
    assert service.name == "greeting"  # type: ignore[attr-defined]


def test_several_targets_each_service_once_in_order(tmp_path: Path, tag: str) -> None:
    first = write(tmp_path / "one" / f"first_{tag}.py", service_source("alpha"))
    second = write(tmp_path / "two" / f"second_{tag}.py", service_source("beta"))
    services = load_services([str(second), str(first), str(second), str(first.parent)])
    assert names(services) == ["beta", "alpha"]


# -- errors ---------------------------------------------------------------------------


def test_empty_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"no services found in {tmp_path}"):
        load_services([str(tmp_path)])


def test_file_without_services_is_a_config_error(tmp_path: Path, tag: str) -> None:
    path = write(tmp_path / f"helpers_{tag}.py", "from basidia import Service\nX = 1\n")
    with pytest.raises(ConfigError, match="no services found"):
        load_services([str(path)])


def test_directory_with_only_skipped_files_is_a_config_error(tmp_path: Path, tag: str) -> None:
    write(tmp_path / f"_internal_{tag}.py", service_source("internal"))
    write(tmp_path / f"test_thing_{tag}.py", service_source("thing"))
    with pytest.raises(ConfigError, match="no services found"):
        load_services([str(tmp_path)])


@pytest.mark.parametrize(
    "target",
    ["no_such_module_xyz", "no_such_module_xyz:Service", "no/such/dir/", "missing_file_xyz.py"],
)
def test_unknown_target_is_a_config_error_naming_it(target: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_services([target])
    assert repr(target) in str(caught.value)
    assert "neither a path nor an importable module" in str(caught.value)


@pytest.mark.parametrize("attribute", ["Missing", "helper", "VALUE"])
def test_module_colon_non_service_is_a_config_error(
    tmp_path: Path, tag: str, monkeypatch: pytest.MonkeyPatch, attribute: str
) -> None:
    write(
        tmp_path / f"mod_{tag}.py",
        service_source("real") + "\ndef helper():\n    pass\n\nVALUE = 3\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=f"'mod_{tag}:{attribute}' is not a Service class"):
        load_services([f"mod_{tag}:{attribute}"])


def test_missing_dependency_of_a_module_is_named(
    tmp_path: Path, tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / f"needs_{tag}.py", f"import not_installed_{tag}\n" + service_source("x"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=f"not_installed_{tag}"):
        load_services([f"needs_{tag}"])


def test_missing_dependency_is_not_reported_as_a_missing_module(
    tmp_path: Path, tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / f"needs_{tag}.py", f"import not_installed_{tag}\n" + service_source("x"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_services([f"needs_{tag}"])
    assert "neither a path nor an importable module" not in str(caught.value)


def test_failed_file_import_leaves_no_half_imported_module(tmp_path: Path, tag: str) -> None:
    path = write(
        tmp_path / f"broken_{tag}.py", service_source("x") + "\nraise RuntimeError('boom')\n"
    )
    with pytest.raises(RuntimeError, match="boom"):
        load_services([str(path)])
    assert f"broken_{tag}" not in sys.modules

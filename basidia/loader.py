"""Finding services: in a directory, a file, a module, or ``module:Class``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

from basidia.errors import ConfigError
from basidia.service import Service

__all__ = ["load_services"]


def _services_in(module: ModuleType) -> list[type[Service]]:
    """Service classes defined (not merely imported) in ``module`` that have a name."""
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, Service)
        and value.__module__ == module.__name__
        and isinstance(getattr(value, "name", None), str)
    ]


def _import_file(path: Path) -> ModuleType:
    # The file's directory goes on sys.path so that services can import their siblings.
    directory = str(path.parent.resolve())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = path.stem
    existing = sys.modules.get(name)
    if (
        existing is not None
        and Path(getattr(existing, "__file__", "") or "").resolve() == path.resolve()
    ):
        return existing
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load_one(target: str) -> list[type[Service]]:
    path = Path(target)
    if path.is_dir():
        found: list[type[Service]] = []
        for file in sorted(path.glob("*.py")):
            if not file.name.startswith(("_", "test_")):
                found.extend(_services_in(_import_file(file)))
        return found
    if path.suffix == ".py" and path.is_file():
        return _services_in(_import_file(path))
    module_name, _, class_name = target.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise ConfigError(
                f"{target!r} is neither a path nor an importable module ({exc})"
            ) from None
        raise ConfigError(f"importing {module_name} failed: {exc}") from None
    if not class_name:
        return _services_in(module)
    service = getattr(module, class_name, None)
    if not (inspect.isclass(service) and issubclass(service, Service)):
        raise ConfigError(f"{target!r} is not a Service class")
    return [service]


def load_services(targets: list[str]) -> list[type[Service]]:
    """Every service named by ``targets``, each once, in order; an error if there are none."""
    services: list[type[Service]] = []
    for target in targets:
        for service in _load_one(target):
            if service not in services:
                services.append(service)
    if not services:
        raise ConfigError(f"no services found in {' '.join(targets)}")
    return services

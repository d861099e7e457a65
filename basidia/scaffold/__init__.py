"""``basidia new NAME``: a project with a service, its tests, config and deployment files.

The templates are package data (``basidia/scaffold/templates``); ``{{key}}`` marks
what is filled in, so that the ``${VAR}`` of config files and shells passes through.
"""

from __future__ import annotations

import keyword
import re
from importlib import resources
from pathlib import Path

from basidia import __version__
from basidia.config import Settings

__all__ = ["BROKERS", "PRESTOP_SECONDS", "create_project", "termination_grace"]

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
_MAX_NAME = 40  # Kubernetes names (<= 63) get suffixes such as "-config" and "-broker"
_KEY = re.compile(r"{{([a-z0-9_]+)}}")

#: Broker choice → (pip extra, compose template, URL inside Kubernetes).
BROKERS = {
    "rabbitmq": ("amqp", "compose-rabbitmq.yaml", "amqp://USER:PASSWORD@rabbitmq:5672/"),
    "nats": ("nats", "compose-nats.yaml", "nats://nats:4222"),
}
#: Seconds the Kubernetes preStop hook waits before SIGTERM (endpoints drain meanwhile).
PRESTOP_SECONDS = 5
#: Seconds after the grace period for the process to close its connections and exit.
EXIT_MARGIN_SECONDS = 5

# Template → where it goes in the project ({package} is the Python package's name).
_FILES = {
    "README.md": "README.md",
    "pyproject.toml": "pyproject.toml",
    "config.yaml": "config.yaml",
    "Dockerfile": "Dockerfile",
    "dockerignore": ".dockerignore",
    "gitignore": ".gitignore",
    "package/__init__.py": "{package}/__init__.py",
    "package/service.py": "{package}/service.py",
    "tests/test_service.py": "tests/test_service.py",
    "k8s/configmap.yaml": "k8s/configmap.yaml",
    "k8s/deployment.yaml": "k8s/deployment.yaml",
    "k8s/service.yaml": "k8s/service.yaml",
}


def termination_grace(grace: float) -> int:
    """Kubernetes' ``terminationGracePeriodSeconds`` for ``basidia run --grace grace``:
    the preStop wait, the grace period and a margin to exit."""
    return PRESTOP_SECONDS + int(-(-grace // 1)) + EXIT_MARGIN_SECONDS


def check_name(name: str) -> str:
    """``name`` if it can name a project, a Python package and Kubernetes objects."""
    if not _NAME.match(name) or len(name) > _MAX_NAME:
        raise ValueError(
            f"a project name is 1 to {_MAX_NAME} lower-case letters and digits, words "
            f"joined by '-' or '_', starting with a letter (e.g. 'billing' or 'order-desk'), "
            f"got {name!r}"
        )
    package = name.replace("-", "_")
    if keyword.iskeyword(package) or package in ("basidia", "tests", "test", "k8s"):
        raise ValueError(f"{name!r} would shadow a module its project needs; choose another")
    return name


def _values(name: str, broker: str) -> dict[str, str]:
    extra, _, k8s_url = BROKERS[broker]
    package = name.replace("-", "_")
    grace = Settings.shutdown_grace
    return {
        "name": name,
        "k8s_name": name.replace("_", "-"),  # Kubernetes names allow no "_"
        "package": package,
        "service": package,
        "class_name": "".join(part.capitalize() for part in package.split("_")) + "Service",
        "broker": broker,
        "broker_extra": extra,
        "k8s_broker_url": k8s_url,
        "basidia_version": __version__,
        "grace": f"{grace:g}",
        "termination_grace": str(termination_grace(grace)),
        "compose_grace": str(int(-(-grace // 1)) + EXIT_MARGIN_SECONDS),
        "prestop": str(PRESTOP_SECONDS),
    }


def _render(text: str, values: dict[str, str], template: str) -> str:
    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template {template} uses an unknown key {{{{{key}}}}}")
        return values[key]

    return _KEY.sub(fill, text)


def create_project(name: str, directory: Path | str = ".", *, broker: str = "rabbitmq") -> Path:
    """Write project ``name`` into ``directory/name``; return its path.

    Raises ``ValueError`` for a bad name or broker and ``FileExistsError`` when the
    directory exists: nothing is ever overwritten.
    """
    check_name(name)
    if broker not in BROKERS:
        raise ValueError(f"--broker must be one of {', '.join(BROKERS)}, got {broker!r}")
    root = Path(directory) / name
    if root.exists():
        raise FileExistsError(f"{root} exists already; basidia new does not overwrite anything")
    values = _values(name, broker)
    templates = resources.files(__package__).joinpath("templates")
    files = dict(_FILES)
    files[BROKERS[broker][1]] = "compose.yaml"
    root.mkdir(parents=True)
    for template, target in files.items():
        text = templates.joinpath(f"{template}.tmpl").read_text(encoding="utf-8")
        path = root / target.format(package=values["package"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_render(text, values, template), encoding="utf-8")
    return root

"""mkdocs hooks: the navigation over every page in docs/, and the CLI and configuration
references generated from the code (typer's app, basidia.config), so they cannot drift.

``python scripts/mkdocs_hooks.py cli|config`` prints a reference.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

# The guide first, then the brokers, then the references; a page found in docs/ and named
# nowhere here goes under "More", so that a new page is never left out of the site.
GUIDE = [
    "getting-started.md",
    "events.md",
    "http.md",
    "contracts.md",
    "deployment.md",
    "operations.md",
    "serialization.md",
    "dead-letters.md",
    "resilience.md",


    "observability.md",
    "reliability.md",
    "security.md",
]
BROKERS = ["brokers.md", "memory.md", "rabbitmq.md", "nats.md", "redis.md", "kafka.md"]
REFERENCE = [
    "reference/cli.md",
    "reference/configuration.md",
    "protocol.md",
    "architecture.md",
    "benchmarks.md",
    "packaging.md",
]
GENERATED = {"reference/cli.md": "cli", "reference/configuration.md": "config"}


# -- navigation -------------------------------------------------------------------------------


def navigation(docs: Path) -> list[Any]:
    """The nav: every Markdown page under ``docs`` plus the generated ones, grouped."""
    present = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")} | set(GENERATED)
    nav: list[Any] = []
    if "index.md" in present:
        nav.append({"Home": "index.md"})
    listed = {"index.md"}
    for title, pages in (("Guide", GUIDE), ("Brokers", BROKERS), ("Reference", REFERENCE)):
        found = [page for page in pages if page in present]
        listed.update(found)
        if found:
            nav.append({title: found})
    rest = sorted(present - listed)
    if rest:
        nav.append({"More": rest})
    return nav


def on_config(config: Any) -> Any:
    config["nav"] = navigation(Path(config["docs_dir"]))
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path, kind in GENERATED.items():
        files.append(File.generated(config, path, content=reference(kind)))
    return files


# -- the references ---------------------------------------------------------------------------


def reference(kind: str) -> str:
    """The Markdown of reference ``kind``: ``cli`` or ``config``."""
    return cli_reference() if kind == "cli" else config_reference()


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def cli_reference() -> str:
    """Every command of ``basidia`` with its arguments and options, from the typer app."""
    import typer.main

    from basidia.cli import app

    # typer may carry its own copy of click: its classes are used as they come.
    group: Any = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="basidia")
    lines = [
        "# Command line",
        "",
        "Generated from the `basidia` command itself (`scripts/mkdocs_hooks.py`); "
        "`basidia COMMAND --help` says the same.",
        "",
        "```text",
        "basidia [--version] COMMAND [OPTIONS] [ARGUMENTS]...",
        "```",
        "",
    ]
    for option in group.params:
        if option.param_type_name == "option":
            lines.append(f"- `{', '.join(option.opts)}`: {_cell(option.help or '')}")
    lines.append("")
    for name in sorted(group.list_commands(ctx)):
        command = group.get_command(ctx, name)
        assert command is not None
        lines += [f"## basidia {name}", "", inspect.cleandoc(command.help or ""), ""]
        arguments = [
            (param.name or "").upper() + ("..." if param.nargs == -1 else "")
            for param in command.params
            if param.param_type_name == "argument"
        ]
        usage = " ".join(["basidia", name, "[OPTIONS]", *arguments])
        lines += ["```text", usage, "```", ""]
        lines += ["| argument or option | takes | default | what it does |", "|---|---|---|---|"]
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            if param.param_type_name == "option":
                names = ", ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
                takes = "flag" if param.is_flag else (param.metavar or param.type.name.upper())
                default = "" if param.default in (None, False, ()) else f"`{param.default}`"
                help_text = param.help or ""
            else:
                names = f"`{(param.name or '').upper()}`"
                takes = ("one or more " if param.nargs == -1 else "") + param.type.name.upper()
                default = "(required)" if param.required else ""
                help_text = getattr(param, "help", "") or ""
            lines.append(f"| {names} | {takes} | {default} | {_cell(help_text)} |")
        lines.append("")
    return "\n".join(lines)


def field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comments above each field of a dataclass, by field name."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found: list[str] = []
            row = node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#:"):
                found.insert(0, lines[row].strip()[2:].strip())
                row -= 1
            comments[node.target.id] = " ".join(found)
    return comments


def config_keys() -> list[tuple[str, str, Any, str]]:
    """``(key, type, default, description)`` of every setting Basidia reads."""
    from basidia.config import Settings
    from basidia.http.server import HttpSettings
    from basidia.telemetry import TelemetrySettings

    keys: list[tuple[str, str, Any, str]] = []
    sections = ((Settings, ""), (HttpSettings, "http."), (TelemetrySettings, "telemetry."))
    for cls, prefix in sections:
        comments = field_comments(cls)
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                default: Any = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = None
            keys.append((prefix + field.name, str(field.type), default, comments[field.name]))
        if cls is HttpSettings:
            # Read by HttpSettings.from_config into host and port.
            keys.append(
                (
                    "http.listen",
                    "str",
                    "127.0.0.1:8000",
                    "Where `basidia run` serves HTTP, `HOST:PORT`; `off` turns HTTP off "
                    "(the `--http` option).",
                )
            )
    return keys


def config_reference() -> str:
    """Every configuration key with its type, default and environment variable."""
    from basidia.config import _ALIASES

    lines = [
        "# Configuration",
        "",
        "Generated from `basidia/config.py`, `basidia/http/server.py` and "
        "`basidia/telemetry/__init__.py` "
        "(`scripts/mkdocs_hooks.py`). Values come from CLI options, then `BASIDIA_*` "
        "environment variables (`.` becomes `__`: `http.token` is `BASIDIA_HTTP__TOKEN`), "
        "then the config file (`--config`, YAML or TOML, with `${VAR:default}` "
        "substitution), then these defaults. Keys are case-insensitive.",
        "",
        "| key | environment | type | default | what it sets |",
        "|---|---|---|---|---|",
    ]
    for key, kind, default, description in config_keys():
        env = "BASIDIA_" + key.upper().replace(".", "__")
        aliases = [a for a in _ALIASES.get(key, ()) if a != key]
        if aliases:
            description += " Also read as " + ", ".join(f"`{a}`" for a in aliases) + "."
        shown = "" if default in (None, "", {}, ()) else f"`{default}`"
        lines.append(f"| `{key}` | `{env}` | `{_cell(kind)}` | {shown} | {_cell(description)} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(reference(sys.argv[1] if len(sys.argv) > 1 else "cli"))

"""The documentation site's generated references (scripts/mkdocs_hooks.py): every option of
every command and every configuration key is in them, and every page is in the navigation."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType

import typer.main

from basidia.cli import app
from basidia.config import Settings
from basidia.http.server import HttpSettings
from basidia.telemetry import TelemetrySettings

ROOT = Path(__file__).resolve().parents[1]


def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts/mkdocs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_command_argument_and_option_is_in_the_cli_reference() -> None:
    text = hooks().cli_reference()
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    assert {"run", "shell", "bench", "asyncapi", "new"} <= set(commands)
    for name, command in commands.items():
        section = text.split(f"## basidia {name}\n", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            if param.param_type_name == "option":
                for opt in [*param.opts, *param.secondary_opts]:
                    assert f"`{opt}`" in section, (name, opt)
                if param.help:
                    assert " ".join(param.help.split())[:40] in section
            else:
                assert f"`{param.name.upper()}`" in section, (name, param.name)
    assert "`--version`" in text


def test_every_config_key_is_in_the_configuration_reference() -> None:
    text = hooks().config_reference()
    keys = [field.name for field in dataclasses.fields(Settings)]
    keys += [f"http.{field.name}" for field in dataclasses.fields(HttpSettings)]
    keys.append("http.listen")
    keys += [f"telemetry.{field.name}" for field in dataclasses.fields(TelemetrySettings)]
    for key in keys:
        env = "BASIDIA_" + key.upper().replace(".", "__")
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), "")
        assert f"`{env}`" in row, key
        # Every key says what it sets (a `#:` comment above its field).
        assert row.rstrip(" |").split("|")[-1].strip(), key
    assert "`20.0`" in text and "`service_timeout`" in text  # a default, an alias


def test_every_page_is_in_the_navigation() -> None:
    nav = hooks().navigation(ROOT / "docs")
    listed = {
        page
        for section in nav
        for pages in section.values()
        for page in ([pages] if isinstance(pages, str) else pages)
    }
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages | {"reference/cli.md", "reference/configuration.md"} == listed
    assert nav[0] == {"Home": "index.md"}

"""The ``basidia`` command: run, worker, shell, services, test, bench, asyncapi, new, sagas,
dlq and the rest."""

from __future__ import annotations

import ast
import asyncio
import code
import concurrent.futures
import inspect
import json
import os
import platform
import subprocess
import sys
import threading
import traceback
import types
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Optional

try:
    import typer
except ImportError as exc:  # pragma: no cover - the CLI extra is missing
    raise ImportError("the basidia command needs an extra: pip install 'basidia[cli]'") from exc

from basidia import IMPLEMENTATION, __version__
from basidia.config import Config
from basidia.errors import BasidiaError, ConfigError
from basidia.loader import load_services
from basidia.log import configure_logging
from basidia.runner import Cluster, ServiceRunner, connect
from basidia.service import Service

__all__ = ["app", "main"]

app = typer.Typer(
    name="basidia",
    help="Run, call and measure Basidia services.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version_text() -> str:
    """What ``basidia --version`` prints: version, active core, Python."""
    core = "compiled (c)" if IMPLEMENTATION == "c" else "pure Python (py)"
    return (
        f"basidia {__version__}, core: {core}, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


def _show_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Basidia: Nameko-style microservices for asyncio."""


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _load_config(
    config: Path | None, defaults: dict[str, Any] | None = None, /, **overrides: Any
) -> Config:
    return Config.load(
        config, base=defaults, overrides={k: v for k, v in overrides.items() if v is not None}
    )


def _fail(exc: BaseException) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)


def _load(targets: list[str]) -> list[type[Service]]:
    """Load services; an error in the user's code gets its traceback and a clear exit."""
    try:
        return load_services(targets)
    except BasidiaError:
        raise
    except Exception as exc:
        traceback.print_exc()
        what = " ".join(targets)
        raise ConfigError(f"loading {what} failed: {type(exc).__name__}: {exc}") from exc


ConfigOption = typer.Option(None, "--config", "-c", help="YAML or TOML config file.")
BrokerOption = typer.Option(
    None,
    "--broker",
    "-b",
    help="Broker URL: memory:// (default), amqp://..., nats://..., redis://...",
)
EventBrokerOption = typer.Option(
    None,
    "--event-broker",
    help="Broker URL for events, RPC staying on --broker (default: the same broker).",
)


@app.command()
def run(
    targets: list[str] = typer.Argument(
        ..., help="Directories, .py files, modules or module:Class naming the services."
    ),
    broker: Optional[str] = BrokerOption,  # noqa: UP045 - typer reads the annotation
    event_broker: Optional[str] = EventBrokerOption,  # noqa: UP045
    config: Optional[Path] = ConfigOption,  # noqa: UP045
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING..."),  # noqa: UP045
    log_format: Optional[str] = typer.Option(None, help="text or json."),  # noqa: UP045
    max_workers: Optional[int] = typer.Option(  # noqa: UP045
        None, help="Calls each service handles at once."
    ),
    grace: Optional[float] = typer.Option(  # noqa: UP045
        None, help="Seconds in-flight calls get to finish on SIGTERM."
    ),
    # -- HTTP (basidia/http, issue 6) --
    http: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--http",
        metavar="HOST:PORT",
        help="Serve HTTP endpoints, the management API and health probes here "
        "(default 127.0.0.1:8000); 'off' turns HTTP off.",
    ),
    management: Optional[bool] = typer.Option(  # noqa: UP045
        None, "--management/--no-management", help="Serve the management API (default: on)."
    ),
    management_token: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--management-token",
        metavar="TOKEN",
        help="Bearer token the management API requires; needed beyond loopback. "
        "Prefer BASIDIA_HTTP__TOKEN: other users can read command lines.",
    ),
    # -- end HTTP --
    fail_fast: bool = typer.Option(
        False,
        "--fail-fast",
        help="Stop everything if one service fails to start (default: it stays in ERROR "
        "and the others run).",
    ),
) -> None:
    """Run services until SIGTERM or Ctrl-C, then stop gracefully."""
    try:
        settings_config = _load_config(
            config,
            broker=broker,
            event_broker=event_broker,
            log_level=log_level,
            log_format=log_format,
            max_workers=max_workers,
            shutdown_grace=grace,
            fail_fast=fail_fast or None,
            **{"http.listen": http, "http.management": management, "http.token": management_token},
        )
        settings = settings_config.settings
        configure_logging(settings.log_level, settings.log_format)
        services = _load(targets)
        runner = ServiceRunner(services, config=settings_config)
        main = _run_with_http(runner)  # HTTP (issue 6): runner.run(), with the HTTP server
    except (BasidiaError, ImportError, TypeError, ValueError) as exc:
        raise _fail(exc) from None
    try:
        run_async(main)
    except (BasidiaError, OSError) as exc:
        raise _fail(exc) from None


# -- HTTP (basidia/http, issue 6) --------------------------------------------------------


def _run_with_http(runner: ServiceRunner) -> Coroutine[Any, Any, None]:
    """``runner.run()``, with the HTTP server that ``http.listen`` asks for.

    Without the ``http`` extra, HTTP is off with a notice, unless it was asked for.
    """
    listen = runner.config.get("http.listen")
    off = listen is False or (
        listen is not None and str(listen).strip().lower() in ("off", "false", "no", "none", "")
    )
    if off:
        return runner.run()  # nor is the HTTP stack imported: a lighter process
    try:
        from basidia.http.server import http_server_for, serve
    except ImportError:
        if listen is not None and not off:  # asked for explicitly
            raise ImportError("--http needs an extra: pip install 'basidia[http]'") from None
        if listen is None:
            typer.echo("notice: HTTP is off; pip install 'basidia[http]' to serve it", err=True)
        return runner.run()
    server = http_server_for(runner)
    return runner.run() if server is None else serve(runner, server)


# -- end HTTP ------------------------------------------------------------------------------


class AsyncConsole(code.InteractiveConsole):
    """A Python console whose input may ``await`` (run on the services' event loop)."""

    def __init__(self, namespace: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(namespace)
        self.loop = loop
        self.compile.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT

    def runcode(self, code_object: types.CodeType) -> None:
        function = types.FunctionType(code_object, self.locals)
        try:
            result = function()
            if inspect.iscoroutine(result):
                asyncio.run_coroutine_threadsafe(result, self.loop).result()
        except SystemExit:
            raise
        except BaseException:
            self.showtraceback()


@app.command()
def shell(
    targets: Optional[list[str]] = typer.Argument(  # noqa: UP045
        None, help="Services to host in this process (on the memory broker by default)."
    ),
    broker: Optional[str] = BrokerOption,  # noqa: UP045
    event_broker: Optional[str] = EventBrokerOption,  # noqa: UP045
    config: Optional[Path] = ConfigOption,  # noqa: UP045
) -> None:
    """An interactive console: ``await rpc.greeting_service.hello("World")``."""
    try:
        # A developer's console: remote errors come with their tracebacks unless the
        # config says otherwise.
        shell_config = _load_config(
            config, {"remote_tracebacks": True}, broker=broker, event_broker=event_broker
        )
        configure_logging("WARNING")
        services = _load(targets) if targets else []
    except (BasidiaError, ImportError) as exc:
        raise _fail(exc) from None

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="basidia-shell-loop", daemon=True)
    thread.start()

    def on_loop(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    runner = ServiceRunner(services, config=shell_config) if services else None
    cluster: Cluster = connect(config=shell_config)
    try:
        if runner is not None:
            on_loop(runner.start())
        on_loop(cluster.start())
    except (BasidiaError, ImportError, OSError, concurrent.futures.TimeoutError) as exc:
        loop.call_soon_threadsafe(loop.stop)
        raise _fail(exc) from None
    hosted = ", ".join(runner.containers) if runner else "none (pass PATHs to host services)"
    banner = (
        f"{version_text()}\nbroker: {cluster.broker.safe_url}; services hosted here: {hosted}\n"
        'Top-level await works: >>> await rpc.greeting_service.hello("World")\n'
        "Also: dispatch(event, data), runner, await dlq.list() (dead letters), "
        "await services()."
    )
    from basidia.resilience.dlq import DeadLetterTool

    if runner is None and cluster.broker.safe_url.startswith("memory://"):
        banner += "\n" + MEMORY_HINT

    async def show_services() -> None:
        """Print the service directory (``basidia services``)."""
        print(_services_table(await cluster.services(), cluster.broker.safe_url))

    namespace = {
        "dlq": DeadLetterTool(cluster.broker),
        "rpc": cluster.rpc,
        "dispatch": cluster.dispatch,
        "services": show_services,
        "runner": runner,
        "cluster": cluster,
        "asyncio": asyncio,
    }
    try:
        AsyncConsole(namespace, loop).interact(banner=banner, exitmsg="")
    finally:
        on_loop(cluster.close())
        if runner is not None:
            on_loop(runner.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


# -- contracts and scaffolding (docs/contracts.md, docs/getting-started.md) ----------------


@app.command()
def asyncapi(
    targets: list[str] = typer.Argument(
        ..., help="Directories, .py files, modules or module:Class naming the services."
    ),
    output: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--output", "-o", help="Write it here (.json, or .yaml/.yml); default: stdout."
    ),
    title: str = typer.Option("Basidia services", help="The document's title."),
    broker: Optional[str] = typer.Option(  # noqa: UP045
        None, "--broker", "-b", help="Name this broker (amqp://... or nats://...) as the server."
    ),
) -> None:
    """Write the AsyncAPI 3.0 document of the services' RPC methods and events."""
    from basidia.asyncapi import asyncapi_document

    try:
        document = asyncapi_document(_load(targets), title=title, broker=broker)
    except (BasidiaError, ImportError, TypeError, ValueError) as exc:
        raise _fail(exc) from None
    if output is not None and output.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    else:
        import json

        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)


@app.command()
def new(
    name: str = typer.Argument(..., help="The project's name: a directory of that name is made."),
    broker: str = typer.Option(
        "rabbitmq", "--broker", "-b", help="The broker in the compose file: rabbitmq or nats."
    ),
    directory: Path = typer.Option(
        Path("."), "--directory", "-d", help="Where to make the project's directory."
    ),
) -> None:
    """Write a new project: a service, its tests, config, Dockerfile, compose file, manifests."""
    from basidia.scaffold import create_project

    try:
        root = create_project(name, directory, broker=broker)
    except (BasidiaError, ValueError, FileExistsError) as exc:
        raise _fail(exc) from None
    typer.echo(f"created {root}; next: cd {root} and see its README.md")


# -- end contracts and scaffolding ---------------------------------------------------------


# -- operations (docs/operations.md) ------------------------------------------------------------

MEMORY_HINT = (
    "note: memory:// lives inside one process: services that another process runs "
    "(basidia run in another terminal) are not seen here. Host them in this process "
    "(basidia shell PATH) or give both a network broker (--broker amqp://... or nats://...)."
)


def _services_table(instances: list[Any], broker: str) -> str:
    from basidia.directory import format_table

    if not instances:
        return f"no service instances on {broker}"
    return f"broker: {broker}\n" + format_table(instances)


@app.command()
def services(
    broker: Optional[str] = BrokerOption,  # noqa: UP045
    config: Optional[Path] = ConfigOption,  # noqa: UP045
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON list, one object per instance."
    ),
    service: Optional[str] = typer.Option(  # noqa: UP045
        None, "--service", "-s", help="Only the instances of this service."
    ),
    wait: float = typer.Option(
        1.0, help="Seconds the running processes get to answer before the list is printed."
    ),
) -> None:
    """List every service instance on the broker: host, pid, version, state, entrypoints."""
    try:
        settings_config = _load_config(config, broker=broker)
        configure_logging("WARNING")
        if not 0 <= wait <= 60:
            raise ConfigError(f"--wait must be 0 to 60 seconds, got {wait}")
    except (BasidiaError, ImportError) as exc:
        raise _fail(exc) from None

    async def listing() -> tuple[list[Any], str]:
        async with connect(config=settings_config) as cluster:
            found = await cluster.services(wait)
            return found, cluster.broker.safe_url

    try:
        instances, url = run_async(listing())
    except (BasidiaError, ImportError, OSError) as exc:
        raise _fail(exc) from None
    if service is not None:
        instances = [i for i in instances if i.service == service]
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in instances], indent=2))
    else:
        typer.echo(_services_table(instances, url))
    if url.startswith("memory://"):
        typer.echo(MEMORY_HINT, err=True)


@app.command()
def worker(
    targets: list[str] = typer.Argument(
        ..., help="Directories, .py files, modules or module:Class naming the services."
    ),
    broker: Optional[str] = BrokerOption,  # noqa: UP045
    config: Optional[Path] = ConfigOption,  # noqa: UP045
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING..."),  # noqa: UP045
    log_format: Optional[str] = typer.Option(None, help="text or json."),  # noqa: UP045
    max_workers: Optional[int] = typer.Option(  # noqa: UP045
        None, help="Events each service handles at once."
    ),
    grace: Optional[float] = typer.Option(  # noqa: UP045
        None, help="Seconds in-flight handlers get to finish on SIGTERM."
    ),
    fail_fast: bool = typer.Option(
        False, "--fail-fast", help="Stop everything if one service fails to start."
    ),
) -> None:
    """Run only the event handlers and timers of the services: no RPC, no HTTP."""
    try:
        settings_config = _load_config(
            config,
            broker=broker,
            log_level=log_level,
            log_format=log_format,
            max_workers=max_workers,
            shutdown_grace=grace,
            fail_fast=fail_fast or None,
        )
        settings = settings_config.settings
        configure_logging(settings.log_level, settings.log_format)
        loaded = _load(targets)
        groups = frozenset(WORKER_GROUPS)
        chosen = [s for s in loaded if any(e.group in groups for e in s.__entrypoints__.values())]
        if not chosen:
            raise ConfigError(
                f"nothing for a worker in {' '.join(targets)}: no @event_handler or @timer"
            )
        for skipped in sorted(
            {s.service_name() for s in loaded} - {s.service_name() for s in chosen}
        ):
            typer.echo(f"notice: {skipped} has no event handler or timer; not run", err=True)
        runner = ServiceRunner(chosen, config=settings_config, groups=groups)
    except (BasidiaError, ImportError, TypeError, ValueError) as exc:
        raise _fail(exc) from None
    try:
        run_async(runner.run())
    except (BasidiaError, OSError) as exc:
        raise _fail(exc) from None


#: The entrypoint groups ``basidia worker`` serves.
WORKER_GROUPS = ("events", "timers")


@app.command(
    "test",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def test_command(
    ctx: typer.Context,
    broker: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--broker",
        "-b",
        help="Run the fixtures' services on this broker (default: a private memory:// per test).",
    ),
) -> None:
    """Run pytest with Basidia's fixtures (basidia_runner, basidia_rpc...) in asyncio auto
    mode, on the memory broker unless --broker names one; other arguments go to pytest:
    basidia test tests/ -k greeting -x."""
    import importlib.util

    if (
        importlib.util.find_spec("pytest") is None
        or importlib.util.find_spec("pytest_asyncio") is None
    ):
        raise _fail(ImportError("basidia test needs pytest: pip install 'basidia[testing]'"))
    from importlib.metadata import entry_points

    args = list(ctx.args)
    for option, value in (
        ("asyncio_mode", "auto"),
        ("asyncio_default_fixture_loop_scope", "function"),
    ):
        # async def tests and fixtures run without markers, as in a project from basidia new.
        if not any(option in arg for arg in args):
            args = ["-o", f"{option}={value}", *args]
    if not any(ep.value == "basidia.testing.plugin" for ep in entry_points(group="pytest11")):
        args = ["-p", "basidia.testing.plugin", *args]  # a checkout without the entry point
    if broker is not None:
        from basidia.testing import TEST_BROKER_ENV

        os.environ[TEST_BROKER_ENV] = broker
    # pytest in a fresh interpreter: in this one Basidia is imported already, and pytest
    # could not rewrite the assertions of its plugin.
    command = [sys.executable, "-m", "pytest", *args]
    if os.name == "posix":
        sys.stdout.flush()
        os.execv(sys.executable, command)
    raise typer.Exit(code=subprocess.call(command))  # pragma: no cover - Windows


# -- end operations ------------------------------------------------------------------------------

# -- sagas (docs/sagas.md) -------------------------------------------------------------------


@app.command()
def sagas(
    action: str = typer.Argument(..., help="list, or show (with SAGA_ID)."),
    saga_id: Optional[str] = typer.Argument(None, help="The saga to show."),  # noqa: UP045
    database: str = typer.Option(
        ...,
        "--database",
        "-d",
        metavar="URL",
        envvar="BASIDIA_DATABASE__URL",
        help="The service's database: postgresql://... or sqlite:///file.db "
        "(default: BASIDIA_DATABASE__URL).",
    ),
    schema: Optional[str] = typer.Option(  # noqa: UP045
        None, "--schema", help="The PostgreSQL schema of the tables (default: the search path)."
    ),
    status: Optional[str] = typer.Option(  # noqa: UP045
        None,
        "--status",
        help="list: only sagas in this status (running, compensating, completed, "
        "compensated, failed).",
    ),
    limit: int = typer.Option(50, "--limit", help="list: at most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rather than text."),
) -> None:
    """List the sagas in a service's database, or show one with its steps."""
    from basidia.data.sagactl import show_sagas

    if action not in ("list", "show") or (action == "show") != (saga_id is not None):
        raise _fail(ValueError("use: basidia sagas list, or basidia sagas show SAGA_ID"))
    try:
        text = run_async(
            show_sagas(database, schema, saga_id, status=status, limit=limit, as_json=as_json)
        )
    except (BasidiaError, ImportError, ValueError, OSError) as exc:
        raise _fail(exc) from None
    typer.echo(text)


# -- end sagas -------------------------------------------------------------------------------


@app.command()
def dlq(
    action: str = typer.Argument(..., help="list, show, replay or purge."),
    ids: Optional[list[str]] = typer.Argument(  # noqa: UP045
        None, help="Dead letters to show, replay or purge, by id (default: all selected)."
    ),
    broker: Optional[str] = BrokerOption,  # noqa: UP045
    service: Optional[str] = typer.Option(  # noqa: UP045
        None, "--service", "-s", help="Only the dead letters of this service."
    ),
    handler: Optional[str] = typer.Option(  # noqa: UP045
        None, "--handler", "-H", help="Only those of this event handler."
    ),
    limit: int = typer.Option(100, "--limit", help="Dead letters read per group, at most."),
    yes: bool = typer.Option(False, "--yes", help="Purge every selected dead letter."),
    config: Optional[Path] = ConfigOption,  # noqa: UP045
) -> None:
    """Dead letters: list, show (whole records, as JSON), replay to their handlers, purge."""
    from basidia.brokers import broker_from_url
    from basidia.resilience.dlq import ACTIONS, DeadLetterTool

    if action not in ACTIONS:
        raise _fail(ConfigError(f"the action must be one of {', '.join(ACTIONS)}, not {action!r}"))

    async def act() -> None:
        settings = _load_config(config, broker=broker).settings
        adapter = broker_from_url(settings.broker, settings.broker_options)
        await adapter.connect()
        try:
            tool = DeadLetterTool(adapter, typer.echo)
            chosen = list(ids or ())
            if action == "list":
                await tool.list(service, handler, limit=limit)
            elif action == "show":
                await tool.show(chosen, service, handler, limit=limit)
            elif action == "replay":
                await tool.replay(chosen, service, handler)
            else:
                await tool.purge(chosen, service, handler, everything=yes)
        finally:
            await adapter.close()

    try:
        run_async(act())
    except (BasidiaError, ImportError, OSError, NotImplementedError) as exc:
        raise _fail(exc) from None


def _register_bench() -> None:
    try:
        from basidia.bench import command
    except ImportError:  # pragma: no cover - benchmark module not installed
        return
    app.command("bench")(command)


_register_bench()


def main() -> None:
    """Entry point of the ``basidia`` console script."""
    app(prog_name="basidia")


if __name__ == "__main__":  # pragma: no cover
    main()

"""``basidia worker`` and ``basidia test`` (docs/operations.md), run as a user runs them."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest

from basidia import ServiceUnavailable, connect

from .test_cli import basidia_cmd, cli_env, run_cli
from .test_directory import ONCE

WORKER_SERVICES = """
import os
from pathlib import Path

from basidia import Service, event_handler, rpc
from basidia.timers import timer

MARKERS = Path(os.environ["MARKERS"])


class Mixed(Service):
    name = "mixed_{unique}"

    @rpc
    async def ask(self) -> str:
        return "answered"

    @event_handler("{unique}.job", durable=False)
    async def on_job(self, job: dict) -> None:
        (MARKERS / f"job-{{job['n']}}").touch()

    @timer(0.2, eager=True)
    async def tick(self) -> None:
        (MARKERS / "tick").touch()


class RpcOnly(Service):
    name = "rpc_only_{unique}"

    @rpc
    async def ask(self) -> str:
        return "answered"
"""


def _start_worker(tmp_path: Path, broker: str) -> subprocess.Popen[bytes]:
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        return subprocess.Popen(
            basidia_cmd("worker", "worker_services.py", "--broker", broker),
            cwd=tmp_path,
            env=cli_env(MARKERS=str(tmp_path / "markers"), BASIDIA_DIRECTORY_HEARTBEAT="1"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


@pytest.mark.nats
@pytest.mark.timeout(60)
async def test_worker_runs_events_and_timers_but_no_rpc(
    tmp_path: Path, nats_url: str, unique: str
) -> None:
    (tmp_path / "worker_services.py").write_text(WORKER_SERVICES.format(unique=unique))
    markers = tmp_path / "markers"
    markers.mkdir()
    process = _start_worker(tmp_path, nats_url)
    try:
        async with connect(nats_url) as cluster:
            deadline = time.monotonic() + 30
            while not [i for i in await cluster.services() if i.service == f"mixed_{unique}"]:
                assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "the worker never announced itself"
                await asyncio.sleep(0.2)
            (mixed,) = [i for i in await cluster.services() if i.service == f"mixed_{unique}"]
            assert mixed.entrypoints == {"events": ["on_job"], "timers": ["tick"]}
            assert (markers / "tick").exists()
            await cluster.dispatch(f"{unique}.job", {"n": 1})
            while not (markers / "job-1").exists():
                assert time.monotonic() < deadline, "the event was not handled"
                await asyncio.sleep(0.05)
            with pytest.raises(ServiceUnavailable):
                await cluster.rpc[f"mixed_{unique}"].ask()  # no RPC in a worker
            assert not [i for i in await cluster.services() if i.service.startswith("rpc_only")]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "stderr.txt").read_text()
    assert f"rpc_only_{unique} has no event handler or timer; not run" in log


@ONCE
@pytest.mark.timeout(60)
def test_worker_without_handlers_exits_2_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "only_rpc.py").write_text(
        "from basidia import Service, rpc\n\n"
        "class OnlyRpc(Service):\n    name = 'only_rpc'\n\n"
        "    @rpc\n    async def ask(self) -> str:\n        return 'x'\n"
    )
    result = run_cli("worker", "only_rpc.py", cwd=tmp_path, timeout=50)
    assert result.returncode == 2
    assert "no @event_handler or @timer" in result.stderr


USER_TESTS = """
from basidia import Service, rpc


class Greeter(Service):
    name = "greeter"

    @rpc
    async def hello(self, name: str) -> str:
        return f"Hello, {name}!"


async def test_hello(basidia_runner, basidia_rpc, basidia_broker_url):
    await basidia_runner([Greeter])
    assert await basidia_rpc.greeter.hello("World") == "Hello, World!"
    assert basidia_broker_url.startswith(EXPECTED)


def test_wrong():
    assert FAIL is False
"""


@ONCE
@pytest.mark.timeout(90)
def test_basidia_test_runs_pytest_with_the_fixtures_on_the_given_broker(tmp_path: Path) -> None:
    # Without --broker the fixtures take a private memory:// (tests/test_testing_plugin.py).
    tests = tmp_path / "test_user.py"
    tests.write_text("EXPECTED, FAIL = 'memory://named', True\n" + USER_TESTS)
    result = run_cli(
        "test",
        "--broker",
        "memory://named",
        str(tests),
        "-q",
        "-p",
        "no:cacheprovider",
        cwd=tmp_path,
        timeout=80,  # a second pytest, with its plugins, on a busy machine
    )
    assert result.returncode == 1, result.stdout + result.stderr  # pytest's exit code
    assert "1 failed, 1 passed" in result.stdout  # test_hello ran on memory://named
    assert "Warning" not in result.stdout


FAILING_SERVICES = '''
from basidia import Dependency, Service, rpc


class Missing:
    """No provider is registered for it: the service cannot start."""


class Fine(Service):
    name = "fine"

    @rpc
    async def ok(self) -> str:
        return "ok"


class Broken(Service):
    name = "broken"
    thing = Dependency(Missing)

    @rpc
    async def ok(self) -> str:
        return "ok"
'''


@ONCE
@pytest.mark.timeout(60)
def test_run_fail_fast_exits_when_one_service_cannot_start(tmp_path: Path) -> None:
    # Without --fail-fast the others run and the broken one is in ERROR (tests/http/
    # test_lifecycle.py); with it, the whole run stops with the reason.
    (tmp_path / "failing_services.py").write_text(FAILING_SERVICES)
    result = run_cli(
        "run", "failing_services.py", "--fail-fast", "--http", "off", cwd=tmp_path, timeout=50
    )
    assert result.returncode == 2, result.stderr
    assert "error: no provider for" in result.stderr and "Missing" in result.stderr

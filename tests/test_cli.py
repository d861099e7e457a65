"""The ``basidia`` command, run as a user runs it: in a process of its own."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import basidia
from basidia import RpcTimeout, ServiceUnavailable, connect

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# The compiled-core switches are kept so that the child picks the same core as this process.
KEPT_SWITCHES = {"BASIDIA_NO_EXTENSIONS", "BASIDIA_REQUIRE_EXTENSIONS"}


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without Basidia settings, with the repository importable."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("BASIDIA_") or key in KEPT_SWITCHES
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def basidia_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "basidia", *args]


def run_cli(
    *args: str, stdin: str = "", cwd: Path = REPO, timeout: float = 20, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        basidia_cmd(*args),
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=cli_env(**env),
        timeout=timeout,  # on expiry subprocess.run kills and reaps the child
    )


@pytest.mark.timeout(30)
def test_version_names_the_version_and_the_active_core() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert basidia.__version__ in result.stdout
    expected = "(c)" if basidia.IMPLEMENTATION == "c" else "(py)"
    assert expected in result.stdout
    assert "basidia" in result.stdout


@pytest.mark.timeout(30)
def test_version_reports_the_pure_python_core_when_forced() -> None:
    result = run_cli("--version", BASIDIA_NO_EXTENSIONS="1")
    assert result.returncode == 0, result.stderr
    assert "pure Python (py)" in result.stdout


@pytest.mark.timeout(30)
def test_shell_on_the_examples_says_hello_world() -> None:
    """Done-when: run the examples on the memory broker and get ``Hello, World!`` back."""
    result = run_cli("shell", "examples/", stdin='await rpc.greeting_service.hello("World")\n')
    assert result.returncode == 0, result.stderr
    assert "Hello, World!" in result.stdout
    assert "greeting_service" in result.stderr  # the banner lists the hosted services


def test_readme_first_command_installs_what_the_examples_import() -> None:
    # The examples include the HTTP API service: the first command must bring the http extra.
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "basidia shell examples/" in line)
    extras = re.search(r"-e '\.\[([^\]]*)\]'", command)
    assert extras is not None, command
    assert {"cli", "http"} <= set(extras.group(1).split(","))


@pytest.mark.timeout(30)
def test_shell_survives_a_failing_call() -> None:
    lines = [
        'await rpc.nobody_here.hello("x")',
        "await rpc.user_service.get_user_greeting(7)",
    ]
    result = run_cli("shell", str(EXAMPLES), stdin="\n".join(lines) + "\n", cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    assert "ServiceUnavailable" in result.stderr
    assert "Hello, User 7!" in result.stdout


@pytest.mark.timeout(30)
def test_run_help() -> None:
    result = run_cli("run", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--broker", "--config", "--grace", "--log-level", "--max-workers"):
        assert option in result.stdout


@pytest.mark.timeout(30)
def test_run_with_a_bad_target_exits_2_with_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("run", "no_such_services_xyz", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "no_such_services_xyz" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_run_with_a_bad_config_exits_2_with_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "basidia.yaml"
    config.write_text("max_workers: 0\n", encoding="utf-8")
    result = run_cli("run", str(EXAMPLES), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "max_workers must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


CALLS = 5
HANDLER_SECONDS = 1.5
GRACE = 10.0
# ``basidia run`` serves HTTP on 127.0.0.1:8000 by default; these tests need no port.
NO_HTTP = {"BASIDIA_HTTP__LISTEN": "off"}

SLOW_SERVICES = f'''
"""A slow service: each call takes {HANDLER_SECONDS} s and leaves marker files.

With CALL_ITSELF=1 it also calls itself {CALLS} times once running: on the memory
broker nobody outside the process could call it.
"""

import asyncio
import os
from pathlib import Path

from basidia import DependencyProvider, Service, State, rpc

MARKERS = Path(os.environ["MARKERS"])


class CallsItself(DependencyProvider):
    """Once its container is RUNNING, calls the service's ``work`` {CALLS} times at once
    through the runner's own client, and records each reply."""

    async def setup(self):
        self._task = asyncio.get_running_loop().create_task(self._call())

    async def _call(self):
        while self.container.state is not State.RUNNING:
            await asyncio.sleep(0.01)
        client = self.container.runtime.client

        async def one(n):
            result = await client.call(self.container.service_name, "work", (n,), {{}})
            (MARKERS / f"replied-{{result}}").touch()

        await asyncio.gather(*(one(n) for n in range({CALLS})))

    def get_dependency(self, ctx):
        return None

    async def stop(self):
        # The service has drained by now: the replies are on their way.
        await asyncio.wait_for(self._task, 5)


class SlowService(Service):
    name = os.environ.get("SERVICE_NAME", "slow_service")
    if os.environ.get("CALL_ITSELF") == "1":
        calls = CallsItself()

    @rpc
    async def ready(self) -> bool:
        return True

    @rpc
    async def work(self, n: int) -> int:
        (MARKERS / f"started-{{n}}").touch()
        await asyncio.sleep({HANDLER_SECONDS})
        (MARKERS / f"finished-{{n}}").touch()
        return n
'''


def _numbers(directory: Path, kind: str) -> set[int]:
    return {int(path.name.split("-")[1]) for path in directory.glob(f"{kind}-*")}


def _start_run(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    services = tmp_path / "slow_services.py"
    services.write_text(SLOW_SERVICES, encoding="utf-8")
    (tmp_path / "markers").mkdir()
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        return subprocess.Popen(
            basidia_cmd("run", str(services), "--grace", str(GRACE), "--log-level", "INFO", *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=tmp_path,
            env=cli_env(MARKERS=str(tmp_path / "markers"), **NO_HTTP, **env),
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _wait_until_started(process: subprocess.Popen[bytes], tmp_path: Path) -> None:
    deadline = time.monotonic() + 15
    while len(_numbers(tmp_path / "markers", "started")) < CALLS:
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
        assert time.monotonic() < deadline, "the calls never started"
        time.sleep(0.02)
    assert not _numbers(tmp_path / "markers", "finished"), "calls finished before SIGTERM"


def _assert_drained(returncode: int, elapsed: float, tmp_path: Path) -> None:
    log = (tmp_path / "stderr.txt").read_text()
    assert returncode == 0, log
    assert _numbers(tmp_path / "markers", "finished") == set(range(CALLS)), log
    assert elapsed < GRACE, log  # it stopped when the calls were done, not at the grace limit
    assert f"waiting for {CALLS} calls in flight" in log
    assert "cancelling" not in log


@pytest.mark.timeout(30)
def test_sigterm_lets_calls_in_flight_finish_then_exits_0(tmp_path: Path) -> None:
    """Done-when 6: SIGTERM to ``basidia run`` with handlers in flight: they finish, exit 0."""
    process = _start_run(tmp_path, CALL_ITSELF="1")
    try:
        _wait_until_started(process, tmp_path)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=GRACE + 5)
        elapsed = time.monotonic() - sent
    finally:
        _stop(process)
    _assert_drained(returncode, elapsed, tmp_path)
    assert _numbers(tmp_path / "markers", "replied") == set(range(CALLS))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "broker_fixture",
    [
        pytest.param("nats_url", marks=pytest.mark.nats, id="nats"),
        pytest.param("amqp_url", marks=pytest.mark.amqp, id="amqp"),
    ],
)
async def test_sigterm_on_a_real_broker_answers_the_calls_in_flight(
    tmp_path: Path, broker_fixture: str, request: pytest.FixtureRequest, unique: str
) -> None:
    """The same on a real broker, with the callers in another process: they get replies."""
    broker_url: str = request.getfixturevalue(broker_fixture)
    service = f"slow_{unique}"
    process = _start_run(tmp_path, "--broker", broker_url, SERVICE_NAME=service)
    try:
        async with connect(broker_url, timeout=GRACE + 5) as cluster:
            proxy = cluster.rpc[service]
            deadline = time.monotonic() + 15
            while True:  # until the service is up
                assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
                try:
                    await proxy.ready.with_timeout(2)()
                    break
                except (ServiceUnavailable, RpcTimeout):
                    assert time.monotonic() < deadline, "the service never came up"
                    await asyncio.sleep(0.05)
            calls = [asyncio.ensure_future(proxy.work(n)) for n in range(CALLS)]
            try:
                await asyncio.to_thread(_wait_until_started, process, tmp_path)
                sent = time.monotonic()
                process.send_signal(signal.SIGTERM)
                results = await asyncio.wait_for(asyncio.gather(*calls), GRACE + 5)
            finally:
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
        returncode = await asyncio.to_thread(process.wait, GRACE + 5)
        elapsed = time.monotonic() - sent
    finally:
        _stop(process)
    assert results == list(range(CALLS))
    _assert_drained(returncode, elapsed, tmp_path)

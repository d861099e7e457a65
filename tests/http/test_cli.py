"""``basidia run examples/`` as a user runs it: a child process, a real socket, SIGTERM."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.http.conftest import JSON, TLS

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
START_TIMEOUT = 30.0


def basidia_command() -> list[str]:
    """``python -m basidia`` when the package has a ``__main__``, else the console script."""
    if importlib.util.find_spec("basidia.__main__") is not None:
        return [sys.executable, "-m", "basidia"]
    script = shutil.which("basidia", path=str(Path(sys.executable).parent)) or shutil.which(
        "basidia"
    )
    if script is None:
        pytest.fail("neither 'python -m basidia' nor a 'basidia' script is available")
    return [script]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Basidia:
    """A running ``basidia`` child process and its log."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path, url: str) -> None:
        self.process = process
        self.log = log
        self.url = url

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_until(self, ready: Callable[[], object]) -> None:
        """Poll ``ready`` until it is true; fail with the log if the process exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline:
            if self.process.returncode is not None:
                pytest.fail(f"basidia exited with {self.process.returncode}:\n{self.output()}")
            result = ready()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.1)
        pytest.fail(f"basidia did not get ready within {START_TIMEOUT} s:\n{self.output()}")

    async def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code (killed, and the test failed, if it hangs)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            pytest.fail(f"basidia did not stop within {timeout} s of SIGTERM:\n{self.output()}")


StartBasidia = Callable[..., Awaitable[Basidia]]


@pytest.fixture
async def start_basidia(tmp_path: Path) -> AsyncIterator[StartBasidia]:
    """``await start_basidia(*args, env=...)`` runs ``basidia run examples/ *args``."""
    started: list[Basidia] = []
    logs: list[IO[bytes]] = []

    async def start(*args: str, env: dict[str, str] | None = None, port: int = 0) -> Basidia:
        log_path = tmp_path / f"basidia-{len(started)}.log"
        log = log_path.open("wb")
        logs.append(log)
        environ = {**os.environ, **(env or {})}
        environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), environ.get("PYTHONPATH", "")])
        )
        for name in [n for n in environ if n.startswith("BASIDIA_HTTP")]:
            if name not in (env or {}):
                del environ[name]
        process = await asyncio.create_subprocess_exec(
            *basidia_command(),
            "run",
            str(EXAMPLES),
            *args,
            cwd=ROOT,
            env=environ,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        basidia = Basidia(process, log_path, f"http://127.0.0.1:{port}")
        started.append(basidia)
        return basidia

    yield start
    for basidia in started:
        if basidia.process.returncode is None:
            basidia.process.kill()
            await basidia.process.wait()
    for log in logs:
        log.close()


async def _answers(client: httpx.AsyncClient, path: str, status: int = 200) -> bool:
    try:
        return (await client.get(path)).status_code == status
    except httpx.TransportError:
        return False


async def test_basidia_run_examples_serves_users_through_rpc(
    start_basidia: StartBasidia,
) -> None:
    port = free_port()
    basidia = await start_basidia("--http", f"127.0.0.1:{port}", port=port)
    async with httpx.AsyncClient(base_url=basidia.url, timeout=10, verify=TLS) as client:
        await basidia.wait_until(lambda: _answers(client, "/health/ready"))

        response = await client.get("/users/1")
        assert response.status_code == 200
        assert response.json() == {"message": "Hello, User 1!"}
        assert (await client.get("/users/42")).json() == {"message": "Hello, User 42!"}

        # Stop the service behind the endpoint through the management API, then start it.
        stopped = await client.post("/services/database_service/stop", headers=JSON)
        assert stopped.json()["state"] == "STOPPED"
        assert (await client.get("/health/ready")).status_code == 503
        assert (await client.get("/users/1")).status_code == 503
        started = await client.post("/services/database_service/start", headers=JSON)
        assert started.json()["state"] == "RUNNING"
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.get("/users/1")).json() == {"message": "Hello, User 1!"}

        # Without a token, what a page from another site sends is refused.
        form = {"Content-Type": "text/plain", "Origin": "https://evil.example"}
        refused = await client.post("/services/database_service/stop", headers=form)
        assert refused.status_code == 403
        rebound = await client.get("/services", headers={"Host": f"evil.example:{port}"})
        assert rebound.status_code == 421
        assert (await client.get("/users/1")).json() == {"message": "Hello, User 1!"}

    assert await basidia.terminate() == 0
    log = basidia.output()
    assert "HTTP server on" in log and "stopped" in log
    assert "Traceback" not in log


async def test_basidia_run_refuses_an_exposed_management_api_without_token(
    start_basidia: StartBasidia,
) -> None:
    port = free_port()
    basidia = await start_basidia("--http", f"0.0.0.0:{port}", port=port)
    code = await asyncio.wait_for(basidia.process.wait(), START_TIMEOUT)
    assert code == 2
    assert "without a token" in basidia.output()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("token", ["env-token-3f9a1c7e", "0"])
async def test_basidia_run_exposed_with_a_token_from_the_environment(
    start_basidia: StartBasidia, token: str
) -> None:
    # "0" is a token like any other (it was once read as the number 0: no token).
    port = free_port()
    basidia = await start_basidia(
        "--http", f"0.0.0.0:{port}", port=port, env={"BASIDIA_HTTP__TOKEN": token}
    )
    async with httpx.AsyncClient(base_url=basidia.url, timeout=10, verify=TLS) as client:
        await basidia.wait_until(lambda: _answers(client, "/health/ready"))
        assert (await client.get("/services")).status_code == 401
        assert (await client.post("/services/user_service/stop")).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/", headers=auth)).json()["services"]["user_service"] == (
            "RUNNING"
        )
        assert (await client.get("/users/3")).json() == {"message": "Hello, User 3!"}
    assert await basidia.terminate() == 0
    if token != "0":  # "0" is in any log; a real token must not be
        assert token not in basidia.output()


async def test_basidia_run_without_management_or_without_http(
    start_basidia: StartBasidia,
) -> None:
    port = free_port()
    no_management = await start_basidia("--http", f"127.0.0.1:{port}", "--no-management", port=port)
    no_http = await start_basidia("--http", "off")
    async with httpx.AsyncClient(base_url=no_management.url, timeout=10, verify=TLS) as client:
        await no_management.wait_until(lambda: _answers(client, "/health/ready"))
        assert (await client.get("/services")).status_code == 404
        assert (await client.get("/users/1")).status_code == 200
    await no_http.wait_until(lambda: re.search(r"running \d+ service", no_http.output()))
    assert "HTTP on" not in no_http.output()
    assert await no_management.terminate() == 0
    assert await no_http.terminate() == 0

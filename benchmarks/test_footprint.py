"""Memory footprint of a basic service under ``basidia run`` (docs/benchmarks.md: under 40 MB RSS).

    python -m pytest benchmarks/test_footprint.py -s   # prints the figures, fails above 40 MB
    python benchmarks/test_footprint.py                # the same, without pytest

A one-method service runs on the memory broker, as ``basidia run`` starts it in
production: once with the HTTP server (management API and health probes) and
once with ``--http off``.  Once it serves, its resident set size is read from
``/proc/<pid>/status`` (Linux only).  RSS is not timing: it barely moves with load
on the machine, so a fixed limit holds here where a time would not.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MB = 40.0
START_SECONDS = 20.0

SERVICE = """
from basidia import Service, rpc


class Greeting(Service):
    name = "footprint_greeting"

    @rpc
    async def hello(self, name: str) -> str:
        return f"Hello, {name}!"
"""

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads RSS from /proc (Linux only)"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextmanager
def _basidia_run(*options: str) -> Iterator[subprocess.Popen[bytes]]:
    """``basidia run`` on a one-method service, until the test is done with it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        service = Path(folder) / "greeting.py"
        service.write_text(SERVICE)
        with subprocess.Popen(
            [sys.executable, "-m", "basidia", "run", str(service), *options],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        ) as process:
            try:
                yield process
            finally:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_for_log(process: subprocess.Popen[bytes], text: bytes) -> None:
    assert process.stderr is not None
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise RuntimeError(f"basidia run exited with {process.wait()}")
        if text in line:
            return
    raise TimeoutError(f"basidia run did not log {text!r} in {START_SECONDS:g} s")


def _wait_for_ready(port: int) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


def measure() -> dict[str, float]:
    """RSS in MB of a basic service with the HTTP server, and without it."""
    figures: dict[str, float] = {}
    port = _free_port()
    with _basidia_run("--http", f"127.0.0.1:{port}") as process:
        _wait_for_ready(port)
        figures["with HTTP"] = _rss_mb(process.pid)
    with _basidia_run("--http", "off") as process:
        _wait_for_log(process, b"running 1 service(s)")
        time.sleep(0.2)
        figures["--http off"] = _rss_mb(process.pid)
    return figures


def _report(figures: dict[str, float]) -> str:
    return ", ".join(f"{name}: {mb:.1f} MB" for name, mb in figures.items())


def test_a_basic_service_stays_under_40_mb() -> None:
    figures = measure()
    print(f"\nbasidia run, one-method service on memory://: {_report(figures)}")
    over = {name: mb for name, mb in figures.items() if mb >= LIMIT_MB}
    assert not over, f"over {LIMIT_MB:g} MB RSS: {_report(over)}"


if __name__ == "__main__":
    found = measure()
    print(f"basidia run, one-method service on memory://: {_report(found)}")
    sys.exit(0 if all(mb < LIMIT_MB for mb in found.values()) else 1)

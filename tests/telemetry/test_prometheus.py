"""A real Prometheus server scrapes ``GET /metrics`` of a ``basidia run`` process, and
PromQL over its HTTP API counts the calls the test made, by method and outcome.

Prometheus is Debian's ``prometheus`` package (``.ci/run`` installs it); it runs as a
child process on a free loopback port with a data directory of its own.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from basidia import connect
from basidia.errors import RemoteError
from tests.brokers.cleanup import delete_nats_consumers
from tests.http.test_cli import free_port
from tests.telemetry.processes import Process, start, wait_for_log

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("the prometheus binary is missing: apt-get install prometheus (.ci/run does)")
    return found


class Prometheus:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    async def query(self, client: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
        response = await client.get(f"{self.url}/api/v1/query", params={"query": promql})
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()["data"]["result"]
        return found


@pytest.fixture
def prometheus(prometheus_binary: str, tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def launch(target_port: int) -> Prometheus:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: basidia\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        log = tmp_path / "prometheus.log"
        with log.open("wb") as output:  # the child has its own descriptor of it
            process = subprocess.Popen(
                [
                    prometheus_binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        return Prometheus(process, f"http://127.0.0.1:{port}", log)

    yield launch
    for process in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def front(tmp_path: Path, nats_url: str, unique: str) -> AsyncIterator[tuple[Process, int]]:
    port = free_port()
    process = await start(
        tmp_path,
        "db",
        "tests.telemetry.chain:DbService",
        "--broker",
        nats_url,
        "--http",
        f"127.0.0.1:{port}",
        env={"CHAIN_SUFFIX": unique, "OTEL_METRICS_EXPORTER": "prometheus"},
    )
    try:
        await wait_for_log(process, "running 1 service(s)")
        yield process, port
        await process.stop()
    finally:
        process.kill()
        await delete_nats_consumers(nats_url, unique)


async def test_prometheus_scrapes_the_calls_by_method_and_outcome(
    front: tuple[Process, int], prometheus: Any, nats_url: str, unique: str
) -> None:
    _, port = front
    service = f"chain_db_{unique}"
    async with connect(nats_url) as cluster:
        for user_id in range(5):
            assert (await cluster.rpc[service].get_user(user_id))["id"] == user_id
        for _ in range(2):
            with pytest.raises(RemoteError):
                await cluster.rpc[service].fail()

    server: Prometheus = prometheus(port)
    promql = (
        "sum by (rpc_method, rpc_response_status_code) "
        f'(rpc_server_call_duration_seconds_count{{rpc_method=~"{service}/.*"}})'
    )
    expected = {(f"{service}/get_user", "OK"): 5.0, (f"{service}/fail", "remote_error"): 2.0}
    found: dict[tuple[str, str], float] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while found != expected and loop.time() < deadline:
            await asyncio.sleep(0.5)
            try:
                result = await server.query(client, promql)
            except httpx.HTTPError:
                continue  # Prometheus is still starting
            found = {
                (row["metric"]["rpc_method"], row["metric"]["rpc_response_status_code"]): float(
                    row["value"][1]
                )
                for row in result
            }
        metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        up = await server.query(client, 'up{job="basidia"}')
    assert found == expected, (found, server.log.read_text(), metrics[:3000])
    assert [row["value"][1] for row in up] == ["1"]
    # The process's own figures come through the system-metrics instrumentation.
    assert "process_memory_usage" in metrics and "process_cpu_time" in metrics
    assert "basidia_calls_in_flight" in metrics

"""A service in a process of its own, for the scenarios that kill or stop one (F8, F11).

The worker builds its broker with ``broker_from_url`` from a URL and options, so the same
script serves every broker.  It reports on stdout, one line each: ``running`` once every
service is consuming, ``start <id>`` and ``done <id>`` around each event or request it
handles, and ``exited`` after a clean stop.  Its log (DEBUG) goes to stderr, which the
caller can check for a secret that must never appear (B3).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import asyncio, json, logging, sys
from basidia import Service, ServiceRunner, event_handler, rpc
from basidia.brokers import broker_from_url

url, name, event, workers, grace, options = sys.argv[1:7]

class Worker(Service):
    max_workers = int(workers)

    @event_handler(event)
    async def on_work(self, job: dict) -> None:
        print("start", job["id"], flush=True)
        await asyncio.sleep(job["seconds"])
        print("done", job["id"], flush=True)

    @rpc
    async def work(self, n: int, seconds: float) -> int:
        print("start", n, flush=True)
        await asyncio.sleep(seconds)
        print("done", n, flush=True)
        return n

Worker.name = name
runner = ServiceRunner([Worker], broker=broker_from_url(url, json.loads(options)),
                       config={"shutdown_grace": float(grace), "log_level": "DEBUG"})

async def main() -> None:
    task = asyncio.ensure_future(runner.run())
    while not runner.broker.connected or any(
        c.state.value != "RUNNING" for c in runner.containers.values()
    ):
        if task.done():
            return await task
        await asyncio.sleep(0.02)
    print("running", flush=True)
    await task
    print("exited", flush=True)

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
asyncio.run(main())
"""


class WorkerProcess:
    """The worker process and what it reported: ids started and done, a clean exit."""

    def __init__(
        self,
        url: str,
        options: Mapping[str, Any],
        name: str,
        event: str,
        workers: int,
        grace: float,
    ) -> None:
        self._args = (url, name, event, str(workers), str(grace), json.dumps(dict(options)))
        self.process: asyncio.subprocess.Process | None = None
        self.started: list[str] = []
        self.done: list[str] = []
        self.stderr = b""
        self.running = asyncio.Event()
        self.exited = False
        self._reader: asyncio.Task[None] | None = None
        self._stderr: asyncio.Task[bytes] | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SCRIPT, *self._args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert self.process.stderr is not None
        # Read all along: a worker logging at DEBUG would otherwise fill the pipe and block.
        self._stderr = asyncio.ensure_future(self.process.stderr.read())
        self._reader = asyncio.ensure_future(self._read())
        running = asyncio.ensure_future(self.running.wait())
        try:
            await asyncio.wait_for(
                asyncio.wait({running, self._reader}, return_when=asyncio.FIRST_COMPLETED), 30
            )
        finally:
            running.cancel()
        if not self.running.is_set():
            code = await self.wait(5)
            tail = self.stderr.decode(errors="replace")[-3000:]
            raise RuntimeError(f"the worker exited with {code} before it ran:\n{tail}")

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            word, _, value = line.decode().strip().partition(" ")
            if word == "running":
                self.running.set()
            elif word == "start":
                self.started.append(value)
            elif word == "done":
                self.done.append(value)
            elif word == "exited":
                self.exited = True

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        """Wait for the exit and return its code, with everything it printed read."""
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._stderr is not None:
            self.stderr = await self._stderr
        if self._reader is not None:
            await self._reader
        return code

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
        if self.process is not None:
            await self.wait(10)


@contextlib.asynccontextmanager
async def worker_process(
    url: str,
    options: Mapping[str, Any],
    name: str,
    event: str = "none",
    *,
    workers: int = 10,
    grace: float = 5.0,
    secret: str = "",
) -> AsyncIterator[WorkerProcess]:
    """A running worker serving RPC method ``work`` and event ``event`` as service ``name``;
    killed on the way out if still alive.  ``secret`` must not appear in its log (B3)."""
    worker = WorkerProcess(url, options, name, event, workers, grace)
    try:
        await worker.start()
        yield worker
    finally:
        await worker.close()
        if secret:
            assert secret.encode() not in worker.stderr, "the worker logged the secret"

"""``basidia run`` child processes for the telemetry tests, each with its own span file."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import IO

import pytest

from tests.http.test_cli import basidia_command

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


class Process:
    """A running ``basidia run`` and its log."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path, handle: IO[bytes]) -> None:
        self.process = process
        self.log = log
        self._handle = handle

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait: the runner stops and flushes its spans."""
        try:
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
                pytest.fail(f"basidia did not stop on SIGTERM:\n{self.output()}")
            assert code == 0, self.output()
        finally:
            self._handle.close()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def start(tmp_path: Path, name: str, *args: str, env: dict[str, str]) -> Process:
    """``basidia run *args`` with ``env`` over this process's environment."""
    log = tmp_path / f"{name}.log"
    handle = log.open("wb")
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BASIDIA_HTTP", "BASIDIA_TELEMETRY", "OTEL_"))
    }
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        *basidia_command(),
        "run",
        *args,
        cwd=tmp_path,
        env=environ,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=handle,
        stderr=asyncio.subprocess.STDOUT,
    )
    return Process(process, log, handle)


async def wait_for_log(process: Process, text: str, count: int = 1) -> None:
    """Until the log holds ``text`` ``count`` times; fail with the log if it exits first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while process.output().count(text) < count:
        if process.process.returncode is not None:
            pytest.fail(f"basidia exited with {process.process.returncode}:\n{process.output()}")
        if loop.time() > deadline:
            pytest.fail(
                f"basidia did not log {text!r} within {START_TIMEOUT} s:\n{process.output()}"
            )
        await asyncio.sleep(0.1)

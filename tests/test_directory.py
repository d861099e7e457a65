"""The service directory (docs/operations.md): every instance of every process on the broker,
renewed by a heartbeat and forgotten when a process dies; ``basidia services`` prints it.

The directory of each broker adapter is also checked by the contract suite
(``tests/brokers/contract.py``); here: the view on memory, the commands, and real
``basidia run`` processes on RabbitMQ and NATS, one of them killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from basidia import Dependency, Service, ServiceRunner, ServiceUnavailable, connect, rpc
from basidia._speedups import env_flag
from basidia.brokers.base import Broker
from basidia.directory import Directory, Instance, format_table

from .test_cli import basidia_cmd, cli_env, run_cli

pytestmark = pytest.mark.timeout(60)

# What runs as processes of its own (basidia run, services, test) does not depend on the core,
# and the contract suite checks the directory on both: these run once, in the compiled-core run.
ONCE = pytest.mark.skipif(
    env_flag("BASIDIA_NO_EXTENSIONS"),
    reason="does not depend on the core: runs once, in the compiled-core run",
)

# Short timers: a heartbeat a second, forgotten after three missed ones.
FAST = {"directory_heartbeat": 1.0, "directory_expiry": 3.0}


class Alpha(Service):
    name = "alpha"

    @rpc
    async def ping(self) -> str:
        return "pong"


class Beta(Service):
    name = "beta"
    version = "2.1.0"

    @rpc
    async def ping(self) -> str:
        return "pong"


async def _until(condition: Any, timeout: float = 10.0) -> float:
    """Wait until ``await condition()`` is true; return how long it took."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"still not true after {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# -- on memory, within one process -------------------------------------------------------------


async def test_each_instance_says_where_it_runs_and_what_it_serves(memory_url: str) -> None:
    # Listing and expiry on every broker: tests/brokers/contract.py.
    first = ServiceRunner([Alpha], broker=memory_url, config=FAST)
    second = ServiceRunner([Alpha, Beta], broker=memory_url, config=FAST)
    async with first, second, connect(memory_url, config=FAST) as cluster:
        instances = await cluster.services()
        listed = {(i.service, i.instance) for i in instances}
        assert listed == {
            ("alpha", first.directory.process),
            ("alpha", second.directory.process),
            ("beta", second.directory.process),
        }
        beta = next(i for i in instances if i.service == "beta")
        assert (beta.host, beta.pid, beta.version, beta.state) == (
            first.directory.host,
            os.getpid(),
            "2.1.0",
            "RUNNING",
        )
        assert beta.entrypoints == {"rpc": ["ping"]} and beta.broker == memory_url
        assert beta.started_at > 0


async def _count(cluster: Any, expected: int) -> bool:
    return len(await cluster.services()) == expected


async def test_states_follow_the_lifecycle_and_a_stopped_runner_leaves_at_once(
    memory_url: str,
) -> None:
    runner = ServiceRunner([Alpha, Beta], broker=memory_url, config=FAST)
    async with connect(memory_url, config=FAST) as cluster:
        await runner.start()
        await cluster.services()
        directory = cluster.directory
        assert directory.has_live_instance("alpha") is True
        await runner.stop_service("alpha")
        await _until(lambda: _state_is(cluster, "alpha", "STOPPED"))
        assert directory.has_live_instance("alpha") is False  # listed, but not RUNNING
        assert directory.has_live_instance("beta") is True
        await runner.stop()
        # A runner that stops says goodbye: no wait for the expiry.
        await _until(lambda: _count(cluster, 0), timeout=FAST["directory_expiry"] - 1)
        assert directory.has_live_instance("beta") is False


async def _state_is(cluster: Any, service: str, state: str) -> bool:
    return any(i.state == state for i in await cluster.services() if i.service == service)


async def test_the_view_is_unknown_until_a_heartbeat_has_passed(memory_url: str) -> None:
    async with connect(memory_url, config=FAST) as cluster:
        directory = cluster.directory
        assert directory.has_live_instance("alpha") is None  # not watching
        await directory.watch()
        assert directory.has_live_instance("alpha") is None  # too early to say "none"
        await asyncio.sleep(FAST["directory_heartbeat"])
        assert directory.has_live_instance("alpha") is False


class _SilentBroker(Broker):
    """A broker that cannot say "no responders": requests vanish unless the adapter asks
    the directory first (``Broker.no_live_instance``), as such adapters do."""

    def __init__(self, inner: Broker) -> None:
        super().__init__()
        self.inner = inner
        self.safe_url = inner.safe_url

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def connected(self) -> bool:
        return self.inner.connected

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def serve_requests(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.serve_requests(*args, **kwargs)

    async def send_request(self, service: str, body: bytes, *, correlation_id: int) -> None:
        if self.no_live_instance(service):
            raise ServiceUnavailable(f"no instance of service {service!r} is running")
        # The broker of this test keeps quiet: the call would wait for its deadline.
        with contextlib.suppress(ServiceUnavailable):
            await self.inner.send_request(service, body, correlation_id=correlation_id)

    async def open_inbox(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.open_inbox(*args, **kwargs)

    async def send_reply(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.send_reply(*args, **kwargs)

    async def publish_event(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.publish_event(*args, **kwargs)

    async def subscribe_events(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.subscribe_events(*args, **kwargs)

    async def dead_letters(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.dead_letters(*args, **kwargs)


async def test_a_broker_without_no_responders_fails_fast_through_the_directory(
    memory_url: str,
) -> None:
    from basidia.brokers import broker_from_url

    silent = _SilentBroker(broker_from_url(memory_url))
    assert not silent.reports_no_responders
    async with ServiceRunner([Alpha], broker=memory_url, config=FAST):
        async with connect(silent, config=FAST, timeout=20) as cluster:
            assert cluster.directory.watching  # started for such a broker
            await asyncio.sleep(FAST["directory_heartbeat"])
            assert await cluster.rpc.alpha.ping() == "pong"
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="'nobody'"):
                await cluster.rpc.nobody.ping()
            assert time.monotonic() - started < 1  # not the 20 s deadline


def test_the_table_shows_one_line_per_instance_with_the_error_reason() -> None:
    instances = [
        Instance(
            service="billing",
            instance="a1b2c3d4e5f6",
            host="web-1",
            pid=42,
            version="1.0.0",
            state="ERROR",
            error="ConnectionError: database down",
            entrypoints={"rpc": ["charge", "refund"], "events": ["on_order"]},
        ),
        Instance(
            service="api",
            instance="0f0f0f0f0f0f",
            host="web-2",
            pid=7,
            version="0.3.0",
            state="RUNNING",
            entrypoints={"http": ["index"]},
            started_at=1000.0,
        ),
    ]
    lines = format_table(instances, now=1000.0 + 3725).splitlines()
    assert lines[0].split() == [
        "SERVICE",
        "INSTANCE",
        "HOST",
        "PID",
        "VERSION",
        "STATE",
        "UP",
        "ENTRYPOINTS",
    ]
    assert "ERROR (ConnectionError: database down)" in lines[1]
    assert lines[1].endswith("events:1 rpc:2")
    assert "1h02m" in lines[2] and lines[2].endswith("http:1")


async def test_malformed_directory_messages_are_ignored(memory_url: str) -> None:
    async with ServiceRunner([Alpha], broker=memory_url, config=FAST) as runner:
        async with connect(memory_url, config=FAST) as cluster:
            await cluster.services()
            await runner.broker.publish_event(
                "basidia.directory", b"\x00not a frame", idempotency_key="junk-1"
            )
            await asyncio.sleep(0.1)
            assert [i.service for i in await cluster.services()] == ["alpha"]


def test_directory_settings_are_checked() -> None:
    from basidia.config import Config
    from basidia.errors import ConfigError

    with pytest.raises(ConfigError, match="directory_expiry must be more than"):
        _ = Config({"directory_heartbeat": 5, "directory_expiry": 5}).settings
    with pytest.raises(ConfigError, match="directory_heartbeat"):
        _ = Config({"directory_heartbeat": 0}).settings
    assert isinstance(Directory, type)


# -- the commands ------------------------------------------------------------------------------


@ONCE
@pytest.mark.timeout(60)
def test_services_on_memory_explains_that_memory_lives_in_one_process() -> None:
    result = run_cli("services", "--wait", "0", timeout=50)
    assert result.returncode == 0, result.stderr
    assert "no service instances on memory://" in result.stdout
    assert "memory:// lives inside one process" in result.stderr


@ONCE
@pytest.mark.timeout(60)
def test_the_shell_hints_that_memory_lives_in_one_process_and_lists_what_it_hosts() -> None:
    stdin = "await rpc.billing.charge(1)\nawait services()\n"
    result = run_cli("shell", "examples/", stdin=stdin, timeout=50)
    assert result.returncode == 0, result.stderr
    # The "other terminal" case: the service runs elsewhere, on a memory:// of its own.
    assert "no instance of service 'billing' is running on memory://" in result.stderr
    assert "Hint: memory:// lives inside one process" in result.stderr
    assert "greeting_service" in result.stdout and "RUNNING" in result.stdout


# -- real processes on the shared brokers (done-when 1) -----------------------------------------


SERVICE_MODULE = """
from basidia import Service, rpc


class Echo(Service):
    name = "{name}"

    @rpc
    async def echo(self, text: str) -> str:
        return text
"""


def _services_json(broker: str, name: str) -> list[dict[str, Any]]:
    result = run_cli(
        "services", "--broker", broker, "--json", "--service", name, "--wait", "1", timeout=40
    )
    assert result.returncode == 0, result.stderr
    listed: list[dict[str, Any]] = json.loads(result.stdout)
    return listed


def _start(tmp_path: Path, broker: str, log: str) -> subprocess.Popen[bytes]:
    env = cli_env(
        BASIDIA_DIRECTORY_HEARTBEAT=str(FAST["directory_heartbeat"]),
        BASIDIA_DIRECTORY_EXPIRY=str(FAST["directory_expiry"]),
    )
    with (tmp_path / log).open("wb") as errors:  # the child keeps its own copy
        return subprocess.Popen(
            basidia_cmd("run", "echo_service:Echo", "--broker", broker, "--http", "off"),
            cwd=tmp_path,
            env={**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )


def _srv_pings(url: str, name: str) -> int:
    """How many instances answer ``$SRV.PING.<name>`` on NATS within half a second."""

    async def gather() -> int:
        import nats

        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        try:
            answers: list[bytes] = []
            inbox = nc.new_inbox()

            async def collect(msg: Any) -> None:
                answers.append(msg.data)

            await nc.subscribe(inbox, cb=collect)
            await nc.publish(f"$SRV.PING.{name}", b"", reply=inbox)
            await asyncio.sleep(0.5)
            return len(answers)
        finally:
            await nc.close()

    return asyncio.run(gather())


def _two_processes_then_one_killed(
    tmp_path: Path, broker: str, unique: str, *, srv: bool = False
) -> None:
    name = f"echo_{unique}"
    (tmp_path / "echo_service.py").write_text(SERVICE_MODULE.format(name=name))
    processes = [_start(tmp_path, broker, "first.log"), _start(tmp_path, broker, "second.log")]
    try:
        deadline = time.monotonic() + 30
        listed: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            listed = _services_json(broker, name)
            if sum(i["state"] == "RUNNING" for i in listed) == 2:
                break
            for process, log in zip(processes, ("first.log", "second.log"), strict=True):
                assert process.poll() is None, (tmp_path / log).read_text()
            time.sleep(0.2)
        assert {i["pid"] for i in listed} == {p.pid for p in processes}, listed
        assert all(i["entrypoints"] == {"rpc": ["echo"]} for i in listed)
        assert all(":guest@" not in i["broker"] for i in listed)  # no password
        if srv:  # the NATS service API keeps answering beside the directory
            assert _srv_pings(broker, name) == 2

        victim = processes[1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed = time.monotonic()
        while {i["pid"] for i in _services_json(broker, name)} != {processes[0].pid}:
            assert time.monotonic() - killed < FAST["directory_expiry"] + 10, "not dropped"
            time.sleep(0.2)
        # Dropped once the expiry passed (plus one listing of up to ~2 s on a busy machine).
        assert time.monotonic() - killed <= FAST["directory_expiry"] + 4
        if srv:
            assert _srv_pings(broker, name) == 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@ONCE
@pytest.mark.amqp
@pytest.mark.slow
@pytest.mark.timeout(120)  # processes of their own, on a machine that may be busy
def test_basidia_services_on_rabbitmq(tmp_path: Path, amqp_url: str, unique: str) -> None:
    _two_processes_then_one_killed(tmp_path, amqp_url, unique)


@ONCE
@pytest.mark.nats
@pytest.mark.slow
@pytest.mark.timeout(120)  # processes of their own, on a machine that may be busy
def test_basidia_services_on_nats(tmp_path: Path, nats_url: str, unique: str) -> None:
    _two_processes_then_one_killed(tmp_path, nats_url, unique, srv=True)


# -- lifecycle in the directory ------------------------------------------------------------------


class Broken:
    """A dependency whose provider fails."""


async def broken_provider() -> Any:
    raise ConnectionError("database down")
    yield  # pragma: no cover


class NeedsBroken(Service):
    name = "needs_broken"
    thing = Dependency(Broken)

    @rpc
    async def ping(self) -> str:
        return "pong"


async def test_a_failed_service_shows_error_with_its_reason_in_the_directory(
    memory_url: str,
) -> None:
    runner = ServiceRunner(
        [NeedsBroken, Alpha], broker=memory_url, config=FAST, providers={Broken: broken_provider}
    )
    async with runner, connect(memory_url) as cluster:
        assert await cluster.rpc.alpha.ping() == "pong"
        states = {i.service: (i.state, i.error) for i in await cluster.services()}
        assert states == {
            "alpha": ("RUNNING", ""),
            "needs_broken": ("ERROR", "ConnectionError: database down"),
        }


async def test_a_runner_started_again_announces_again(memory_url: str) -> None:
    runner = ServiceRunner([Alpha], broker=memory_url, config=FAST)
    await runner.start()
    await runner.stop()
    await runner.start()
    try:
        async with connect(memory_url, config=FAST) as cluster:
            assert [(i.service, i.state) for i in await cluster.services()] == [
                ("alpha", "RUNNING")
            ]
    finally:
        await runner.stop()


async def test_with_events_on_another_broker_the_directory_stays_with_rpc(
    memory_url: str,
) -> None:
    # A client of the RPC broker alone sees the services (docs/brokers.md, MixedBroker).
    events = f"{memory_url}-events"
    async with ServiceRunner([Alpha], broker=memory_url, event_broker=events, config=FAST):
        async with connect(memory_url, config=FAST) as cluster:
            assert [i.service for i in await cluster.services()] == ["alpha"]

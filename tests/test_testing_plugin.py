"""The pytest fixtures of ``basidia.testing.plugin``.

Installed Basidia registers the plugin through its ``pytest11`` entry point; run from a
checkout it is not registered.  ``pytest_plugins = ["basidia.testing.plugin"]`` would then
work, but errors ("Plugin already registered under a different name") when the entry point
has registered the same module as ``basidia``.  So this module binds the plugin's fixtures
to module-level names instead: pytest collects them as this module's own fixtures, which
take precedence over the plugin's when it is registered too.  Either way the tests below
exercise the plugin's code.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from basidia import Cluster, Service, ServiceRunner, ServiceUnavailable, State, event_handler, rpc
from basidia.rpc import ClusterProxy
from basidia.testing import entrypoint_waiter
from basidia.testing import plugin as _plugin
from basidia.testing.plugin import RunnerFactory

basidia_broker_url = _plugin.basidia_broker_url
basidia_config = _plugin.basidia_config
basidia_runner = _plugin.basidia_runner
basidia_cluster = _plugin.basidia_cluster
basidia_rpc = _plugin.basidia_rpc

REPO = Path(__file__).resolve().parents[1]


class GreetingService(Service):
    name = "greeting_service"

    @rpc
    async def hello(self, name: str) -> str:
        return f"Hello, {name}!"


class AuditService(Service):
    name = "audit_service"
    seen: list[dict[str, str]] = []  # noqa: RUF012

    @event_handler("user.created")
    async def on_user_created(self, user: dict[str, str]) -> None:
        AuditService.seen.append(user)


async def test_runner_and_rpc_fixtures(
    basidia_runner: RunnerFactory, basidia_rpc: ClusterProxy
) -> None:
    runner = await basidia_runner([GreetingService])
    assert isinstance(runner, ServiceRunner)
    assert runner.containers["greeting_service"].state is State.RUNNING
    assert await basidia_rpc.greeting_service.hello("x") == "Hello, x!"


async def test_cluster_fixture_dispatches_events(
    basidia_runner: RunnerFactory, basidia_cluster: Cluster
) -> None:
    AuditService.seen = []
    runner = await basidia_runner([AuditService])
    async with entrypoint_waiter(runner.containers["audit_service"], "on_user_created"):
        await basidia_cluster.dispatch("user.created", {"email": "ada@example.com"})
    assert AuditService.seen == [{"email": "ada@example.com"}]


async def test_fixtures_share_a_private_memory_broker(
    basidia_broker_url: str, basidia_runner: RunnerFactory, basidia_rpc: ClusterProxy
) -> None:
    assert basidia_broker_url.startswith("memory://test-")
    runner = await basidia_runner([GreetingService])
    assert runner.broker.safe_url == basidia_broker_url
    # A service on any other memory broker is out of reach.
    async with ServiceRunner([AuditService], broker=basidia_broker_url + "-elsewhere"):
        with pytest.raises(ServiceUnavailable):
            await basidia_rpc.audit_service.on_user_created({})


@pytest.fixture
def started_runners() -> Iterator[list[ServiceRunner]]:
    """Set up before ``basidia_runner``, so torn down after it: sees what it left behind."""
    runners: list[ServiceRunner] = []
    yield runners
    for runner in runners:
        assert not runner.broker.connected
        assert all(c.state is State.STOPPED for c in runner.containers.values())


async def test_runners_are_stopped_after_the_test(
    started_runners: list[ServiceRunner], basidia_runner: RunnerFactory
) -> None:
    started_runners.append(await basidia_runner([GreetingService]))
    started_runners.append(await basidia_runner([AuditService]))
    assert all(runner.broker.connected for runner in started_runners)


class TestConfigOverride:
    @pytest.fixture
    def basidia_config(self) -> dict[str, object]:
        return {"rpc_timeout": 7, "database": {"url": "sqlite:///fixture.db"}}

    async def test_overriding_basidia_config_reaches_the_runner(
        self, basidia_runner: RunnerFactory, basidia_rpc: ClusterProxy
    ) -> None:
        runner = await basidia_runner([GreetingService])
        assert runner.runtime.settings.rpc_timeout == 7.0
        assert runner.config["database.url"] == "sqlite:///fixture.db"
        assert await basidia_rpc.greeting_service.hello("y") == "Hello, y!"


@pytest.mark.nats
class TestOnNats:
    @pytest.fixture
    def basidia_broker_url(self, nats_url: str) -> str:
        return nats_url

    async def test_the_same_fixtures_on_a_real_broker(
        self, basidia_runner: RunnerFactory, basidia_rpc: ClusterProxy, unique: str
    ) -> None:
        # A name of its own: the NATS server is shared with other tests.
        greeter = type("Greeter", (GreetingService,), {"name": f"greeting_{unique}"})
        await basidia_runner([greeter])
        assert await basidia_rpc[f"greeting_{unique}"].hello("NATS") == "Hello, NATS!"


def test_plugin_is_declared_as_a_pytest11_entry_point() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    plugins = pyproject["project"]["entry-points"]["pytest11"]
    assert plugins == {"basidia": "basidia.testing.plugin"}


def test_installed_plugin_is_registered(pytestconfig: pytest.Config) -> None:
    installed = any(ep.value == "basidia.testing.plugin" for ep in entry_points(group="pytest11"))
    if not installed:
        pytest.skip("Basidia is not installed (pip install -e .): its entry point is absent")
    assert pytestconfig.pluginmanager.has_plugin("basidia")

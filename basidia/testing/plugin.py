"""pytest fixtures for Basidia services (registered through the ``pytest11`` entry point).

Needs pytest-asyncio.  ``basidia_runner`` starts services on a private memory
broker; ``basidia_rpc`` calls them::

    async def test_hello(basidia_runner, basidia_rpc):
        await basidia_runner([GreetingService])
        assert await basidia_rpc.greeting_service.hello("x") == "Hello, x!"

Override ``basidia_broker_url``, or run ``basidia test --broker URL``, to run the same
tests on a real broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import pytest

from basidia.rpc import ClusterProxy
from basidia.runner import Cluster, ServiceRunner, connect
from basidia.service import Service
from basidia.testing import fixture_broker_url

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - without pytest-asyncio the fixtures are not offered
    HAVE_PYTEST_ASYNCIO = False
else:
    HAVE_PYTEST_ASYNCIO = True

RunnerFactory = Callable[..., Awaitable[ServiceRunner]]

if HAVE_PYTEST_ASYNCIO:

    @pytest.fixture
    def basidia_broker_url() -> str:
        """The broker the fixtures use: a private memory broker per test, or the one
        ``basidia test --broker`` names (``BASIDIA_TEST_BROKER``)."""
        return fixture_broker_url()

    @pytest.fixture
    def basidia_config() -> Mapping[str, Any]:
        """Config for the fixtures' runners and client; override to change it.  Remote
        errors carry their tracebacks in tests (``remote_tracebacks``) and a service that
        fails to start fails the test (``fail_fast``)."""
        return {"remote_tracebacks": True, "fail_fast": True}

    @pytest_asyncio.fixture
    async def basidia_runner(
        basidia_broker_url: str, basidia_config: Mapping[str, Any]
    ) -> AsyncIterator[RunnerFactory]:
        """``await basidia_runner([Service, ...])`` starts a runner, stopped after the test."""
        runners: list[ServiceRunner] = []

        async def start(services: Sequence[type[Service]], **options: Any) -> ServiceRunner:
            options.setdefault("broker", basidia_broker_url)
            options.setdefault("config", basidia_config)
            runner = ServiceRunner(services, **options)
            runners.append(runner)
            await runner.start()
            return runner

        yield start
        for runner in reversed(runners):
            await runner.stop()

    @pytest_asyncio.fixture
    async def basidia_cluster(
        basidia_broker_url: str, basidia_config: Mapping[str, Any]
    ) -> AsyncIterator[Cluster]:
        """A standalone client connected to the fixtures' broker."""
        async with connect(basidia_broker_url, config=basidia_config) as cluster:
            yield cluster

    @pytest.fixture
    def basidia_rpc(basidia_cluster: Cluster) -> ClusterProxy:
        """``await basidia_rpc.<service>.<method>(...)``."""
        return basidia_cluster.rpc

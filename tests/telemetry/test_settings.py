"""The ``telemetry`` config section over the ``OTEL_*`` variables, and telemetry that
costs nothing when it is off."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from basidia import Config, ServiceRunner
from basidia.errors import ConfigError
from basidia.http.server import HttpSettings, build_app
from basidia.telemetry import TelemetrySettings
from tests.telemetry.chain import chain_services


def test_importing_basidia_and_running_without_telemetry_imports_no_opentelemetry() -> None:
    code = (
        "import sys, asyncio, basidia, basidia.cli\n"
        "from basidia import ServiceRunner\n"
        "from basidia.bench.core import echo_service\n"
        "async def main():\n"
        "    async with ServiceRunner([echo_service('e', 4)]) as runner:\n"
        "        assert runner.middleware == []\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus'))))\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_config_section_wins_over_the_otel_variables() -> None:
    environ = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_SERVICE_NAME": "from-env",
    }
    config = Config({"telemetry": {"traces_exporter": "file", "service_name": "from-config"}})
    settings = TelemetrySettings.from_config(config, environ)
    assert settings.exporters("traces") == ["file"]
    assert settings.exporters("metrics") == ["otlp"]
    assert settings.service_name == "from-config"
    assert settings.wants_sdk


def test_an_otlp_endpoint_turns_otlp_on_and_otel_sdk_disabled_turns_everything_off() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    settings = TelemetrySettings.from_config(Config({}), endpoint)
    assert settings.exporters("traces") == settings.exporters("metrics") == ["otlp"]
    disabled = TelemetrySettings.from_config(Config({}), {**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not disabled.enabled and not disabled.wants_sdk
    assert not TelemetrySettings.from_config(Config({}), {}).wants_sdk


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"traces_exporter": "zipkin"}, "unknown traces exporter 'zipkin'"),
        ({"metrics_exporter": "prometheus,statsd"}, "unknown metrics exporter 'statsd'"),
        ({"sampler": "always_on"}, "unknown telemetry setting 'sampler'"),
        ({"enabled": "maybe"}, "invalid telemetry setting"),
    ],
)
def test_bad_telemetry_settings_are_config_errors(section: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TelemetrySettings.from_config(Config({"telemetry": section}), {})


async def test_metrics_answers_404_with_a_hint_when_the_prometheus_exporter_is_off(
    memory_url: str, unique: str
) -> None:
    async with ServiceRunner([chain_services(unique)["db"]], broker=memory_url) as runner:
        transport = httpx.ASGITransport(app=build_app(runner, HttpSettings()))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            response = await client.get("/metrics")
    assert response.status_code == 404
    assert "OTEL_METRICS_EXPORTER=prometheus" in response.text

"""deploy/: the Dockerfile, compose files and Kubernetes manifests (no container engine
runs here: what can be checked without one is, against the code they depend on)."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from basidia.config import Settings
from basidia.http.server import HttpSettings
from basidia.loader import load_services

from .contracts.conftest import fresh_imports
from .test_scaffold import check_deployment, grace_option_default, served_paths

__all__ = ["fresh_imports"]  # autouse: loading examples/ leaves no module behind

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def entrypoint(dockerfile: str) -> list[str]:
    (line,) = re.findall(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    return list(yaml.safe_load(line))


def test_the_dockerfile_builds_the_wheel_in_one_stage_and_runs_it_in_another() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert len(stages) == 2 and stages[0].split()[2] == "build"
    assert "python -m build --wheel" in stages[0]
    assert "COPY --from=build /wheels /wheels" in stages[1]
    assert "--no-index --find-links /wheels" in stages[1]
    assert "USER 10001" in stages[1]
    # What it copies exists, so that `docker build -f deploy/Dockerfile .` finds it.
    for line in re.findall(r"^COPY (?!--from)(.*)$", stages[0], re.M):
        for source in shlex.split(line)[:-1]:
            assert (ROOT / source).exists(), source
    command = entrypoint(dockerfile)
    assert command[:3] == ["basidia", "run", "/srv/services"]
    assert float(command[command.index("--grace") + 1]) == Settings.shutdown_grace
    # The default services (examples/) load as basidia run would load them.
    default = re.search(r"^ARG SERVICES=(\S+)$", dockerfile, re.M)
    assert default is not None
    assert load_services([str(ROOT / default.group(1))])


@pytest.mark.parametrize("name", ["compose.yaml", "compose.nats.yaml"])
def test_the_compose_files_wait_for_the_broker_and_longer_than_the_grace(name: str) -> None:
    compose = yaml.safe_load((DEPLOY / name).read_text())
    services = compose["services"]
    broker = "nats" if "nats" in name else "rabbitmq"
    assert set(services) == {broker, "services"}
    app = services["services"]
    assert app["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert app["depends_on"][broker]["condition"] == "service_healthy"
    assert app["environment"]["BASIDIA_BROKER"].startswith(
        "nats://" if broker == "nats" else "amqp://"
    )
    assert int(app["stop_grace_period"].rstrip("s")) > Settings.shutdown_grace
    assert "/health/ready" in " ".join(app["healthcheck"]["test"])
    assert "/health/ready" in served_paths()


def test_the_kubernetes_manifests_probe_real_paths_and_stop_gracefully() -> None:
    manifests = {
        path.stem: yaml.safe_load(path.read_text()) for path in (DEPLOY / "k8s").glob("*.yaml")
    }
    assert {name: m["kind"] for name, m in manifests.items()} == {
        "deployment": "Deployment",
        "service": "Service",
        "configmap": "ConfigMap",
    }
    deployment = manifests["deployment"]
    assert grace_option_default() is None  # so --grace in the command is what counts
    check_deployment(deployment, Settings.shutdown_grace)
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert manifests["service"]["spec"]["selector"].items() <= labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    assert manifests["service"]["spec"]["ports"][0]["targetPort"] in {
        port["name"] for port in container["ports"]
    }
    assert container["envFrom"] == [{"configMapRef": {"name": "basidia-config"}}]
    assert manifests["configmap"]["metadata"]["name"] == "basidia-config"
    # The image's entrypoint and the manifest's command run the same thing.
    assert container["command"] == entrypoint((DEPLOY / "Dockerfile").read_text())
    # Every setting in the ConfigMap is one Basidia reads.
    data = manifests["configmap"]["data"]
    known = {f"BASIDIA_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    known |= {f"BASIDIA_HTTP__{f.name.upper()}" for f in dataclasses.fields(HttpSettings)}
    assert set(data) <= known | {"BASIDIA_HTTP__LISTEN"}
    assert all(isinstance(value, str) for value in data.values())
    assert data["BASIDIA_HTTP__LISTEN"] == "0.0.0.0:8000"

"""``basidia new``: the project it writes, whose own tests pass right after generation,
whose probes point at paths the HTTP server serves and whose grace matches ``--grace``."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from basidia._speedups import env_flag
from basidia.cli import app
from basidia.config import Settings
from basidia.http.server import HttpSettings, build_app
from basidia.runner import ServiceRunner
from basidia.scaffold import PRESTOP_SECONDS, create_project, termination_grace

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def served_paths() -> set[str]:
    """Every path the HTTP server of ``basidia run`` serves besides services' routes."""
    application = build_app(ServiceRunner([]), HttpSettings())
    return {route.path for route in application.routes}  # type: ignore[attr-defined]


def grace_option_default() -> Any:
    """The default of ``basidia run --grace``: None, which means config ``shutdown_grace``."""
    import typer.main

    command = typer.main.get_command(app)
    run = command.commands["run"]  # type: ignore[attr-defined]
    (option,) = [p for p in run.params if p.name == "grace"]
    return option.default


def check_deployment(manifest: dict[str, Any], grace: float) -> None:
    """Probes on the real health paths, graceful shutdown sized for ``--grace``."""
    spec = manifest["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    paths = served_paths()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    port = container["livenessProbe"]["httpGet"]["port"]
    assert [p["containerPort"] for p in container["ports"] if p["name"] == port] == [8000]
    command = container["command"]
    assert command[:2] == ["basidia", "run"]
    assert float(command[command.index("--grace") + 1]) == grace
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop == ["sleep", str(PRESTOP_SECONDS)]
    # SIGTERM comes after preStop; the grace runs from SIGTERM; a margin to exit after.
    assert spec["terminationGracePeriodSeconds"] >= PRESTOP_SECONDS + grace + 5


@pytest.mark.parametrize("broker", ["rabbitmq", "nats"])
def test_the_project_has_its_files_and_they_parse(tmp_path: Path, broker: str) -> None:
    result = CliRunner().invoke(app, ["new", "order-desk", "-d", str(tmp_path), "-b", broker])
    assert result.exit_code == 0, result.output
    root = tmp_path / "order-desk"
    names = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert names == {
        ".dockerignore",
        ".gitignore",
        "Dockerfile",
        "README.md",
        "compose.yaml",
        "config.yaml",
        "pyproject.toml",
        "order_desk/__init__.py",
        "order_desk/service.py",
        "tests/test_service.py",
        "k8s/configmap.yaml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
    }
    text = "\n".join(p.read_text() for p in root.rglob("*") if p.is_file())
    assert "{{" not in text and "}}" not in text
    compose = yaml.safe_load((root / "compose.yaml").read_text())
    broker_service = {"rabbitmq": "rabbitmq", "nats": "nats"}[broker]
    assert set(compose["services"]) == {broker_service, "order-desk"}
    app_service = compose["services"]["order-desk"]
    assert app_service["environment"]["BASIDIA_BROKER"].startswith(
        {"rabbitmq": "amqp://", "nats": "nats://"}[broker]
    )
    assert app_service["depends_on"][broker_service]["condition"] == "service_healthy"
    grace = Settings.shutdown_grace
    assert int(app_service["stop_grace_period"].rstrip("s")) > grace
    manifests = [
        yaml.safe_load((root / "k8s" / f"{kind}.yaml").read_text())
        for kind in ("deployment", "service", "configmap")
    ]
    assert [m["kind"] for m in manifests] == ["Deployment", "Service", "ConfigMap"]
    check_deployment(manifests[0], grace)
    assert manifests[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == (
        termination_grace(grace)
    )
    assert manifests[1]["spec"]["ports"][0]["targetPort"] == "http"
    assert manifests[2]["data"]["BASIDIA_HTTP__LISTEN"] == "0.0.0.0:8000"
    dockerfile = (root / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) == 2  # multi-stage
    assert f'"--grace", "{grace:g}"' in dockerfile
    pyproject = (root / "pyproject.toml").read_text()
    extra = {"rabbitmq": "amqp", "nats": "nats"}[broker]
    assert f'"basidia[cli,yaml,http,{extra}]' in pyproject
    readme = (root / "README.md").read_text()
    assert "pip install -e '.[test]'\npytest\n" in readme


def test_kubernetes_names_are_valid_when_the_project_name_has_underscores(
    tmp_path: Path,
) -> None:
    root = create_project("order_desk", tmp_path)
    dns_label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for path in (root / "k8s").glob("*.yaml"):
        manifest = yaml.safe_load(path.read_text())
        assert dns_label.match(manifest["metadata"]["name"]), path.name
    deployment = yaml.safe_load((root / "k8s" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "order-desk:latest"
    assert "docker build -t order-desk:latest ." in (root / "README.md").read_text()
    assert container["command"][2] == "order_desk.service"


def test_the_grace_the_files_assume_is_basidia_runs_default() -> None:
    # --grace unset means the config's shutdown_grace, whose default the files use.
    assert grace_option_default() is None
    assert Settings().shutdown_grace == Settings.shutdown_grace == 20.0
    assert termination_grace(20.0) == 30
    assert termination_grace(7.5) == 18


def test_it_refuses_to_overwrite_and_checks_the_name(tmp_path: Path) -> None:
    create_project("demo", tmp_path)
    marker = tmp_path / "demo" / "README.md"
    marker.write_text("mine")
    runner = CliRunner()
    result = runner.invoke(app, ["new", "demo", "-d", str(tmp_path)])
    assert result.exit_code == 2 and "exists already" in result.output
    assert marker.read_text() == "mine"
    for bad in ("Demo", "9lives", "my.project", "a--b", "x" * 41, "class", "basidia", "tests"):
        result = runner.invoke(app, ["new", bad, "-d", str(tmp_path)])
        assert result.exit_code == 2 and "error:" in result.output, bad
        assert not (tmp_path / bad).exists()
    result = runner.invoke(app, ["new", "ok", "-d", str(tmp_path), "--broker", "kafka"])
    assert result.exit_code == 2 and "rabbitmq, nats" in result.output


def run_readme_tests(python: str, project: Path) -> subprocess.CompletedProcess[str]:
    """The README's test command (``pytest``) with ``python``, in ``project``."""
    return subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
    )


def test_the_projects_tests_pass_with_this_basidia(tmp_path: Path) -> None:
    project = create_project("demo", tmp_path, broker="nats")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(project)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~40 s on an idle 2-core machine; pip waits on the index
@pytest.mark.skipif(
    env_flag("BASIDIA_NO_EXTENSIONS"),
    reason="installs Basidia's pure core in a fresh venv whatever the run: once, in the "
    "compiled-core run, is enough",
)
def test_basidia_new_then_the_readme_test_command_passes_in_a_fresh_venv(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    venv = tmp_path / "venv"
    # No pip of its own (ensurepip takes long): this interpreter's pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")

    def pip(*args: str, cwd: Path = tmp_path) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--python", python, "install", "-q", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "BASIDIA_NO_EXTENSIONS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    pip(f"{ROOT}[cli]")  # this checkout, as a wheel, pure core
    new = subprocess.run(
        [str(venv / "bin" / "basidia"), "new", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert new.returncode == 0, new.stdout + new.stderr  # templates came with the wheel
    project = tmp_path / "demo"
    readme = (project / "README.md").read_text()
    block = readme.split("## Install and test\n\n```bash\n", 1)[1].split("```", 1)[0]
    _, install, test = block.splitlines()
    assert (install, test) == ("pip install -e '.[test]'", "pytest")
    pip(*shlex.split(install)[2:], cwd=project)  # the README's install command
    done = run_readme_tests(python, project)  # and its test command
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout
    elapsed = time.monotonic() - started
    print(f"fresh venv, install, basidia new, pytest: {elapsed:.1f} s")

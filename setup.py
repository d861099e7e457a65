"""Build script: compiles Basidia's Cython core, or falls back to pure Python.

The project metadata lives in pyproject.toml; this file only decides what to
compile.  Environment switches (``1``/``true``/``yes``/``on`` is on, anything
else off):

* ``BASIDIA_NO_EXTENSIONS``: compile nothing and install the pure-Python twins.
* ``BASIDIA_BUILD_CYTHON_ALWAYS``: regenerate the C sources even if up to date.
* ``CIBUILDWHEEL`` (set by cibuildwheel): a failed build fails, instead of
  quietly producing a wheel without the compiled core.

The generated C sources are not in git.  ``build_ext`` generates them when one
is missing or older than its Cython sources, and ``sdist`` ships them, so that
installing from an sdist needs a C compiler but not Cython.  A source install
that cannot compile falls back to pure Python with a loud notice.

Usual commands::

    pip install -e '.[all,test]'           # editable, compiled in place
    python setup.py build_ext --inplace    # recompile after editing a .pyx/.pxd
    BASIDIA_BUILD_CYTHON_ALWAYS=1 python setup.py build_ext --inplace --force
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist
from setuptools.errors import CCompilerError, ExecError, PlatformError

HERE = Path(__file__).resolve().parent
# The oldest Cython that compiles the core (keep in step with pyproject.toml).
CYTHON_MIN_VERSION = (3, 1)


def env_flag(name: str) -> bool:
    """Same rule as ``basidia._speedups.env_flag``, which cannot be imported here."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


NO_EXTENSIONS = env_flag("BASIDIA_NO_EXTENSIONS")
CYTHON_ALWAYS = env_flag("BASIDIA_BUILD_CYTHON_ALWAYS")
CIBUILDWHEEL = env_flag("CIBUILDWHEEL")

# Directives for every module; per-module additions are below.
COMMON_DIRECTIVES: dict[str, object] = {"language_level": 3, "embedsignature": True}


@dataclass(frozen=True)
class CythonModule:
    """One compiled module: its import name, its Cython source and its .pxd files."""

    name: str
    source: str
    depends: tuple[str, ...]
    directives: dict[str, object] = field(default_factory=dict)

    @property
    def c_source(self) -> str:
        """The generated C file, named after the module (not the source)."""
        return str(Path(self.source).with_name(self.name.rpartition(".")[2] + ".c"))

    def is_stale(self) -> bool:
        """True if the C file is missing or older than a file it is generated from."""
        c_file = HERE / self.c_source
        if not c_file.exists():
            return True
        generated = c_file.stat().st_mtime
        return any(
            (HERE / path).stat().st_mtime > generated for path in (self.source, *self.depends)
        )

    def extension(self) -> Extension:
        return Extension(self.name, [self.c_source], depends=list(self.depends))


MODULES = [
    CythonModule(
        "basidia._speedups._frames_c",
        "basidia/_speedups/_frames_c.pyx",
        ("basidia/_speedups/_frames_c.pxd",),
        # The codec checks every read against the bytes remaining itself.
        {"boundscheck": False, "wraparound": False},
    ),
    CythonModule(
        "basidia._speedups._router_c",
        # The pure-Python router itself, compiled in pure-Python mode; _router_c.pxd
        # declares its types.  Its annotations are for mypy: read by Cython, they would
        # change what it accepts (``timeout: float`` would become a C double, and take
        # a Decimal that the pure-Python router refuses).
        "basidia/_speedups/_router_py.py",
        ("basidia/_speedups/_router_c.pxd",),
        {"annotation_typing": False},
    ),
    CythonModule(
        "basidia._speedups._calls_c",
        # The call path's C awaitables; their pure-Python twins are RpcClient._call and
        # RequestServer.on_request (docs/benchmarks.md#the-compiled-call-path).
        "basidia/_speedups/_calls_c.pyx",
        ("basidia/_speedups/_frames_c.pxd", "basidia/_speedups/_router_c.pxd"),
    ),
]


class BuildFailed(Exception):
    """The compiled core could not be built (no compiler, no Cython, a C error)."""


def generate_c_sources(*, force: bool) -> None:
    """Run Cython on every module whose C file is missing or stale (all, if ``force``)."""
    todo = [module for module in MODULES if force or module.is_stale()]
    if not todo:
        return
    try:
        import Cython
        from Cython.Compiler import Options
        from Cython.Compiler.Main import compile as cython_compile
    except ImportError as exc:
        raise BuildFailed(
            f"Cython is needed to generate {', '.join(m.c_source for m in todo)} "
            f"(pip install 'Cython>={'.'.join(map(str, CYTHON_MIN_VERSION))}')"
        ) from exc
    version = tuple(int(part) for part in Cython.__version__.split(".")[:2] if part.isdigit())
    if version < CYTHON_MIN_VERSION:
        raise BuildFailed(f"Cython {Cython.__version__} is too old for Basidia's core")
    Options.warning_errors = True  # a Cython warning is a bug in the core
    for module in todo:
        print(f"cythonizing {module.source} -> {module.c_source}")
        result = cython_compile(
            str(HERE / module.source),
            full_module_name=module.name,
            output_file=str(HERE / module.c_source),
            compiler_directives={**COMMON_DIRECTIVES, **module.directives},
            include_path=[str(HERE)],  # for cimports between the core's modules
        )
        if result.num_errors:
            (HERE / module.c_source).unlink(missing_ok=True)
            raise BuildFailed(f"Cython failed on {module.source}")


class BuildExt(build_ext):
    """``build_ext`` that generates the C sources first and reports any failure as one error."""

    def run(self) -> None:
        try:
            generate_c_sources(force=CYTHON_ALWAYS)
            super().run()
        except (CCompilerError, ExecError, PlatformError) as exc:
            raise BuildFailed(str(exc)) from exc
        banner("* Accelerated build *", "Compiled: " + ", ".join(m.name for m in MODULES))

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, ValueError) as exc:
            raise BuildFailed(f"{ext.name}: {exc}") from exc


class Sdist(sdist):
    """``sdist`` that ships up-to-date C sources, so installs from it need no Cython."""

    def run(self) -> None:
        generate_c_sources(force=CYTHON_ALWAYS)
        super().run()


def banner(title: str, *lines: str) -> None:
    """Print a notice that stands out in a long build log."""
    rule = "*" * 78
    print("\n".join([rule, title.center(78), *lines, rule]), file=sys.stderr)


def main() -> None:
    commands = {"sdist": Sdist}
    if NO_EXTENSIONS or sys.implementation.name != "cpython":
        reason = "BASIDIA_NO_EXTENSIONS is set" if NO_EXTENSIONS else sys.implementation.name
        banner("* Pure Python build *", f"Not compiling the core: {reason}.")
        setup(cmdclass=commands)
        return
    extensions = [module.extension() for module in MODULES]
    if CIBUILDWHEEL:  # a wheel must never ship without its compiled core
        setup(ext_modules=extensions, cmdclass={**commands, "build_ext": BuildExt})
        return
    try:
        setup(ext_modules=extensions, cmdclass={**commands, "build_ext": BuildExt})
    except BuildFailed as exc:
        banner(
            "* Pure Python build *",
            "WARNING: Basidia's compiled core could not be built:",
            f"    {exc}",
            "Installing the pure-Python implementation instead: it behaves the same,",
            "but frame coding is several times slower, and reply routing slower too.",
            "Install a C compiler (and Cython, from a git checkout) and reinstall,",
            "or set BASIDIA_NO_EXTENSIONS=1 to choose pure Python and silence this.",
        )
        setup(cmdclass=commands)


main()

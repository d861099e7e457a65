#!/usr/bin/env bash
# The whole check: lint, types, the suite on the compiled core, the suite on the pure-Python
# core, and the benchmark gates.  Run it from a virtual environment where
# `pip install -e '.[all,test,docs]'` has been done (README, "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

step() { printf '\n==> %s\n' "$*"; }

step "ruff"
"$python" -m ruff check basidia tests benchmarks examples
"$python" -m ruff format --check basidia tests benchmarks examples

step "mypy --strict on the package"
"$python" -m mypy

step "test suite, compiled core (BASIDIA_REQUIRE_EXTENSIONS=1)"
BASIDIA_NO_EXTENSIONS= BASIDIA_REQUIRE_EXTENSIONS=1 "$python" -m pytest "$@"

step "test suite, pure-Python core (BASIDIA_NO_EXTENSIONS=1)"
BASIDIA_NO_EXTENSIONS=1 BASIDIA_REQUIRE_EXTENSIONS= "$python" -m pytest "$@"

step "documentation site: mkdocs build --strict"
site=$(mktemp -d)
"$python" -m mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"

step "benchmark gates: basidia bench --max-overhead-us 1000 on every broker available"
"$python" benchmarks/bench_gate.py

step "footprint: a basic service under basidia run stays under 40 MB RSS"
"$python" -m pytest -q -s benchmarks/test_footprint.py

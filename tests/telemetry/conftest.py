"""The telemetry tests that start ``basidia run`` processes or Prometheus are marked
``long_fault``: they run once, in the compiled-core run.  The instrumentation is the
same Python code under both cores; what the core changes (the frames that carry the
trace context) the in-process tests cover under both."""

from __future__ import annotations

from pathlib import Path

import pytest

from basidia._speedups import NO_EXTENSIONS

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not NO_EXTENSIONS:
        return
    skip = pytest.mark.skip(reason="runs once, in the compiled-core run")
    for item in items:
        if item.get_closest_marker("long_fault") is not None and HERE in item.path.parents:
            item.add_marker(skip)

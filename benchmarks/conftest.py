"""Shared by the micro-benchmarks: a summary of compiled-versus-pure speed ratios.

Benchmarks that call the ``record_speed`` fixture with ``(group, tag, seconds)``
get a line per group at the end of the run, e.g.
``frame encode+decode: py 7,300 ns, c 1,000 ns, c is 7.3x faster``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest

# group -> implementation tag ("py" or "c") -> fastest time of one operation, in seconds
_SPEEDS: defaultdict[str, dict[str, float]] = defaultdict(dict)


def _record(group: str, tag: str, seconds: float) -> None:
    _SPEEDS[group][tag] = seconds


@pytest.fixture
def record_speed() -> Callable[[str, str, float], None]:
    """Note the time of one operation of a group for an implementation (``py`` or ``c``)."""
    return _record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        f"{group}: py {t['py'] * 1e9:,.0f} ns, c {t['c'] * 1e9:,.0f} ns,"
        f" c is {t['py'] / t['c']:.1f}x faster"
        for group, t in _SPEEDS.items()
        if {"py", "c"} <= t.keys()
    ]
    if lines:
        terminalreporter.section("compiled core speed-ups (fastest round of each)")
        for line in lines:
            terminalreporter.write_line(line)

"""``basidia bench``: echo RPC latency and throughput, beside the raw broker client's.

``command`` (the typer command that ``basidia.cli`` registers) is imported on
first use, so the measuring code and the raw floors load without typer.
"""

from __future__ import annotations

from typing import Any

from basidia.bench.core import BenchPlan, BenchReport, Figures, PayloadResult, run_bench

__all__ = ["BenchPlan", "BenchReport", "Figures", "PayloadResult", "command", "run_bench"]


def __getattr__(name: str) -> Any:
    if name == "command":
        from basidia.bench.cli import command

        return command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""``basidia bench``: the command as a user runs it, its JSON schema, and its gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from basidia.bench import core
from basidia.bench.cli import parse_size
from basidia.bench.core import BenchPlan, BenchReport, Figures, PayloadResult, figures, run_bench
from basidia.bench.report import Gate, check_gate, render_table

ROOT = Path(__file__).resolve().parents[1]

# Short enough for a test, long enough that every phase runs.
SHORT = ("--calls", "100", "--duration", "0.2")


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m basidia bench ARGS`` on this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "basidia", "bench", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


FIGURE_KEYS = {"p50_us", "p90_us", "p99_us", "calls_per_s"}


def check_figures(item: dict[str, Any]) -> None:
    assert set(item) == FIGURE_KEYS
    assert 0 < item["p50_us"] <= item["p90_us"] <= item["p99_us"]
    assert item["calls_per_s"] > 0


def test_quick_json_on_memory_has_the_schema() -> None:
    result = bench("--quick", "--json", *SHORT)

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == 1
    assert data["broker"] == "memory://"
    assert data["implementation"] in ("c", "py")
    assert data["python"].split()[0] in ("CPython", "PyPy")
    assert data["uvloop"] is None or isinstance(data["uvloop"], str)
    assert data["concurrency"] == 64
    assert data["raw_floor"] == {"name": None, "available": False, "reason": None}
    assert [payload["bytes"] for payload in data["payloads"]] == [16, 1024]
    for payload in data["payloads"]:
        check_figures(payload["basidia"])
        assert payload["raw"] is None
        assert payload["overhead_p50_us"] is None
        assert payload["throughput_ratio"] is None
    assert data["gate"]["passed"] is True
    # Progress goes to stderr, so stdout stays parseable.
    assert "measuring latency (16 B" in result.stderr
    assert "measuring throughput (1 KiB" in result.stderr


def test_the_table_names_the_core_and_the_figures() -> None:
    result = bench("--payload", "64", *SHORT)

    assert result.returncode == 0, result.stderr
    assert "core: " in result.stdout
    assert "p50 µs" in result.stdout
    assert "calls/s" in result.stdout
    assert "64 B" in result.stdout


def test_on_memory_the_gate_checks_the_absolute_p50() -> None:
    result = bench("--json", "--payload", "16", "--max-overhead-us", "0.001", *SHORT)

    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["gate"]["passed"] is False
    assert "gate failed: 16 B: p50" in result.stderr
    assert "absolute p50" in result.stderr


def test_an_unreachable_broker_is_an_error_not_a_traceback() -> None:
    result = bench("--broker", "nats://127.0.0.1:9", *SHORT)

    assert result.returncode == 2
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.nats
def test_nats_measures_the_raw_floor_and_passes_a_generous_gate(nats_url: str) -> None:
    result = bench("--broker", nats_url, "--json", "--max-overhead-us", "1000", *SHORT)

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["raw_floor"]["available"] is True
    assert data["raw_floor"]["name"] == "raw nats-py request/reply"
    for payload in data["payloads"]:
        check_figures(payload["basidia"])
        check_figures(payload["raw"])
        overhead = payload["basidia"]["p50_us"] - payload["raw"]["p50_us"]
        assert payload["overhead_p50_us"] == pytest.approx(overhead, abs=0.11)
        assert payload["throughput_ratio"] > 0
    assert data["gate"] == {
        "max_overhead_us": 1000.0,
        "min_throughput_ratio": None,
        "passed": True,
        "failures": [],
        "notices": [],
    }


@pytest.mark.nats
def test_nats_gate_fails_with_exit_code_1(nats_url: str) -> None:
    # No client reaches a thousand times the raw floor's throughput.
    result = bench(
        "--broker", nats_url, "--payload", "16", "--min-throughput-ratio", "1000", *SHORT
    )

    assert result.returncode == 1, result.stderr
    assert "gate failed: 16 B: throughput" in result.stderr
    assert "overhead" in result.stdout  # the table still shows what was measured


@pytest.mark.nats
async def test_a_missing_raw_floor_is_reported_not_fatal(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = "basidia.bench.raw_missing_for_test"
    monkeypatch.setitem(core._RAW_FLOORS, "nats", (missing, "raw nats-py request/reply"))
    plan = BenchPlan(broker=nats_url, payloads=(16,), calls=50, duration=0.1, concurrency=8)

    report = await run_bench(plan)

    assert report.raw_unavailable == f"{missing} is not installed"
    assert [item.raw for item in report.results] == [None]
    assert "raw floor unavailable" in render_table(report)


def fake_report(raw: Figures | None, unavailable: str | None = None) -> BenchReport:
    ours = Figures(p50_us=120.0, p90_us=150.0, p99_us=300.0, calls_per_s=8000.0)
    return BenchReport(
        plan=BenchPlan(broker="nats://x"),
        broker="nats://x",
        raw_floor="raw nats-py request/reply",
        raw_unavailable=unavailable,
        results=[PayloadResult(16, ours, raw), PayloadResult(1024, ours, raw)],
    )


def test_gate_compares_overhead_and_throughput_with_the_floor() -> None:
    report = fake_report(Figures(p50_us=100.0, p90_us=120.0, p99_us=200.0, calls_per_s=10000.0))

    assert check_gate(report, Gate(max_overhead_us=20, min_throughput_ratio=0.8)).passed
    failed = check_gate(report, Gate(max_overhead_us=19.9, min_throughput_ratio=0.81))
    assert len(failed.failures) == 4
    assert failed.failures[0] == (
        "16 B: p50 overhead 20.0 µs over the raw floor exceeds --max-overhead-us 19.9"
    )
    assert not failed.notices


def test_without_a_floor_the_gate_bounds_the_overhead_by_the_p50() -> None:
    report = fake_report(None, unavailable="basidia.bench.raw_amqp is not installed")

    verdict = check_gate(report, Gate(max_overhead_us=120, min_throughput_ratio=0.8))
    assert verdict.passed
    assert len(verdict.notices) == 2
    assert "raw_amqp is not installed" in verdict.notices[0]
    assert not check_gate(report, Gate(max_overhead_us=119)).passed


def test_percentiles_are_nearest_rank() -> None:
    measured = figures([i * 1000 for i in range(1, 101)], calls=500, seconds=2.0)

    assert measured == Figures(p50_us=50.0, p90_us=90.0, p99_us=99.0, calls_per_s=250.0)


@pytest.mark.parametrize(
    ("text", "size"), [("16", 16), ("1k", 1024), ("1KiB", 1024), ("2kb", 2048), ("64 B", 64)]
)
def test_payload_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "1 GiB", "-1", "lots", "2MiB"])
def test_bad_payload_sizes_are_refused(text: str) -> None:
    import typer

    with pytest.raises(typer.BadParameter):
        parse_size(text)


# --sweep: payloads 16 B to 1 MiB, 1 to 1,024 in flight; every point in the JSON.
SWEEP_SHORT = ("--sweep", "--quick", "--json", "--duration", "0.05", "--calls", "10")


def check_sweep(data: dict[str, Any]) -> None:
    assert data["kind"] == "sweep"
    payloads = data["payload_axis"]["points"]
    in_flight = data["concurrency_axis"]["points"]
    assert [point["bytes"] for point in payloads] == [16, 1024, 16384, 262144, 1048576]
    assert [point["in_flight"] for point in in_flight] == [1, 4, 16, 64, 256, 1024]
    for point in payloads + in_flight:
        basidia = point["basidia"]
        if basidia is None:  # refused by the broker's own limit, and said why
            assert point["errors"]["basidia"]
            continue
        assert basidia["calls_per_s"] > 0
        assert ("p50_us" if "bytes" in point else "mean_latency_us") in basidia


def test_sweep_on_memory_holds_every_point_of_both_axes() -> None:
    result = bench(*SWEEP_SHORT)

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    check_sweep(data)
    assert data["raw_floor"]["name"] is None
    # In process there is no broker limit: even 1 MiB goes through.
    assert all(point["errors"] == {} for point in data["payload_axis"]["points"])


@pytest.mark.nats
def test_sweep_on_nats_sets_each_point_beside_the_raw_floor(nats_url: str) -> None:
    result = bench("--broker", nats_url, *SWEEP_SHORT)

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    check_sweep(data)
    small = data["payload_axis"]["points"][0]
    assert small["raw"]["calls_per_s"] > 0 and small["throughput_ratio"] > 0
    # 1 MiB framed is over the server's default max_payload, for Basidia and raw nats-py alike.
    assert set(data["payload_axis"]["points"][-1]["errors"]) == {"basidia", "raw"}


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_sweep_draws_its_picture(tmp_path: Path, suffix: str, magic: bytes) -> None:
    pytest.importorskip("matplotlib", reason="the picture needs basidia[plot]")
    picture = tmp_path / f"sweep{suffix}"

    result = bench(*SWEEP_SHORT, "--plot", str(picture))

    assert result.returncode == 0, result.stderr
    assert picture.read_bytes().startswith(magic)


def test_sweep_does_not_gate_and_plot_needs_a_sweep() -> None:
    assert bench("--sweep", "--max-overhead-us", "5").returncode == 2
    assert bench("--plot", "x.png").returncode == 2

"""CI's performance gate: ``basidia bench --quick`` on every broker this checkout has.

    python benchmarks/bench_gate.py                       # the seed plan's limit, 1000 µs
    python benchmarks/bench_gate.py --max-overhead-us 30  # the contract (docs/benchmarks.md)

For each broker (memory always; NATS and RabbitMQ when their adapter exists)
it runs ``basidia bench --quick --max-overhead-us N``, which measures the raw
client floor in the same run and fails above N µs of p50 overhead.  A broker
that is not reachable is skipped with a notice, or fails the gate under
``BASIDIA_REQUIRE_BROKERS=1``, as in the test suite.  Exits 1 if any run fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]

# (adapter source in this checkout, URL); the URLs are the test suite's, overridable alike.
BROKERS = [
    ("basidia/brokers/memory.py", "memory://"),
    ("basidia/brokers/nats.py", os.environ.get("BASIDIA_TEST_NATS_URL", "nats://127.0.0.1:4222")),
    (
        "basidia/brokers/amqp.py",
        os.environ.get("BASIDIA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    ),
]


def _require_brokers() -> bool:
    return os.environ.get("BASIDIA_REQUIRE_BROKERS", "").strip().lower() in {"1", "true", "yes"}


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return True
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 1.0):
            return True
    except OSError:
        return False


def _shown(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.hostname else url


def gate(max_overhead_us: float) -> int:
    """Run the bench on every available broker; 0 when all pass, 1 otherwise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    verdicts: list[tuple[str, str]] = []
    for adapter, url in BROKERS:
        shown = _shown(url)
        if not (ROOT / adapter).exists():
            verdicts.append((shown, f"skipped: {adapter} does not exist yet"))
            continue
        if not _reachable(url):
            if _require_brokers():
                verdicts.append((shown, "FAILED: not reachable and BASIDIA_REQUIRE_BROKERS=1"))
            else:
                verdicts.append((shown, "skipped: not reachable"))
            continue
        print(f"== basidia bench --quick --broker {shown}", flush=True)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "basidia",
                "bench",
                "--quick",
                "--broker",
                url,
                "--max-overhead-us",
                f"{max_overhead_us:g}",
            ],
            env=env,
            check=False,
        )
        verdicts.append((shown, "passed" if done.returncode == 0 else "FAILED"))
    print(f"\nbench gate (p50 overhead ≤ {max_overhead_us:g} µs):")
    for shown, verdict in verdicts:
        print(f"  {shown:<28} {verdict}")
    return 1 if any(verdict.startswith("FAILED") for _, verdict in verdicts) else 0


def main() -> None:
    """Parse the one option and run the gate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-overhead-us",
        type=float,
        default=1000.0,
        help="p50 overhead allowed over the raw floor (default: 1000, the seed plan's limit)",
    )
    sys.exit(gate(parser.parse_args().max_overhead_us))


if __name__ == "__main__":
    main()

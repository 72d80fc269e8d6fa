"""The benchmark scripts run (a smoke test: one short repeat each; their figures are not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "args",
    [
        ["bench_step.py", "--quick", "--device", "cpu", "--sizes", "small", "--repeats", "1", "--markdown"],
        ["bench_monitor.py", "--quick", "--device", "cpu", "--repeats", "1", "--block-ms", "5", "--markdown"],
    ],
    ids=["bench_step", "bench_monitor"],
)
def test_benchmark_runs_and_prints_its_table(args):
    out = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "machine:" in out.stdout and "| cpu |" in out.stdout, out.stdout[-2000:]

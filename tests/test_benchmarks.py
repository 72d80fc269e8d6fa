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
        # (one size, one activation, one model: every mode of each script runs, eager and compiled, in ~30 s)
        ["bench_step.py", "--quick", "--device", "cpu", "--sizes", "small", "--activations", "relu", "--repeats", "1"]
        + ["--markdown"],
        ["bench_monitor.py", "--quick", "--device", "cpu", "--models", "mlp-relu", "--repeats", "1", "--block-ms", "5"]
        + ["--markdown"],
    ],
    ids=["bench_step", "bench_monitor"],
)
def test_benchmark_runs_and_prints_its_table(args):
    out = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "machine:" in out.stdout and "| cpu |" in out.stdout, out.stdout[-2000:]


def test_bench_peers_rows_each_recorded_or_say_why(tmp_path):
    """Every peer of bench_peers.py (eager, one step each) recorded what it should, or its row says why not."""
    import json

    out = tmp_path / "peers.json"
    args = ["--no-compile", "--rounds", "1", "--block-ms", "1", "--warmup", "2", "--threads", "1", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, str(BENCH / "bench_peers.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "machine:" in run.stdout and "| mlp | torch | eager |" in run.stdout, run.stdout[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["key"] for r in rows} >= {"torch", "torchbp", "monitor10", "monitor1", "hooks1", "full-backward-hook"}
    for r in rows:
        if r["notes"] and r["notes"][0].startswith(("skipped:", "failed")):
            assert ("pip install" in r["notes"][0]) or ("torch" in r["notes"][0]) or r["notes"][0].startswith("fail")
            continue
        if r["expected"]:
            assert r["records"] == r["expected"], r
        assert r["ratio"] is not None, r

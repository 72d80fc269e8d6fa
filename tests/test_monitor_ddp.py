"""The DeltaMonitor with data parallelism on torch.distributed.

Two processes started here (gloo on CPU), each a rank running tests/_ddp_child.py: a converted model in
``DistributedDataParallel``, a monitor on every rank (the same code everywhere), each rank on its half
of the same global batches. Checked against one process on the whole batch: the gradients (float64,
rel 1e-12), and with ``global_stats=True`` the logged statistics over all ranks' samples. Rank 0 alone
writes. Every wait has a deadline and the ranks are killed after it: no rank can hang the test.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import STATS, read_events, scalar_series

import torchbp

CHILD = Path(__file__).resolve().with_name("_ddp_child.py")
ROOT = CHILD.parents[1]
DEADLINE_S = 120

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _load_child_helpers():
    """build() and batches() of the child script, without running it (the definitions come first)."""
    source = CHILD.read_text()
    head = source[: source.index("model = torchbp.convert(build())")]
    head = head[head.index("def build():") :]
    namespace = {"torch": torch}
    exec(compile(head, str(CHILD), "exec"), namespace)
    return namespace["build"], namespace["batches"]


build, batches = _load_child_helpers()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, mode: str, world: int = 2) -> tuple[list[dict], Path]:
    out, logdir = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    port = str(free_port())
    # The ranks import this checkout's torchbp (a child's sys.path starts at tests/, not at the repository).
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    ranks = [
        subprocess.Popen(
            [sys.executable, str(CHILD), str(r), str(world), port, str(out), str(logdir), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=DEADLINE_S)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for r, (p, text) in enumerate(zip(ranks, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{text[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)], logdir


def single_process():
    """One process on the whole batch: the gradients and monitor.latest() of every step."""
    model = torchbp.convert(build())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, latest = [], []
    with torchbp.DeltaMonitor(model) as monitor:
        for x, y in batches():
            optimizer.zero_grad(set_to_none=True)
            torchbp.nn.CrossEntropyLoss()(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            latest.append(monitor.latest())
            optimizer.step()
    return grads, latest


def test_ddp_gradients_equal_one_process_and_rank_0_alone_writes(tmp_path):
    records, logdir = run_ranks(tmp_path, "ddp")
    grads, _ = single_process()
    for r, record in enumerate(records):
        for step, (ours, expected) in enumerate(zip(record["grads"], grads)):
            for g, e in zip(ours, expected):
                torch.testing.assert_close(
                    g, e, rtol=1e-12, atol=1e-15, msg=lambda m, r=r, step=step: f"rank {r} step {step}: {m}"
                )
    assert [r["writer"] for r in records] == [True, False]
    files = sorted(p.name for p in logdir.rglob("events.out.tfevents.*"))
    assert len(files) == 1, f"only rank 0 writes: {files}"
    # Rank 0's logged statistics are its own samples': those of monitor.latest() on rank 0.
    ea = read_events(logdir)
    for step, latest in enumerate(records[0]["latest"]):
        for layer, stats in latest.items():
            assert math.isclose(scalar_series(ea, f"delta_norm/{layer}")[step], stats["delta_norm"], rel_tol=1e-6)


def test_ddp_global_statistics_equal_one_process_on_the_whole_batch(tmp_path):
    records, logdir = run_ranks(tmp_path, "ddp-global")
    _, expected = single_process()
    ea = read_events(logdir)
    for step, whole in enumerate(expected):
        for layer, stats in whole.items():
            for stat in STATS:
                value = stats[stat]
                tag = f"{stat}/{layer}"
                if value is None:
                    assert tag not in ea.Tags()["scalars"] or step not in scalar_series(ea, tag), tag
                    continue
                logged = scalar_series(ea, tag)[step]
                assert math.isclose(logged, float(value), rel_tol=1e-6, abs_tol=1e-9), (step, tag, logged, value)
    # Dead units on every rank's samples: the model has two by construction.
    assert scalar_series(ea, "dead_fraction/0")[0] == pytest.approx(0.2)
    # monitor.latest() stays this rank's own (half-batch) statistics.
    assert records[0]["latest"][0]["0"]["delta_norm"] != pytest.approx(expected[0]["0"]["delta_norm"], rel=1e-3)


def test_fsdp2_fully_shard_on_cpu_with_gloo(tmp_path):
    """FSDP2 (torch.distributed.fsdp.fully_shard) on CPU with gloo: gradients equal one process."""
    records, _ = run_ranks(tmp_path, "fsdp")
    grads, expected = single_process()
    for step, (ours, ref) in enumerate(zip(records[0]["grads"], grads)):
        for g, e in zip(ours, ref):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15, msg=lambda m, step=step: f"step {step}: {m}")
    assert set(records[0]["latest"][0]) == set(expected[0])

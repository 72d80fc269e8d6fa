"""The monitor in compositions of real training code: activation checkpointing (reentrant and not),
``torch.autograd.grad`` with respect to a subset of the parameters, changing ``every`` after construction, a
layer replaced after attaching.

The oracle is the same model without the composition (the same batch, the same weights): its statistics are
checked against torch's own δ in test_monitor.py; here, each composition must give exactly them (and torch's
gradients).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch._dynamo
from torch.utils.checkpoint import checkpoint

import torchbp

pytestmark = pytest.mark.filterwarnings("ignore:.*TF32.*")


def assert_latest_equal(actual: dict, expected: dict, label: str) -> None:
    """Two ``latest()`` tables: the same layers, the same statistics, equal to rel 1e-12 (None where None)."""
    assert list(actual) == list(expected), f"{label}: layers {list(actual)}, expected {list(expected)}"
    for layer, stats in expected.items():
        for stat, value in stats.items():
            got = actual[layer][stat]
            if value is None or isinstance(value, bool):
                assert got == value, f"{label}: {layer}/{stat} = {got}, expected {value}"
            else:
                assert got == pytest.approx(value, rel=1e-12, abs=1e-300), (
                    f"{label}: {layer}/{stat} = {got}, expected {value}"
                )


# -- activation checkpointing ---------------------------------------------------------------------------------


class Checkpointed(torch.nn.Module):
    """An MLP whose middle block (Linear, ReLU, Linear, ReLU) runs under ``torch.utils.checkpoint`` (or not)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.first = torchbp.nn.Linear(6, 8)
        self.block = torch.nn.Sequential(
            torchbp.nn.Linear(8, 8), torchbp.nn.ReLU(), torchbp.nn.Linear(8, 8), torchbp.nn.ReLU()
        )
        self.head = torchbp.nn.Linear(8, 3)
        self.reentrant = reentrant  # None: no checkpoint

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = self.block(h) if self.reentrant is None else checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


def checkpoint_run(reentrant, steps=3, every=1, step=None, compiled=False):
    torch.manual_seed(0)
    model = Checkpointed(reentrant).double()
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(steps)
    ]
    counter = [0]
    monitor = torchbp.DeltaMonitor(model, every=every, step=None if step is None else (lambda: counter[0]))
    run = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logged = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DeltaMonitor")  # (none: a changed step callable, a missed step)
        for x, y in data:
            torch.nn.functional.cross_entropy(run(x), y).backward()
            if monitor.latest() and (not logged or logged[-1][0] != monitor.step) and monitor.step % every == 0:
                logged.append((monitor.step, monitor.latest()))
            optimizer.step()
            optimizer.zero_grad()
            counter[0] += 1
    grads = None
    monitor.close()
    return monitor, logged, grads


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("step", [None, "callable"], ids=["counted", "step-callable"])
def test_checkpointing_counts_one_step_and_records_the_unchecked_statistics(reentrant, step):
    expected_monitor, expected, _ = checkpoint_run(None, step=step)
    monitor, logged, _ = checkpoint_run(reentrant, step=step)
    assert monitor.step == expected_monitor.step == 2, f"steps: {monitor.step}, expected 2 (one per training step)"
    assert [s for s, _ in logged] == [s for s, _ in expected] == [0, 1, 2]
    for (s, actual), (_, wanted) in zip(logged, expected):
        if reentrant:  # (the block's inside is a graph of its own: no gain across its boundary, documented)
            wanted["block.2"]["delta_gain"] = None
        assert_latest_equal(actual, wanted, f"checkpoint(use_reentrant={reentrant}) step {s}")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointing_every_10_logs_steps_0_and_10(reentrant, tmp_path):
    torch.manual_seed(0)
    model = Checkpointed(reentrant).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    seen = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DeltaMonitor")
        monitor = torchbp.DeltaMonitor(model, every=10)
        for _ in range(20):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if monitor.latest() and monitor.step % 10 == 0:
                seen.append(monitor.step)
        monitor.close()
    assert monitor.step == 19
    assert seen == [0, 10]


def test_checkpointing_compiled_non_reentrant_records_the_unchecked_statistics():
    torch._dynamo.reset()
    try:
        expected_monitor, expected, _ = checkpoint_run(None, steps=2)
        monitor, logged, _ = checkpoint_run(False, steps=2, compiled=True)
    finally:
        torch._dynamo.reset()
    assert monitor.step == expected_monitor.step == 1
    assert [s for s, _ in logged] == [s for s, _ in expected] == [0, 1]
    for (s, actual), (_, wanted) in zip(logged, expected):
        assert_latest_equal(actual, wanted, f"compiled checkpoint(use_reentrant=False) step {s}")

"""The backprop loop frees what it saved when torch would: a forward pass with grad on whose output is dropped
without backward, or a graph kept by ``backward(retain_graph=True)`` and then dropped, leaves nothing alive.

The oracle is plain ``torch.nn`` running the same loop: after it, no more live tensors than torch's (counted
among the objects Python's garbage collector tracks, after a collection) and the dropped output is gone (a weak
reference to it is dead). The loop runs once first, so that what is created once (a monitor's per-layer state,
a cached plan) is not counted as growth.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import weakref
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbp
import torchbp.nn as bnn


@pytest.fixture(autouse=True, scope="module")
def _frozen_heap():
    """Everything alive before this module's tests is left out of the collections and the counts (it is not the
    loop's), so that each count scans only what the tests created: a fraction of a second less per count."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def live_tensors() -> int:
    """The number of tensors alive after a garbage collection (the tensors Python's gc tracks)."""
    gc.collect()
    kinds = Counter(map(type, gc.get_objects()))
    return sum(n for kind, n in kinds.items() if issubclass(kind, torch.Tensor))


def torch_mlp() -> nn.Module:
    # Every kind of saved tensor: inputs (BP4), weights (BP2), kept activations (σ'(z), the next a^{l-1}) and the
    # run's output (the last Sigmoid's σ'(z)).
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 4), nn.Sigmoid())


class PerOpCalls(nn.Module):
    """torchbp's modules called one by one, outside any Sequential (each op its own Function)."""

    def __init__(self, seq: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(seq)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def make(kind: str) -> nn.Module:
    model = torch_mlp()
    if kind == "torch":
        return model
    ours = torchbp.convert(model)
    if kind == "chain":
        assert isinstance(ours, bnn.Sequential) and ours.chained_runs() == [(0, 6)], ours
    elif kind == "chain=False":
        ours.chain = False
    elif kind == "per_op_calls":
        ours = PerOpCalls(ours)
    return ours


def forward_only(model, x, y):
    out = model(x)
    F.mse_loss(out, y)  # (a validation loss computed with grad on, then thrown away)
    return weakref.ref(out)


def retain_graph(model, x, y):
    out = model(x)
    F.mse_loss(out, y).backward(retain_graph=True)
    return weakref.ref(out)


LOOPS = {"forward_only": forward_only, "retain_graph": retain_graph}
KINDS = ["chain", "chain=False", "per_op_calls"]
MONITORS = ["no_monitor", "monitor_log_none", "monitor_log_dir", "monitor_histograms"]


def growth(kind: str, loop, monitor: str, tmp_path, context=contextlib.nullcontext, steps: int = 6):
    """Live tensors after ``steps`` runs of ``loop`` minus before (after one warm-up run), and whether the last
    run's dropped output is still alive."""
    model = make(kind)
    mon = None
    if monitor != "no_monitor":
        log = None if monitor == "monitor_log_none" else tmp_path / kind
        histograms = 1 if monitor == "monitor_histograms" else None
        mon = torchbp.DeltaMonitor(model, log=log, every=1, histogram_every=histograms)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
    try:
        with context():
            loop(model, x, y)
        model.zero_grad(set_to_none=True)
        settle = mon.flush if mon is not None else lambda: None  # (nothing of the monitor's in flight is counted)
        settle()
        before = live_tensors()
        for _ in range(steps):
            with context():
                out = loop(model, x, y)
            model.zero_grad(set_to_none=True)
        settle()
        after = live_tensors()
        return after - before, out() is not None
    finally:
        if mon is not None:
            mon.close()


_TORCH: dict[str, tuple[int, bool]] = {}


def torch_growth_of(loop: str, tmp_path) -> tuple[int, bool]:
    """The oracle's growth and whether its output stays alive, once per loop."""
    if loop not in _TORCH:
        _TORCH[loop] = growth("torch", LOOPS[loop], "no_monitor", tmp_path)
    return _TORCH[loop]


@pytest.mark.parametrize("monitor", MONITORS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loop", LOOPS)
def test_a_dropped_graph_leaves_no_more_alive_than_torch(loop, kind, monitor, tmp_path):
    torch_growth, torch_alive = torch_growth_of(loop, tmp_path)
    assert not torch_alive and torch_growth <= 0, (torch_growth, torch_alive)  # (the oracle frees everything)
    ours, alive = growth(kind, LOOPS[loop], monitor, tmp_path)
    assert not alive, f"{kind}, {loop}, {monitor}: the dropped output is still alive (its graph is kept)"
    assert ours <= torch_growth, f"{kind}, {loop}, {monitor}: {ours} more live tensors, torch {torch_growth}"


def _checkpointed(model, x, y, loop):
    def run(x):
        return model(x)

    out = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
    if loop is retain_graph:
        F.mse_loss(out, y).backward(retain_graph=True)
    return weakref.ref(out)


@pytest.mark.parametrize("loop", LOOPS)
def test_under_non_reentrant_checkpoint_a_dropped_graph_leaves_no_more_than_torch(loop, tmp_path):
    # The loop's holders under checkpoint's saved-tensor hooks (the outer hooks: its pack keeps no tensor).
    def run(model, x, y):
        return _checkpointed(model, x.requires_grad_(), y, LOOPS[loop])

    torch_growth, torch_alive = growth("torch", run, "no_monitor", tmp_path)
    ours, alive = growth("chain", run, "no_monitor", tmp_path)
    assert not torch_alive and not alive, (torch_alive, alive)
    assert ours <= torch_growth, (ours, torch_growth)


def test_an_in_place_change_of_a_saved_tensor_raises_like_torch():
    # The holders hold a detached alias that shares the version counter: a change in place after the forward
    # pass raises, as torch's own check does for the per-op Functions (a silent wrong gradient otherwise).
    torch_model = torch_mlp().double()
    for model in (torch_model, torchbp.convert(copy.deepcopy(torch_model))):
        out = model(torch.randn(3, 8, dtype=torch.float64))
        out.mul_(2)  # the last Sigmoid's output, which its σ'(z) reads
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True) * 1.0
        out = model(x)
        x.add_(1)  # a^0, which BP4 of the first layer reads
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_a_monitor_that_rarely_logs_holds_a_bounded_map_of_steps():
    """With a step callable the monitor maps each backward pass to its step until the pass's finiteness flags are
    read (at a logged step): a monitor that logs once in a long while still holds at most PASS_STEPS_HELD of them,
    and a NaN born past that bound is found at its step."""
    from torchbp.monitor.backward import PASS_STEPS_HELD

    model = torchbp.nn.Sequential(torchbp.nn.Linear(3, 4), torchbp.nn.ReLU(), torchbp.nn.Linear(4, 2))
    steps = iter(range(10**9))
    step = [0]
    with torchbp.DeltaMonitor(model, every=10**9, step=lambda: step[0]) as monitor:
        x = torch.randn(2, 3)
        for _ in range(PASS_STEPS_HELD + 200):
            step[0] = 7 + next(steps)  # (a step that is not the pass number)
            model(x).sum().backward()
            assert len(monitor._backward.pass_steps) <= PASS_STEPS_HELD
        step[0] += 1
        model(torch.full((2, 3), float("nan"))).sum().backward()
        born = step[0]
    assert monitor.nonfinite() == (born, "0", "input")

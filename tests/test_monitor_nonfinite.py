"""A NaN found where it was born, and a batch of 0 rows.

Every backward pass, logged or not, checks δ, ∂C/∂W, ∂C/∂b and each layer's input for a NaN or Inf. The truth
is known by construction: a NaN put into one input row at a known step (with its target ignored by the loss,
so that δ stays finite while torch's own ∂C/∂W is NaN), read against torch's ``.grad``; a GradScaler's
overflow, which torch's scaler itself reports by lowering its scale.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch._dynamo
from helpers import read_events, scalar_series
from torch import nn

import torchbp
from torchbp import report

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def mlp(seed=0):
    torch.manual_seed(seed)
    return torchbp.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)))


def batch(step, n=16, nan_row=False):
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    if nan_row:  # a padded row: its input NaN, its target ignored by the loss (its δ row is 0)
        x[2], y[2] = math.nan, -100
    return x, y


def loss_fn(out, y):
    return torchbp.nn.CrossEntropyLoss(ignore_index=-100)(out, y)  # (its δ of an ignored row is 0, not NaN)


def train(model, monitor_kw, steps, nan_at=(), compiled=False, sgd=True):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = torch.compile(model, fullgraph=True) if compiled else model
    monitor = torchbp.DeltaMonitor(model, **monitor_kw)
    grads = []
    for step in range(steps):
        x, y = batch(step, nan_row=step in nan_at)
        opt.zero_grad(set_to_none=True)
        loss_fn(run(x), y).backward()
        grads.append(model[0].weight.grad.clone())
        if sgd:
            opt.step()
    return monitor, grads


def test_a_nan_in_the_weight_gradient_while_delta_is_finite_is_found(tmp_path):
    """A padded input row with ignore_index: δ is finite, torch's ∂C/∂W is NaN; the monitor names the step,
    the layer nearest the input whose input held it, and the tensor; ∂C/∂W's norm reads NaN, not None."""
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor, grads = train(model, dict(log=tmp_path, every=1), steps=1, nan_at=(0,), sgd=False)
        monitor.close()
    assert grads[0].isnan().any(), "by construction torch's ∂C/∂W is NaN"
    assert monitor.first_nonfinite == "0"
    assert monitor.nonfinite() == torchbp.monitor.Nonfinite(0, "0", "input")
    stats = monitor.latest()["0"]
    assert stats["delta_nonfinite"] is False  # δ itself is finite (its padded row is 0)
    assert stats["weight_grad_norm"] is not None and math.isnan(stats["weight_grad_norm"])
    findings = report.analyze(report.read_logdir(tmp_path)["."])
    assert [f.kind for f in findings if f.problem] == ["nonfinite"]
    nonfinite = findings[0]
    assert nonfinite.steps == [0] and nonfinite.layers[0] == "0" and "input" in nonfinite.message


def test_a_nan_born_on_an_unlogged_step_is_found_at_its_step():
    model = mlp()
    monitor, grads = train(model, dict(every=10), steps=12, nan_at=(3,))
    assert not grads[2].isnan().any() and grads[3].isnan().any()  # born at step 3 (then SGD spreads it)
    birth = monitor.nonfinite()
    assert (birth.step, birth.layer, birth.tensor) == (3, "0", "input")
    assert monitor.first_nonfinite == "0"
    monitor.close()


def test_training_that_stops_before_a_logged_step_reports_the_birth(tmp_path):
    """every=10, a NaN at step 13, training stops at step 15: the log holds the birth (written by close),
    and the report says where it was born instead of "every δ finite"."""
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor, _ = train(model, dict(log=tmp_path, every=10, image_every=0), steps=16, nan_at=(13,))
        monitor.close()
    assert any(p.isnan().any() for p in model.parameters()), "by construction the weights are NaN"
    assert scalar_series(read_events(tmp_path), "nonfinite/0") == {13: 2.0}  # 1 + the index of "input"
    history = report.read_logdir(tmp_path)["."]
    assert history["steps"] == [0, 10]  # the birth is at no logged step
    findings = report.analyze(history)
    assert findings[0].kind == "nonfinite" and findings[0].steps == [13]
    assert "step 13" in report.format_report({"run": history}, {"run": findings})
    assert monitor.nonfinite().step == 13


def test_a_nan_in_the_output_layers_delta_is_named_there():
    """A NaN target: the loss and every δ are NaN, every input finite: the output layer's δ is the birth."""
    model = mlp()
    monitor = torchbp.DeltaMonitor(model, every=10)
    for step in range(3):
        x, _ = batch(step)
        target = torch.randn(16, 3)
        if step == 1:
            target[0, 0] = math.nan
        nn.functional.mse_loss(model(x), target).backward()
    assert monitor.nonfinite() == torchbp.monitor.Nonfinite(1, "4", "delta")
    monitor.close()


def test_an_overflow_the_grad_scaler_skips_is_counted_not_a_birth():
    """float16 autocast with a scale of 2^40: δ overflows at step 0, the scaler skips that step and backs off
    (torch's own verdict: its scale falls); the steps after are finite."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    monitor = torchbp.DeltaMonitor(model, every=10, scaler=scaler)
    scales = []
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scaler.step(opt)
        scales.append(scaler.get_scale())
        scaler.update()
    monitor.close()
    assert scaler.get_scale() < scales[0], "by construction the scaler skipped step 0"
    assert monitor.skipped_steps == 1
    assert monitor.nonfinite() is None and monitor.first_nonfinite is None


def test_raise_nonfinite_raises_in_the_backward_that_produced_it():
    model = mlp()
    with pytest.raises(FloatingPointError, match=r"input a\^\{l-1\} of layer '0' at step 2"):
        train(model, dict(every=10, raise_nonfinite=True), steps=4, nan_at=(2,))


def test_compiled_unlogged_step_finds_the_birth_two_graphs_no_recompile():
    """fullgraph=True, every=3: a NaN at step 7 (unlogged); the logged and the unlogged step each compile once."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, fullgraph=True)
    monitor = torchbp.DeltaMonitor(model, every=3)
    try:
        for step in range(9):
            if step == 4:  # warmed up: step 0 eager (the data flow), 1-2 unlogged, 3 logged
                torch.compiler.set_stance("fail_on_recompile")
            x, y = batch(step, nan_row=step == 7)
            opt.zero_grad(set_to_none=True)
            loss_fn(compiled(x), y).backward()
            if step < 7:
                assert monitor.nonfinite() is None, step
            opt.step()
    finally:
        torch.compiler.set_stance("default")
        monitor.close()
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert monitor.nonfinite() == torchbp.monitor.Nonfinite(7, "0", "input")


# -- a batch of 0 rows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_batch_of_zero_rows_on_a_logged_step_has_no_statistics(compiled, tmp_path):
    """A logged step with 0 rows: no crash, its statistics absent (None, NaN in history), not zeros; the next
    step's ‖∂C/∂b‖ equals torch's (its bias gradient)."""
    torch.manual_seed(0)
    torch_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    model = torchbp.convert(copy.deepcopy(torch_model))
    run = torch.compile(model, fullgraph=True) if compiled else model
    monitor = torchbp.DeltaMonitor(model, log=tmp_path, every=1, histogram_every=1, image_every=0)
    sizes = [4, 0, 5]
    for step, n in enumerate(sizes):
        x, y = torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 3, (n,))
        model.zero_grad(set_to_none=True)
        out = run(x)
        (out.sum() if n == 0 else loss_fn(out, y)).backward()
        if n == 0:
            latest = monitor.latest()
            for name, stats in latest.items():
                assert stats["delta_nonfinite"] is False, name
                assert {k: v for k, v in stats.items() if k != "delta_nonfinite" and v is not None} == {}, name
        else:
            torch_model.zero_grad(set_to_none=True)
            loss_fn(torch_model(x), y).backward()
            ours = monitor.latest()
            for name in ("0", "2"):
                expected = torch_model[int(name)].bias.grad.norm().item()
                assert ours[name]["delta_norm"] == pytest.approx(expected, rel=1e-12), (step, name)
    history = monitor.history()
    monitor.close()
    assert history["steps"] == [0, 1, 2]
    assert np.isnan(history["delta_fro"][:, 1]).all() and np.isnan(history["delta_norm"][:, 1]).all()
    assert (history["delta_nonfinite"][:, 1] == 0).all()
    assert np.isfinite(history["delta_fro"][:, [0, 2]]).all()
    assert monitor.nonfinite() is None

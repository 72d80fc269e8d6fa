"""The DeltaMonitor under torch.compile: every step's statistics equal eager's and torch's.

The oracle is torch: the same model built from ``torch.nn`` with a tensor hook on each Linear's output
(``DeltaOracle`` of test_monitor.py). The compiled torchbp copy, an eager torchbp copy and the torch
model train in lockstep on the same batches with the same SGD; after every step the compiled model's
``monitor.latest()`` must equal the oracle's statistics (float64: rel 1e-12; float32: rel 1e-5) and the
eager copy's. ``torch.compiler.set_stance("fail_on_recompile")`` proves that logged and unlogged steps
run the same compiled code, and dynamo's counters that nothing broke the graph.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo
from helpers import (
    DEVICES,
    DeltaOracle,
    assert_stats_match,
    loss_fn,
    make_models,
    mixed_mlp,
    monitored,
    nested,
    read_events,
    relu_mlp,
    scalar_series,
)

import torchbp

pytestmark = [pytest.mark.filterwarnings("ignore:.*TF32.*"), pytest.mark.usefixtures("fresh_dynamo")]

MODELS = {"mixed": mixed_mlp, "relu_inplace": lambda: relu_mlp(inplace=True), "nested": nested}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def batches(device, dtype, steps, n=16):
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(n, 6, generator=gen, dtype=dtype).to(device),
            torch.randn(n, 4, generator=gen, dtype=dtype).to(device),
        )
        for _ in range(steps)
    ]


def graph_breaks() -> dict:
    return dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("model", MODELS, ids=MODELS.keys())
def test_compiled_model_statistics_equal_eager_and_torch_every_step(model, dtype, device, tmp_path):
    torch_model, bp_model, relu_after = make_models(MODELS[model], device, dtype)
    eager_model = copy.deepcopy(bp_model)
    out_features = torch_model(torch.zeros(1, 6, device=device, dtype=dtype)).shape[-1]
    oracle = DeltaOracle(torch_model)
    models = (torch_model, bp_model, eager_model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    compiled_monitor = torchbp.DeltaMonitor(bp_model, log=tmp_path, every=2, histogram_every=0)
    eager_monitor = torchbp.DeltaMonitor(eager_model, every=2)
    compiled = torch.compile(bp_model, fullgraph=True)
    steps = 6
    try:
        for step, (x, y) in enumerate(batches(device, dtype, steps)):
            y = y[:, :out_features]
            oracle.reset()
            for opt, call in zip(opts, (torch_model, compiled, eager_model)):
                opt.zero_grad(set_to_none=True)
                loss_fn(call(x), y).backward()
            if step == 2:  # compiled from step 1 on (step 0 ran eagerly, reading the data flow): unlogged, logged
                torch.compiler.set_stance("fail_on_recompile")  # the two graphs, each compiled once
            ours = compiled_monitor.latest()  # (the last logged step's: every 2nd)
            if step % 2 == 0:
                expected = oracle.stats(relu_after)
            assert_stats_match(ours, expected, rel=TOLERANCE[dtype], label=f"step {step}: ")
            assert_stats_match(ours, eager_monitor.latest(), rel=TOLERANCE[dtype], label=f"step {step} vs eager: ")
            for opt in opts:
                opt.step()
        assert compiled_monitor.step == steps - 1
    finally:
        torch.compiler.set_stance("default")
        compiled_monitor.close()
        eager_monitor.close()
        oracle.remove()
    assert graph_breaks() == {}, f"graph breaks: {graph_breaks()}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # with the records and without
    ea = read_events(tmp_path)
    output_layer = next(iter(compiled_monitor.layers))
    assert sorted(scalar_series(ea, f"delta_norm/{output_layer}")) == [0, 2, 4]


def test_compiled_training_step_records_each_step(tmp_path):
    """A compiled step function (forward, loss, backward, optimizer step): torch breaks the graph at
    backward() and in the optimizer, never in the model; every step is recorded and logged."""
    torch_model, bp_model, relu_after = make_models(mixed_mlp, "cpu", torch.float64)
    oracle = DeltaOracle(torch_model)
    opt_t = torch.optim.SGD(torch_model.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(bp_model.parameters(), lr=0.05)

    @torch.compile
    def train_step(x, y):
        loss = loss_fn(bp_model(x), y)
        loss.backward()
        opt_b.step()
        return loss.detach()

    with torchbp.DeltaMonitor(bp_model, log=tmp_path, every=1) as monitor:
        for step, (x, y) in enumerate(batches("cpu", torch.float64, 4)):
            oracle.reset()
            opt_t.zero_grad(set_to_none=True)
            loss_fn(torch_model(x), y).backward()
            opt_b.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's own graph-break notices
                train_step(x, y)
            assert monitor.step == step
            assert_stats_match(monitor.latest(), oracle.stats(relu_after), label=f"step {step}: ")
            opt_t.step()
    breaks = " ".join(graph_breaks())
    assert "torchbp" not in breaks, f"a graph break in torchbp: {graph_breaks()}"
    assert sorted(scalar_series(read_events(tmp_path), "delta_norm/0")) == [0, 1, 2, 3]


def test_fullgraph_loss_function_then_eager_backward():
    """torch.compile(fullgraph=True) of forward + loss (the usual compiled region), backward() outside."""
    torch_model, bp_model, relu_after = make_models(relu_mlp, "cpu", torch.float64)
    oracle = DeltaOracle(torch_model)
    compute_loss = torch.compile(lambda x, y: loss_fn(bp_model(x), y), fullgraph=True)
    with torchbp.DeltaMonitor(bp_model) as monitor:
        for step, (x, y) in enumerate(batches("cpu", torch.float64, 3)):
            y = y[:, :3]
            oracle.reset()
            torch_model.zero_grad(set_to_none=True)  # the oracle reads this step's weight gradient
            loss_fn(torch_model(x), y).backward()
            compute_loss(x, y).backward()
            assert_stats_match(monitor.latest(), oracle.stats(relu_after), label=f"step {step}: ")
    assert graph_breaks() == {}


def test_attach_after_compile_recompiles_once_and_records():
    """A model compiled (and run) without a monitor: attaching one recompiles its layers once; the
    first step after attaching runs eagerly (reading the data flow), the next ones compiled."""
    torch_model, bp_model, relu_after = make_models(mixed_mlp, "cpu", torch.float64)
    compiled = torch.compile(bp_model, fullgraph=True)
    data = batches("cpu", torch.float64, 4)
    x, y = data[0]
    loss_fn(compiled(x), y).backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    oracle = DeltaOracle(torch_model)
    with torchbp.DeltaMonitor(bp_model) as monitor:
        for step, (x, y) in enumerate(data[1:]):
            oracle.reset()
            torch_model.zero_grad(set_to_none=True)
            loss_fn(torch_model(x), y).backward()
            loss_fn(compiled(x), y).backward()
            assert monitor.step == step
            assert_stats_match(monitor.latest(), oracle.stats(relu_after), label=f"step {step}: ")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one recompile, for the monitor


def test_close_after_compile_recompiles_and_records_nothing():
    torch_model, bp_model, _ = make_models(mixed_mlp, "cpu", torch.float64)
    reference = copy.deepcopy(bp_model)
    compiled = torch.compile(bp_model, fullgraph=True)
    data = batches("cpu", torch.float64, 4)
    monitor = torchbp.DeltaMonitor(bp_model)
    for x, y in data[:2]:
        loss_fn(compiled(x), y).backward()
    assert monitor.step == 1
    before = monitor.latest()
    monitor.close()
    assert monitored(bp_model) == []
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for x, y in data[2:]:
        torch.testing.assert_close(compiled(x), reference(x), rtol=0, atol=0)
        loss_fn(compiled(x), y).backward()
    assert monitor.step == 1 and monitor.latest() == before, "a closed monitor recorded a compiled step"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # the monitor-free graph


def test_per_sample_norms_run_the_layers_eagerly_under_compile():
    """Per-sample norms are eager-only: with them on, the monitored layers run eagerly under torch.compile
    (a graph break, as torch.compiler.disable), so the norms are there; fullgraph=True fails at the break."""
    _, bp_model, _ = make_models(mixed_mlp, "cpu", torch.float64)
    x, y = batches("cpu", torch.float64, 1)[0]
    with torchbp.DeltaMonitor(bp_model, per_sample_norms=True) as monitor:
        loss_fn(bp_model(x), y).backward()  # the eager step
        loss_fn(torch.compile(bp_model)(x), y).backward()
        assert set(monitor.per_sample_grad_norms()) == set(monitor.layers)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="disable"):
            loss_fn(torch.compile(bp_model, fullgraph=True)(x), y).backward()

"""The monitor's schedule: nothing recorded on an unlogged step (eager and compiled), two compiled graphs and no
recompilation, the step axis (a step callable, gradient accumulation), copies of a monitored model, the
bounded history.

The oracle is torch's own δ (``DeltaOracle`` of test_monitor.py: tensor hooks on each torch.nn.Linear's
output); "nothing recorded" is checked by counting the calls of the record math and by the buffer's bytes.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch._dynamo
from helpers import (
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
import torchbp.monitor.records as records_module
from torchbp.monitor.host import History
from torchbp.monitor.records import LayerSlot as Slot

pytestmark = [pytest.mark.filterwarnings("ignore:.*TF32.*"), pytest.mark.usefixtures("fresh_dynamo")]


def batches(steps, n=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(n, 6, generator=gen, dtype=dtype), torch.randn(n, 4, generator=gen, dtype=dtype))
        for _ in range(steps)
    ]


class CallCounter:
    """Counts the calls of the record math (layer_record, dead_record) and passes them through."""

    def __init__(self, monkeypatch) -> None:
        self.calls = {"layer_record": 0, "Records.add": 0, "dead_record": 0}  # (Records.add: eager's layer_record)
        for name in self.calls:
            owner = records_module.Records if name == "Records.add" else records_module
            attribute = name.split(".")[-1]
            original = getattr(owner, attribute)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, attribute, counted)

    def layers(self) -> int:
        return self.calls["layer_record"] + self.calls["Records.add"]

    def total(self) -> int:
        return sum(self.calls.values())


@pytest.mark.parametrize("model", ["relu", "nested"])  # the backprop loop's Function, and one Function per op
def test_unlogged_steps_compute_no_record_eager(model, monkeypatch, tmp_path):
    builder = {"relu": relu_mlp, "nested": nested}[model]
    torch_model, bp_model, relu_after = make_models(builder, "cpu")
    out_features = 3
    oracle = DeltaOracle(torch_model)
    counter = CallCounter(monkeypatch)
    every, steps = 3, 8
    with torchbp.DeltaMonitor(bp_model, log=tmp_path, every=every, histogram_every=0) as monitor:
        for step, (x, y) in enumerate(batches(steps)):
            oracle.reset()
            torch_model.zero_grad(set_to_none=True)
            loss_fn(torch_model(x), y[:, :out_features]).backward()
            before, buffer = counter.total(), monitor._records.buffer.clone()
            bp_model.zero_grad(set_to_none=True)
            loss_fn(bp_model(x), y[:, :out_features]).backward()
            assert monitor.step == step
            if step % every:
                assert counter.total() == before, f"step {step} is not logged, yet the record math ran"
                assert torch.equal(monitor._records.buffer.nan_to_num(-7), buffer.nan_to_num(-7)), step
                recording = [
                    n for n, m in bp_model.named_modules() if isinstance(m.__dict__.get("_torchbp_slot"), Slot)
                ]
                assert recording == [] or step % every == every - 1  # armed (records) only for a logged step
            else:
                assert counter.total() > before, f"step {step} is logged, yet nothing was recorded"
                expected = oracle.stats(relu_after)
            assert_stats_match(monitor.latest(), expected, label=f"step {step}: ")  # the last logged step's
    oracle.remove()
    layers = len(monitor.layers)
    logged = len(range(0, steps, every))
    assert counter.layers() == layers * logged
    assert counter.calls["dead_record"] == len(relu_after) * logged
    assert sorted(scalar_series(read_events(tmp_path), f"delta_norm/{next(iter(monitor.layers))}")) == [0, 3, 6]


def test_compiled_unlogged_steps_write_nothing_two_graphs_no_recompile(tmp_path):
    """fullgraph=True: the logged and the unlogged step each compile once; after warm-up fail_on_recompile
    holds, the unlogged steps leave the buffer untouched and the logged ones equal torch's statistics."""
    torch_model, bp_model, relu_after = make_models(mixed_mlp, "cpu")
    oracle = DeltaOracle(torch_model)
    compiled = torch.compile(bp_model, fullgraph=True)
    every, steps = 3, 10
    monitor = torchbp.DeltaMonitor(bp_model, log=tmp_path, every=every, histogram_every=0)
    try:
        for step, (x, y) in enumerate(batches(steps)):
            if step == every + 1:  # warmed up: step 0 eager (the data flow), 1 unlogged, 3 logged
                torch.compiler.set_stance("fail_on_recompile")
            oracle.reset()
            torch_model.zero_grad(set_to_none=True)
            loss_fn(torch_model(x), y).backward()
            buffer = monitor._records.buffer.clone()
            bp_model.zero_grad(set_to_none=True)
            loss_fn(compiled(x), y).backward()
            assert monitor.step == step
            if step % every:
                assert torch.equal(monitor._records.buffer.nan_to_num(-7), buffer.nan_to_num(-7)), step
            else:
                assert not torch.equal(monitor._records.buffer.nan_to_num(-7), buffer.nan_to_num(-7)), step
                expected = oracle.stats(relu_after)
            assert_stats_match(monitor.latest(), expected, label=f"step {step}: ")
    finally:
        torch.compiler.set_stance("default")
        monitor.close()
        oracle.remove()
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # with the records, and without
    assert sorted(scalar_series(read_events(tmp_path), "delta_norm/4")) == [0, 3, 6, 9]


def test_step_callable_with_gradient_accumulation(monkeypatch, tmp_path):
    """step=lambda: optimizer steps; 3 micro-batches per step: a logged step shows its first micro-batch's δ,
    the other micro-batches record nothing; the events' x-axis is the optimizer step."""
    torch_model, bp_model, relu_after = make_models(relu_mlp, "cpu")
    oracle = DeltaOracle(torch_model)
    counter = CallCounter(monkeypatch)
    state = {"optimizer_steps": 0}
    every, steps, micro = 2, 5, 3
    data = batches(steps * micro)
    first = {}
    with torchbp.DeltaMonitor(
        bp_model, log=tmp_path, every=every, histogram_every=0, step=lambda: state["optimizer_steps"]
    ) as monitor:
        for step in range(steps):
            for k in range(micro):
                x, y = data[step * micro + k]
                oracle.reset()
                torch_model.zero_grad(set_to_none=True)
                loss_fn(torch_model(x), y[:, :3]).backward()
                before = counter.total()
                bp_model.zero_grad(set_to_none=True)
                loss_fn(bp_model(x), y[:, :3]).backward()
                assert monitor.step == step
                recorded = counter.total() > before
                assert recorded == (k == 0 and step % every == 0), (step, k)
                if recorded:
                    first[step] = oracle.stats(relu_after)
            state["optimizer_steps"] += 1  # (after optimizer.step())
            assert_stats_match(monitor.latest(), first[step - step % every], label=f"step {step}: ")
        history = monitor.history()
    oracle.remove()
    assert history["steps"] == [0, 2, 4]
    ea = read_events(tmp_path)
    for layer in monitor.layers:
        series = scalar_series(ea, f"delta_norm/{layer}")
        assert sorted(series) == [0, 2, 4]
        for s in series:
            assert math.isclose(series[s], first[s][layer]["delta_norm"], rel_tol=1e-5)


def test_step_callable_on_a_compiled_model(tmp_path):
    """Compiled with a step callable: the logged steps are those of the callable, with torch's values."""
    torch_model, bp_model, relu_after = make_models(mixed_mlp, "cpu")
    oracle = DeltaOracle(torch_model)
    compiled = torch.compile(bp_model, fullgraph=True)
    state = {"step": 100}  # (a resumed run)
    expected = {}
    with torchbp.DeltaMonitor(bp_model, log=tmp_path, every=4, histogram_every=0, step=lambda: state["step"]) as m:
        for x, y in batches(10):
            oracle.reset()
            torch_model.zero_grad(set_to_none=True)
            loss_fn(torch_model(x), y).backward()
            bp_model.zero_grad(set_to_none=True)
            loss_fn(compiled(x), y).backward()
            assert m.step == state["step"]
            if state["step"] % 4 == 0:
                expected[state["step"]] = oracle.stats(relu_after)
                assert_stats_match(m.latest(), expected[state["step"]], label=f"step {state['step']}: ")
            state["step"] += 1
    oracle.remove()
    assert m.history()["steps"] == [100, 104, 108]
    assert sorted(scalar_series(read_events(tmp_path), "delta_norm/4")) == [100, 104, 108]


def test_bad_step_argument():
    _, bp_model, _ = make_models(mixed_mlp, "cpu")
    with pytest.raises(TypeError, match="step must be a callable"):
        torchbp.DeltaMonitor(bp_model, step=3)
    with torchbp.DeltaMonitor(bp_model, step=lambda: "three") as monitor:
        with pytest.raises(TypeError, match="must return an int"):
            bp_model(torch.randn(2, 6, dtype=torch.float64)).sum().backward()
    del monitor


# --------------------------------------------------------------------------------------------------
# Copies
# --------------------------------------------------------------------------------------------------


def _save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "torch.save": _save_load,
    "AveragedModel": lambda m: torch.optim.swa_utils.AveragedModel(m).module,
}


@pytest.mark.parametrize("after_forward", [False, True], ids=["before-first-forward", "after-first-forward"])
@pytest.mark.parametrize("how", COPIES)
def test_copies_of_a_monitored_model_are_not_monitored(how, after_forward, recwarn):
    torch_model, bp_model, relu_after = make_models(relu_mlp, "cpu")
    x, y = batches(1)[0]
    with torchbp.DeltaMonitor(bp_model) as monitor:
        if after_forward:
            loss_fn(bp_model(x), y[:, :3]).backward()
        twin = COPIES[how](bp_model)
        assert monitored(twin) == [], "the copy carries the monitor's slots"
        steps = monitor.step
        out = twin(x)
        loss_fn(out, y[:, :3]).backward()
        assert monitor.step == steps, "a copy's backward pass was counted by the original's monitor"
        torch.testing.assert_close(out, bp_model(x), rtol=0, atol=0)  # the same weights, the same model
        # The original is still monitored: its next step equals torch's.
        oracle = DeltaOracle(torch_model)
        loss_fn(torch_model(x), y[:, :3]).backward()
        bp_model.zero_grad(set_to_none=True)
        torch_model.zero_grad(set_to_none=True)
        oracle.reset()
        loss_fn(torch_model(x), y[:, :3]).backward()
        loss_fn(bp_model(x), y[:, :3]).backward()
        assert monitor.step == steps + 1
        assert_stats_match(monitor.latest(), oracle.stats(relu_after))
        oracle.remove()
    assert not [w for w in recwarn if "hook" in str(w.message)], [str(w.message) for w in recwarn]
    # The copy can be monitored on its own.
    with torchbp.DeltaMonitor(twin) as other:
        loss_fn(twin(x), y[:, :3]).backward()
        assert set(other.latest()) == set(monitor.layers)


# --------------------------------------------------------------------------------------------------
# Bounded history
# --------------------------------------------------------------------------------------------------


def test_history_keeps_at_most_its_columns_evenly_spaced():
    layers, columns, steps = 2, 16, 10_000
    history = History(layers, columns)
    stats = len(torchbp.monitor.STATS)
    for start in range(0, steps, 100):  # (in batches, as the host side adds them)
        block = list(range(start, start + 100))
        values = np.broadcast_to(np.array(block, dtype=np.float64)[:, None, None], (100, stats, layers))
        history.add(block, values)
        kept, held = history.read()
        assert len(kept) <= columns and held.shape == (stats, layers, len(kept))
        assert held[0, 0].tolist() == [float(s) for s in kept]  # each column is its step's values
        gaps = np.diff(kept[:-1])
        assert (gaps == gaps[0]).all(), "the kept steps are evenly spaced, then the newest"
        assert kept[0] == 0 and kept[-1] == block[-1]
    assert len(kept) >= columns // 2


def test_monitor_history_is_bounded_and_holds_every_statistic(tmp_path):
    _, bp_model, _ = make_models(relu_mlp, "cpu")
    x, y = batches(1)[0]
    with torchbp.DeltaMonitor(bp_model, log=tmp_path, every=1, histogram_every=0, image_every=0, max_history=4) as m:
        for _ in range(21):
            loss_fn(bp_model(x), y[:, :3]).backward()
        last = m.latest()
    history = m.history()
    assert history["steps"] == [0, 8, 16, 20]  # 21 logged steps in 4 columns at most: every 8th, and the newest
    assert history["layers"] == ["0", "2", "4", "6"]
    for stat in torchbp.monitor.STATS:
        assert history[stat].shape == (4, 4), stat
    assert np.isnan(history["delta_gain"][3]).all()  # the output layer has no consumer
    assert np.isnan(history["dead_fraction"][3]).all()  # not followed by a ReLU
    assert (history["delta_nonfinite"] == 0).all()
    # Nothing trained: every step's δ is the same, the last logged step's.
    for i, layer in enumerate(history["layers"]):
        assert history["delta_norm"][i, -1] == pytest.approx(last[layer]["delta_norm"], rel=1e-12)
        assert history["delta_fro"][i, -1] == pytest.approx(last[layer]["delta_fro"], rel=1e-12)


def test_report_formats_the_analysis_of_the_history(tmp_path):
    from torchbp import report

    _, bp_model, _ = make_models(relu_mlp, "cpu")
    x, y = batches(1)[0]
    with torchbp.DeltaMonitor(bp_model, log=tmp_path, every=1, histogram_every=0, image_every=0) as m:
        for _ in range(3):
            loss_fn(bp_model(x), y[:, :3]).backward()
        text = m.report()
    history = m.history()
    assert text == report.format_report({"monitor": history}, {"monitor": report.analyze(history)})
    assert text.startswith("run monitor: 4 layers") and "3 logged steps" in text
    # The figures it reports are the recorded ones: ‖δ‖ of the first layer and of the output layer at step 0.
    first, out = history["layers"][0], history["layers"][-1]
    a, b = history["delta_fro"][0, 0], history["delta_fro"][-1, 0]
    assert f"of {first} is {100 * a / b:.2g}% of {out}'s ({a:.2e} vs {b:.2e} at step 0)" in " ".join(text.split())


def test_a_layer_called_twice_keeps_the_call_whose_backward_ran_last():
    """The eager records of one backward pass are written together: a layer called twice keeps its first call's
    (its backward runs last), as torch's δ of that call says."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6).double()
    bp = torchbp.convert(copy.deepcopy(lin))
    x = torch.randn(8, 6, dtype=torch.float64)
    z1 = lin(x)
    z1.retain_grad()
    lin(torch.tanh(z1)).square().sum().backward()
    with torchbp.DeltaMonitor(bp) as monitor:
        bp(torch.tanh(bp(x))).square().sum().backward()
        stats = monitor.latest()["model"]
    delta = z1.grad
    assert stats["delta_norm"] == pytest.approx(delta.sum(0).norm().item(), rel=1e-12)
    assert stats["delta_fro"] == pytest.approx(delta.norm().item(), rel=1e-12)
    assert stats["delta_sample_norm_max"] == pytest.approx(delta.norm(dim=1).max().item(), rel=1e-12)


def test_a_nonfinite_delta_on_an_unlogged_step_is_found_at_its_step(tmp_path):
    """An unlogged step computes one finiteness flag per layer: its NaN is found at its own step (the input of the
    first layer), and the next logged step, to which SGD carried it, flags δ there too."""
    _, bp_model, _ = make_models(mixed_mlp, "cpu")
    opt = torch.optim.SGD(bp_model.parameters(), lr=0.1)
    data = batches(3)
    flagged = []
    with pytest.warns(UserWarning, match="not finite at step 2"):
        with torchbp.DeltaMonitor(bp_model, log=tmp_path, every=2, histogram_every=0, image_every=0) as monitor:
            for step, (x, y) in enumerate(data):
                if step == 1:
                    x = x.clone()
                    x[0, 0] = math.nan
                opt.zero_grad(set_to_none=True)
                loss_fn(bp_model(x), y).backward()
                opt.step()
                flagged.append(monitor.first_nonfinite)
            monitor.flush()
    assert flagged == [None, "0", "0"]  # step 1's NaN: found at step 1, in the first layer's input
    assert monitor.nonfinite() == (1, "0", "input")
    assert scalar_series(read_events(tmp_path), "delta_nonfinite/4") == {0: 0.0, 2: 1.0}

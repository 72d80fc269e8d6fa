"""The monitor in compositions of real training code: activation checkpointing (reentrant and not),
``torch.autograd.grad`` with respect to a subset of the parameters, changing ``every`` after construction, a
layer replaced after attaching.

The oracle is the same model without the composition (the same batch, the same weights): its statistics are
checked against torch's own δ in test_monitor.py; here, each composition must give exactly them (and torch's
gradients).
"""

from __future__ import annotations

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
    """An MLP (first, block = Linear, ReLU, Linear, ReLU, head) with parts under ``torch.utils.checkpoint``:
    ``layout`` says which (``"block"``: the block; ``"last"``: the block and the head, so that no monitored
    layer runs after it; ``"segments"``: two checkpointed segments; ``"whole"``: all of it)."""

    def __init__(self, reentrant: bool | None, layout: str = "block") -> None:
        super().__init__()
        self.first = torchbp.nn.Linear(6, 8)
        self.block = torch.nn.Sequential(
            torchbp.nn.Linear(8, 8), torchbp.nn.ReLU(), torchbp.nn.Linear(8, 8), torchbp.nn.ReLU()
        )
        self.head = torchbp.nn.Linear(8, 3)
        self.reentrant, self.layout = reentrant, layout  # reentrant None: no checkpoint

    def _run(self, fn, h):
        return fn(h) if self.reentrant is None else checkpoint(fn, h, use_reentrant=self.reentrant)

    def forward(self, x):
        first = lambda h: torch.tanh(self.first(h))  # noqa: E731
        if self.layout == "block":
            return self.head(self._run(self.block, first(x)))
        if self.layout == "last":
            return self._run(lambda h: self.head(self.block(h)), first(x))
        if self.layout == "segments":
            h = self._run(lambda h: self.block[:2](first(h)), x)
            return self._run(lambda h: self.head(self.block[2:](h)), h)
        return self._run(lambda h: self.head(self.block(first(h))), x)


LAYOUTS = ["block", "last", "segments", "whole"]


def checkpoint_run(reentrant, layout="block", steps=3, every=1, step=None, compiled=False):
    torch.manual_seed(0)
    model = Checkpointed(reentrant, layout).double()
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
        for x, y in data:  # (x needs a gradient: a reentrant checkpoint of the first layer needs one input that does)
            torch.nn.functional.cross_entropy(run(x.requires_grad_()), y).backward()
            if monitor.latest() and (not logged or logged[-1][0] != monitor.step) and monitor.step % every == 0:
                logged.append((monitor.step, monitor.latest()))
            optimizer.step()
            optimizer.zero_grad()
            counter[0] += 1
    grads = None
    monitor.close()
    return monitor, logged, grads


def assert_checkpointed_equal(actual: dict, wanted: dict, reentrant: bool, label: str) -> None:
    """The checkpointed run's statistics are the unchecked run's. Under a reentrant checkpoint, a gain across
    the checkpoint's boundary is absent (its inside is a graph of its own: documented); every other is equal."""
    if reentrant:
        for layer, stats in actual.items():
            if stats["delta_gain"] is None and layer in wanted:
                wanted[layer]["delta_gain"] = None
    assert_latest_equal(actual, wanted, label)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("step", [None, "callable"], ids=["counted", "step-callable"])
def test_checkpointing_counts_one_step_and_records_the_unchecked_statistics(reentrant, step, layout):
    expected_monitor, expected, _ = checkpoint_run(None, step=step)
    monitor, logged, _ = checkpoint_run(reentrant, layout, step=step)
    assert monitor.step == expected_monitor.step == 2, f"steps: {monitor.step}, expected 2 (one per training step)"
    assert [s for s, _ in logged] == [s for s, _ in expected] == [0, 1, 2]
    for (s, actual), (_, wanted) in zip(logged, expected):
        assert_checkpointed_equal(actual, wanted, reentrant, f"checkpoint(use_reentrant={reentrant}) {layout} step {s}")
    if reentrant and layout == "block":  # (the gains inside the block and into it are read)
        assert [layer for layer, v in logged[0][1].items() if v["delta_gain"] is not None] == ["block.0", "first"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointing_every_10_logs_steps_0_and_10(reentrant, layout, tmp_path):
    torch.manual_seed(0)
    model = Checkpointed(reentrant, layout).double()
    x, y = torch.randn(8, 6, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (8,))
    seen = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DeltaMonitor")
        monitor = torchbp.DeltaMonitor(model, log=tmp_path, every=10)
        for _ in range(20):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if monitor.latest() and monitor.step % 10 == 0:
                seen.append(monitor.step)
        assert monitor.history()["steps"] == [0, 10]
        assert "no δ statistics" not in monitor.report()
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


# -- torch.autograd.grad with respect to some of the parameters ----------------------------------------------


def grad_models(chain: bool):
    """A torchbp Sequential (Linear, ReLU, Linear, Sigmoid, Linear) run chained or per op, and torch's twin."""
    torch.manual_seed(0)
    model = torchbp.nn.Sequential(
        torchbp.nn.Linear(6, 8),
        torchbp.nn.ReLU(),
        torchbp.nn.Linear(8, 8),
        torchbp.nn.Sigmoid(),
        torchbp.nn.Linear(8, 3),
    ).double()
    model.chain = chain
    torch.manual_seed(0)
    reference = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3)
    ).double()
    return model, reference


ASKED = {
    "last-weight": lambda m, x: [m[4].weight],
    "middle-bias": lambda m, x: [m[2].bias],
    "input-only": lambda m, x: [x],
    "first-weight-and-input": lambda m, x: [m[0].weight, x],
}


@pytest.mark.parametrize("asked", list(ASKED))
def test_autograd_grad_on_some_parameters_chained_equals_per_op_and_torch(asked):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    results = {}
    for chain in (True, False):
        model, reference = grad_models(chain)
        assert model.chained_runs() == ([(0, 5)] if chain else [])
        x = x0.clone().requires_grad_()
        with torchbp.DeltaMonitor(model) as monitor:
            loss = torch.nn.functional.mse_loss(model(x), target)
            grads = torch.autograd.grad(loss, ASKED[asked](model, x))
        xr = x0.clone().requires_grad_()
        expected = torch.autograd.grad(torch.nn.functional.mse_loss(reference(xr), target), ASKED[asked](reference, xr))
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14, msg=f"chain={chain} {asked}: gradient")
        assert all(p.grad is None for p in model.parameters()), "autograd.grad accumulated into .grad"
        results[chain] = monitor.latest()
    assert results[True], "nothing recorded"
    assert_latest_equal(results[True], results[False], f"{asked}: chained vs per-op records")


def test_autograd_grad_of_the_last_weight_runs_only_the_last_layer():
    """The chained loop computes nothing below the lowest layer asked for (the per-op path's nodes are not run)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for chain in (True, False):
        model, _ = grad_models(chain)
        x = torch.randn(16, 6, dtype=torch.float64)
        out = model(x).sum()
        with FlopCounterMode(display=False) as flops:
            torch.autograd.grad(out, [model[4].weight])
        counts[chain] = flops.get_total_flops()
    # chained: BP4 of the last layer only (δᵀ a); per op, that layer's node also runs its BP2 (unused)
    assert counts[True] == 2 * 16 * 8 * 3 and counts[False] == 2 * counts[True], counts


# -- every, histogram_every, image_every after construction ------------------------------------------------


def small_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torchbp.nn.Linear(4, 6), torchbp.nn.ReLU(), torchbp.nn.Linear(6, 2)).double()


def train(model, steps, monitor=None, change=None):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    for s in range(steps):
        if change is not None and s in change:
            change[s](monitor)
        model(x).pow(2).sum().backward()


def test_every_set_after_construction_takes_effect_from_the_next_step(tmp_path):
    from helpers import read_events

    model = small_mlp()
    with torchbp.DeltaMonitor(model, log=tmp_path, every=10, histogram_every=0) as monitor:

        def to_5(m):
            m.every = 5
            m.histogram_every = 15

        train(model, 20, monitor, {3: to_5})
        assert (monitor.every, monitor.histogram_every) == (5, 15)
        assert monitor.history()["steps"] == [0, 5, 10, 15]
    events = read_events(tmp_path)
    assert [e.step for e in events.Histograms("delta/0")] == [15]


def test_every_set_to_log_the_next_step_arms_its_forward():
    model = small_mlp()
    monitor = torchbp.DeltaMonitor(model, every=100)
    train(model, 3)
    assert monitor.latest() and monitor.step == 2  # (step 0 is logged; steps 1, 2 are not)
    first = monitor.latest()
    monitor.every = 3  # step 3 is due
    model(torch.ones(8, 4, dtype=torch.float64)).pow(2).sum().backward()
    assert monitor.step == 3 and monitor.latest() != first
    monitor.close()


@pytest.mark.parametrize(
    "name, value", [("every", 0), ("every", 2.0), ("every", True), ("histogram_every", -1), ("image_every", "5")]
)
def test_every_set_to_a_bad_value_raises_as_the_constructor_does(name, value):
    monitor = torchbp.DeltaMonitor(small_mlp())
    before = getattr(monitor, name)
    with pytest.raises(ValueError, match=f"{name} must be an int >= "):
        setattr(monitor, name, value)
    assert getattr(monitor, name) == before
    with pytest.raises(ValueError, match=f"{name} must be an int >= "):
        torchbp.DeltaMonitor(small_mlp(), **{name: value})
    monitor.close()


# -- a layer replaced after attaching ------------------------------------------------------------------------


def test_a_layer_replaced_after_attaching_is_named_in_one_warning():
    model = small_mlp()
    monitor = torchbp.DeltaMonitor(model)
    train(model, 1)
    assert list(monitor.latest()) == ["2", "0"]
    with pytest.warns(UserWarning, match=r"changed after the monitor attached \(replaced: '0'; added: '0'\)"):
        model[0] = torchbp.nn.Linear(4, 6).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (once)
        model[0] = torchbp.nn.Linear(4, 6).double()
        train(model, 1)
    assert list(monitor.latest()) == ["2"]  # (what the warning said: the new layer is not monitored)
    monitor.close()
    with torchbp.DeltaMonitor(model) as fresh:  # the fix the warning gives
        train(model, 1)
        assert list(fresh.latest()) == ["2", "0"]


def test_a_block_replaced_names_its_monitored_layers_and_nothing_warns_after_close():
    torch.manual_seed(0)
    model = torch.nn.Sequential(small_mlp(), torchbp.nn.Linear(2, 2)).double()
    monitor = torchbp.DeltaMonitor(model)
    with pytest.warns(UserWarning, match=r"\(replaced: '0.0', '0.2'; added: '0.0', '0.2'\)"):
        model[0] = small_mlp()
    monitor.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model[1] = torchbp.nn.Linear(2, 2)  # (no monitor attached: no warning)


def test_a_layer_added_after_attaching_is_named_in_one_warning():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.body = small_mlp()
    other = torch.nn.Sequential(torchbp.nn.Linear(3, 3))  # (another model: its changes are not this monitor's)
    monitor = torchbp.DeltaMonitor(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.plain = torch.nn.Linear(2, 2)  # (a torch layer: no monitor would watch it)
        other[0] = torchbp.nn.Linear(3, 3)
    with pytest.warns(UserWarning, match=r"changed after the monitor attached \(added: 'head.1'\)"):
        model.head = torch.nn.Sequential(torch.nn.ReLU(), torchbp.nn.Linear(2, 2))
    monitor.close()

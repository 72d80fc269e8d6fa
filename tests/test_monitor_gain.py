"""delta_gain along the data flow, against δ from PyTorch's autograd.

delta_gain of layer l is ‖δ^l‖ / ‖δ^c‖, c the monitored Linear(s) consuming l's output through
element-wise operations only. The expected consumers are written down here from each architecture (not
read from torchbp), and δ comes from tensor hooks on the torch.nn twin (``DeltaOracle``).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch
from helpers import DEVICES, STATS, DeltaOracle, bp_copy
from torch import nn

import torchbp

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
REL = 1e-12


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


transformer = load_example("transformer")


def torch_gains(oracle: DeltaOracle, consumers: dict[str, list[str]]) -> dict[str, float | None]:
    """‖δ^l‖ / √Σ_c ‖δ^c‖² from torch's δ, for the consumers written down per architecture."""
    fro = {name: d.norm().item() for name, d in oracle.delta.items()}
    return {
        name: (fro[name] / math.sqrt(sum(fro[c] ** 2 for c in consumers[name])) if consumers.get(name) else None)
        for name in oracle.modules
    }


def run_both(torch_model, x, upstream_seed=0):
    """One backward of each twin under the same random upstream gradient; (monitor stats, oracle)."""
    bp_model = bp_copy(torch_model)
    oracle = DeltaOracle(torch_model)
    out = torch_model(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=out.dtype)
    upstream = upstream.to(out.device)
    out.backward(upstream)
    with torchbp.DeltaMonitor(bp_model) as monitor:
        bp_model(x).backward(upstream)
        stats = monitor.latest()
    return stats, oracle


def assert_gains(stats, oracle, consumers):
    expected = torch_gains(oracle, consumers)
    assert set(stats) == set(expected)
    for name, gain in expected.items():
        ours = stats[name]["delta_gain"]
        if gain is None:
            assert ours is None, f"{name}: gain {ours}, but no monitored Linear consumes its output element-wise"
        else:
            assert ours is not None and math.isclose(ours, gain, rel_tol=REL), f"{name}: gain {ours}, torch {gain}"
        assert set(stats[name]) == set(STATS)
        assert math.isclose(
            stats[name]["delta_norm"], oracle.delta[name].flatten(0, -2).sum(0).norm().item(), rel_tol=REL
        )


BLOCK_CONSUMERS = {
    "fc1": ["fc2"]
}  # through GELU; q/k/v feed attention, o_proj and fc2 the residual stream and LayerNorm


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_block_gains_follow_the_data_flow(device):
    torch.manual_seed(0)
    block = transformer.Block(16, 2, 32).to(device=device, dtype=torch.float64)
    x = torch.randn(3, 5, 16, dtype=torch.float64, device=device)
    stats, oracle = run_both(block, x)
    assert_gains(stats, oracle, BLOCK_CONSUMERS)
    assert stats["fc1"]["delta_gain"] is not None  # (the test would notice gains that are all None)


def test_two_block_transformer_never_compares_siblings_or_other_blocks():
    torch.manual_seed(0)
    model = transformer.TinyTransformer(vocab=11, dim=16, heads=2, layers=2, length=6).double()
    tokens = torch.randint(0, 11, (4, 6))
    stats, oracle = run_both(model, tokens)
    assert_gains(stats, oracle, {"blocks.0.fc1": ["blocks.0.fc2"], "blocks.1.fc1": ["blocks.1.fc2"]})


class TwoHeads(nn.Module):
    """One hidden layer read by two Linear layers: its gain is against both consumers' δ together."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.l0(x))
        return self.l1(h) + self.l2(torch.tanh(h))


class Residual(nn.Module):
    """h = l0(x); out = l2(h + l1(sigmoid(h))): l0 is consumed by l1 (sigmoid) and by l2 (the residual add)."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.l0(x)
        return self.l2(h + self.l1(torch.sigmoid(h)) * 0.5)


@pytest.mark.parametrize(
    "model, consumers",
    [
        (TwoHeads, {"l0": ["l1", "l2"]}),
        (Residual, {"l0": ["l1", "l2"], "l1": ["l2"]}),
        (
            lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.Sigmoid(), nn.Linear(7, 2)),
            {"0": ["2"], "2": ["4"]},
        ),
    ],
    ids=["two-consumers", "residual", "mlp"],
)
def test_consumers_through_elementwise_operations(model, consumers):
    torch.manual_seed(0)
    stats, oracle = run_both(model().double(), torch.randn(6, 5, dtype=torch.float64))
    assert_gains(stats, oracle, consumers)


def test_compiled_transformer_statistics_equal_eager_and_torch():
    """The converted transformer under torch.compile(fullgraph=True): every statistic, gains included,
    equals torch's (float64, rel 1e-12) on every step."""
    import torch._dynamo
    from helpers import assert_stats_match

    torch._dynamo.reset()
    torch.manual_seed(0)
    torch_model = transformer.TinyTransformer(vocab=11, dim=16, heads=2, layers=1, length=6).double()
    bp_model = bp_copy(torch_model)
    oracle = DeltaOracle(torch_model)
    compiled = torch.compile(bp_model, fullgraph=True)
    consumers = {"blocks.0.fc1": ["blocks.0.fc2"]}
    gen = torch.Generator().manual_seed(1)
    with torchbp.DeltaMonitor(bp_model) as monitor:
        for step in range(3):
            tokens = torch.randint(0, 11, (4, 7), generator=gen)
            oracle.reset()
            for m, call in ((torch_model, torch_model), (bp_model, compiled)):
                m.zero_grad(set_to_none=True)
                logits = call(tokens[:, :-1])
                nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1)).backward()
            expected = oracle.stats(set())
            gains = torch_gains(oracle, consumers)
            for name in expected:
                expected[name]["delta_gain"] = gains[name]
            assert_stats_match(monitor.latest(), expected, rel=REL, label=f"step {step}: ")
    torch._dynamo.reset()

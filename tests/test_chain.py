"""The backprop loop (``torchbp.functional.ChainFunction`` via ``torchbp.nn.Sequential``) against torch.nn.

Every model here is built from ``torch.nn`` (the reference, run by PyTorch's autograd); ours is a
``copy.deepcopy`` passed through ``torchbp.convert`` (same weights), whose Sequential runs each run of
Linear/activation layers as one Function. Each case checks the forward value and every gradient (input and all
parameters) under a random upstream gradient against torch (float64: rel 1e-12; float32), and also against the
per-op path of the same converted model (``chain = False``: one Function per layer), which must give the same.
Where the loop must not apply (hooks, foreign modules, subclasses) the per-op path must run transparently.
"""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import DeltaOracle, OpRecorder, assert_close_labelled, assert_stats_match, kill_units, leaf_copy, tolerance
from torch import nn
from torch.func import functional_call

import torchbp
import torchbp.nn as bnn

# torch's own: the first torch.func forward-mode transform imports torch._decomp.decompositions_for_jvp, which calls the
# deprecated torch.jit.script (torch 2.13); whichever test file uses it first gets the warning.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DTYPES = {"float64": torch.float64, "float32": torch.float32}
CHAIN_NODE = "ChainFunctionBackward"


# --------------------------------------------------------------------------------------------------
# The comparison: run a model forward and backward, then compare outputs and gradients
# --------------------------------------------------------------------------------------------------


def grad_fn_counts(t: torch.Tensor) -> dict[str, int]:
    """How many nodes of each type the autograd graph behind ``t`` has."""
    seen, stack, counts = set(), [t.grad_fn], {}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        counts[type(fn).__name__] = counts.get(type(fn).__name__, 0) + 1
        stack.extend(f for f, _ in fn.next_functions)
    return counts


def upstream_like(out: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random upstream gradient ∂C/∂out, drawn in float64 (the same numbers for every dtype)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)


def run(model: nn.Module, x: torch.Tensor, seed: int = 0, **backward_kw):
    """Forward ``x`` (a leaf copy), backward a random upstream gradient: (output, grads, graph node counts).

    ``grads`` maps ``"input"`` and each parameter name to its ``.grad`` (None where nothing flowed).
    """
    model.zero_grad(set_to_none=True)
    x = leaf_copy(x)
    out = model(x)
    nodes = grad_fn_counts(out)
    if out.requires_grad:
        out.backward(upstream_like(out, seed), **backward_kw)
    grads = {"input": x.grad, **{name: p.grad for name, p in model.named_parameters()}}
    return out, grads, nodes


def assert_same(got, expected, label: str, **tol) -> None:
    """Output and every gradient of ``got`` equal ``expected`` (None where it has None)."""
    out, grads, _ = got
    ref_out, ref_grads, _ = expected
    assert_close_labelled(out, ref_out, f"{label}: forward value", **tol)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape, f"{label}: {out.dtype} {out.shape}"
    assert out.requires_grad == ref_out.requires_grad, f"{label}: requires_grad {out.requires_grad}"
    assert grads.keys() == ref_grads.keys(), f"{label}: {sorted(grads)} vs {sorted(ref_grads)}"
    for name, g in ref_grads.items():
        assert_close_labelled(grads[name], g, f"{label}: grad of {name}", **tol)


def sequentials(model: nn.Module) -> list[bnn.Sequential]:
    return [m for m in model.modules() if isinstance(m, bnn.Sequential)]


@contextlib.contextmanager
def per_op(model: nn.Module):
    """Every torchbp Sequential of ``model`` runs one Function per layer (``chain = False``) inside."""
    seqs = sequentials(model)
    for s in seqs:
        s.chain = False
    try:
        yield model
    finally:
        for s in seqs:
            del s.chain  # back to the class default


def check_model(torch_model: nn.Module, x: torch.Tensor, runs=None, chains: int | None = None, seed: int = 0):
    """The converted copy of ``torch_model`` gives torch's output and gradients, through the loop and per-op.

    ``runs``: what the root's ``chained_runs()`` must be (default: the whole model, one run). ``chains``: the number
    of ChainFunction nodes in the graph (default: the number of runs).
    Returns (ours, torch's results, the loop's results).
    """
    ours = torchbp.convert(copy.deepcopy(torch_model))
    runs = [(0, len(torch_model))] if runs is None else runs
    assert ours.chained_runs() == runs
    chains = len(runs) if chains is None else chains
    expected = run(torch_model, x, seed)
    chained = run(ours, x, seed)
    assert_same(chained, expected, "loop vs torch")
    if x.requires_grad or any(p.requires_grad for p in torch_model.parameters()):
        assert chained[2].get(CHAIN_NODE, 0) == chains, f"graph: {chained[2]}"
    with per_op(ours):
        assert all(s.chained_runs() == [] for s in sequentials(ours))
        separate = run(ours, x, seed)
    assert CHAIN_NODE not in separate[2], f"per-op graph: {separate[2]}"
    assert_same(chained, separate, "loop vs per-op")
    return ours, expected, chained


# --------------------------------------------------------------------------------------------------
# 1. MLPs: activations, bias, trailing activations, Linear after Linear, shapes, strides
# --------------------------------------------------------------------------------------------------


def L(i: int, o: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(i, o, bias=bias)


def relu_with_dead_units() -> nn.Sequential:
    m = nn.Sequential(L(6, 10), nn.ReLU(), L(10, 8), nn.ReLU(), L(8, 3))
    kill_units(m[0], [0, 3])  # z = -1 for every sample
    kill_units(m[2], [1], bias_value=0.0)  # z = 0 exactly: σ'(0) = 0, as torch's
    return m


MLPS = {
    "sigmoid": lambda: nn.Sequential(L(6, 10), nn.Sigmoid(), L(10, 8), nn.Sigmoid(), L(8, 3)),
    "relu": relu_with_dead_units,
    "relu_inplace": lambda: nn.Sequential(L(6, 10), nn.ReLU(True), L(10, 8), nn.ReLU(True), L(8, 3)),
    "mixed": lambda: nn.Sequential(
        L(6, 10), nn.ReLU(), L(10, 8, bias=False), nn.Sigmoid(), L(8, 7), nn.ReLU(True), L(7, 3)
    ),
    "no_bias": lambda: nn.Sequential(L(6, 10, False), nn.ReLU(), L(10, 8, False), nn.Sigmoid(), L(8, 3, False)),
    "trailing_sigmoid": lambda: nn.Sequential(L(6, 10), nn.ReLU(), L(10, 3), nn.Sigmoid()),
    "trailing_relu": lambda: nn.Sequential(L(6, 10), nn.Sigmoid(), L(10, 3), nn.ReLU()),
    "trailing_relu_inplace": lambda: nn.Sequential(L(6, 10), nn.ReLU(True), L(10, 3), nn.ReLU(True)),
    "linear_linear": lambda: nn.Sequential(L(6, 10), L(10, 8), nn.ReLU(), L(8, 5, False), L(5, 3)),
    "activation_activation": lambda: nn.Sequential(L(6, 10), nn.ReLU(), nn.Sigmoid(), L(10, 3)),
    "single_sigmoid": lambda: nn.Sequential(L(6, 3), nn.Sigmoid()),
    "single_relu": lambda: nn.Sequential(L(6, 3), nn.ReLU()),
    "single_relu_inplace": lambda: nn.Sequential(L(6, 3, False), nn.ReLU(True)),
    "two_linears": lambda: nn.Sequential(L(6, 4), L(4, 3)),
}


def make_input(shape: tuple[int, ...], layout: str | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An input of ``shape`` (drawn in float64); ``layout``: ``"T"`` a transposed view, ``"slice"`` every other
    feature, ``"permute"`` the first two dims swapped (each non-contiguous)."""
    if layout is None:
        raw = shape
    elif layout == "T":
        raw = shape[:-2] + (shape[-1], shape[-2])
    elif layout == "slice":
        raw = shape[:-1] + (2 * shape[-1],)
    else:
        raw = (shape[1], shape[0]) + shape[2:]
    x = torch.randn(raw, dtype=torch.float64).to(dtype)
    if layout == "T":
        x = x.mT
    elif layout == "slice":
        x = x[..., ::2]
    elif layout == "permute":
        x = x.transpose(0, 1)
    assert x.shape == shape and x.is_contiguous() == (layout is None)
    return x


SHAPES = {
    "2d": ((5, 6), None),
    "1d": ((6,), None),
    "3d": ((4, 3, 6), None),
    "4d": ((2, 3, 2, 6), None),
    "N0": ((0, 6), None),
    "N1": ((1, 6), None),
    "transposed": ((5, 6), "T"),
    "strided": ((5, 6), "slice"),
    "3d_permuted": ((3, 4, 6), "permute"),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPES.keys())
@pytest.mark.parametrize("mlp", MLPS, ids=MLPS.keys())
def test_mlp_matches_torch_and_per_op(mlp, shape, dtype):
    torch_model = MLPS[mlp]().to(dtype)
    x = make_input(*SHAPES[shape], dtype=dtype).requires_grad_()
    _, expected, _ = check_model(torch_model, x)
    assert all(g is not None for g in expected[1].values())  # every gradient was compared, not None = None


@pytest.mark.parametrize("mlp", ["mixed", "trailing_relu_inplace"])
def test_without_grad_the_loop_gives_torchs_values(mlp):
    """Under no_grad and inference_mode the run is applied without recording; values as torch's."""
    torch_model = MLPS[mlp]().double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out, ref = ours(x), torch_model(x)
        assert not out.requires_grad
        assert_close_labelled(out, ref, f"{mode.__name__}: forward value")


# --------------------------------------------------------------------------------------------------
# 2. Frozen layers: the same gradients (None where torch gives None), and no GEMM nobody needs
# --------------------------------------------------------------------------------------------------


def frozen_model() -> nn.Sequential:
    return nn.Sequential(L(6, 10), nn.ReLU(), L(10, 8, False), nn.Sigmoid(), L(8, 7), nn.ReLU(True), L(7, 3))


LINEARS = (0, 2, 4, 6)

# name: (the (layer, "weight"/"bias") frozen, whether the input requires grad)
FROZEN = {
    "middle_weight": ({(2, "weight")}, True),
    "some": ({(0, "bias"), (4, "weight"), (6, "bias")}, True),
    "first_layer": ({(0, "weight"), (0, "bias")}, True),
    "first_layer_input_no_grad": ({(0, "weight"), (0, "bias")}, False),
    "first_two_input_no_grad": ({(0, "weight"), (0, "bias"), (2, "weight")}, False),
    "all_layers": ({(i, k) for i in LINEARS for k in ("weight", "bias")}, True),
    "only_last_weight": ({(i, k) for i in LINEARS for k in ("weight", "bias")} - {(6, "weight")}, False),
    "input_no_grad": (set(), False),
    "nothing_needs_grad": ({(i, k) for i in LINEARS for k in ("weight", "bias")}, False),
}


def gemms_needed(model: nn.Sequential, input_grad: bool) -> int:
    """The GEMMs a backward needs, from the equations: BP4 where w^l requires grad; BP2 ((w^l)^T δ^l) where anything
    before layer l (the input, an earlier parameter) requires grad."""
    count, flows = 0, input_grad
    for i in LINEARS:
        m = model[i]
        count += m.weight.requires_grad + flows
        flows = flows or any(p.requires_grad for p in m.parameters())
    return count


def count_backward_gemms(model: nn.Module, x: torch.Tensor) -> list[str]:
    x = leaf_copy(x)
    out = model(x)
    if not out.requires_grad:
        return []
    with OpRecorder() as rec:
        out.backward(upstream_like(out))
    return rec.gemms


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", FROZEN, ids=FROZEN.keys())
def test_frozen_layers_same_gradients_and_no_unneeded_gemm(case, dtype):
    frozen, input_grad = FROZEN[case]
    torch_model = frozen_model().to(dtype)
    frozen = {(i, kind) for i, kind in frozen if getattr(torch_model[i], kind) is not None}
    for i, kind in frozen:
        getattr(torch_model[i], kind).requires_grad_(False)
    x = torch.randn(5, 6, dtype=torch.float64).to(dtype).requires_grad_(input_grad)
    ours, expected, chained = check_model(torch_model, x)
    for name, g in expected[1].items():  # the None gradients are torch's (a frozen weight, the input)
        assert (g is None) == (name in {f"{i}.{k}" for i, k in frozen} | ({"input"} if not input_grad else set()))
    need = gemms_needed(torch_model, input_grad)
    torch_gemms = count_backward_gemms(torch_model, x)
    loop_gemms = count_backward_gemms(ours, x)
    with per_op(ours):
        per_op_gemms = count_backward_gemms(ours, x)
    assert len(torch_gemms) == need, f"torch's autograd ran {torch_gemms}, the equations need {need}"
    assert len(loop_gemms) == need, f"the loop ran {loop_gemms}, torch {torch_gemms}"
    assert len(per_op_gemms) == need, f"per-op ran {per_op_gemms}, torch {torch_gemms}"


# --------------------------------------------------------------------------------------------------
# 3. Where the loop must not apply: the per-op path runs, transparently
# --------------------------------------------------------------------------------------------------


def hook_counter():
    calls: list[str] = []

    def hook(module, *args):
        calls.append(type(module).__name__)  # returns None: changes nothing

    return calls, hook


HOOKS = {
    "forward": lambda m, h: m.register_forward_hook(h),
    "forward_pre": lambda m, h: m.register_forward_pre_hook(h),
    "full_backward": lambda m, h: m.register_full_backward_hook(h),
    "full_backward_pre": lambda m, h: m.register_full_backward_pre_hook(h),
}


@pytest.mark.parametrize("where", [2, 3], ids=["on_a_linear", "on_an_activation"])
@pytest.mark.parametrize("kind", HOOKS, ids=HOOKS.keys())
def test_a_hooked_module_runs_per_op_and_its_hook_runs_once(kind, where):
    torch_model = nn.Sequential(L(6, 10), nn.ReLU(), L(10, 8), nn.Sigmoid(), L(8, 7), nn.ReLU(), L(7, 3)).double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    torch_calls, torch_hook = hook_counter()
    our_calls, our_hook = hook_counter()
    HOOKS[kind](torch_model[where], torch_hook)
    HOOKS[kind](ours[where], our_hook)
    # The hooked module breaks the run; what is before it (2 or more layers from a Linear) and after it still runs as one.
    runs = [(0, 2), (4, 7)] if where == 2 else [(0, 3), (4, 7)]
    assert ours.chained_runs() == runs
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    expected = run(torch_model, x)
    assert len(torch_calls) == 1, torch_calls
    chained = run(ours, x)
    assert len(our_calls) == 1, f"the {kind} hook ran {len(our_calls)} times in one forward and backward"
    assert chained[2].get(CHAIN_NODE) == 2, chained[2]
    assert_same(chained, expected, f"{kind} hook on {where}")
    with per_op(ours):
        assert_same(run(ours, x), chained, "loop vs per-op")


GLOBAL_HOOKS = {
    "forward": nn.modules.module.register_module_forward_hook,
    "forward_pre": nn.modules.module.register_module_forward_pre_hook,
    "full_backward": nn.modules.module.register_module_full_backward_hook,
    "full_backward_pre": nn.modules.module.register_module_full_backward_pre_hook,
}


@pytest.mark.parametrize("kind", GLOBAL_HOOKS, ids=GLOBAL_HOOKS.keys())
def test_a_global_module_hook_makes_everything_per_op(kind):
    torch_model = MLPS["relu"]().double()  # (no in-place ReLU: torch's backward hooks forbid it)
    ours = torchbp.convert(copy.deepcopy(torch_model))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert ours.chained_runs() == [(0, 5)]
    calls, hook = hook_counter()
    handle = GLOBAL_HOOKS[kind](hook)
    try:
        assert ours.chained_runs() == []
        expected = run(torch_model, x)
        torch_calls, calls[:] = list(calls), []
        chained = run(ours, x)
        our_calls = list(calls)
    finally:
        handle.remove()
    assert our_calls == torch_calls, f"ours: {our_calls}, torch: {torch_calls}"  # per module, in order
    assert len(torch_calls) == 6, torch_calls  # 5 layers and the Sequential
    assert CHAIN_NODE not in chained[2]
    assert_same(chained, expected, f"global {kind} hook")
    assert ours.chained_runs() == [(0, 5)]  # removed: the loop again
    assert run(ours, x)[2].get(CHAIN_NODE) == 1


def test_a_hook_on_the_sequential_itself_keeps_the_loop():
    torch_model = MLPS["relu"]().double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    calls, hook = hook_counter()
    ours.register_forward_hook(hook)
    torch_model.register_forward_hook(hook)
    assert ours.chained_runs() == [(0, 5)]
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    chained = run(ours, x)
    assert calls == ["Sequential"] and chained[2].get(CHAIN_NODE) == 1
    assert_same(chained, run(torch_model, x), "hook on the Sequential")


class ScaledLinear(nn.Linear):
    """torch.nn's Linear with a forward of its own (the reference)."""

    def forward(self, input):
        return F.linear(input, self.weight, self.bias) * 2


class ScaledBPLinear(bnn.Linear):
    """A subclass of torchbp's Linear with a forward of its own: the loop must not skip it."""

    def forward(self, input):
        return super().forward(input) * 2


class BPSigmoidPlusOne(bnn.Sigmoid):
    def forward(self, input):
        return super().forward(input) + 1


class SigmoidPlusOne(nn.Sigmoid):
    def forward(self, input):
        return torch.sigmoid(input) + 1


def with_class(model: nn.Module, index: int, cls: type) -> nn.Module:
    model[index].__class__ = cls
    return model


def dropout_model():
    return nn.Sequential(L(6, 10), nn.ReLU(), L(10, 8), nn.Dropout(0.5), L(8, 7), nn.Sigmoid(), L(7, 3))


def nested_model():
    inner = nn.Sequential(L(10, 8), nn.Sigmoid(), L(8, 8), nn.ReLU(True))
    deeper = nn.Sequential(L(8, 6), nn.Sequential(L(6, 5), nn.ReLU(), L(5, 4)), L(4, 4), nn.Sigmoid(), L(4, 3))
    return nn.Sequential(L(6, 10), nn.ReLU(), inner, deeper)


def named_model():
    return nn.Sequential(OrderedDict(fc1=L(6, 10), act1=nn.ReLU(), fc2=L(10, 3), act2=nn.Sigmoid()))


# name: (torch model builder, change to our converted copy, the root's runs, ChainFunction nodes in the graph)
NOT_CHAINED = {
    "tanh_in_the_middle": (
        lambda: nn.Sequential(L(6, 10), nn.ReLU(), L(10, 8), nn.Tanh(), L(8, 7), nn.Sigmoid(), L(7, 3)),
        None,
        [(0, 3), (4, 7)],
        2,
    ),
    "dropout_in_the_middle": (dropout_model, None, [(0, 3), (4, 7)], 2),
    "only_one_linear_between": (
        lambda: nn.Sequential(nn.Tanh(), L(6, 10), nn.Tanh(), L(10, 3), nn.Tanh()),
        None,
        [],
        0,
    ),
    "starts_with_an_activation": (
        lambda: nn.Sequential(nn.ReLU(), nn.Sigmoid(), L(6, 10), nn.Tanh(), L(10, 3)),
        None,
        [],
        0,
    ),
    "linear_subclass": (
        lambda: with_class(
            nn.Sequential(L(6, 10), nn.ReLU(), L(10, 8), L(8, 7), nn.Sigmoid(), L(7, 3)), 2, ScaledLinear
        ),
        lambda m: with_class(m, 2, ScaledBPLinear),
        [(0, 2), (3, 6)],
        2,
    ),
    "activation_subclass": (
        lambda: with_class(nn.Sequential(L(6, 10), nn.ReLU(), L(10, 8), nn.Sigmoid(), L(8, 3)), 3, SigmoidPlusOne),
        lambda m: with_class(m, 3, BPSigmoidPlusOne),
        [(0, 3)],
        1,
    ),
    "nested": (nested_model, None, [(0, 2)], 4),  # the root's [0, 2); inner [0, 4); deeper [2, 5), its inner [0, 3)
    "named_modules": (named_model, None, [(0, 4)], 1),
    "tied_weights": (
        lambda: (lambda lin: nn.Sequential(lin, nn.ReLU(), lin, nn.Sigmoid(), lin))(L(6, 6)),
        None,
        [(0, 5)],
        1,
    ),
}


@pytest.mark.parametrize("case", NOT_CHAINED, ids=NOT_CHAINED.keys())
def test_modules_that_break_the_run(case):
    build, change, runs, chains = NOT_CHAINED[case]
    torch.manual_seed(0)
    torch_model = build().double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    if change is not None:
        change(ours)
    assert ours.chained_runs() == runs
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)  # (the same dropout mask: no other random op runs before it on either side)
    expected = run(torch_model, x)
    torch.manual_seed(1)
    chained = run(ours, x)
    assert chained[2].get(CHAIN_NODE, 0) == chains, chained[2]
    assert_same(chained, expected, case)
    with per_op(ours):
        torch.manual_seed(1)
        separate = run(ours, x)
    assert CHAIN_NODE not in separate[2]
    assert_same(chained, separate, f"{case}: loop vs per-op")


def test_nested_sequentials_each_run_their_own_runs():
    ours = torchbp.convert(nested_model())
    assert [(name, s.chained_runs()) for name, s in ours.named_modules() if isinstance(s, bnn.Sequential)] == [
        ("", [(0, 2)]),
        ("2", [(0, 4)]),
        ("3", [(2, 5)]),
        ("3.1", [(0, 3)]),
    ]


def test_chain_false_on_an_instance_runs_per_op():
    torch_model = MLPS["mixed"]().double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    other = torchbp.convert(copy.deepcopy(torch_model))
    ours.chain = False
    assert ours.chained_runs() == [] and other.chained_runs() == [(0, 7)]  # the instance only
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    separate = run(ours, x)
    assert CHAIN_NODE not in separate[2] and separate[2].get("LinearFunctionBackward") == 4, separate[2]
    assert_same(separate, run(torch_model, x), "chain = False")


@pytest.mark.parametrize("chain", [True, False], ids=["loop", "per_op"])
def test_errors_are_the_per_op_paths(chain):
    """A bad input to the run raises the Linear's own error, as the per-op path does."""
    ours = torchbp.convert(MLPS["mixed"]().double())
    ours.chain = chain
    with pytest.raises(RuntimeError, match=r"last dimension 6 \(in_features\), got shape \(4, 5\)"):
        ours(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="expected weight of dtype torch.float32 like input"):
        ours(torch.randn(4, 6))
    with pytest.raises(RuntimeError, match=r"got shape \(\)"):
        ours(torch.tensor(1.0, dtype=torch.float64))
    bad = torchbp.convert(nn.Sequential(L(6, 5), nn.ReLU(), L(4, 3)).double())  # the second Linear is wrong
    bad.chain = chain
    with pytest.raises(RuntimeError, match=r"last dimension 4 \(in_features\), got shape \(2, 5\)"):
        bad(torch.randn(2, 6, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# 4. Double backward: gradgradcheck, second derivatives and the Hessian against torch
# --------------------------------------------------------------------------------------------------

SMALL = {
    "sigmoid": lambda: nn.Sequential(L(3, 4), nn.Sigmoid(), L(4, 4), nn.Sigmoid(), L(4, 2)),
    "relu": lambda: nn.Sequential(L(3, 4), nn.ReLU(), L(4, 4, False), nn.ReLU(), L(4, 2)),
    "relu_inplace_trailing": lambda: nn.Sequential(L(3, 4), nn.ReLU(True), L(4, 2), nn.Sigmoid()),
}


def as_function(model: nn.Module):
    """``model`` as a function of (input, *parameters), through functional_call: what the checks differentiate."""
    names = [n for n, _ in model.named_parameters()]

    def f(x, *params):
        return functional_call(model, dict(zip(names, params)), (x,))

    return f, [p.detach().clone().requires_grad_() for p in model.parameters()]


def converted(builder) -> tuple[nn.Module, nn.Module]:
    """(torch.nn model, our converted copy), float64, the whole model one run."""
    torch_model = builder().double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    assert ours.chained_runs() == [(0, len(ours))]
    return torch_model, ours


def assert_runs_the_loop(f, *args) -> None:
    out = f(*args)
    assert grad_fn_counts(out).get(CHAIN_NODE) == 1, grad_fn_counts(out)


@pytest.mark.parametrize("model", SMALL, ids=SMALL.keys())
def test_gradgradcheck_through_the_loop(model):
    _, ours = converted(SMALL[model])
    f, params = as_function(ours)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert_runs_the_loop(f, x, *params)
    assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("model", SMALL, ids=SMALL.keys())
def test_second_derivatives_match_torch(model):
    """∂/∂θ of ‖∂C/∂θ‖² (create_graph=True through the loop's backward), against torch's."""
    results = []
    for m in converted(SMALL[model]):
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = m(x)
        wrt = [x, *m.parameters()]
        grads = torch.autograd.grad(out, wrt, upstream_like(out), create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, wrt, allow_unused=True))  # (the last bias: unused)
    for name, o, r in zip(["input", *dict(converted(SMALL[model])[0].named_parameters())], *results):
        assert_close_labelled(o, r, f"second derivative, {name}")


@pytest.mark.parametrize("input_grad", [False, True], ids=["input_no_grad", "input_grad"])
def test_second_derivatives_with_a_frozen_first_layer_match_torch(input_grad):
    """Double backward where no gradient flows back through the first layers (nothing of theirs is saved)."""
    results = []
    for m in converted(SMALL["relu"]):
        for p in m[0].parameters():
            p.requires_grad_(False)
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(input_grad)
        out = m(x)
        wrt = [t for t in (x, *m.parameters()) if t.requires_grad]
        grads = torch.autograd.grad(out, wrt, upstream_like(out), create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, wrt, allow_unused=True))
    assert len(results[0]) == len(results[1]) == 3 + input_grad
    for i, (o, r) in enumerate(zip(*results)):
        assert_close_labelled(o, r, f"second derivative {i}")


@pytest.mark.parametrize("model", SMALL, ids=SMALL.keys())
def test_hessian_of_a_loss_matches_torch(model):
    torch_model, ours = converted(SMALL[model])
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    params = {n: p.detach() for n, p in torch_model.named_parameters()}

    def loss(m):
        return lambda p, x: F.mse_loss(functional_call(m, p, (x,)), y)

    got = torch.func.hessian(loss(ours), argnums=(0, 1))(params, x)
    expected = torch.func.hessian(loss(torch_model), argnums=(0, 1))(params, x)
    for path, o, r in leaves(got, expected):
        assert_close_labelled(o, r, f"hessian {path}")


def leaves(ours, ref, path=()):
    """(path, ours, ref) for every tensor of two nested dicts/tuples of the same structure."""
    if isinstance(ref, torch.Tensor):
        yield path, ours, ref
        return
    keys = ref.keys() if isinstance(ref, dict) else range(len(ref))
    assert (ours.keys() if isinstance(ours, dict) else range(len(ours))) == keys
    for k in keys:
        yield from leaves(ours[k], ref[k], (*path, k))


# --------------------------------------------------------------------------------------------------
# 5. torch.func: per-sample gradients, jacrev, jacfwd, jvp; gradcheck with forward AD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", SMALL, ids=SMALL.keys())
def test_vmap_grad_per_sample_gradients_match_torch(model):
    from torch.func import grad, vmap

    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    results = []
    for m in converted(SMALL[model]):
        params = {n: p.detach() for n, p in m.named_parameters()}

        def loss_one(p, xn, yn, m=m):
            return F.mse_loss(functional_call(m, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

        results.append(vmap(grad(loss_one, argnums=(0, 1)), in_dims=(None, 0, 0))(params, x, y))
    for path, o, r in leaves(*results):
        assert_close_labelled(o, r, f"per-sample gradient {path}")


@pytest.mark.parametrize("model", SMALL, ids=SMALL.keys())
def test_jacrev_jacfwd_and_jvp_match_torch(model):
    from torch.func import jacfwd, jacrev, jvp

    x, dx = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    results = {}
    for side, m in zip(("torch", "ours"), converted(SMALL[model])):
        params = {n: p.detach() for n, p in m.named_parameters()}
        gen = torch.Generator().manual_seed(2)
        dparams = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}

        def f(p, x, m=m):
            return functional_call(m, p, (x,))

        results[side] = {
            "jacrev": jacrev(f, argnums=(0, 1))(params, x),
            "jacfwd": jacfwd(f, argnums=(0, 1))(params, x),
            "jvp": jvp(f, (params, x), (dparams, dx)),
        }
    for path, o, r in leaves(results["ours"], results["torch"]):
        assert_close_labelled(o, r, f"{path}")


@pytest.mark.parametrize("model", SMALL, ids=SMALL.keys())
def test_gradcheck_with_forward_ad_on_the_loop(model):
    _, ours = converted(SMALL[model])
    f, params = as_function(ours)
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert_runs_the_loop(f, x, *params)
    assert torch.autograd.gradcheck(f, (x, *params), check_forward_ad=True)


# --------------------------------------------------------------------------------------------------
# 6. torch.compile(fullgraph=True): one Function in the graph, torch's loss and gradients, no graph break
# --------------------------------------------------------------------------------------------------


def capturing(backend: str, graphs: list):
    """A compile backend that keeps Dynamo's graph, then hands it to ``backend``."""
    from torch._dynamo.backends.registry import lookup_backend

    def compile_fn(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)

    return compile_fn


def function_applies(graphs: list) -> int:
    """The autograd Functions Dynamo traced (each one ``autograd_function_apply`` node)."""
    return sum(
        n.target is torch.ops.higher_order.autograd_function_apply
        for gm in graphs
        for n in gm.graph.nodes
        if n.op == "call_function"
    )


COMPILED = {
    "mixed-float64-aot_eager": ("mixed", torch.float64, "aot_eager"),
    "trailing_relu_inplace-float64-aot_eager": ("trailing_relu_inplace", torch.float64, "aot_eager"),
    "relu-float32-inductor": ("relu", torch.float32, "inductor"),
}


@pytest.mark.parametrize("case", COMPILED, ids=COMPILED.keys())
def test_compiled_loop_matches_torch_eager(case, fresh_dynamo):
    mlp, dtype, backend = COMPILED[case]
    torch_model = MLPS[mlp]().to(dtype)
    ours = torchbp.convert(copy.deepcopy(torch_model))
    x = torch.randn(8, 6, dtype=torch.float64).to(dtype)
    y = torch.randn(8, 3, dtype=torch.float64).to(dtype)
    graphs: list = []

    def step(model, x, y):
        return F.mse_loss(model(x), y)

    compiled = torch.compile(step, backend=capturing(backend, graphs), fullgraph=True)
    results = []
    for model, fn in ((torch_model, step), (ours, compiled)):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        loss = fn(model, xi, y)
        loss.backward()  # outside the compiled function
        results.append((loss.detach(), {"input": xi.grad, **{n: p.grad for n, p in model.named_parameters()}}))
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert function_applies(graphs) == 1, "the run is one Function in the compiled graph"
    (ref_loss, ref_grads), (loss, grads) = results
    assert_close_labelled(loss, ref_loss, "loss")
    for name, g in ref_grads.items():
        assert_close_labelled(grads[name], g, f"grad of {name}")


# --------------------------------------------------------------------------------------------------
# 7. autocast (CPU, bfloat16)
# --------------------------------------------------------------------------------------------------


def bf16_tolerance(expected: torch.Tensor) -> dict:
    """helpers' bfloat16 tolerance, scaled by ``expected`` (a float32 gradient of bfloat16 computations too)."""
    return tolerance(expected.to(torch.bfloat16))


@pytest.mark.parametrize("mlp", ["mixed", "trailing_sigmoid", "linear_linear"])
def test_autocast_bfloat16_matches_torch(mlp):
    torch_model = MLPS[mlp]()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    results = []
    for model in (torch_model, ours):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xi)
            loss = F.mse_loss(out, y)
        nodes = grad_fn_counts(out)
        loss.backward()
        grads = {"input": xi.grad, **{n: p.grad for n, p in model.named_parameters()}}
        results.append((out, loss, grads, nodes))
    (ref_out, ref_loss, ref_grads, _), (out, loss, grads, nodes) = results
    assert nodes.get(CHAIN_NODE) == 1, nodes
    assert out.dtype == ref_out.dtype == torch.bfloat16 and loss.dtype == ref_loss.dtype
    assert_close_labelled(out, ref_out, "output", **bf16_tolerance(ref_out))
    assert_close_labelled(loss, ref_loss, "loss", **bf16_tolerance(ref_loss))
    for name, g in ref_grads.items():
        assert g.dtype == grads[name].dtype == torch.float32, name
        assert_close_labelled(grads[name], g, f"grad of {name}", **bf16_tolerance(g))


# --------------------------------------------------------------------------------------------------
# 8. retain_graph
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mlp", ["mixed", "trailing_relu_inplace", "linear_linear"])
def test_retain_graph_and_a_second_backward(mlp):
    torch_model = MLPS[mlp]().double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    x = torch.randn(5, 6, dtype=torch.float64)
    results = []
    for model in (torch_model, ours):
        xi = x.clone().requires_grad_()
        out = model(xi)
        up = upstream_like(out)
        out.backward(up, retain_graph=True)
        out.backward(2 * up, retain_graph=True)  # accumulates
        out.backward(up)  # the last one may free the graph
        grads = {"input": xi.grad, **{n: p.grad.clone() for n, p in model.named_parameters()}}
        with pytest.raises(RuntimeError) as raised:
            out.backward(up)
        results.append((grads, raised.value))
    (ref_grads, ref_error), (grads, error) = results
    for name, g in ref_grads.items():
        assert_close_labelled(grads[name], g, f"grad of {name} after 3 backward passes")
    assert "second time" in str(ref_error) and ("second time" in str(error) or "freed" in str(error)), error


def test_backward_without_retain_graph_then_again_raises_like_torch():
    for model in converted(SMALL["relu"]):
        out = model(torch.randn(4, 3, dtype=torch.float64, requires_grad=True))
        out.sum().backward()
        with pytest.raises(RuntimeError):
            out.sum().backward()


# --------------------------------------------------------------------------------------------------
# 9. The DeltaMonitor on a run of layers: every statistic as the per-op path's, and as torch's
# --------------------------------------------------------------------------------------------------


class WithHead(nn.Module):
    """A run that ends with a ReLU, consumed by a Linear outside the Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(L(6, 10), nn.ReLU(True), L(10, 8), nn.ReLU())
        self.head = L(8, 3)
        kill_units(self.body[0], [0, 4])
        kill_units(self.body[2], [1, 2], bias_value=0.0)

    def forward(self, x):
        return self.head(self.body(x))


def monitor_relu_mlp():
    m = nn.Sequential(L(6, 12), nn.ReLU(True), L(12, 10, False), nn.ReLU(), L(10, 8), nn.ReLU(True), L(8, 3))
    kill_units(m[0], [0, 3, 5])
    kill_units(m[2], [1])  # no bias: z = 0 exactly
    kill_units(m[4], [7], bias_value=-3.0)
    return m, {"0", "2", "4"}


def monitor_mixed_mlp():
    m = nn.Sequential(L(6, 10), nn.ReLU(), L(10, 8, False), nn.Sigmoid(), L(8, 4))
    kill_units(m[0], [0, 1])
    return m, {"0"}


def monitor_trailing_relu():
    m = nn.Sequential(L(6, 10), nn.Sigmoid(), L(10, 8), nn.ReLU(True), L(8, 5), nn.ReLU())
    kill_units(m[4], [0, 2])  # the last Linear's dead units
    return m, {"2", "4"}


MONITORED = {
    "relu": monitor_relu_mlp,
    "mixed": monitor_mixed_mlp,
    "trailing_relu": monitor_trailing_relu,
    "head_outside": lambda: (WithHead(), {"body.0", "body.2"}),
}


def monitored_step(model, x, upstream, per_sample=False):
    with torchbp.DeltaMonitor(model, per_sample_norms=per_sample) as monitor:
        out = model(x)
        nodes = grad_fn_counts(out)
        out.backward(upstream)
        stats = monitor.latest()
        norms = monitor.per_sample_grad_norms() if per_sample else None
    return stats, norms, nodes


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nonfinite"])
@pytest.mark.parametrize("shape", [(16, 6), (4, 3, 6), (6,)], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("case", MONITORED, ids=MONITORED.keys())
def test_monitor_statistics_equal_per_op_and_torch(case, shape, nonfinite):
    torch_model, relu_after = MONITORED[case]()
    torch_model.double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    separate = torchbp.convert(copy.deepcopy(torch_model))
    for s in sequentials(separate):
        s.chain = False
    for m in torch_model.modules():  # the oracle's hooks on z^l need out-of-place ReLUs (see test_monitor)
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(shape, dtype=torch.float64)
    oracle = DeltaOracle(torch_model)
    out = torch_model(x)
    upstream = upstream_like(out)
    if nonfinite:  # an Inf into a unit that is not dead (σ'(z) = 0 would stop it, as in torch)
        upstream.view(-1)[(out.detach().reshape(-1) != 0).nonzero()[0]] = math.inf
    out.backward(upstream)
    expected = oracle.stats(relu_after)
    loop, _, nodes = monitored_step(ours, x, upstream)
    assert nodes.get(CHAIN_NODE) == 1, nodes
    per_op_stats, _, per_op_nodes = monitored_step(separate, x, upstream)
    assert CHAIN_NODE not in per_op_nodes
    assert_stats_match(loop, per_op_stats, label="loop vs per-op: ")
    if nonfinite:  # (the other values of a non-finite layer are the monitor's convention, not a norm of torch's δ)
        assert {k: v["delta_nonfinite"] for k, v in loop.items()} == {
            k: v["delta_nonfinite"] for k, v in expected.items()
        }
        assert any(v["delta_nonfinite"] for v in loop.values())
        return
    assert_stats_match(loop, expected, label="loop vs torch: ")
    for name, stats in loop.items():  # what the case is about
        assert (stats["dead_fraction"] is not None) == (name in relu_after), name
        assert stats["delta_nonfinite"] is False, name
    assert all(loop[name]["dead_fraction"] > 0 for name in relu_after)  # units killed on purpose
    last = {"relu": "4", "mixed": "2", "trailing_relu": "2", "head_outside": "body.2"}[case]
    assert loop[last]["delta_gain"] is not None  # against the next Linear, inside or outside the run


@pytest.mark.parametrize("input_grad", [False, True], ids=["input_no_grad", "input_grad"])
@pytest.mark.parametrize("frozen", [(0,), (0, 2), (2,)], ids=["first", "first_two", "second"])
def test_monitor_with_frozen_layers_equal_per_op_and_torch(frozen, input_grad):
    """Frozen Linears: their δ is recorded only where torch computes one; weight_grad_norm None for frozen weights."""
    torch_model, relu_after = monitor_relu_mlp()
    torch_model.double()
    for i in frozen:
        torch_model[i].requires_grad_(False)
    ours = torchbp.convert(copy.deepcopy(torch_model))
    separate = torchbp.convert(copy.deepcopy(torch_model))
    separate.chain = False
    for m in torch_model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=input_grad)
    oracle = DeltaOracle(torch_model)
    out = torch_model(x)
    upstream = upstream_like(out)
    out.backward(upstream)
    expected = oracle.stats({name for name in relu_after if name in oracle.order})
    loop, _, nodes = monitored_step(ours, x, upstream)
    assert nodes.get(CHAIN_NODE) == 1, nodes
    assert_stats_match(loop, monitored_step(separate, x, upstream)[0], label="loop vs per-op: ")
    assert set(loop) == set(oracle.order)  # the layers torch computed a δ for
    assert_stats_match(loop, expected, label="loop vs torch: ")
    assert all((loop[str(i)]["weight_grad_norm"] is None) for i in frozen if str(i) in loop)


@pytest.mark.parametrize("shape", [(8, 6), (3, 4, 6), (6,)], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("case", ["relu", "head_outside"])
def test_monitor_per_sample_norms_equal_per_op(case, shape):
    torch_model, _ = MONITORED[case]()
    torch_model.double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    separate = torchbp.convert(copy.deepcopy(torch_model))
    for s in sequentials(separate):
        s.chain = False
    x = torch.randn(shape, dtype=torch.float64)
    upstream = upstream_like(torch_model(x))
    loop_stats, loop, nodes = monitored_step(ours, x, upstream, per_sample=True)
    assert nodes.get(CHAIN_NODE) == 1, nodes
    per_op_stats, expected, _ = monitored_step(separate, x, upstream, per_sample=True)
    assert_stats_match(loop_stats, per_op_stats, label="loop vs per-op: ")
    assert loop.keys() == expected.keys() and len(loop) == len(loop_stats)
    for name, norms in expected.items():
        for kind, e in norms.items():
            assert_close_labelled(loop[name][kind], e, f"per-sample {kind} norm of {name}")


# --------------------------------------------------------------------------------------------------
# 10. Memory: the bytes autograd saves, and the peak of a training step
# --------------------------------------------------------------------------------------------------


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes, count) of the distinct storages autograd saves for backward in one forward (as
    benchmarks/bench_step.py's saved_bytes)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values()), len(storages)


@pytest.mark.parametrize("shape", ["2d", "3d", "1d", "N0", "transposed", "strided"])
@pytest.mark.parametrize("mlp", MLPS, ids=MLPS.keys())
def test_saved_bytes_equal_per_op_and_torch(mlp, shape):
    torch_model = MLPS[mlp]()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    x = make_input(*SHAPES[shape], dtype=torch.float32).requires_grad_()
    expected = saved_bytes(torch_model, x)
    assert expected[0] > 0
    assert saved_bytes(ours, x) == expected, "the loop vs torch"
    with per_op(ours):
        assert saved_bytes(ours, x) == expected, "per-op vs torch"


@pytest.mark.parametrize("case", FROZEN, ids=FROZEN.keys())
def test_saved_bytes_with_frozen_layers_equal_per_op_and_torch(case):
    """A layer no gradient flows back through (all before it frozen) saves nothing, as per-op and torch."""
    frozen, input_grad = FROZEN[case]
    torch_model = frozen_model()
    for i, kind in frozen:
        if getattr(torch_model[i], kind) is not None:
            getattr(torch_model[i], kind).requires_grad_(False)
    ours = torchbp.convert(copy.deepcopy(torch_model))
    x = torch.randn(5, 6).requires_grad_(input_grad)
    expected = saved_bytes(torch_model, x)
    assert saved_bytes(ours, x) == expected, "the loop vs torch"
    with per_op(ours):
        assert saved_bytes(ours, x) == expected, "per-op vs torch"


def bench_step_module():
    root = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if root not in sys.path:
        sys.path.insert(0, root)
    import bench_step

    return bench_step


def peak_growths(builder, batch: int, features: int) -> tuple[dict[str, int], int]:
    """Peak growth of a training step (benchmarks/bench_step.py's peak_growth_cpu) of torch, the loop, per-op;
    and the bytes of the gradient at the run's output (float32)."""
    bench = bench_step_module()
    torch.manual_seed(0)
    torch_model = builder()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, features, generator=gen), torch.randint(0, 10, (batch,), generator=gen))]
    models = {
        "loop": torchbp.convert(copy.deepcopy(torch_model)),
        "per_op": torchbp.convert(copy.deepcopy(torch_model)),
    }
    models["per_op"].chain = False
    with torch.no_grad():
        run_output = models["loop"][: models["loop"].chained_runs()[0][1]](batches[0][0])
    growth = {}
    for name, model in {"torch": torch_model, **models}.items():
        loss = nn.CrossEntropyLoss() if name == "torch" else torchbp.CrossEntropyLoss()
        growth[name] = bench.peak_growth_cpu(bench.Trainer(model, loss, "sgd", batches))
    return growth, run_output.numel() * run_output.element_size()


def test_peak_memory_of_a_training_step_not_above_per_op():
    """The loop's peak memory over a training step is the per-op path's.

    Allowed on top: the gradient at the run's output. The engine hands it to the one Function's backward and holds
    it (the call's arguments) until the whole loop has run, where the per-op path frees it after the last layer; no
    Python backward can let it go. It is N x out_features: 10 KiB at [784, 512, 512, 10] and batch 256.
    """
    bench = bench_step_module()
    problems = []
    hooked_head = nn.Linear(512, 10)
    hooked_head.register_forward_hook(lambda *args: None)  # the run ends with a ReLU: its output gradient is 512 wide
    models = {
        "[784, 512, 512, 10]": lambda: bench.build_mlp([784, 512, 512, 10], nn.ReLU),
        "[784, 512, 512] + hooked Linear(512, 10)": lambda: nn.Sequential(
            *bench.build_mlp([784, 512, 512], nn.ReLU), nn.ReLU(), copy.deepcopy(hooked_head)
        ),
    }
    for name, builder in models.items():
        growth, output_grad = peak_growths(builder, 256, 784)
        if growth["loop"] > growth["per_op"] + output_grad:
            problems.append(
                f"{name}: peak growth of the loop {growth['loop'] / 1024:.0f} KiB > per-op {growth['per_op'] / 1024:.0f}"
                f" KiB + the run's output gradient {output_grad / 1024:.0f} KiB (torch: {growth['torch'] / 1024:.0f} KiB)"
            )
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# 11. The Sequential API: unchanged by convert; chained_runs; indexing, editing, pickling
# --------------------------------------------------------------------------------------------------


def test_convert_leaves_the_module_tree_state_dict_repr_and_parameters():
    torch_model = nested_model()
    reference = copy.deepcopy(torch_model)
    params = dict(torch_model.named_parameters())
    ours = torchbp.convert(torch_model)
    assert ours is torch_model and type(ours) is bnn.Sequential
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in reference.named_modules()]
    assert [type(m).__name__ for m in ours.modules()] == [type(m).__name__ for m in reference.modules()]
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert repr(ours) == repr(reference)
    assert all(p is params[n] for n, p in ours.named_parameters())
    assert isinstance(ours, nn.Sequential) and len(ours) == len(reference)
    ours.load_state_dict(reference.state_dict())  # loads, strict


RUNS = {
    "empty": ([], []),
    "one_linear": ([lambda: L(6, 3)], []),
    "linear_activation": ([lambda: L(6, 3), nn.ReLU], [(0, 2)]),
    "activation_first": ([nn.ReLU, lambda: L(6, 3), nn.Sigmoid], [(1, 3)]),
    "two_runs": ([lambda: L(6, 3), nn.ReLU, nn.Tanh, lambda: L(3, 3), lambda: L(3, 2)], [(0, 2), (3, 5)]),
    "activations_only": ([nn.ReLU, nn.Sigmoid], []),
    "tanh_between_linears": ([lambda: L(6, 3), nn.Tanh, lambda: L(3, 2)], []),
    "long": ([lambda: L(6, 6), nn.ReLU, lambda: L(6, 6), nn.Sigmoid, nn.ReLU, lambda: L(6, 6)], [(0, 6)]),
}


@pytest.mark.parametrize("case", RUNS, ids=RUNS.keys())
def test_chained_runs_of_layouts(case):
    makers, runs = RUNS[case]
    torch_model = nn.Sequential(*[make() for make in makers]).double()
    ours = torchbp.convert(copy.deepcopy(torch_model)) if makers else bnn.Sequential()
    assert ours.chained_runs() == runs
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    got, expected = run(ours, x), run(torch_model, x)
    if makers:
        assert got[2].get(CHAIN_NODE, 0) == len(runs)
        assert_same(got, expected, case)
    else:
        assert got[0] is not None and torch.equal(got[0], x)  # an empty Sequential returns its input


def test_indexing_and_slicing_give_torchbp_sequentials_that_work():
    torch_model = MLPS["mixed"]().double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    assert type(ours[0]) is bnn.Linear and type(ours[-1]) is bnn.Linear
    head, tail = ours[:3], ours[2:]
    assert type(head) is bnn.Sequential and type(tail) is bnn.Sequential
    assert head.chained_runs() == [(0, 3)] and tail.chained_runs() == [(0, 5)]
    assert ours[1:3].chained_runs() == []  # starts with an activation
    assert head[0] is ours[0]  # the same modules
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    for label, ours_part, torch_part in (("[:3]", head, torch_model[:3]), ("[2:]", tail, torch_model[2:])):
        inp = x if label == "[:3]" else torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
        got = run(ours_part, inp)
        assert got[2].get(CHAIN_NODE) == 1, label
        assert_same(got, run(torch_part, inp), label)


def test_append_insert_delete_change_the_runs():
    torch_model = nn.Sequential(L(6, 8), nn.ReLU(), L(8, 4)).double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    steps = [
        ("append Sigmoid", lambda m, lib: m.append(lib.Sigmoid()), [(0, 4)]),
        ("insert Tanh at 2", lambda m, lib: m.insert(2, nn.Tanh()), [(0, 2), (3, 5)]),
        ("del [0]", lambda m, lib: m.__delitem__(0), [(2, 4)]),
        ("set [1] = Linear", lambda m, lib: m.__setitem__(1, lib.Linear(8, 8).double()), [(1, 4)]),
        ("del [2:]", lambda m, lib: m.__delitem__(slice(2, None)), []),
        ("extend", lambda m, lib: m.extend([lib.ReLU(), lib.Linear(8, 3).double()]), [(1, 4)]),
    ]
    for label, edit, runs in steps:
        torch.manual_seed(len(label))
        edit(torch_model, nn)
        torch.manual_seed(len(label))
        edit(ours, bnn)  # torchbp's own modules, as a user of torchbp.nn would add
        assert ours.chained_runs() == runs, label
        inp = x if type(ours[0]) is bnn.Linear and ours[0].in_features == 6 else torch.randn(4, 8, dtype=torch.float64)
        inp = inp.requires_grad_() if not inp.requires_grad else inp
        got = run(ours, inp)
        assert got[2].get(CHAIN_NODE, 0) == len(runs), label
        assert_same(got, run(torch_model, inp), label)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_model_trains_like_torch(how):
    torch_model = MLPS["mixed"]()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    clone = copy.deepcopy(ours) if how == "deepcopy" else pickle.loads(pickle.dumps(ours))
    assert type(clone) is bnn.Sequential and clone.chained_runs() == [(0, 7)]
    assert all(p is not q for p, q in zip(clone.parameters(), ours.parameters()))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (clone, torch_model)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
        for model, opt in zip((clone, torch_model), opts):
            opt.zero_grad()
            out = model(x)
            assert (CHAIN_NODE in grad_fn_counts(out)) == (model is clone)
            F.mse_loss(out, y).backward()
            opt.step()
    for (name, p), q in zip(clone.named_parameters(), torch_model.parameters()):
        assert_close_labelled(p, q, f"{name} after 5 steps")
    assert not torch.equal(clone[0].weight, ours[0].weight)  # the copy trained, not the original


# --------------------------------------------------------------------------------------------------
# The loop's saved-tensor holders among other graph features
# --------------------------------------------------------------------------------------------------


def square_model():
    return nn.Sequential(L(6, 8), nn.ReLU(True), L(8, 8, False), nn.Sigmoid(), L(8, 6))


GRAPHS = {
    "called_twice": lambda m, x: m(m(x)),  # two loops over the same parameters in one graph
    "output_used_twice": lambda m, x: m(x) * m[0](x)[..., :6] + m(x).sum(-1, keepdim=True),
    "under_save_on_cpu": lambda m, x: _under(torch.autograd.graph.save_on_cpu(), m, x),  # the holders wrap its hooks
    "under_saved_tensors_hooks": lambda m, x: _under(torch.autograd.graph.saved_tensors_hooks(_pack, _unpack), m, x),
}


def _pack(t):
    return ("packed", t.clone())


def _unpack(packed):
    return packed[1]


def _under(context, m, x):
    with context:
        return m(x)


@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPHS.keys())
def test_the_loop_in_other_graphs_matches_torch(graph):
    torch_model = square_model().double()
    ours = torchbp.convert(copy.deepcopy(torch_model))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for model in (torch_model, ours):
        model.zero_grad(set_to_none=True)
        xi = leaf_copy(x)
        out = GRAPHS[graph](model, xi)
        nodes = grad_fn_counts(out)
        out.backward(upstream_like(out))
        results.append((out, {"input": xi.grad, **{n: p.grad for n, p in model.named_parameters()}}, nodes))
    assert results[1][2].get(CHAIN_NODE) == (1 if graph.startswith("under") else 2), results[1][2]
    assert_same(results[1], results[0], graph)

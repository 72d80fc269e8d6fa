"""Forward mode: every Function's ``jvp`` against torch's own forward-mode derivatives.

torch.func.jvp / jacfwd / hessian and torch.autograd.forward_ad dual numbers, through the functions (the cases
of test_functional.py) and through modules; gradcheck with check_forward_ad. Every comparison is against
torch.nn.functional (quadratic_cost: its formula in helpers.py) run the same way, never against torchbp.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from cases import CASES, Case
from helpers import (
    DTYPES,
    OpRecorder,
    assert_close_labelled,
    layer_norm_formula,
    quadratic_cost_formula,
    torch_ref,
)
from torch import nn
from torch.autograd import gradcheck
from torch.autograd.gradcheck import GradcheckError
from torch.func import functional_call, hessian, jacfwd, jvp

import torchbp
import torchbp.equations.activations
import torchbp.equations.costs
import torchbp.functional as BF
import torchbp.nn as bnn

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using a target size"),
    # torch loads its forward-AD decompositions with torch.jit.script on the first dual tensor
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


def _split(case: Case, dtype) -> tuple[dict, list[str]]:
    """The case's inputs, and the names of those forward mode differentiates (the floating ones requiring grad)."""
    inputs = case.make(dtype)
    wrt = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad and v.is_floating_point()]
    inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return inputs, wrt


def _tangents(inputs: dict, names: list[str], seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(inputs[k].shape, generator=gen, dtype=torch.float64).to(inputs[k].dtype) for k in names}


def _function_of(M, case: Case, inputs: dict, names: list[str]):
    """``case.call(M, ...)`` as a function of the inputs ``names``, the others fixed."""

    def f(*args):
        return case.call(M, **{**inputs, **dict(zip(names, args))})

    return f


def _dual_tangent(M, case: Case, inputs: dict, tangents: dict):
    """The output's value and tangent with torch.autograd.forward_ad, tangents on ``tangents``' inputs only."""
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(v, tangents[k]) if k in tangents else v for k, v in inputs.items()}
        out = fwAD.unpack_dual(case.call(M, **duals))
        return out.primal, out.tangent


JVP_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


ACTIVATIONS = ("linear", "sigmoid", "relu", "gelu", "silu", "tanh", "layernorm", "rmsnorm", "embedding", "conv")


def _torch_jvp(case: Case, inputs: dict, tangents: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.func.jvp of torch's function along ``tangents`` (the other inputs constant): its value and tangent.

    Two corrections, where torch's forward mode disagrees with torch itself; ours is pinned here, so a change shows:
    - a cost's tangent is NaN where the cost is (a NaN has no derivative; a mean over nothing is 0/0). torch's is
      NaN there too, but for probability-target cross_entropy over no samples (0) and
      binary_cross_entropy_with_logits at z = −∞ along the target alone (±∞).
    - mse_loss at a = ±∞: torch's tangent is NaN, though its gradient there is 2(a − y) = ±∞; ours contracts
      the gradient with the tangent: 2(a − y)(da − dy) = ±∞.
    """
    names = list(tangents)
    primals, t = tuple(inputs[k] for k in names), tuple(tangents[k] for k in names)
    value, ref = jvp(_function_of(torch_ref, case, inputs, names), primals, t)
    if not case.id.startswith(ACTIVATIONS):
        ref = torch.where(value.isnan(), value, ref)
    if case.id.startswith("mse-none-nan-inf"):
        a, y = inputs["input"], inputs["target"]
        da = tangents.get("input", torch.zeros_like(a))
        dy = tangents.get("target", torch.zeros_like(y))
        ref = torch.where(a.isinf(), 2 * (a - y) * (da - dy), ref)
    return value, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", JVP_PARAMS)
def test_jvp_matches_torch(case: Case, dtype):
    """torch.func.jvp and dual numbers along every differentiable input, then dual numbers along each alone.

    The reference is torch.func.jvp, with the inputs without a tangent held constant. (torch's forward_ad
    formulas give such inputs a zero tangent instead, and 0 · ∞ = NaN where their partial is infinite: BCE's
    ∂C/∂y at a = 0. Ours gives them none, as torch.func does.)
    """
    inputs, wrt = _split(case, dtype)
    if not wrt:
        pytest.skip("no differentiable input")
    tangents = _tangents(inputs, wrt)
    equal_nan = case.equal_nan or not case.smooth  # (saturated BCE: ∞ − ∞ in its tangent, NaN in torch's too)
    primals, t = tuple(inputs[k] for k in wrt), tuple(tangents[k] for k in wrt)
    out, d_out = jvp(_function_of(BF, case, inputs, wrt), primals, t)
    ref, d_ref = _torch_jvp(case, inputs, tangents)
    assert_close_labelled(out, ref, "torch.func.jvp value", equal_nan=case.equal_nan)
    assert_close_labelled(d_out, d_ref, "torch.func.jvp tangent", equal_nan=equal_nan)
    _, d_out = _dual_tangent(BF, case, inputs, tangents)
    assert_close_labelled(d_out, d_ref, "forward_ad tangent", equal_nan=equal_nan)
    for name in wrt if len(wrt) > 1 else []:
        _, d_out = _dual_tangent(BF, case, inputs, {name: tangents[name]})
        _, d_ref = _torch_jvp(case, inputs, {name: tangents[name]})
        assert_close_labelled(d_out, d_ref, f"forward_ad tangent along {name} alone", equal_nan=equal_nan)


# --------------------------------------------------------------------------------------------------
# jacfwd, hessian (forward over reverse: jacfwd of jacrev), gradcheck with forward AD: a subset per function
# --------------------------------------------------------------------------------------------------

# Every option the backward handles, each reduction, the layouts; smooth cases only (finite differences).
SUBSET = [
    *("linear-2d", "linear-N0", "linear-1d", "linear-3d", "linear-no-bias", "linear-1d-no-bias"),
    *("linear-input-transposed", "linear-3d-input-permuted", "linear-weight-1d", "linear-bias-0d"),
    *("sigmoid-2d", "sigmoid-3d", "relu-2d", "relu-inplace-3d", "relu-inplace-transposed"),
    *("gelu-3d", "gelu_tanh-3d", "silu-2d", "silu_inplace-3d", "tanh-3d"),
    *("layernorm-3d", "layernorm-N0", "layernorm-shifted", "layernorm-no-bias", "layernorm-no-affine"),
    *("layernorm-2-dims", "rmsnorm-3d", "rmsnorm-shifted", "rmsnorm-no-affine", "rmsnorm-2-dims"),
    *("embedding-2d", "embedding-0d", "embedding-repeated"),
    *("conv1d-groups", "conv2d-same"),
    *(f"mse-{r}-{k}" for r in ("mean", "sum", "none") for k in ("2d", "weight", "broadcast-input")),
    *("mse-mean-weight-input-shaped-target-broadcast", "mse-none-weight-broadcast-target"),
    *(f"quadratic-{r}-{k}" for r in ("mean", "sum", "none") for k in ("3d", "1d")),
    *(f"ce-{r}-{k}" for r in ("mean", "sum", "none") for k in ("idx", "idx-weight-ignore-smoothing", "prob-spatial")),
    *("ce-mean-idx-spatial-smoothing", "ce-none-idx-unbatched-weight-smoothing", "ce-mean-prob-weight-smoothing"),
    *("ce-none-prob-unbatched", "ce-sum-prob-transposed"),
    *(f"bce-{r}-{k}" for r in ("mean", "sum", "none") for k in ("weight-broadcast", "3d")),
    *(f"bcel-{r}-{k}" for r in ("mean", "sum", "none") for k in ("weight-pos-weight", "3d-pos-weight")),
]
_BY_ID = {c.id: c for c in CASES}
SUBSET_PARAMS = [pytest.param(_BY_ID[i], id=i) for i in SUBSET]


def test_subset_is_smooth_and_covers_every_function():
    assert all(_BY_ID[i].smooth for i in SUBSET)
    assert {i.split("-")[0] for i in SUBSET} == {c.id.split("-")[0] for c in CASES}


def _hessian_tolerance(case: Case) -> dict:
    # torch's double backward of binary_cross_entropy uses (a + 1e-12)^2 (1 - a + 1e-12)^2 as the denominator
    # (its first derivative clamps a(1 - a) at 1e-12 instead): ~1e-11 relative from the exact Hessian, ours.
    return {"rtol": 1e-10, "atol": 1e-10} if case.id.startswith("bce-") else {}


@pytest.mark.parametrize("case", SUBSET_PARAMS)
def test_jacfwd_and_hessian_match_torch(case: Case):
    inputs, wrt = _split(case, torch.float64)
    primals = tuple(inputs[k] for k in wrt)
    argnums = tuple(range(len(wrt)))
    for transform, tol in ((jacfwd, {}), (hessian, _hessian_tolerance(case))):
        ours = transform(_function_of(BF, case, inputs, wrt), argnums=argnums)(*primals)
        M = torch_ref
        if transform is hessian and case.id.startswith("layernorm"):  # (torch's is asymmetric: layer_norm_formula)
            M = SimpleNamespace(**{**vars(torch_ref), "layer_norm": layer_norm_formula})
        ref = transform(_function_of(M, case, inputs, wrt), argnums=argnums)(*primals)
        for path, o, r in _leaves(ours, ref):
            assert_close_labelled(o, r, f"{transform.__name__} {[wrt[i] for i in path]}", **tol)


def _leaves(ours, ref, path=()):
    """The matching tensors of two nested tuples (jacfwd's and hessian's results), with their index paths."""
    if isinstance(ref, torch.Tensor):
        yield path, ours, ref
        return
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        yield from _leaves(o, r, (*path, i))


@pytest.mark.parametrize("case", SUBSET_PARAMS)
def test_gradcheck_forward_and_backward(case: Case):
    """Forward and reverse mode against finite differences, and batched (vmap) forward grads, in float64.

    Not batched for in-place ReLU: gradcheck batches tangents with torch's legacy vmap, under which no in-place
    custom Function can update its input's tangent in place (the docs' own ``x.mul_(2)`` example fails the same
    way); torch.func.jacfwd, which batches with torch.func.vmap, is tested above.
    """
    inputs, wrt = _split(case, torch.float64)
    primals = tuple(inputs[k].requires_grad_() for k in wrt)
    f = _function_of(BF, case, inputs, wrt)
    batched = not case.id.startswith("relu-inplace")
    assert gradcheck(
        f,
        primals,
        eps=1e-6,
        atol=1e-5,
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_forward_grad=batched,
    )


def test_torch_legacy_batched_forward_grad_rejects_any_in_place_function():
    """Why in-place ReLU's gradcheck above is not batched: a minimal in-place Function fails the same way."""

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.mul_(2)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.mark_dirty(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

        @staticmethod
        def jvp(ctx, tangent):
            return tangent.mul_(2)

    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: Double.apply(x * 1), (x,), check_forward_ad=True, check_batched_forward_grad=False)
    with pytest.raises(GradcheckError, match="not modifying the forward mode gradients inplace"):
        gradcheck(lambda x: Double.apply(x * 1), (x,), check_forward_ad=True, check_batched_forward_grad=True)


# --------------------------------------------------------------------------------------------------
# The jvp is hand-written; in-place ReLU updates the tangent in place; no fast path under transforms
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if not c.equal_nan])
def test_forward_mode_is_hand_written(case: Case):
    """No ``aten.*_backward`` op (torch's own derivative, e.g. sigmoid_backward) runs in torchbp's forward mode."""
    inputs, wrt = _split(case, torch.float64)
    if not wrt:
        pytest.skip("no differentiable input")
    with OpRecorder() as rec:
        _, tangent = _dual_tangent(BF, case, inputs, _tangents(inputs, wrt))
    assert tangent is not None
    assert not [op for op in rec.ops if op.endswith("_backward")], rec.ops


@pytest.mark.parametrize("M", [BF, torch_ref], ids=["torchbp", "torch"])
def test_relu_inplace_overwrites_the_tangent_too(M):
    """In-place ReLU on a dual tensor: the primal and its tangent are both overwritten (as torch's)."""
    z = torch.tensor([-1.0, 0.0, 2.0, -0.0, 3.0], dtype=torch.float64)
    dz = torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0], dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(z, dz) * 1  # a non-leaf, as inside a network
        tangent_before = fwAD.unpack_dual(dual).tangent
        out = M.relu(dual, inplace=True)
        assert out is dual
        primal, tangent = fwAD.unpack_dual(dual)
    assert primal.tolist() == [0.0, 0.0, 2.0, 0.0, 3.0]
    assert tangent.tolist() == [0.0, 0.0, 7.0, 0.0, 9.0]  # σ'(0) = 0
    assert tangent.data_ptr() == tangent_before.data_ptr()


def test_fast_paths_not_taken_when_backward_is_differentiated(monkeypatch):
    """Forward over reverse (hessian; dual numbers through backward): the one-buffer fast paths stay off.

    They are in-place ops and integer bit views, which forward-mode AD cannot differentiate.
    """
    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.randint(0, 3, (4,))
    params = [torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]

    def loss(M, w, b):
        return M.cross_entropy(M.sigmoid(M.relu(M.linear(x, w, b))), t)

    expected = hessian(lambda w, b: loss(torch_ref, w, b), argnums=(0, 1))(*params)
    fast_paths = (
        (torchbp.equations.activations, "_select_by_bits"),
        (torchbp.equations.activations, "_times_a_one_minus_a"),
        (torchbp.equations.costs, "_softmax_minus_one_hot"),
    )
    for module, name in fast_paths:  # (patched where the equations look them up)
        monkeypatch.setattr(module, name, _raises(name))
    got = hessian(lambda w, b: loss(BF, w, b), argnums=(0, 1))(*params)
    for path, o, r in _leaves(got, expected):
        assert_close_labelled(o, r, f"hessian {path}")
    # dual numbers through a plain backward (no create_graph): the tangent of the gradient is H·v
    v = [torch.randn_like(p) for p in params]
    for M in (BF, torch_ref):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p.clone().requires_grad_(), d) for p, d in zip(params, v)]
            grads = torch.autograd.grad(loss(M, *duals), duals)
            hvp = [fwAD.unpack_dual(g).tangent for g in grads]
        if M is BF:
            got = hvp
    for i, (o, r) in enumerate(zip(got, hvp)):
        assert_close_labelled(o, r, f"forward over reverse, argument {i}")


def _raises(name):
    def fast_path(*args, **kwargs):
        raise AssertionError(f"{name} ran while the backward was being differentiated")

    return fast_path


# --------------------------------------------------------------------------------------------------
# Modules: a converted MLP with dual numbers; jacfwd and hessian of a model's loss
# --------------------------------------------------------------------------------------------------


def _model(inplace: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 3)
    ).double()


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu-inplace"])
def test_converted_mlp_dual_numbers_match_torch(inplace, grad_mode):
    """Dual numbers on the input and on every parameter, through torchbp.convert(model) and through torch's.

    Also under torch.no_grad(): forward mode alone, where nothing records a graph.
    """
    ref = _model(inplace)
    ours = torchbp.convert(copy.deepcopy(ref))
    assert type(ours[0]) is bnn.Linear and type(ours[1]) is bnn.ReLU and type(ours[3]) is bnn.Sigmoid
    x, dx = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    tangents = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in ref.named_parameters()}
    results = []
    for model in (ours, ref):
        with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
            along_x = fwAD.unpack_dual(model(fwAD.make_dual(x, dx))).tangent
            params = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in model.named_parameters()}
            out = fwAD.unpack_dual(functional_call(model, params, (fwAD.make_dual(x, dx),)))
        results.append((along_x, out.primal, out.tangent))
    for label, o, r in zip(("tangent along x", "value", "tangent along x and parameters"), *results):
        assert_close_labelled(o, r, label)


LOSSES = {
    "cross-entropy": (lambda: bnn.CrossEntropyLoss(label_smoothing=0.1), lambda: nn.CrossEntropyLoss(label_smoothing=0.1)),
    "cross-entropy-probs": (lambda: bnn.CrossEntropyLoss(weight=torch.rand(3, dtype=torch.float64) + 0.5),
                            lambda: nn.CrossEntropyLoss(weight=torch.rand(3, dtype=torch.float64) + 0.5)),
    "mse": (lambda: bnn.MSELoss(reduction="sum"), lambda: nn.MSELoss(reduction="sum")),
    "quadratic": (lambda: bnn.QuadraticCost(), lambda: quadratic_cost_formula),
    "bce": (lambda: lambda z, y: bnn.BCELoss()(bnn.Sigmoid()(z), y), lambda: lambda z, y: nn.BCELoss()(nn.Sigmoid()(z), y)),
    "bce-with-logits": (lambda: bnn.BCEWithLogitsLoss(pos_weight=torch.full((3,), 2.0, dtype=torch.float64)),
                        lambda: nn.BCEWithLogitsLoss(pos_weight=torch.full((3,), 2.0, dtype=torch.float64))),
}  # fmt: skip


def _loss_target(name: str) -> torch.Tensor:
    if name == "cross-entropy":
        return torch.randint(0, 3, (4,))
    if name in ("cross-entropy-probs", "bce", "bce-with-logits"):
        return torch.rand(4, 3, dtype=torch.float64).softmax(1)
    return torch.randn(4, 3, dtype=torch.float64)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_model_loss_jacfwd_and_hessian_match_torch(loss_name):
    """jacfwd and hessian of a model's loss w.r.t. its parameters (functional_call), converted vs torch's."""
    ref = _model(inplace=True)
    ours = torchbp.convert(copy.deepcopy(ref))
    make_ours, make_ref = LOSSES[loss_name]
    torch.manual_seed(1)
    ours_loss = make_ours()
    torch.manual_seed(1)
    ref_loss = make_ref()
    x, t = torch.randn(4, 5, dtype=torch.float64), _loss_target(loss_name)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    second = {n: params[n] for n in ("2.weight", "4.weight", "4.bias")}  # the Hessian's blocks: 99² in all is slow

    def loss_of(model, loss):
        def f(first, rest):
            return loss(functional_call(model, {**first, **rest}, (x,)), t)

        return f

    rest = {n: p for n, p in params.items() if n not in second}
    tol = {"rtol": 1e-10, "atol": 1e-10} if loss_name == "bce" else {}  # see _hessian_tolerance
    for transform, kw in ((jacfwd, {}), (hessian, tol)):
        got = transform(loss_of(ours, ours_loss))(second, rest)
        expected = transform(loss_of(ref, ref_loss))(second, rest)
        for path, o, r in _leaves_of_dicts(got, expected):
            assert_close_labelled(o, r, f"{transform.__name__} {path}", **kw)


def _leaves_of_dicts(ours, ref, path=()):
    if isinstance(ref, torch.Tensor):
        yield path, ours, ref
        return
    assert ours.keys() == ref.keys()
    for k in ref:
        yield from _leaves_of_dicts(ours[k], ref[k], (*path, k))

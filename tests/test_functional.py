"""Every Function of torchbp.functional against torch.nn.functional (quadratic_cost: its formula).

Cases in the BackPACK "settings" style: a list of (id, call, inputs); ``call(M, *inputs)`` runs the
function from namespace ``M`` (``torchbp.functional`` or ``helpers.torch_ref``), and one helper,
``assert_matches_torch``, checks the forward value and every gradient.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from cases import CASES, Case
from helpers import DEVICES, DTYPES, OpRecorder, assert_matches_torch, leaf_copy, torch_ref
from torch.autograd import gradcheck, gradgradcheck

import torchbp.functional as BF

pytestmark = pytest.mark.filterwarnings("ignore:Using a target size")

CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]
SMOOTH_PARAMS = [pytest.param(c, id=c.id) for c in CASES if c.smooth]
EXTREME_PARAMS = [pytest.param(c, id=c.id) for c in CASES if "extreme" in c.id]


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_every_function_is_covered():
    """Each public function of torchbp.functional has cases here."""
    covered = {name.split("-")[0] for name in (c.id for c in CASES)}
    short = {"linear", "sigmoid", "relu", "gelu", "gelu_tanh", "silu", "silu_inplace", "tanh", "layernorm", "rmsnorm"}
    short |= {"embedding", "conv1d", "conv2d", "mse", "quadratic", "ce", "bce", "bcel"}
    assert covered >= short
    public = {n for n in BF.__all__ if not n[0].isupper() and not n.endswith("_backward")}
    assert public == {
        "linear",
        "sigmoid",
        "relu",
        "gelu",
        "silu",
        "tanh",
        "layer_norm",
        "rms_norm",
        "embedding",
        "conv1d",
        "conv2d",
        "mse_loss",
        "quadratic_cost",
        "cross_entropy",
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_torch(case: Case, dtype, device):
    assert_matches_torch(partial(case.call, BF), partial(case.call, torch_ref), case.make(dtype, device),
                         equal_nan=case.equal_nan)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SMOOTH_PARAMS)
def test_gradcheck(case: Case, device):
    inputs = case.make(torch.float64, device)
    names = list(inputs)

    def fn(*args):
        return case.call(BF, **dict(zip(names, args)))

    args = tuple(inputs.values())
    assert any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    assert gradcheck(fn, args, eps=1e-6, atol=1e-5)
    assert gradgradcheck(fn, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", EXTREME_PARAMS)
def test_extreme_values_finite(case: Case, dtype, device):
    """Extreme logits (±1e4) and pre-activations (±1e3): finite loss and gradients (and torch's, above)."""
    inputs = {k: leaf_copy(v) for k, v in case.make(dtype, device).items()}
    out = case.call(BF, **inputs)
    assert torch.isfinite(out).all(), f"forward value not finite: {out}"
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    for g in torch.autograd.grad(out.sum(), wrt):
        assert torch.isfinite(g).all(), f"gradient not finite: {g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if not c.equal_nan])
def test_backward_is_hand_written(case: Case, device):
    """No ``aten.*_backward`` op (torch's own derivative) runs inside torchbp's backward."""
    inputs = case.make(torch.float64, device)
    wrt = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    out = case.call(BF, **inputs)
    with OpRecorder() as rec:
        torch.autograd.grad(out, wrt, torch.ones_like(out))
    assert not [op for op in rec.ops if op.endswith("_backward")], rec.ops


# --------------------------------------------------------------------------------------------------
# Targeted checks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_gradient_at_zero_is_zero(dtype, device):
    x = torch.tensor([-2.0, 0.0, -0.0, 3.0], dtype=dtype, device=device, requires_grad=True)
    (g_ours,) = torch.autograd.grad(BF.relu(x).sum(), x)
    (g_torch,) = torch.autograd.grad(torch.relu(x).sum(), x)
    assert g_torch.tolist() == [0.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(g_ours, g_torch, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_inplace_overwrites_and_returns_its_input(device):
    base = torch.randn(4, 3, device=device)
    for fn in (BF.relu, torch.nn.functional.relu):
        y = base.clone()
        out = fn(y, inplace=True)
        assert out is y
        torch.testing.assert_close(y, torch.relu(base))
    y = base.clone()
    out = BF.relu(y, inplace=False)
    torch.testing.assert_close(y, base)  # not in place by default


@pytest.mark.parametrize("device", DEVICES)
def test_relu_inplace_on_leaf_raises_like_torch(device):
    leaf = torch.randn(3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError) as ref:
        torch.nn.functional.relu(leaf, inplace=True)
    with pytest.raises(type(ref.value)):
        BF.relu(leaf, inplace=True)


REQUESTS = [(True, False, False), (False, True, False), (False, False, True), (True, True, False), (False, True, True),
            (True, True, True)]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 4), (4,)], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: "grad-" + "-".join(n for n, f in zip("xwb", r) if f))
def test_linear_gemms_only_for_requested_grads(shape, request_, device):
    """ctx.needs_input_grad: one GEMM for grad_input (BP2) if asked, one for grad_weight (BP4) if asked."""
    want_x, want_w, want_b = request_
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=want_x)
    w = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=want_w)
    b = torch.randn(5, dtype=torch.float64, device=device, requires_grad=want_b)
    out = BF.linear(x, w, b)
    wrt = [t for t in (x, w, b) if t.requires_grad]
    with OpRecorder() as rec:
        grads = torch.autograd.grad(out, wrt, torch.randn_like(out))
    assert len(rec.gemms) == want_x + want_w, f"GEMMs in backward: {rec.gemms} (all ops: {rec.ops})"
    expected = torch.autograd.grad(torch.nn.functional.linear(x, w, b), wrt, torch.randn_like(out))
    assert [g.shape for g in grads] == [g.shape for g in expected]


def _saved_bytes(fn, *args) -> tuple[int, list[torch.Tensor], torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(storages.values()), saved, out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name, ours, ref, needs",
    [
        ("sigmoid", BF.sigmoid, torch.sigmoid, (True,)),
        ("relu", BF.relu, torch.relu, (True,)),
        ("relu-inplace", lambda x: BF.relu(x * 1, inplace=True), lambda x: torch.relu_(x * 1), (True,)),
        ("linear-all", BF.linear, torch.nn.functional.linear, (True, True, True)),
        ("linear-input-only", BF.linear, torch.nn.functional.linear, (True, False, False)),
        ("linear-weight-only", BF.linear, torch.nn.functional.linear, (False, True, True)),
    ],
)
def test_saves_no_more_than_torch(name, ours, ref, needs, device):
    args = [torch.randn(32, 16, device=device), torch.randn(8, 16, device=device), torch.randn(8, device=device)]
    args = [a.requires_grad_(n) for a, n in zip(args, needs)]  # one argument per entry of `needs`
    ours_bytes, ours_saved, out = _saved_bytes(ours, *args)
    ref_bytes, _, _ = _saved_bytes(ref, *args)
    assert ours_bytes <= ref_bytes, f"{name}: saves {ours_bytes} bytes for backward, torch {ref_bytes}"
    if name == "sigmoid":  # keeps σ(z), its output, not z
        assert len(ours_saved) == 1 and ours_saved[0].data_ptr() == out.data_ptr()


# --------------------------------------------------------------------------------------------------
# The float64 tolerance catches a float32 leak
# --------------------------------------------------------------------------------------------------


class _CrossEntropyWithFloat32Smoothing(torch.autograd.Function):
    """cross_entropy with label smoothing whose δ^L builds q = (1 − ε) y + ε/C in float32: the old leak."""

    @staticmethod
    def forward(z, target, eps):
        return torch.nn.functional.cross_entropy(z, target, label_smoothing=eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, target, eps = inputs
        ctx.save_for_backward(z, target)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad):
        z, target = ctx.saved_tensors
        n_classes = z.shape[1]
        q = torch.nn.functional.one_hot(target, n_classes).float() * (1 - ctx.eps) + ctx.eps / n_classes  # float32
        return (z.softmax(1) - q.to(z.dtype)) * grad / z.shape[0], None, None


class _RoundGradToFloat32(torch.autograd.Function):
    """The identity, whose backward rounds the gradient to float32 and back."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.float().to(grad.dtype)


def test_float64_tolerance_catches_float32_leaks():
    """A float64 gradient with one float32 step on its path fails assert_matches_torch (1e-12 relative).

    The smoothing coefficients built in float32 put a ~1e-9 relative error into δ^L: inside assert_close's
    float64 defaults (rtol 1e-7), which is how the leak went unnoticed, but 1000x the float64 tolerance here.
    """
    inputs = {"input": torch.randn(6, 5, dtype=torch.float64, requires_grad=True), "target": torch.randint(0, 5, (6,))}
    leaky = lambda input, target: _CrossEntropyWithFloat32Smoothing.apply(input, target, 0.1)  # noqa: E731
    ref = partial(torch.nn.functional.cross_entropy, label_smoothing=0.1)
    assert_matches_torch(leaky, ref, inputs, rtol=1e-7, atol=1e-7)  # the old float64 tolerance lets it pass
    with pytest.raises(AssertionError, match="grad of input"):
        assert_matches_torch(leaky, ref, inputs)
    assert_matches_torch(partial(BF.cross_entropy, label_smoothing=0.1), ref, inputs)  # torchbp's: exact

    rounded = lambda input: torch.sigmoid(_RoundGradToFloat32.apply(input))  # noqa: E731
    x = {"input": torch.randn(4, 3, dtype=torch.float64, requires_grad=True)}
    with pytest.raises(AssertionError, match="grad of input"):
        assert_matches_torch(rounded, torch.sigmoid, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["relu", "sigmoid"])
def test_batched_grads_of_activations_match_torch(name, device):
    """torch.autograd.grad(..., is_grads_batched=True) (legacy vmap over the backward) and vectorized jacobians."""
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    ours, ref = getattr(BF, name), getattr(torch_ref, name)
    torch.testing.assert_close(
        torch.autograd.functional.jacobian(ours, x, vectorize=True),
        torch.autograd.functional.jacobian(ref, x, vectorize=True),
        rtol=1e-12,
        atol=1e-12,
    )
    basis = torch.randn(5, 3, 4, dtype=torch.float64, device=device)
    (g_ours,) = torch.autograd.grad(ours(x), x, basis, is_grads_batched=True)
    (g_ref,) = torch.autograd.grad(ref(x), x, basis, is_grads_batched=True)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)

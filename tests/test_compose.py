"""torchbp composes with the rest of PyTorch: torch.func, torch.compile, autocast, DDP; random shapes.

Every comparison is against torch.nn / torch.nn.functional run the ordinary (eager) way.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, assert_close_labelled, assert_matches_torch, quadratic_cost_formula, torch_ref
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import torchbp
import torchbp.functional as BF
import torchbp.nn as bnn

pytestmark = pytest.mark.filterwarnings("ignore:Using a target size")

# --------------------------------------------------------------------------------------------------
# A small MLP and each loss, in both libraries
# --------------------------------------------------------------------------------------------------

N_IN, N_OUT = 5, 3


def mlp(lib, act: str, device="cpu", dtype=torch.float32, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    Act = lib.Sigmoid if act == "sigmoid" else lib.ReLU
    return nn.Sequential(lib.Linear(N_IN, 6), Act(), lib.Linear(6, 6), Act(), lib.Linear(6, N_OUT)).to(device, dtype)


def loss_of(M, name: str, out, target):
    """The loss ``name`` from namespace M (torchbp.functional or helpers.torch_ref)."""
    if name == "mse":
        return M.mse_loss(out, target)
    if name == "quadratic":
        return M.quadratic_cost(out, target)
    if name in ("cross-entropy", "cross-entropy-probs"):
        return M.cross_entropy(out, target, label_smoothing=0.1)
    if name == "bce":
        return M.binary_cross_entropy(M.sigmoid(out), target)
    if name == "bce-with-logits":
        return M.binary_cross_entropy_with_logits(out, target, pos_weight=torch.full_like(out[..., :1], 2.0))
    raise ValueError(name)


LOSS_NAMES = ["mse", "quadratic", "cross-entropy", "cross-entropy-probs", "bce", "bce-with-logits"]


def make_target(name: str, shape, device="cpu", dtype=torch.float32):
    if name == "cross-entropy":
        return torch.randint(0, N_OUT, shape[:-1], device=device)
    if name == "cross-entropy-probs":
        return torch.rand(shape, device=device, dtype=dtype).softmax(-1)
    if name in ("bce", "bce-with-logits"):
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.randn(shape, device=device, dtype=dtype)


def named_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# torch.func
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unbatched", [False, True], ids=["batch-of-1", "unbatched"])
@pytest.mark.parametrize("act", ["sigmoid", "relu"])
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_vmap_grad_per_sample_gradients(loss_name, act, unbatched, device):
    """vmap(grad(f)) over samples equals torch.nn's gradients computed one sample at a time."""
    ours, ref = mlp(bnn, act, device, torch.float64), mlp(nn, act, device, torch.float64)
    n = 6
    x = torch.randn(n, N_IN, device=device, dtype=torch.float64)
    t = make_target(loss_name, (n, N_OUT), device, torch.float64)

    def per_sample_loss(M, model):
        def f(params, xi, ti):
            if not unbatched:
                xi, ti = xi.unsqueeze(0), ti.unsqueeze(0)
            return loss_of(M, loss_name, functional_call(model, params, (xi,)), ti)

        return f

    per_sample = vmap(grad(per_sample_loss(BF, ours)), in_dims=(None, 0, 0))(named_params(ours), x, t)
    ref_loss = per_sample_loss(torch_ref, ref)
    for i in range(n):
        params = {k: v.requires_grad_() for k, v in named_params(ref).items()}
        expected = torch.autograd.grad(ref_loss(params, x[i], t[i]), list(params.values()))
        for (name, g_ours), g_ref in zip(per_sample.items(), expected):
            assert_close_labelled(g_ours[i], g_ref, f"sample {i}, grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name, call, shapes",
    [
        ("linear", lambda M, x, w, b: M.linear(x, w, b), [(3, 4), (2, 4), (2,)]),
        ("linear-3d", lambda M, x, w, b: M.linear(x, w, b), [(2, 3, 4), (2, 4), (2,)]),
        ("linear-1d", lambda M, x, w: M.linear(x, w), [(4,), (2, 4)]),
        ("sigmoid", lambda M, x: M.sigmoid(x), [(3, 4)]),
        ("relu", lambda M, x: M.relu(x), [(3, 4)]),
        ("mse", lambda M, x, y: M.mse_loss(x, y), [(3, 4), (3, 4)]),
        ("cross-entropy-probs", lambda M, x, y: M.cross_entropy(x, y.softmax(1)), [(3, 4), (3, 4)]),
        ("bce-with-logits", lambda M, x, y: M.binary_cross_entropy_with_logits(x, y.sigmoid()), [(3, 4), (3, 4)]),
    ],
)
def test_jacrev_matches_torch(name, call, shapes, device):
    args = [torch.randn(s, dtype=torch.float64, device=device) for s in shapes]
    argnums = tuple(range(len(args)))
    ours = jacrev(lambda *a: call(BF, *a), argnums=argnums)(*args)
    ref = jacrev(lambda *a: call(torch_ref, *a), argnums=argnums)(*args)
    for i, (j_ours, j_ref) in enumerate(zip(ours, ref)):
        assert_close_labelled(j_ours, j_ref, f"{name}: jacobian w.r.t. argument {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_name", ["cross-entropy", "bce-with-logits", "quadratic"])
def test_second_derivatives_match_torch(loss_name, device):
    """jacrev(jacrev(loss)) w.r.t. the last layer's weight: the Hessian, through torchbp's backward twice."""
    ours, ref = mlp(bnn, "sigmoid", device, torch.float64), mlp(nn, "sigmoid", device, torch.float64)
    x = torch.randn(4, N_IN, device=device, dtype=torch.float64)
    t = make_target(loss_name, (4, N_OUT), device, torch.float64)

    def f(M, model):
        params = named_params(model)

        def loss(w):
            return loss_of(M, loss_name, functional_call(model, {**params, "4.weight": w}, (x,)), t)

        return jacrev(jacrev(loss))(params["4.weight"])

    assert_close_labelled(f(BF, ours), f(torch_ref, ref), "Hessian w.r.t. 4.weight")


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


def _train_step_grads(model, loss_fn, x, t, params_of=None):
    """One forward and backward; the loss and the gradients of ``params_of`` (default: ``model``)."""
    params_of = model if params_of is None else params_of
    params_of.zero_grad()
    loss = loss_fn(model(x), t)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params_of.named_parameters()}


def _assert_same_step(got, expected, **tol):
    loss, grads = got
    ref_loss, ref_grads = expected
    assert_close_labelled(loss, ref_loss, "loss", **tol)
    for name in ref_grads:
        assert_close_labelled(grads[name], ref_grads[name], f"grad of {name}", **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "loss_name, act",
    [(name, "sigmoid" if i % 2 else "relu") for i, name in enumerate(LOSS_NAMES)],
)
def test_compile_fullgraph_matches_eager_torch(loss_name, act, device):
    """torch.compile(fullgraph=True) (aot_eager backend) gives torch.nn's eager loss and gradients."""
    torch._dynamo.reset()
    ours, ref = mlp(bnn, act, device), mlp(nn, act, device)
    x, t = torch.randn(8, N_IN, device=device), make_target(loss_name, (8, N_OUT), device)
    compiled = torch.compile(
        lambda out, target: loss_of(BF, loss_name, out, target), fullgraph=True, backend="aot_eager"
    )
    compiled_model = torch.compile(ours, fullgraph=True, backend="aot_eager")
    expected = _train_step_grads(ref, lambda o, y: loss_of(torch_ref, loss_name, o, y), x, t)
    for _ in range(2):  # the second call runs the cached graph
        _assert_same_step(_train_step_grads(compiled_model, compiled, x, t, params_of=ours), expected)


def test_compile_inductor_matches_eager_torch():
    """The default backend (inductor), one case: a converted model and its loss, compiled whole."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(N_IN, 6), nn.ReLU(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, N_OUT))
    ours = torchbp.convert(copy.deepcopy(ref))
    x, t = torch.randn(8, N_IN), torch.randint(0, N_OUT, (8,))

    def step(model, loss_fn):
        return loss_fn(model(x), t)

    compiled = torch.compile(step, fullgraph=True)
    ours_loss = compiled(ours, bnn.CrossEntropyLoss())
    ours_loss.backward()
    ref_loss = step(ref, nn.CrossEntropyLoss())
    ref_loss.backward()
    assert_close_labelled(ours_loss, ref_loss, "loss")
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close_labelled(p.grad, q.grad, f"grad of {name}")


# --------------------------------------------------------------------------------------------------
# Automatic mixed precision
# --------------------------------------------------------------------------------------------------

BF16 = {"rtol": 2e-2, "atol": 2e-2}


@pytest.mark.parametrize("act", ["sigmoid", "relu"])
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_autocast_bfloat16_matches_torch(loss_name, act):
    """Under torch.autocast('cpu', bfloat16) a training step gives torch.nn's dtypes and gradients."""
    ours, ref = mlp(bnn, act), mlp(nn, act)
    x, t = torch.randn(16, N_IN), make_target(loss_name, (16, N_OUT))
    results = []
    for model, M in ((ours, BF), (ref, torch_ref)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = loss_of(M, loss_name, out, t)
        loss.backward()
        results.append((out.dtype, loss.dtype, loss.detach().float(), {n: p.grad for n, p in model.named_parameters()}))
    (out_dtype, loss_dtype, loss, grads), (ref_out_dtype, ref_loss_dtype, ref_loss, ref_grads) = results
    assert (out_dtype, loss_dtype) == (ref_out_dtype, ref_loss_dtype)
    assert_close_labelled(loss, ref_loss, "loss", **BF16)
    for name, g in ref_grads.items():
        assert grads[name].dtype == g.dtype == torch.float32
        scale = max(1.0, g.abs().max().item())
        assert_close_labelled(grads[name], g, f"grad of {name}", rtol=BF16["rtol"], atol=BF16["atol"] * scale)


# --------------------------------------------------------------------------------------------------
# DistributedDataParallel
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this build")
    store = tmp_path_factory.mktemp("ddp") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("act", ["sigmoid", "relu"])
def test_ddp_single_process_matches_torch(process_group, act):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = mlp(nn, act)
    ours = torchbp.convert(copy.deepcopy(ref))
    ddp_ours, ddp_ref = DDP(ours), DDP(ref)
    x, t = torch.randn(8, N_IN), torch.randint(0, N_OUT, (8,))
    for _ in range(2):
        got = _train_step_grads(ddp_ours, bnn.CrossEntropyLoss(), x, t, params_of=ours)
        expected = _train_step_grads(ddp_ref, nn.CrossEntropyLoss(), x, t, params_of=ref)
        _assert_same_step(got, expected)
    assert type(ddp_ours.module[0]) is bnn.Linear


# --------------------------------------------------------------------------------------------------
# Property-based: random shapes through linear, an activation and a loss
# --------------------------------------------------------------------------------------------------


@st.composite
def network_case(draw):
    unbatched = draw(st.booleans()) and draw(st.booleans())  # about one case in four
    batch = None if unbatched else draw(st.integers(0, 5))
    extra = [] if unbatched else draw(st.lists(st.integers(1, 3), max_size=2))
    return {
        "batch": batch,
        "extra": extra,
        "in_features": draw(st.integers(1, 7)),
        "out_features": draw(st.integers(1, 7)),
        "bias": draw(st.booleans()),
        "act": draw(st.sampled_from(["sigmoid", "relu", "none"])),
        "loss": draw(st.sampled_from(["mse", "quadratic", "ce", "ce-probs", "bce", "bce-with-logits"])),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.2])),
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _network(M, p, x, weight, bias, target, pos_weight):
    z = M.linear(x, weight, bias)
    a = {"sigmoid": M.sigmoid, "relu": M.relu, "none": lambda v: v}[p["act"]](z)
    r, loss = p["reduction"], p["loss"]
    if loss == "mse":
        return M.mse_loss(a, target, reduction=r)
    if loss == "quadratic":
        return M.quadratic_cost(a, target, reduction=r)
    if loss in ("ce", "ce-probs"):
        logits = a.movedim(-1, 1) if a.dim() > 2 else a  # classes at dim 1: (N, C, d1, ...)
        return M.cross_entropy(logits, target, reduction=r, label_smoothing=p["label_smoothing"])
    if loss == "bce":
        return M.binary_cross_entropy(M.sigmoid(a), target, reduction=r)
    return M.binary_cross_entropy_with_logits(a, target, reduction=r, pos_weight=pos_weight)


@given(network_case())
def test_random_shapes_match_torch(p):
    gen = torch.Generator().manual_seed(p["seed"])
    dt = p["dtype"]

    def randn(*shape, grad=True):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dt).requires_grad_(grad)

    lead = [] if p["batch"] is None else [p["batch"], *p["extra"]]
    n_in, n_out = p["in_features"], p["out_features"]
    out_shape = [*lead, n_out]
    if p["loss"] == "ce":
        class_free = out_shape[:-1]
        target = torch.randint(0, n_out, class_free, generator=gen)
        if target.numel() > 1:
            target.view(-1)[0] = -100  # an ignored sample
    elif p["loss"] == "ce-probs":
        probs = torch.rand(out_shape, generator=gen, dtype=torch.float64).softmax(-1).to(dt)
        target = (probs.movedim(-1, 1) if probs.dim() > 2 else probs).requires_grad_()
    elif p["loss"] in ("bce", "bce-with-logits"):
        target = torch.rand(out_shape, generator=gen, dtype=torch.float64).to(dt).requires_grad_()
    else:
        target = randn(*out_shape)
    inputs = {
        "x": randn(*lead, n_in),
        "weight": randn(n_out, n_in),
        "bias": randn(n_out) if p["bias"] else None,
        "target": target,
        "pos_weight": (torch.rand(n_out, generator=gen, dtype=torch.float64) + 0.5).to(dt),
    }
    assert_matches_torch(
        lambda **kw: _network(BF, p, **kw), lambda **kw: _network(torch_ref, p, **kw), inputs, equal_nan=True
    )


@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_quadratic_cost_matches_formula(shape, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "input": torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(),
        "target": torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(),
    }
    assert_matches_torch(
        lambda input, target: BF.quadratic_cost(input, target, reduction),
        lambda input, target: quadratic_cost_formula(input, target, reduction),
        inputs,
        equal_nan=True,
    )


@given(
    lead=st.lists(st.integers(0, 3), max_size=3),
    features=st.integers(1, 7),
    scale=st.sampled_from([1.0, 30.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_activations_match_torch(lead, features, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn([*lead, features], generator=gen, dtype=torch.float64) * scale).requires_grad_()
    assert_matches_torch(BF.sigmoid, torch.sigmoid, {"input": x})
    assert_matches_torch(BF.relu, F.relu, {"input": x})

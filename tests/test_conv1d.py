"""GPT-2's Conv1D (transformers.pytorch_utils.Conv1D) converted by torchbp.convert, against transformers' own.

Every reference is transformers' Conv1D or GPT-2 run by PyTorch's autograd (an unconverted deep copy), or δ
captured from it by tensor hooks (``Oracle``); never torchbp itself. Tests that need transformers skip with
the reason where it is missing.
"""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, DTYPES, NEEDS_CUDA, assert_close_labelled, assert_matches_torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call

import torchbp
from torchbp.functional import _conv1d

REL = 1e-12


@pytest.fixture(scope="module")
def Conv1D():
    return pytest.importorskip("transformers.pytorch_utils", reason="transformers is not installed").Conv1D


def converted(module: nn.Module) -> nn.Module:
    """A converted deep copy (the original stays torch's)."""
    return torchbp.convert(copy.deepcopy(module))


# -- Conv1D alone ---------------------------------------------------------------------------------------

# (nf, nx, input shape, id): 2-D, 3-D, 1-D and 4-D inputs, odd sizes, an empty batch.
CASES = [
    pytest.param(5, 3, (7, 3), id="2d"),
    pytest.param(6, 4, (2, 5, 4), id="3d"),
    pytest.param(7, 11, (3, 13, 11), id="3d-odd"),
    pytest.param(2, 7, (7,), id="1d"),
    pytest.param(3, 1, (2, 3, 4, 1), id="4d-nx1"),
    pytest.param(4, 2, (0, 2), id="empty"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nf, nx, shape", CASES)
def test_forward_and_every_gradient_equal_transformers(Conv1D, nf, nx, shape, dtype, device):
    """Forward value, then ∂C/∂input, ∂C/∂W and ∂C/∂b under a random upstream gradient (assert_matches_torch)."""
    ref = Conv1D(nf, nx).to(device=device, dtype=dtype)
    with torch.no_grad():
        ref.bias.normal_()  # (transformers initialises it to zero)
    ours = converted(ref)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    if x.numel():
        assert ours(x).grad_fn.name() == "Conv1DFunctionBackward"  # (torchbp's backward runs, not autograd's)

    def call(module):
        return lambda input, weight, bias: functional_call(module, {"weight": weight, "bias": bias}, (input,))

    params = {"weight": ref.weight.detach().requires_grad_(), "bias": ref.bias.detach().requires_grad_()}
    assert_matches_torch(call(ours), call(ref), {"input": x, **params})
    if dtype == torch.float64:  # the tight bound, stated here: rel 1e-12
        assert_matches_torch(call(ours), call(ref), {"input": x, **params}, rtol=REL, atol=0)


def test_forward_is_transformers_to_the_bit(Conv1D):
    ref = Conv1D(9, 5)
    x = torch.randn(3, 4, 5)
    assert torch.equal(converted(ref)(x), ref(x))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_equals_transformers(Conv1D, device):
    """Under torch.autocast transformers' torch.addmm runs in the autocast dtype; so does ours: the same bits."""
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    ref = Conv1D(6, 4).to(device)
    ours = converted(ref)

    def call(module):  # forward under autocast, backward outside it (as torch.autocast's documentation asks)
        def forward(input, weight, bias):
            with torch.autocast(device, dtype=dtype):
                return functional_call(module, {"weight": weight, "bias": bias}, (input,))

        return forward

    x = torch.randn(3, 5, 4, device=device, requires_grad=True)
    inputs = {"input": x, "weight": ref.weight, "bias": ref.bias}
    assert call(ours)(**inputs).dtype == dtype
    assert_matches_torch(call(ours), call(ref), inputs, rtol=0, atol=0)


def test_gradcheck_and_gradgradcheck_float64():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_conv1d, (x, w, b), check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(_conv1d, (x, w, b))


def test_backward_tags_and_layout():
    """BP4 in W's (in, out) layout: ∂C/∂W = Σ_n a_n δ_n^T, checked against the outer products written out."""
    from torchbp.equations import conv1d_backward

    a, delta = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    grad_input, grad_weight, grad_bias = conv1d_backward(delta, a, w)
    outer = sum(torch.outer(a[n], delta[n]) for n in range(6))
    assert grad_weight.shape == (3, 4)
    torch.testing.assert_close(grad_weight, outer, rtol=REL, atol=0)
    torch.testing.assert_close(grad_input, torch.stack([w @ delta[n] for n in range(6)]), rtol=REL, atol=0)
    torch.testing.assert_close(grad_bias, delta.sum(0), rtol=REL, atol=0)


def test_state_dict_isinstance_and_repr(Conv1D):
    ref = Conv1D(6, 4)
    ours = converted(ref)
    assert isinstance(ours, Conv1D) and isinstance(ours, torchbp.nn.Conv1D) and type(ours) is not Conv1D
    assert repr(ours) == repr(ref) == "Conv1D(nf=6, nx=4)"
    assert (ours.in_features, ours.out_features, ours.weight.shape) == (4, 6, (4, 6))
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref) == ["weight", "bias"]
    assert all(torch.equal(sd_ours[k], sd_ref[k]) for k in sd_ref)
    plain, fresh = Conv1D(6, 4), converted(Conv1D(6, 4))
    plain.load_state_dict(sd_ours)  # both ways
    fresh.load_state_dict(sd_ref)
    x = torch.randn(2, 4)
    assert torch.equal(plain(x), ref(x)) and torch.equal(fresh(x), ref(x))


def test_converted_model_saves_and_loads_whole(Conv1D):
    """torch.save of a whole converted model: the class is found again by its name, torchbp.nn.Conv1D."""
    model = converted(nn.Sequential(Conv1D(3, 2)))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded[0]) is torchbp.nn.Conv1D
    x = torch.randn(4, 2)
    assert torch.equal(loaded(x), model(x))


def test_only_the_exact_class_is_converted(Conv1D):
    class Mine(Conv1D):
        pass

    model = nn.Sequential(Mine(3, 2), Conv1D(3, 3))
    torchbp.convert(model)
    assert type(model[0]) is Mine and type(model[1]) is torchbp.nn.Conv1D
    torchbp.convert(model)  # converting twice changes nothing
    assert type(model[1]) is torchbp.nn.Conv1D


def test_wrong_input_says_expected_and_received(Conv1D):
    ours = converted(Conv1D(6, 4))
    with pytest.raises(RuntimeError):  # transformers' own (torch.addmm's) error type
        Conv1D(6, 4)(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"Conv1D expected input with last dimension 4 \(nx\), got shape \(2, 3\)"):
        ours(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"expected weight of dtype torch\.float32 like input, got torch\.float64"):
        functional_call(ours, {"weight": ours.weight.double()}, (torch.randn(2, 4),))


def test_torch_func_grad_vmap_and_jvp(Conv1D):
    ref = Conv1D(5, 3).double()
    with torch.no_grad():
        ref.bias.normal_()
    ours = converted(ref)
    x = torch.randn(4, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(module):
        return lambda p, x: functional_call(module, p, (x,)).tanh().sum()

    for name, g in torch.func.grad(loss(ours))(params, x).items():  # grad
        assert_close_labelled(g, torch.func.grad(loss(ref))(params, x)[name], f"grad of {name}", rtol=REL, atol=0)
    per_sample = torch.func.vmap(torch.func.grad(loss(ours)), in_dims=(None, 0))  # vmap(grad): per-sample gradients
    expected = torch.func.vmap(torch.func.grad(loss(ref)), in_dims=(None, 0))(params, x)
    for name, g in per_sample(params, x).items():
        assert_close_labelled(g, expected[name], f"per-sample grad of {name}", rtol=REL, atol=0)
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    _, dz = torch.func.jvp(lambda p: functional_call(ours, p, (x,)), (params,), (tangent,))  # forward mode
    _, dz_ref = torch.func.jvp(lambda p: functional_call(ref, p, (x,)), (params,), (tangent,))
    assert_close_labelled(dz, dz_ref, "jvp", rtol=REL, atol=0)


def test_import_and_convert_never_import_transformers_and_conv1d_says_why_without_it():
    """In a fresh interpreter: import torchbp, convert and monitor a torch model, then torchbp.nn.Conv1D with
    transformers made unimportable (as if not installed)."""
    code = (
        "import sys, torch, torchbp\n"
        "model = torchbp.convert(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)))\n"
        "with torchbp.DeltaMonitor(model):\n"
        "    model(torch.randn(4, 2)).sum().backward()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
        "sys.modules['transformers'] = None  # (importing it now raises ImportError)\n"
        "print(hasattr(torchbp.nn, 'Conv1D'))\n"
        "try:\n"
        "    torchbp.nn.Conv1D\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[:2] == ["[]", "False"], proc
    assert "needs transformers" in lines[2] and "pip install transformers" in lines[2], proc


# -- GPT-2 --------------------------------------------------------------------------------------------------

VOCAB = 64
CONV1D_NAMES = [
    f"transformer.h.{i}.{part}" for i in range(2) for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]
MLP_CONSUMERS = {f"transformer.h.{i}.mlp.c_fc": f"transformer.h.{i}.mlp.c_proj" for i in range(2)}  # through GELU


@pytest.fixture(scope="module")
def gpt2():
    """A 2-block GPT-2 from its config (no download), float64, in eval mode (no dropout)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    model.loss_type = "ForCausalLM"  # (else transformers logs a warning that torch.compile(fullgraph=True) can't trace)
    return model


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in logits' dtype (transformers' own loss casts the logits to float32)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


class Oracle:
    """δ^l = ∂C/∂z^l of each Conv1D and Linear of the original model, from tensor hooks on their outputs."""

    def __init__(self, model: nn.Module, Conv1D) -> None:
        self.delta: dict[str, torch.Tensor] = {}
        self.input: dict[str, torch.Tensor] = {}
        self.modules = {n: m for n, m in model.named_modules() if type(m) in (Conv1D, nn.Linear)}
        for name, m in self.modules.items():
            m.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, z):
            self.input[name] = inputs[0].detach().clone()
            z.register_hook(lambda g: self.delta.__setitem__(name, g.detach().clone()))

        return hook


def assert_same_run(ours, ref, ids, label):
    """Logits, transformers' loss, a float64 loss and every parameter's gradient: ours against the original's."""
    out, out_ref = ours(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert_close_labelled(out.logits, out_ref.logits, f"{label}: logits", rtol=REL, atol=0)
    assert_close_labelled(out.loss, out_ref.loss, f"{label}: transformers' loss")
    loss, loss_ref = causal_lm_loss(out.logits, ids), causal_lm_loss(out_ref.logits, ids)
    assert_close_labelled(loss, loss_ref, f"{label}: float64 loss", rtol=REL, atol=0)
    loss.backward()
    loss_ref.backward()
    grads = dict(ref.named_parameters())
    for name, p in getattr(ours, "_orig_mod", ours).named_parameters():  # (a compiled model: its module)
        assert_close_labelled(p.grad, grads[name].grad, f"{label}: grad of {name}", rtol=REL, atol=REL)


@pytest.mark.parametrize("device", DEVICES)
def test_converted_gpt2_gives_the_same_logits_loss_and_gradients(gpt2, Conv1D, device):
    ref = copy.deepcopy(gpt2).to(device)
    ours = converted(ref)
    kinds = {n: type(m) for n, m in ours.named_modules() if isinstance(m, (Conv1D, nn.Linear))}
    assert kinds == {**dict.fromkeys(CONV1D_NAMES, torchbp.nn.Conv1D), "lm_head": torchbp.nn.Linear}  # 9 layers
    ids = torch.randint(0, VOCAB, (3, 7), device=device)
    with torch.no_grad():  # the same ops on the same views: the same bits
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert_same_run(ours, ref, ids, "eager")


@pytest.mark.parametrize(
    "device, dtype",
    [
        pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
        pytest.param("cuda", torch.bfloat16, marks=NEEDS_CUDA, id="cuda-bfloat16"),
        pytest.param("cuda", torch.float16, marks=NEEDS_CUDA, id="cuda-float16"),
    ],
)
def test_converted_gpt2_under_autocast_gives_the_same_logits_loss_and_gradients(gpt2, device, dtype):
    """A float32 GPT-2, forward under torch.autocast, backward outside it: ours and the original agree, every
    layer's matrix products in the autocast dtype on both sides (on CPU the same bits)."""
    ref = copy.deepcopy(gpt2).float().to(device)
    ours = converted(ref)
    ids = torch.randint(0, VOCAB, (3, 7), device=device)
    outs = []
    for model in (ours, ref):
        with torch.autocast(device, dtype=dtype):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    exact = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 2e-2, "atol": 1e-3}  # (CUDA: atomics, kernels)
    assert outs[0].logits.dtype == outs[1].logits.dtype == dtype
    assert_close_labelled(outs[0].logits, outs[1].logits, "autocast: logits", **exact)
    assert_close_labelled(outs[0].loss, outs[1].loss, "autocast: loss", **exact)
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert_close_labelled(p.grad, grads[name].grad, f"autocast: grad of {name}", **exact)


def assert_monitor_matches(stats, oracle: Oracle, ours) -> None:
    """Every recorded statistic of every layer against δ from the oracle (the original model's hooks)."""
    assert set(stats) == {*CONV1D_NAMES, "lm_head"}
    assert ours.lm_head.weight is ours.transformer.wte.weight  # tied: its .grad also holds the embedding's
    for name, d in oracle.delta.items():
        per_sample = d.reshape(d.shape[0], -1).norm(dim=1)  # ‖δ_n‖ per sequence n
        if name == "lm_head":  # this layer's own ∂C/∂W, Σ_n δ_n a_n^T, from the hooked a and δ
            weight_grad = d.flatten(0, -2).mT @ oracle.input[name].flatten(0, -2)
        else:
            weight_grad = oracle.modules[name].weight.grad
        expected = {
            "delta_norm": d.flatten(0, -2).sum(0).norm().item(),  # ‖Σ_n δ_n‖ = ‖∂C/∂b‖ (BP3)
            "delta_sample_norm_mean": per_sample.mean().item(),
            "delta_sample_norm_max": per_sample.max().item(),
            "weight_grad_norm": weight_grad.norm().item(),  # ‖∂C/∂W‖ (BP4), the same in either layout
        }
        if name in MLP_CONSUMERS:  # ‖δ^{c_fc}‖ / ‖δ^{c_proj}‖ (Frobenius norms over the batch)
            expected["delta_gain"] = d.norm().item() / oracle.delta[MLP_CONSUMERS[name]].norm().item()
        else:
            assert stats[name]["delta_gain"] is None, f"{name}: no monitored layer consumes it element-wise"
        for stat, value in expected.items():
            ours_value = stats[name][stat]
            assert math.isclose(ours_value, value, rel_tol=REL), f"{name} {stat}: {ours_value}, torch {value}"


def test_compiled_converted_gpt2_gives_the_same_results_and_statistics(gpt2, Conv1D):
    """torch.compile(fullgraph=True) (aot_eager backend: Dynamo and AOTAutograd trace the Functions and their
    backward) of the converted GPT-2, against the original run eagerly; then with a DeltaMonitor attached (its
    first step runs eagerly to read the data flow, the second compiled), every statistic against the oracle."""
    torch.compiler.reset()  # (the frame count below: no dynamic shapes learned from another test's GPT-2)
    ref = copy.deepcopy(gpt2)
    ours = converted(ref)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours, fullgraph=True, backend=counter)
    ids = torch.randint(0, VOCAB, (2, 6))
    assert_same_run(compiled, ref, ids, "compiled")
    ref.zero_grad()
    oracle = Oracle(ref, Conv1D)
    causal_lm_loss(ref(input_ids=ids).logits, ids).backward()
    with torchbp.DeltaMonitor(ours) as monitor:
        for _ in range(2):
            causal_lm_loss(compiled(input_ids=ids).logits, ids).backward()
        assert counter.frame_count == 2  # (the monitored step ran compiled: one recompile, for the slots)
        assert_monitor_matches(monitor.latest(), oracle, ours)


@pytest.mark.parametrize("device", DEVICES)
def test_monitor_records_every_conv1d_by_name_and_the_mlp_gain(gpt2, Conv1D, device):
    ref = copy.deepcopy(gpt2).to(device)
    ours = converted(ref)
    oracle = Oracle(ref, Conv1D)
    ids = torch.randint(0, VOCAB, (3, 7), device=device)
    causal_lm_loss(ref(input_ids=ids).logits, ids).backward()
    with torchbp.DeltaMonitor(ours) as monitor:
        causal_lm_loss(ours(input_ids=ids).logits, ids).backward()
        assert_monitor_matches(monitor.latest(), oracle, ours)


def test_monitor_per_sample_weight_gradient_norms(Conv1D):
    """per_sample_norms=True on a Conv1D: ‖∂C_n/∂W‖ per sample against one backward per sample."""
    ref = Conv1D(4, 3).double()
    ours = converted(ref)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torchbp.DeltaMonitor(ours, per_sample_norms=True) as monitor:
        ours(x).square().sum().backward()
        norms = monitor.per_sample_grad_norms()["model"]
    for n in range(5):
        ref.zero_grad()
        ref(x[n : n + 1]).square().sum().backward()
        assert math.isclose(norms["weight"][n].item(), ref.weight.grad.norm().item(), rel_tol=REL)
        assert math.isclose(norms["bias"][n].item(), ref.bias.grad.norm().item(), rel_tol=REL)

"""torchbp.nn modules against their torch.nn counterparts, and torchbp.convert."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from helpers import DEVICES, DTYPES, REDUCTIONS, assert_close_labelled, assert_matches_torch, quadratic_cost_formula
from torch import nn
from torch.func import functional_call

import torchbp
import torchbp.nn as bnn

PAIRS = [
    (bnn.Linear, nn.Linear),
    (bnn.Sigmoid, nn.Sigmoid),
    (bnn.ReLU, nn.ReLU),
    (bnn.MSELoss, nn.MSELoss),
    (bnn.CrossEntropyLoss, nn.CrossEntropyLoss),
    (bnn.BCELoss, nn.BCELoss),
    (bnn.BCEWithLogitsLoss, nn.BCEWithLogitsLoss),
    (bnn.GELU, nn.GELU),
    (bnn.SiLU, nn.SiLU),
    (bnn.Tanh, nn.Tanh),
    (bnn.LayerNorm, nn.LayerNorm),
    (bnn.RMSNorm, nn.RMSNorm),
    (bnn.Embedding, nn.Embedding),
    (bnn.Conv1d, nn.Conv1d),
    (bnn.Conv2d, nn.Conv2d),
]
PAIR_PARAMS = [pytest.param(ours, ref, id=ref.__name__) for ours, ref in PAIRS]


def _ctor(name: str, device="cpu", dtype=torch.float64):
    """Constructor arguments, per class name and configuration id."""
    w = torch.rand(5, dtype=dtype, device=device) + 0.2
    return {
        "Linear": ((4, 3), {"device": device, "dtype": dtype}),
        "Linear-no-bias": ((4, 3), {"bias": False, "device": device, "dtype": dtype}),
        "Sigmoid": ((), {}),
        "ReLU": ((), {}),
        "ReLU-inplace": ((), {"inplace": True}),
        "MSELoss": ((), {}),
        "MSELoss-sum": ((), {"reduction": "sum"}),
        "CrossEntropyLoss": ((), {}),
        "CrossEntropyLoss-all": ((), {"weight": w, "ignore_index": 1, "reduction": "sum", "label_smoothing": 0.1}),
        "BCELoss": ((), {}),
        "BCELoss-weight": ((), {"weight": w, "reduction": "none"}),
        "BCEWithLogitsLoss": ((), {}),
        "BCEWithLogitsLoss-all": ((), {"weight": w, "pos_weight": 2 * w, "reduction": "sum"}),
        "Conv1d": ((3, 4, 3), {"stride": 2, "padding": 1, "device": device, "dtype": dtype}),
        "Conv1d-reflect": ((3, 4, 3), {"padding": 2, "padding_mode": "reflect", "device": device, "dtype": dtype}),
        "Conv2d": ((4, 6, (3, 2)), {"groups": 2, "dilation": (2, 1), "device": device, "dtype": dtype}),
        "Conv2d-same-circular": (
            (3, 2, 4),
            {"padding": "same", "padding_mode": "circular", "bias": False, "device": device, "dtype": dtype},
        ),
        "Conv2d-same-replicate": (
            (3, 2, 3),
            {"padding": "same", "padding_mode": "replicate", "device": device, "dtype": dtype},
        ),  # fmt: skip
        "GELU": ((), {}),
        "GELU-tanh": ((), {"approximate": "tanh"}),
        "SiLU": ((), {}),
        "SiLU-inplace": ((), {"inplace": True}),
        "Tanh": ((), {}),
        "LayerNorm": ((5,), {"device": device, "dtype": dtype}),
        "LayerNorm-2-dims": (((3, 5),), {"eps": 1e-3, "device": device, "dtype": dtype}),
        "LayerNorm-no-bias": ((5,), {"bias": False, "device": device, "dtype": dtype}),
        "LayerNorm-no-affine": ((5,), {"elementwise_affine": False, "device": device, "dtype": dtype}),
        "RMSNorm": ((5,), {"device": device, "dtype": dtype}),
        "RMSNorm-2-dims": (([3, 5],), {"eps": 1e-3, "device": device, "dtype": dtype}),
        "RMSNorm-no-affine": ((5,), {"elementwise_affine": False, "device": device, "dtype": dtype}),
        "Embedding": ((7, 5), {"device": device, "dtype": dtype}),
        "Embedding-padding": ((7, 5), {"padding_idx": 1, "device": device, "dtype": dtype}),
        "Embedding-all": (
            (7, 5),
            {
                "padding_idx": -2,
                "max_norm": 1.0,
                "norm_type": 1.5,
                "scale_grad_by_freq": True,
                "device": device,
                "dtype": dtype,
            },
        ),  # fmt: skip
    }[name]


CONFIGS = [
    ("Linear", bnn.Linear, nn.Linear),
    ("Linear-no-bias", bnn.Linear, nn.Linear),
    ("Sigmoid", bnn.Sigmoid, nn.Sigmoid),
    ("ReLU", bnn.ReLU, nn.ReLU),
    ("ReLU-inplace", bnn.ReLU, nn.ReLU),
    ("MSELoss", bnn.MSELoss, nn.MSELoss),
    ("MSELoss-sum", bnn.MSELoss, nn.MSELoss),
    ("CrossEntropyLoss", bnn.CrossEntropyLoss, nn.CrossEntropyLoss),
    ("CrossEntropyLoss-all", bnn.CrossEntropyLoss, nn.CrossEntropyLoss),
    ("BCELoss", bnn.BCELoss, nn.BCELoss),
    ("BCELoss-weight", bnn.BCELoss, nn.BCELoss),
    ("BCEWithLogitsLoss", bnn.BCEWithLogitsLoss, nn.BCEWithLogitsLoss),
    ("BCEWithLogitsLoss-all", bnn.BCEWithLogitsLoss, nn.BCEWithLogitsLoss),
    ("Conv1d", bnn.Conv1d, nn.Conv1d),
    ("Conv1d-reflect", bnn.Conv1d, nn.Conv1d),
    ("Conv2d", bnn.Conv2d, nn.Conv2d),
    ("Conv2d-same-circular", bnn.Conv2d, nn.Conv2d),
    ("Conv2d-same-replicate", bnn.Conv2d, nn.Conv2d),
    ("GELU", bnn.GELU, nn.GELU),
    ("GELU-tanh", bnn.GELU, nn.GELU),
    ("SiLU", bnn.SiLU, nn.SiLU),
    ("SiLU-inplace", bnn.SiLU, nn.SiLU),
    ("Tanh", bnn.Tanh, nn.Tanh),
    ("LayerNorm", bnn.LayerNorm, nn.LayerNorm),
    ("LayerNorm-2-dims", bnn.LayerNorm, nn.LayerNorm),
    ("LayerNorm-no-bias", bnn.LayerNorm, nn.LayerNorm),
    ("LayerNorm-no-affine", bnn.LayerNorm, nn.LayerNorm),
    ("RMSNorm", bnn.RMSNorm, nn.RMSNorm),
    ("RMSNorm-2-dims", bnn.RMSNorm, nn.RMSNorm),
    ("RMSNorm-no-affine", bnn.RMSNorm, nn.RMSNorm),
    ("Embedding", bnn.Embedding, nn.Embedding),
    ("Embedding-padding", bnn.Embedding, nn.Embedding),
    ("Embedding-all", bnn.Embedding, nn.Embedding),
]
CONFIG_PARAMS = [pytest.param(name, ours, ref, id=name) for name, ours, ref in CONFIGS]


def _build_pair(name, ours_cls, ref_cls, device="cpu", dtype=torch.float64, seed=0):
    args, kwargs = _ctor(name, device, dtype)
    torch.manual_seed(seed)
    ours = ours_cls(*args, **kwargs)
    torch.manual_seed(seed)
    ref = ref_cls(*args, **kwargs)
    return ours, ref


# --------------------------------------------------------------------------------------------------
# Drop-in: constructor, parameters, state_dict, init, repr
# --------------------------------------------------------------------------------------------------


def test_public_names():
    assert {cls.__name__ for cls, _ in PAIRS} | {"QuadraticCost"} <= set(torchbp.__all__)
    for ours, _ in PAIRS:
        assert getattr(torchbp, ours.__name__) is ours


@pytest.mark.parametrize("ours_cls, ref_cls", PAIR_PARAMS)
def test_constructor_signature(ours_cls, ref_cls):
    assert inspect.signature(ours_cls) == inspect.signature(ref_cls)


@pytest.mark.parametrize("ours_cls, ref_cls", PAIR_PARAMS)
def test_forward_signature(ours_cls, ref_cls):
    """The same argument names as torch's forward (a call by keyword works on both)."""
    assert list(inspect.signature(ours_cls.forward).parameters) == list(inspect.signature(ref_cls.forward).parameters)


def test_quadratic_cost_constructor():
    params = inspect.signature(bnn.QuadraticCost).parameters
    assert list(params) == ["reduction"] and params["reduction"].default == "mean"
    assert bnn.QuadraticCost().reduction == "mean"
    assert isinstance(bnn.QuadraticCost(), nn.Module)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, ours_cls, ref_cls", CONFIG_PARAMS)
def test_state_dict_keys_and_loading_both_ways(name, ours_cls, ref_cls, device):
    ours, ref = _build_pair(name, ours_cls, ref_cls, device)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    # torch's weights into ours, and ours (changed) into torch's, strictly
    _, other = _build_pair(name, ours_cls, ref_cls, device, seed=1)
    ours.load_state_dict(other.state_dict(), strict=True)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(ref.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 7])
def test_linear_same_init_for_same_seed(seed, bias, dtype, device):
    torch.manual_seed(seed)
    ref = nn.Linear(6, 5, bias=bias, device=device, dtype=dtype)
    after_ref = torch.rand(3)
    torch.manual_seed(seed)
    ours = bnn.Linear(6, 5, bias=bias, device=device, dtype=dtype)
    after_ours = torch.rand(3)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=0)
    else:
        assert ours.bias is None and "bias" in ours._parameters  # register_parameter('bias', None)
    torch.testing.assert_close(after_ours, after_ref, rtol=0, atol=0)  # same random numbers consumed
    # reset_parameters draws as torch's does
    torch.manual_seed(seed + 1)
    ref.reset_parameters()
    torch.manual_seed(seed + 1)
    ours.reset_parameters()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=0)
    assert ours.weight.dtype == dtype and ours.weight.device.type == device


@pytest.mark.parametrize("name, ours_cls, ref_cls", CONFIG_PARAMS)
def test_repr(name, ours_cls, ref_cls):
    ours, ref = _build_pair(name, ours_cls, ref_cls)
    assert repr(ours) == repr(ref)
    assert ours.extra_repr() == ref.extra_repr()


def test_repr_of_a_model():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2, bias=False), nn.Sigmoid())
    ours = nn.Sequential(bnn.Linear(4, 8), bnn.ReLU(inplace=True), bnn.Linear(8, 2, bias=False), bnn.Sigmoid())
    assert repr(ours) == repr(ref)


def test_quadratic_cost_repr():
    assert repr(bnn.QuadraticCost()) == "QuadraticCost()"


# --------------------------------------------------------------------------------------------------
# Forward and gradients
# --------------------------------------------------------------------------------------------------


def _module_inputs(name, dtype, device):
    """Inputs for one module call, as a dict name -> tensor."""
    kw = {"dtype": dtype, "device": device}
    if name.startswith("Linear"):
        return {"input": torch.randn(2, 3, 4, **kw, requires_grad=True)}
    if name.split("-")[0] in ("Sigmoid", "ReLU", "GELU", "SiLU", "Tanh", "LayerNorm"):
        return {"input": torch.randn(2, 3, 5, **kw, requires_grad=True)}
    if name.startswith("Embedding"):
        return {"input": torch.tensor([[0, 1, 5], [5, 5, 6]], device=device)}
    if name.startswith("Conv1d"):
        return {"input": torch.randn(2, 3, 9, **kw, requires_grad=True)}
    if name.startswith("Conv2d"):
        return {"input": torch.randn(2, 3 if "same" in name else 4, 7, 6, **kw, requires_grad=True)}
    if name.startswith("RMSNorm"):
        return {"x": torch.randn(2, 3, 5, **kw, requires_grad=True)}
    if name.startswith("MSELoss"):
        return {
            "input": torch.randn(3, 5, **kw, requires_grad=True),
            "target": torch.randn(3, 5, **kw, requires_grad=True),
        }
    if name.startswith("CrossEntropyLoss"):
        return {
            "input": torch.randn(4, 5, **kw, requires_grad=True),
            "target": torch.tensor([0, 1, 4, 1], device=device),
        }
    if name.startswith("BCELoss"):
        a = (0.05 + 0.9 * torch.rand(3, 5, **kw)).requires_grad_()
        return {"input": a, "target": torch.rand(3, 5, **kw, requires_grad=True)}
    return {"input": torch.randn(3, 5, **kw, requires_grad=True), "target": torch.rand(3, 5, **kw, requires_grad=True)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, ours_cls, ref_cls", CONFIG_PARAMS)
def test_module_matches_torch(name, ours_cls, ref_cls, dtype, device):
    ours, ref = _build_pair(name, ours_cls, ref_cls, device, dtype)
    inputs = _module_inputs(name, dtype, device)
    if name.endswith("-inplace"):  # in place on a non-leaf, as inside a network
        assert_matches_torch(lambda input: ours(input * 1), lambda input: ref(input * 1), inputs)
        return
    if isinstance(ref, (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.Conv1d, nn.Conv2d)) and list(
        ref.parameters()
    ):
        # parameters as inputs, so their gradients are compared too (random ones: not the init's 1 and 0)
        params = dict(ref.named_parameters())
        inputs.update({k: torch.randn_like(v).requires_grad_() for k, v in params.items()})

        def call(module):
            return lambda **kw: functional_call(module, {k: kw.pop(k) for k in list(params)}, tuple(kw.values()))

        assert_matches_torch(call(ours), call(ref), inputs)
        return
    assert_matches_torch(lambda **kw: ours(**kw), lambda **kw: ref(**kw), inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2), (5,)], ids=["2d", "3d", "1d"])
def test_quadratic_cost_module_matches_formula(shape, reduction, dtype, device):
    inputs = {
        "input": torch.randn(shape, dtype=dtype, device=device, requires_grad=True),
        "target": torch.randn(shape, dtype=dtype, device=device, requires_grad=True),
    }
    module = bnn.QuadraticCost(reduction=reduction)
    assert_matches_torch(
        lambda input, target: module(input, target),
        lambda input, target: quadratic_cost_formula(input, target, reduction),
        inputs,
    )


def test_quadratic_cost_value_by_hand():
    """C = 1/(2n) Σ_x ‖y − a‖²: two samples, squared distances 3 and 12 -> (3 + 12) / 4."""
    a = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    y = torch.zeros(2, 3)
    assert bnn.QuadraticCost()(a, y).item() == pytest.approx(15 / 4)
    assert bnn.QuadraticCost("sum")(a, y).item() == pytest.approx(15 / 2)
    assert bnn.QuadraticCost("none")(a, y).tolist() == pytest.approx([1.5, 6.0])


def _mlp(lib, act: str, seed: int, device, dtype):
    torch.manual_seed(seed)
    Act = {"sigmoid": lib.Sigmoid, "relu": lib.ReLU, "relu-inplace": lambda: lib.ReLU(inplace=True)}[act]
    return nn.Sequential(lib.Linear(5, 8), Act(), lib.Linear(8, 6), Act(), lib.Linear(6, 4)).to(device, dtype)


LOSSES = {
    "mse": (lambda: bnn.MSELoss(), lambda: nn.MSELoss(), "float"),
    "quadratic": (lambda: bnn.QuadraticCost(), lambda: (lambda a, y: quadratic_cost_formula(a, y)), "float"),
    "cross-entropy": (lambda: bnn.CrossEntropyLoss(), lambda: nn.CrossEntropyLoss(), "index"),
    "cross-entropy-probs": (lambda: bnn.CrossEntropyLoss(label_smoothing=0.1), lambda: nn.CrossEntropyLoss(label_smoothing=0.1), "probs"),
    "bce": (lambda: (bnn.Sigmoid(), bnn.BCELoss()), lambda: (nn.Sigmoid(), nn.BCELoss()), "binary"),
    "bce-with-logits": (lambda: bnn.BCEWithLogitsLoss(), lambda: nn.BCEWithLogitsLoss(), "binary"),
}  # fmt: skip


def _apply_loss(loss, out, target):
    if isinstance(loss, tuple):  # (sigmoid, binary loss on probabilities)
        return loss[1](loss[0](out), target)
    return loss(out, target)


def _target(kind, n, device, dtype):
    if kind == "index":
        return torch.randint(0, 4, (n,), device=device)
    if kind == "probs":
        return torch.rand(n, 4, device=device, dtype=dtype).softmax(1)
    if kind == "binary":
        return torch.rand(n, 4, device=device, dtype=dtype)
    return torch.randn(n, 4, device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["sigmoid", "relu", "relu-inplace"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_mlp_matches_torch(loss_name, act, dtype, device):
    """A small MLP of torchbp layers: loss and every parameter gradient equal torch.nn's."""
    ours_model, ref_model = _mlp(bnn, act, 0, device, dtype), _mlp(nn, act, 0, device, dtype)
    make_ours, make_ref, kind = LOSSES[loss_name]
    ours_loss, ref_loss = make_ours(), make_ref()
    names = [n for n, _ in ref_model.named_parameters()]
    inputs = {"x": torch.randn(7, 5, device=device, dtype=dtype), "target": _target(kind, 7, device, dtype)}
    inputs.update({n.replace(".", "_"): p.detach().clone().requires_grad_() for n, p in ref_model.named_parameters()})

    def run(model, loss):
        def f(x, target, **params):
            p = {n: params[n.replace(".", "_")] for n in names}
            return _apply_loss(loss, functional_call(model, p, (x,)), target)

        return f

    assert_matches_torch(run(ours_model, ours_loss), run(ref_model, ref_loss), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_match_torch(device):
    """Ten SGD steps on the same data: torchbp's model follows torch.nn's trajectory."""
    ours, ref = _mlp(bnn, "relu", 3, device, torch.float64), _mlp(nn, "relu", 3, device, torch.float64)
    x, t = torch.randn(16, 5, device=device, dtype=torch.float64), torch.randint(0, 4, (16,), device=device)
    for model, loss in ((ours, bnn.CrossEntropyLoss()), (ref, nn.CrossEntropyLoss())):
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        for _ in range(10):
            opt.zero_grad()
            loss(model(x), t).backward()
            opt.step()
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close_labelled(p, q, f"{n} after 10 steps")


# --------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Sigmoid())
        self.heads = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 3, bias=False)])
        self.extra = nn.ModuleDict({"act": nn.ReLU()})

    def forward(self, x):
        h = self.body(x)
        return self.extra["act"](self.heads[0](h) + self.heads[1](h))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.out = nn.Linear(3, 4)
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.05)
        self.aux = nn.MSELoss()

    def forward(self, x, t):
        z = self.out(self.block(x))
        return self.loss(z, t) + 0.1 * self.aux(z, torch.zeros_like(z))


REPLACED = {
    nn.Linear: bnn.Linear,
    nn.Sigmoid: bnn.Sigmoid,
    nn.ReLU: bnn.ReLU,
    nn.MSELoss: bnn.MSELoss,
    nn.CrossEntropyLoss: bnn.CrossEntropyLoss,
    nn.BCELoss: bnn.BCELoss,
    nn.BCEWithLogitsLoss: bnn.BCEWithLogitsLoss,
    nn.Sequential: bnn.Sequential,  # its runs of layers run as one Function, the backprop loop
}


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_convert_recursive_in_place_keeps_parameters():
    torch.manual_seed(0)
    model = Model()
    reference = copy.deepcopy(model)
    modules_before = dict(model.named_modules())
    params_before = dict(model.named_parameters())
    classes_before = {n: type(m) for n, m in model.named_modules()}

    result = torchbp.convert(model)

    assert result is model
    modules_after = dict(model.named_modules())
    assert list(modules_after) == list(modules_before)
    for name, module in modules_after.items():
        assert module is modules_before[name], f"{name} was replaced by a new object"
        expected_cls = REPLACED.get(classes_before[name], classes_before[name])
        assert type(module) is expected_cls, f"{name}: {type(module).__name__}, expected {expected_cls.__name__}"
    for name, p in model.named_parameters():
        assert p is params_before[name], f"{name} is a new Parameter"
    assert model.block.body[1].inplace and model.loss.label_smoothing == 0.05
    assert repr(model) == repr(reference)

    # the converted model computes torch's loss and gradients, through torchbp's Functions
    x, t = torch.randn(6, 5), torch.randint(0, 4, (6,))
    loss, ref_loss = model(x, t), reference(x, t)
    names = _grad_fn_names(loss)
    assert {"ChainFunctionBackward", "LinearFunctionBackward", "CrossEntropyFunctionBackward"} <= names, names
    assert not {"AddmmBackward0", "NllLossBackward0", "ReluBackward0", "SigmoidBackward0"} & names, names
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_convert_converts_the_root_module():
    layer = nn.Linear(3, 2)
    weight = layer.weight
    assert torchbp.convert(layer) is layer
    assert type(layer) is bnn.Linear and layer.weight is weight
    seq = nn.Sequential(nn.Linear(3, 2))
    assert torchbp.convert(seq) is seq and type(seq[0]) is bnn.Linear


def test_convert_keeps_hooks_mode_and_buffers():
    loss = nn.BCEWithLogitsLoss(weight=torch.rand(3), pos_weight=torch.rand(3) + 0.5)
    buffers = dict(loss.named_buffers())
    layer = nn.Linear(3, 3).eval()
    calls = []
    layer.register_forward_hook(lambda m, i, o: calls.append(o))
    model = nn.Sequential(layer, loss.__class__())  # a loss inside a model, too
    torchbp.convert(loss)
    torchbp.convert(model)
    assert dict(loss.named_buffers()) == buffers and all(loss.get_buffer(n) is b for n, b in buffers.items())
    assert not layer.training
    layer(torch.randn(2, 3))
    assert len(calls) == 1
    assert type(model[1]) is bnn.BCEWithLogitsLoss


def test_convert_leaves_subclasses_alone():
    class MyLinear(nn.Linear):
        def forward(self, input):
            return super().forward(input) * 2

    class MyReLU(nn.ReLU):
        pass

    model = nn.Sequential(MyLinear(3, 3), MyReLU(), nn.Linear(3, 2), nn.Softplus())
    torchbp.convert(model)
    assert type(model[0]) is MyLinear and type(model[1]) is MyReLU
    assert type(model[2]) is bnn.Linear and type(model[3]) is nn.Softplus
    x = torch.randn(2, 3)
    torch.testing.assert_close(model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias) * 2)


def test_convert_is_idempotent():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    torchbp.convert(model)
    torchbp.convert(model)
    assert [type(m) for m in model] == [bnn.Linear, bnn.ReLU]


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="Module"):
        torchbp.convert([nn.Linear(2, 2)])


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_built_before_convert_still_trains(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Sigmoid(), nn.Linear(16, 3)).to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    opt_params = [p for group in opt.param_groups for p in group["params"]]
    x, t = torch.randn(32, 5, device=device), torch.randint(0, 3, (32,), device=device)
    reference = copy.deepcopy(model)  # trained unconverted, with its own optimizer
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.05)

    torchbp.convert(model)
    torchbp.convert(loss_fn)
    assert type(model[0]) is bnn.Linear and type(loss_fn) is bnn.CrossEntropyLoss
    assert [id(p) for p in model.parameters()] == [id(p) for p in opt_params]

    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(x), t)
        assert "ChainFunctionBackward" in _grad_fn_names(loss)  # the converted Sequential's backprop loop
        loss.backward()
        for p, q in zip(model.parameters(), opt_params):
            assert p is q and q.grad is not None  # gradients land in the optimizer's Parameter objects
        opt.step()
        losses.append(loss.item())
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(x), t).backward()
        ref_opt.step()
    assert losses[-1] < 0.8 * losses[0], losses
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # torch.nn's trajectory (float32)


def test_convert_warns_for_a_sequential_of_other_layers():
    """A Sequential holding no layer torchbp converts: the warning, and the model left exactly as it was."""
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Softplus())
    with pytest.warns(UserWarning, match=r"found nothing to convert in Sequential: it converts torch\.nn\.Linear, "):
        assert torchbp.convert(model) is model
    assert type(model) is nn.Sequential and [type(m) for m in model] == [nn.Conv3d, nn.Softplus]
    nested = nn.Sequential(nn.Sequential(nn.Conv3d(1, 2, 3)), nn.Softplus())
    with pytest.warns(UserWarning, match="found nothing to convert"):
        torchbp.convert(nested)
    assert type(nested) is nn.Sequential and type(nested[0]) is nn.Sequential
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torchbp layer in it: no warning, the Sequential runs the loop
        model = torchbp.convert(nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)))
    assert type(model) is bnn.Sequential and type(model[2]) is bnn.Linear

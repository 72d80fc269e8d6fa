"""The transformer layers: LayerNorm, RMSNorm, Embedding, GELU, SiLU, Tanh as drop-in modules and functions.

Parity of values and gradients is in the cases table (tests/cases.py: test_functional.py, test_forward_ad.py) and in
test_nn.py's module pairs; here: initialization, ``convert``, the options torch has and torchbp refuses, torch's
errors, autocast, saved tensors and ``torch.compile``. Every comparison is against torch.nn.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_labelled, assert_matches_torch
from torch import nn

import torchbp
import torchbp.functional as BF
import torchbp.nn as bnn

LAYERS = [
    (bnn.LayerNorm, nn.LayerNorm, ((3, 5),), {"eps": 1e-3, "bias": False}),
    (bnn.RMSNorm, nn.RMSNorm, (5,), {"elementwise_affine": True}),
    (bnn.Embedding, nn.Embedding, (11, 4), {"padding_idx": 3}),
    (bnn.GELU, nn.GELU, (), {"approximate": "tanh"}),
    (bnn.SiLU, nn.SiLU, (), {}),
    (bnn.Tanh, nn.Tanh, (), {}),
    (bnn.Conv1d, nn.Conv1d, (4, 6, 3), {"groups": 2, "padding_mode": "reflect", "padding": 1}),
    (bnn.Conv2d, nn.Conv2d, (3, 5, (3, 2)), {"stride": 2, "bias": False}),
]
LAYER_PARAMS = [pytest.param(*layer, id=layer[1].__name__) for layer in LAYERS]


@pytest.mark.parametrize("ours_cls, ref_cls, args, kwargs", LAYER_PARAMS)
def test_same_seed_same_weights_and_isinstance(ours_cls, ref_cls, args, kwargs):
    torch.manual_seed(0)
    ours = ours_cls(*args, **kwargs)
    torch.manual_seed(0)
    ref = ref_cls(*args, **kwargs)
    assert isinstance(ours, ref_cls) and type(ours) is not ref_cls
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    if isinstance(ref, nn.Embedding):
        assert not ours.weight[3].any()  # the padding row starts at zero, as torch's


def test_convert_converts_each_layer_in_place_with_all_layers_only():
    """With ``all_layers=True`` the norms, embeddings, activations and convolutions are converted (a torchbp one in a
    model is left as it is); by default they stay torch's, and Linear is converted as ever."""
    torch.manual_seed(0)
    refs = [ref_cls for _, ref_cls, _, _ in LAYERS]
    model = nn.ModuleList(
        [ref_cls(*args, **kwargs) for _, ref_cls, args, kwargs in LAYERS] + [bnn.GELU(), nn.Linear(2, 2)]
    )
    params = [id(p) for p in model.parameters()]
    torchbp.convert(model)
    assert [type(m) for m in model] == [*refs, bnn.GELU, bnn.Linear]
    torchbp.convert(model, all_layers=True)
    expected = [
        bnn.LayerNorm,
        bnn.RMSNorm,
        bnn.Embedding,
        bnn.GELU,
        bnn.SiLU,
        bnn.Tanh,
        bnn.Conv1d,
        bnn.Conv2d,
        bnn.GELU,
    ]
    assert [type(m) for m in model] == [*expected, bnn.Linear]
    assert [id(p) for p in model.parameters()] == params
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torchbp activation counts as torchbp's: no "nothing to convert" warning
        torchbp.convert(nn.Sequential(bnn.SiLU()))


def test_convert_leaves_a_sparse_embedding_to_torch():
    """torchbp's gradient is dense: a sparse Embedding stays torch's, and the model trains as before."""
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 2))
    torchbp.convert(model, all_layers=True)
    assert type(model[0]) is nn.Embedding and type(model[1]) is bnn.Linear
    model(torch.tensor([1, 2])).sum().backward()
    assert model[0].weight.grad.is_sparse


def test_sparse_embedding_is_a_clear_error():
    idx, weight = torch.tensor([1, 2]), torch.randn(5, 3, requires_grad=True)
    with pytest.raises(NotImplementedError, match="sparse=True is not supported.*sparse=False"):
        BF.embedding(idx, weight, sparse=True)
    with pytest.raises(NotImplementedError, match="sparse=True"):
        bnn.Embedding(5, 3, sparse=True)(idx)


def test_embedding_max_norm_renormalizes_the_weight_as_torch():
    """max_norm: the rows looked up are renormalized in place, as torch's; the output and gradient match."""
    torch.manual_seed(0)
    ours, ref = bnn.Embedding(6, 4, max_norm=1.0, norm_type=3.0), nn.Embedding(6, 4, max_norm=1.0, norm_type=3.0)
    ref.load_state_dict(ours.state_dict())
    idx = torch.tensor([[0, 2, 2], [5, 0, 1]])
    assert_close_labelled(ours(idx), ref(idx), "output")
    assert_close_labelled(ours.weight, ref.weight, "renormalized weight", rtol=0, atol=0)
    assert ours.weight.norm(p=3, dim=1)[[0, 1, 2, 5]].max() <= 1.0
    ours(idx).pow(2).sum().backward()
    ref(idx).pow(2).sum().backward()
    assert_close_labelled(ours.weight.grad, ref.weight.grad, "grad of weight")


ERRORS = [
    ("layer_norm shape", lambda M: M.layer_norm(torch.randn(2, 4), (3,))),
    ("layer_norm weight", lambda M: M.layer_norm(torch.randn(2, 4), (4,), torch.randn(3))),
    ("layer_norm int shape", lambda M: M.layer_norm(torch.randn(2, 4), 4)),
    ("rms_norm shape", lambda M: M.rms_norm(torch.randn(2, 4), (3, 4))),
    ("rms_norm weight", lambda M: M.rms_norm(torch.randn(2, 4), (4,), torch.randn(4, 1))),
    ("gelu approximate", lambda M: M.gelu(torch.randn(3), approximate="erf")),
    ("embedding float indices", lambda M: M.embedding(torch.tensor([1.0]), torch.randn(5, 3))),
    ("embedding out of range", lambda M: M.embedding(torch.tensor([5]), torch.randn(5, 3))),
    ("embedding negative index", lambda M: M.embedding(torch.tensor([-1]), torch.randn(5, 3))),
    ("embedding padding_idx", lambda M: M.embedding(torch.tensor([1]), torch.randn(5, 3), padding_idx=5)),
    ("embedding 1-d weight", lambda M: M.embedding(torch.tensor([1]), torch.randn(5))),
]


@pytest.mark.parametrize("call", [pytest.param(c, id=i) for i, c in ERRORS])
def test_errors_are_torchs(call):
    """The exception type torch raises for the same mistake; the message says what was expected."""
    with pytest.raises(Exception) as ref:
        call(F)
    with pytest.raises(type(ref.value)) as ours:
        call(BF)
    assert type(ours.value) is type(ref.value)
    assert "expected" in str(ours.value).lower() or "must be" in str(ours.value), str(ours.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_silu_inplace_overwrites_and_returns_its_input(dtype):
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    inputs = {"input": x}
    assert_matches_torch(lambda input: BF.silu(input * 1, inplace=True), lambda input: F.silu(input * 1, True), inputs)
    y = torch.randn(5, dtype=dtype)
    expected = F.silu(y)
    assert BF.silu(y, inplace=True) is y
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):  # torch's error
        BF.silu(torch.randn(3, requires_grad=True), inplace=True)


def test_rms_norm_default_eps_is_torchs():
    """eps=None: the machine epsilon of the dtype it is computed in (float32 for bfloat16), as torch's; the case of
    a tiny input shows it (rms(x)² ~ 1e-14, below float32's epsilon, above float64's)."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = (1e-7 * torch.randn(3, 8, dtype=torch.float64)).to(dtype)
        assert_close_labelled(BF.rms_norm(x, (8,)), F.rms_norm(x, (8,)), f"rms_norm {dtype}")


def _model(lib):
    torch.manual_seed(0)
    return nn.Sequential(
        lib.Embedding(13, 8, padding_idx=0),
        lib.LayerNorm(8),
        nn.Linear(8, 16),
        lib.GELU(approximate="tanh"),
        nn.Linear(16, 8),
        lib.RMSNorm(8),
        lib.SiLU(),
        nn.Linear(8, 8),
        lib.Tanh(),
        lib.LayerNorm(8, bias=False),
        nn.Linear(8, 13),
    )


def test_autocast_gives_torchs_dtypes_and_gradients():
    """CPU autocast to bfloat16: each output and gradient has torch's dtype, and the values agree at bfloat16's
    tolerance (the Linears run in bfloat16; the norms take a bfloat16 input with float32 parameters)."""
    ours, ref = _model(bnn), _model(nn)
    idx = torch.randint(0, 13, (4, 6))
    outputs = {}
    for name, model in (("ours", ours), ("torch", ref)):
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype)) for m in model]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx)
        for h in hooks:
            h.remove()
        out.float().pow(2).mean().backward()
        outputs[name] = (seen, out, [p.grad for p in model.parameters()])
    assert outputs["ours"][0] == outputs["torch"][0], outputs
    assert_close_labelled(outputs["ours"][1], outputs["torch"][1], "output")
    for i, (g, r) in enumerate(zip(outputs["ours"][2], outputs["torch"][2])):
        assert g.dtype == r.dtype, (i, g.dtype, r.dtype)
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2 * r.abs().max().item(), msg=f"grad of parameter {i}")


def _saved_bytes(fn, *args) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


SAVED = [
    ("gelu", lambda x, w, b: BF.gelu(x), lambda x, w, b: F.gelu(x)),
    ("silu", lambda x, w, b: BF.silu(x), lambda x, w, b: F.silu(x)),
    ("tanh", lambda x, w, b: BF.tanh(x), lambda x, w, b: torch.tanh(x)),
    ("layer_norm", lambda x, w, b: BF.layer_norm(x, (64,), w, b), lambda x, w, b: F.layer_norm(x, (64,), w, b)),
    ("rms_norm", lambda x, w, b: BF.rms_norm(x, (64,), w), lambda x, w, b: F.rms_norm(x, (64,), w)),
]


@pytest.mark.parametrize("name, ours, ref", [pytest.param(*s, id=s[0]) for s in SAVED])
def test_saved_tensors_at_most_torchs(name, ours, ref):
    """Each Function saves what its derivative needs: the same bytes as torch's or fewer (LayerNorm: torch's less
    the bias; RMSNorm: x, γ and 1/rms(x), where torch's composite also keeps x/rms(x))."""
    x = torch.randn(32, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    assert _saved_bytes(ours, x, w, b) <= _saved_bytes(ref, x, w, b)


def test_embedding_saves_the_indices_only():
    idx, weight = torch.randint(0, 100, (8, 16)), torch.randn(100, 32, requires_grad=True)
    assert _saved_bytes(BF.embedding, idx, weight) == idx.numel() * idx.element_size()


def test_compiled_fullgraph_matches_torch():
    """torch.compile(fullgraph=True) of a model of every new layer: loss and every gradient equal torch's eager.

    (One compile of the whole model, the slowest test here: ~20-40 s on 2 busy cores.)
    """
    ours, ref = _model(bnn).double(), _model(nn).double()
    idx = torch.randint(0, 13, (3, 5))
    compiled = torch.compile(ours, fullgraph=True)
    loss, expected = compiled(idx).pow(2).mean(), ref(idx).pow(2).mean()
    loss.backward()
    expected.backward()
    assert_close_labelled(loss, expected, "loss")
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close_labelled(p.grad, q.grad, f"grad of {name}")


def test_compiled_convolutions_fullgraph_match_torch():
    """torch.compile(fullgraph=True) of Conv2d (strided and grouped; 'same' with a circular padding); Conv1d runs the
    same Function and equations (one compile of two layers: ~20-40 s on 2 busy cores).

    Static shapes (``dynamic=False``): with symbolic sizes, torch 2.13's inductor cannot lower the crop of the
    weight gradient to the kernel's size (an undecidable size comparison); see docs/layers.md.
    """
    torch.manual_seed(0)
    layers = [
        bnn.Conv2d(4, 6, 3, stride=2, groups=2),
        bnn.Conv2d(6, 3, (2, 3), padding="same", padding_mode="circular"),
    ]
    ours = nn.Sequential(*layers).double()
    ref = copy.deepcopy(ours)
    for m in ref.modules():  # the same weights in torch's classes
        if type(m) in (bnn.Conv1d, bnn.Conv2d):
            m.__class__ = nn.Conv1d if type(m) is bnn.Conv1d else nn.Conv2d
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    loss = torch.compile(ours, fullgraph=True, dynamic=False)(x).pow(2).sum()
    expected = ref(x).pow(2).sum()
    loss.backward()
    expected.backward()
    assert_close_labelled(loss, expected, "loss")
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close_labelled(p.grad, q.grad, f"grad of {name}")

"""The cases of torchbp.functional against torch.nn.functional, in the BackPACK "settings" style: a list of
(id, call, inputs); ``call(M, *inputs)`` runs the function from namespace ``M`` (``torchbp.functional`` or
``helpers.torch_ref``). Shared by tests/test_functional.py (values and gradients) and tests/test_forward_ad.py
(forward mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from helpers import REDUCTIONS

Maker = Callable[[torch.dtype, str], object]

# --------------------------------------------------------------------------------------------------
# Input makers: each returns (dtype, device) -> value. Values are drawn in float64 and cast, so the
# float32 and float64 runs of a case see the same numbers.
# --------------------------------------------------------------------------------------------------


def _finish(x: torch.Tensor, dtype, device, grad: bool, layout: str | None) -> torch.Tensor:
    x = x.to(dtype=dtype, device=device)
    if layout == "T":  # created with the last two dims swapped: a transposed, non-contiguous view
        x = x.mT
    elif layout == "slice":  # created with the last dim doubled: every other column
        x = x[..., ::2]
    elif layout == "permute":  # created with the first two dims swapped
        x = x.transpose(0, 1)
    if layout is not None:
        assert not x.is_contiguous()
    return x.requires_grad_(grad)


def _raw_shape(shape: tuple[int, ...], layout: str | None) -> tuple[int, ...]:
    if layout == "T":
        return shape[:-2] + (shape[-1], shape[-2])
    if layout == "slice":
        return shape[:-1] + (2 * shape[-1],)
    if layout == "permute":
        return (shape[1], shape[0]) + shape[2:]
    return shape


def randn(*shape: int, scale: float = 1.0, grad: bool = True, layout: str | None = None) -> Maker:
    def make(dtype, device):
        x = torch.randn(_raw_shape(shape, layout), dtype=torch.float64) * scale
        return _finish(x, dtype, device, grad, layout)

    return make


def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0, grad: bool = True, layout: str | None = None) -> Maker:
    def make(dtype, device):
        x = lo + (hi - lo) * torch.rand(_raw_shape(shape, layout), dtype=torch.float64)
        return _finish(x, dtype, device, grad, layout)

    return make


def probs(*shape: int, class_dim: int = 1, grad: bool = True) -> Maker:
    """Class probabilities (rows sum to 1 along the class dim)."""

    def make(dtype, device):
        x = torch.randn(shape, dtype=torch.float64).softmax(class_dim if len(shape) > 1 else 0)
        return x.to(dtype=dtype, device=device).requires_grad_(grad)

    return make


def const(values, grad: bool = True) -> Maker:
    def make(dtype, device):
        return torch.tensor(values, dtype=dtype, device=device).requires_grad_(grad)

    return make


def index(n_classes: int, *shape: int, ignore: int | None = None, hits: int = 0, dtype=torch.int64) -> Maker:
    """Class indices in [0, n_classes); the first ``hits`` entries (flattened) set to ``ignore``."""

    def make(_dtype, device):
        t = torch.randint(0, n_classes, shape)
        if hits:
            t.view(-1)[:hits] = ignore
        return t.to(dtype=dtype, device=device)

    return make


def fixed(value) -> Maker:
    """A non-tensor argument (or None)."""
    return lambda dtype, device: value


def classes(values) -> Maker:
    """Given class indices (int64)."""
    return lambda dtype, device: torch.tensor(values, device=device)


def binary(*shape: int, grad: bool = True) -> Maker:
    """Targets that are exactly 0 or 1, in the case's dtype."""

    def make(dtype, device):
        return torch.randint(0, 2, shape).to(dtype=dtype, device=device).requires_grad_(grad)

    return make


@dataclass
class Case:
    id: str
    call: Callable  # call(M, *inputs), M a namespace of functions named as torch.nn.functional's
    inputs: dict[str, Maker]
    smooth: bool = True  # gradcheck-able: differentiable, moderate values
    equal_nan: bool = False

    def make(self, dtype=torch.float64, device="cpu") -> dict[str, object]:
        return {name: make(dtype, device) for name, make in self.inputs.items()}


CASES: list[Case] = []


def case(id: str, call: Callable, smooth: bool = True, equal_nan: bool = False, **inputs: Maker) -> None:
    CASES.append(Case(id, call, inputs, smooth, equal_nan))


# --------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------


def _linear(M, input, weight, bias):
    return M.linear(input, weight, bias)


W, B = randn(3, 4), randn(3)
case("linear-2d", _linear, input=randn(5, 4), weight=W, bias=B)
case("linear-N1", _linear, input=randn(1, 4), weight=W, bias=B)
case("linear-N0", _linear, input=randn(0, 4), weight=W, bias=B)
case("linear-1d", _linear, input=randn(4), weight=W, bias=B)
case("linear-3d", _linear, input=randn(2, 5, 4), weight=W, bias=B)
case("linear-4d", _linear, input=randn(2, 1, 3, 4), weight=W, bias=B)
case("linear-no-bias", _linear, input=randn(5, 4), weight=W, bias=fixed(None))
case("linear-3d-no-bias", _linear, input=randn(2, 5, 4), weight=W, bias=fixed(None))
case("linear-1d-no-bias", _linear, input=randn(4), weight=W, bias=fixed(None))
case("linear-input-transposed", _linear, input=randn(5, 4, layout="T"), weight=W, bias=B)
case("linear-input-sliced", _linear, input=randn(5, 4, layout="slice"), weight=W, bias=B)
case("linear-3d-input-permuted", _linear, input=randn(2, 5, 4, layout="permute"), weight=W, bias=B)
case("linear-weight-transposed", _linear, input=randn(5, 4), weight=randn(3, 4, layout="T"), bias=B)
case("linear-bias-sliced", _linear, input=randn(5, 4), weight=W, bias=randn(3, layout="slice"))
case("linear-only-input-grad", _linear, input=randn(5, 4), weight=randn(3, 4, grad=False), bias=randn(3, grad=False))
case("linear-only-weight-grad", _linear, input=randn(2, 5, 4, grad=False), weight=W, bias=randn(3, grad=False))
case("linear-only-bias-grad", _linear, input=randn(5, 4, grad=False), weight=randn(3, 4, grad=False), bias=B)
# Shapes documented by torch.nn.functional.linear: weight (in_features,) and bias ().
case("linear-weight-1d", _linear, input=randn(5, 4), weight=randn(4), bias=fixed(None))
case("linear-bias-0d", _linear, input=randn(5, 4), weight=W, bias=randn())

# --------------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------------


def _sigmoid(M, input):
    return M.sigmoid(input)


def _relu(M, input):
    return M.relu(input)


def _relu_inplace(M, input):
    return M.relu(input * 1, inplace=True)  # in place on a non-leaf, as inside a network


EXTREME_PRE = [-1e3, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 1e3]
SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -1.0]

for name, fn in (("sigmoid", _sigmoid), ("relu", _relu), ("relu-inplace", _relu_inplace)):
    case(f"{name}-2d", fn, input=randn(4, 3))
    case(f"{name}-0d", fn, input=randn())
    case(f"{name}-1d", fn, input=randn(5))
    case(f"{name}-3d", fn, input=randn(2, 3, 4))
    case(f"{name}-N0", fn, input=randn(0, 3))
    case(f"{name}-transposed", fn, input=randn(4, 3, layout="T"))
    case(f"{name}-sliced", fn, input=randn(4, 3, layout="slice"))
    case(f"{name}-extreme", fn, smooth=False, input=const(EXTREME_PRE))
    case(f"{name}-nan-inf", fn, smooth=False, equal_nan=True, input=const(SPECIALS))
# ReLU's gradient at exactly 0 is 0, as torch's.
case("relu-at-zero", _relu, smooth=False, input=const([-1.0, 0.0, -0.0, 0.0, 2.0]))
case("relu-inplace-at-zero", _relu_inplace, smooth=False, input=const([-1.0, 0.0, -0.0, 0.0, 2.0]))

# The activations of transformers: GELU (both approximations), SiLU, tanh.


def _gelu(approximate, M, input):
    return M.gelu(input, approximate=approximate)


def _silu(M, input):
    return M.silu(input)


def _silu_inplace(M, input):
    return M.silu(input * 1, inplace=True)  # in place on a non-leaf, as inside a network


def _tanh(M, input):
    return M.tanh(input)


for name, fn in (
    ("gelu", partial(_gelu, "none")),
    ("gelu_tanh", partial(_gelu, "tanh")),
    ("silu", _silu),
    ("silu_inplace", _silu_inplace),
    ("tanh", _tanh),
):
    case(f"{name}-2d", fn, input=randn(4, 3, scale=2.0))
    case(f"{name}-0d", fn, input=randn())
    case(f"{name}-3d", fn, input=randn(2, 3, 4, scale=2.0))
    case(f"{name}-N1", fn, input=randn(1, 3))
    case(f"{name}-N0", fn, input=randn(0, 3))
    case(f"{name}-transposed", fn, input=randn(4, 3, layout="T"))
    case(f"{name}-extreme", fn, smooth=False, input=const(EXTREME_PRE))
case("gelu-at-zero", partial(_gelu, "none"), smooth=False, input=const([0.0, -0.0, 1e-300, -1e-300]))

# --------------------------------------------------------------------------------------------------
# layer_norm, rms_norm. Well-conditioned inputs: each sample's |mean| <= 10 std (randn: |mean| ~ std / sqrt(n);
# "shifted": mean 5, std 1), so the float64 comparison holds at rel 1e-12.
# --------------------------------------------------------------------------------------------------


def shifted(*shape: int, mean: float = 5.0) -> Maker:
    """randn(*shape) + mean: a norm's input far from zero mean (|mean| = 5 std)."""

    def make(dtype, device):
        return (torch.randn(shape, dtype=torch.float64) + mean).to(dtype=dtype, device=device).requires_grad_()

    return make


def _ln(normalized_shape, M, input, weight=None, bias=None, eps=1e-5):
    return M.layer_norm(input, normalized_shape, weight, bias, eps)


def _rms(normalized_shape, M, input, weight=None, eps=None):
    return M.rms_norm(input, normalized_shape, weight, eps)


ln, ln2, rms, rms2 = partial(_ln, (5,)), partial(_ln, (3, 5)), partial(_rms, (5,)), partial(_rms, (3, 5))
case("layernorm-2d", ln, input=randn(4, 5), weight=randn(5), bias=randn(5))
case("layernorm-3d", ln, input=randn(2, 3, 5), weight=randn(5), bias=randn(5))
case("layernorm-1d", ln, input=randn(5), weight=randn(5), bias=randn(5))
case("layernorm-N1", ln, input=randn(1, 5), weight=randn(5), bias=randn(5))
case("layernorm-N0", ln, input=randn(0, 5), weight=randn(5), bias=randn(5))
case("layernorm-shifted", ln, input=shifted(4, 5), weight=randn(5), bias=randn(5))
case("layernorm-no-affine", ln, input=randn(4, 5))
case("layernorm-no-bias", ln, input=randn(2, 3, 5), weight=randn(5), bias=fixed(None))
case("layernorm-eps", ln, input=randn(4, 5), weight=randn(5), bias=randn(5), eps=fixed(0.1))
case("layernorm-2-dims", ln2, input=randn(2, 3, 5), weight=randn(3, 5), bias=randn(3, 5))
case("layernorm-2-dims-4d", ln2, input=randn(2, 2, 3, 5), weight=randn(3, 5), bias=randn(3, 5))
case("layernorm-transposed", ln, input=randn(4, 5, layout="T"), weight=randn(5), bias=randn(5))
case("layernorm-only-weight-grad", ln, input=randn(4, 5, grad=False), weight=randn(5), bias=randn(5, grad=False))
case("rmsnorm-2d", rms, input=randn(4, 5), weight=randn(5))
case("rmsnorm-3d", rms, input=randn(2, 3, 5), weight=randn(5))
case("rmsnorm-1d", rms, input=randn(5), weight=randn(5))
case("rmsnorm-N1", rms, input=randn(1, 5), weight=randn(5))
case("rmsnorm-N0", rms, input=randn(0, 5), weight=randn(5))
case("rmsnorm-shifted", rms, input=shifted(4, 5), weight=randn(5))
case("rmsnorm-no-affine", rms, input=randn(4, 5))
case("rmsnorm-eps", rms, input=randn(4, 5), weight=randn(5), eps=fixed(0.1))
case("rmsnorm-2-dims", rms2, input=randn(2, 3, 5), weight=randn(3, 5))
case("rmsnorm-transposed", rms, input=randn(4, 5, layout="T"), weight=randn(5))
case("rmsnorm-only-input-grad", rms, input=randn(4, 5), weight=randn(5, grad=False))

# --------------------------------------------------------------------------------------------------
# embedding
# --------------------------------------------------------------------------------------------------


def _emb(M, input, weight, padding_idx=None, max_norm=None, scale_grad_by_freq=False):
    return M.embedding(input, weight, padding_idx, max_norm, scale_grad_by_freq=scale_grad_by_freq)


E = randn(7, 4)
case("embedding-1d", _emb, input=index(7, 9), weight=E)
case("embedding-2d", _emb, input=index(7, 3, 5), weight=E)
case("embedding-0d", _emb, input=index(7), weight=E)
case("embedding-N0", _emb, input=index(7, 0, 5), weight=E)
case("embedding-int32", _emb, input=index(7, 3, 5, dtype=torch.int32), weight=E)
case("embedding-repeated", _emb, input=classes([[1, 1, 1], [1, 3, 1]]), weight=E)
case("embedding-transposed", _emb, input=index(7, 3, 5), weight=randn(7, 4, layout="T"))
# padding_idx: torch's gradient leaves the padding row at 0, and scale_grad_by_freq divides by each index's count (by
# definition, not the derivative: no gradcheck)
case("embedding-padding", _emb, smooth=False, input=classes([[0, 2, 2], [2, 5, 6]]), weight=E, padding_idx=fixed(2))
case("embedding-padding-negative", _emb, smooth=False, input=classes([[0, 6, 2], [6, 5, 6]]), weight=E,
     padding_idx=fixed(-1))  # fmt: skip
case("embedding-scale-grad-by-freq", _emb, smooth=False, input=classes([[0, 2, 2], [2, 5, 0]]), weight=E, padding_idx=fixed(None),
     max_norm=fixed(None), scale_grad_by_freq=fixed(True))  # fmt: skip
case("embedding-padding-scale-grad-by-freq", _emb, smooth=False, input=classes([[0, 2, 2], [2, 5, 0]]), weight=E,
     padding_idx=fixed(0), max_norm=fixed(None), scale_grad_by_freq=fixed(True))  # fmt: skip
# max_norm renormalizes the rows looked up, in place, before the lookup (not differentiated: no gradcheck)
case("embedding-max-norm", _emb, smooth=False, input=classes([[0, 2, 2], [2, 5, 0]]), weight=randn(7, 4, scale=3.0),
     padding_idx=fixed(None), max_norm=fixed(1.5))  # fmt: skip

# --------------------------------------------------------------------------------------------------
# conv1d, conv2d
# --------------------------------------------------------------------------------------------------


def _conv(dims, M, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return getattr(M, f"conv{dims}d")(input, weight, bias, stride, padding, dilation, groups)


c1, c2 = partial(_conv, 1), partial(_conv, 2)
# (small shapes: gradgradcheck's cost grows with the square of the elements)
case("conv1d-basic", c1, input=randn(2, 3, 7), weight=randn(2, 3, 3), bias=randn(2))
case("conv1d-N1-no-bias", c1, input=randn(1, 3, 7), weight=randn(2, 3, 3))
case("conv1d-N0", c1, input=randn(0, 3, 7), weight=randn(2, 3, 3), bias=randn(2))
case("conv1d-unbatched", c1, input=randn(3, 7), weight=randn(2, 3, 3), bias=randn(2))
case("conv1d-stride-padding-dilation", c1, input=randn(2, 2, 11), weight=randn(2, 2, 3), bias=randn(2),
     stride=fixed(3), padding=fixed(2), dilation=fixed(2))  # fmt: skip
case("conv1d-same-even-kernel", c1, input=randn(2, 2, 7), weight=randn(2, 2, 4), bias=randn(2),
     stride=fixed(1), padding=fixed("same"), dilation=fixed(1))  # fmt: skip
case("conv1d-groups", c1, input=randn(2, 4, 7), weight=randn(4, 2, 3), bias=randn(4), stride=fixed(2),
     padding=fixed(1), dilation=fixed(1), groups=fixed(2))  # fmt: skip
case("conv1d-depthwise", c1, input=randn(2, 3, 7), weight=randn(3, 1, 3), bias=randn(3), stride=fixed(1),
     padding=fixed("same"), dilation=fixed(2), groups=fixed(3))  # fmt: skip
case("conv2d-basic", c2, input=randn(2, 2, 5, 4), weight=randn(3, 2, 3, 2), bias=randn(3))
case("conv2d-N0", c2, input=randn(0, 2, 5, 4), weight=randn(3, 2, 3, 2), bias=randn(3))
case("conv2d-unbatched-no-bias", c2, input=randn(2, 5, 4), weight=randn(3, 2, 3, 3))
case("conv2d-stride-padding-dilation", c2, input=randn(2, 2, 7, 6), weight=randn(2, 2, 3, 2), bias=randn(2),
     stride=fixed((2, 3)), padding=fixed((1, 2)), dilation=fixed((2, 1)))  # fmt: skip
case("conv2d-same", c2, input=randn(2, 2, 5, 4), weight=randn(2, 2, 4, 3), bias=randn(2), stride=fixed(1),
     padding=fixed("same"), dilation=fixed((1, 2)))  # fmt: skip
case("conv2d-valid", c2, input=randn(2, 2, 4, 4), weight=randn(2, 2, 3, 3), bias=randn(2), stride=fixed(1),
     padding=fixed("valid"))  # fmt: skip
case("conv2d-groups", c2, input=randn(2, 6, 4, 4), weight=randn(3, 2, 3, 3), bias=randn(3), stride=fixed(2),
     padding=fixed(1), dilation=fixed(1), groups=fixed(3))  # fmt: skip
case("conv2d-depthwise", c2, input=randn(1, 3, 5, 5), weight=randn(6, 1, 3, 3), bias=randn(6), stride=fixed(1),
     padding=fixed(1), dilation=fixed(1), groups=fixed(3))  # fmt: skip
case("conv2d-only-weight-grad", c2, input=randn(2, 2, 5, 4, grad=False), weight=randn(3, 2, 3, 2),
     bias=randn(3, grad=False))  # fmt: skip
case("conv2d-only-input-grad", c2, input=randn(2, 2, 5, 4), weight=randn(3, 2, 3, 2, grad=False))

# --------------------------------------------------------------------------------------------------
# mse_loss and quadratic_cost
# --------------------------------------------------------------------------------------------------


def _mse(reduction, M, input, target):
    return M.mse_loss(input, target, reduction=reduction)


def _mse_weighted(reduction, M, input, target, weight):
    return M.mse_loss(input, target, reduction=reduction, weight=weight)


def _quad(reduction, M, input, target):
    return M.quadratic_cost(input, target, reduction=reduction)


for r in REDUCTIONS:
    mse, msew = partial(_mse, r), partial(_mse_weighted, r)
    case(f"mse-{r}-2d", mse, input=randn(4, 3), target=randn(4, 3))
    case(f"mse-{r}-3d", mse, input=randn(2, 3, 4), target=randn(2, 3, 4))
    case(f"mse-{r}-1d", mse, input=randn(5), target=randn(5))
    case(f"mse-{r}-0d", mse, input=randn(), target=randn())
    case(f"mse-{r}-N1", mse, input=randn(1, 3), target=randn(1, 3))
    case(f"mse-{r}-N0", mse, smooth=False, equal_nan=True, input=randn(0, 3), target=randn(0, 3))
    case(f"mse-{r}-target-no-grad", mse, input=randn(4, 3), target=randn(4, 3, grad=False))
    case(f"mse-{r}-transposed", mse, input=randn(4, 3, layout="T"), target=randn(4, 3, layout="slice"))
    case(f"mse-{r}-broadcast-target", mse, input=randn(4, 3), target=randn(3))
    case(f"mse-{r}-broadcast-input", mse, input=randn(1, 3), target=randn(4, 3))
    case(f"mse-{r}-weight", msew, input=randn(4, 3), target=randn(4, 3), weight=uniform(4, 3, lo=0.1))
    case(f"mse-{r}-weight-3d", msew, input=randn(2, 3, 2), target=randn(2, 3, 2), weight=uniform(2, 3, 2, lo=0.1))
    case(
        f"mse-{r}-weight-broadcast-target",
        msew,
        input=randn(4, 3),
        target=randn(3),
        weight=uniform(4, 3, lo=0.1),
    )
    case(f"mse-{r}-weight-no-grad", msew, input=randn(4, 3), target=randn(4, 3), weight=uniform(4, 3, grad=False))
    case(f"mse-{r}-nan-inf", mse, smooth=False, equal_nan=True, input=const(SPECIALS), target=randn(6))

    quad = partial(_quad, r)
    case(f"quadratic-{r}-2d", quad, input=randn(4, 3), target=randn(4, 3))
    case(f"quadratic-{r}-3d", quad, input=randn(2, 3, 4), target=randn(2, 3, 4))
    case(f"quadratic-{r}-1d", quad, input=randn(5), target=randn(5))
    case(f"quadratic-{r}-N1", quad, input=randn(1, 3), target=randn(1, 3))
    case(f"quadratic-{r}-N0", quad, smooth=False, equal_nan=True, input=randn(0, 3), target=randn(0, 3))
    case(f"quadratic-{r}-target-no-grad", quad, input=randn(4, 3), target=randn(4, 3, grad=False))
    case(f"quadratic-{r}-transposed", quad, input=randn(4, 3, layout="T"), target=randn(4, 3, layout="slice"))
    case(f"quadratic-{r}-nan-inf", quad, smooth=False, equal_nan=True, input=const([SPECIALS]), target=randn(1, 6))
# torch.nn.functional.mse_loss checks the weight against the input's own size, then broadcasts it.
case("mse-mean-weight-input-shaped-target-broadcast", partial(_mse_weighted, "mean"),
     input=randn(4, 3), target=randn(2, 4, 3), weight=uniform(4, 3, lo=0.1))  # fmt: skip

# --------------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------------


def _ce(reduction, M, input, target, weight=None, ignore_index=-100, label_smoothing=0.0):
    return M.cross_entropy(
        input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


EXTREME_LOGITS = [[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, 1e4], [1e4, 1e4, -1e4, -1e4]]
NAN_LOGITS = [[float("nan"), 0.0, 1.0], [float("inf"), 0.0, 1.0], [-float("inf"), 0.0, 1.0], [0.5, 0.0, 1.0]]

for r in REDUCTIONS:
    ce = partial(_ce, r)
    # class-index targets
    case(f"ce-{r}-idx", ce, input=randn(4, 5), target=index(5, 4))
    case(f"ce-{r}-idx-weight", ce, input=randn(4, 5), target=index(5, 4), weight=uniform(5, lo=0.2, grad=False))
    case(f"ce-{r}-idx-ignore", ce, input=randn(4, 5), target=index(5, 4, ignore=-100, hits=2))
    case(
        f"ce-{r}-idx-ignore-index-2",
        ce,
        input=randn(6, 5),
        target=classes([2, 0, 2, 4, 1, 2]),
        weight=uniform(5, lo=0.2, grad=False),
        ignore_index=fixed(2),
    )
    case(f"ce-{r}-idx-smoothing", ce, input=randn(4, 5), target=index(5, 4), label_smoothing=fixed(0.2))
    case(
        f"ce-{r}-idx-weight-ignore-smoothing",
        ce,
        input=randn(6, 5),
        target=index(5, 6, ignore=-100, hits=2),
        weight=uniform(5, lo=0.2, grad=False),
        ignore_index=fixed(-100),
        label_smoothing=fixed(0.3),
    )
    case(
        f"ce-{r}-idx-spatial",
        ce,
        input=randn(2, 5, 3, 2),
        target=index(5, 2, 3, 2, ignore=-100, hits=1),
        weight=uniform(5, lo=0.2, grad=False),
    )
    case(
        f"ce-{r}-idx-spatial-smoothing",
        ce,
        input=randn(2, 5, 3),
        target=index(5, 2, 3, ignore=-100, hits=1),
        weight=uniform(5, lo=0.2, grad=False),
        ignore_index=fixed(-100),
        label_smoothing=fixed(0.1),
    )
    case(f"ce-{r}-idx-unbatched", ce, input=randn(5), target=index(5))
    case(
        f"ce-{r}-idx-unbatched-weight-smoothing",
        ce,
        input=randn(5),
        target=index(5),
        weight=uniform(5, lo=0.2, grad=False),
        ignore_index=fixed(-100),
        label_smoothing=fixed(0.25),
    )
    case(f"ce-{r}-idx-unbatched-ignored", ce, smooth=False, equal_nan=True, input=randn(5), target=classes(-100))
    case(f"ce-{r}-idx-N1", ce, input=randn(1, 5), target=index(5, 1))
    case(f"ce-{r}-idx-N0", ce, smooth=False, equal_nan=True, input=randn(0, 5), target=index(5, 0))
    case(f"ce-{r}-idx-N0-weight", ce, smooth=False, equal_nan=True, input=randn(0, 5), target=index(5, 0),
         weight=uniform(5, grad=False))  # fmt: skip
    case(
        f"ce-{r}-idx-all-ignored",
        ce,
        smooth=False,
        equal_nan=True,
        input=randn(3, 5),
        target=index(5, 3, ignore=-100, hits=3),
    )
    case(f"ce-{r}-idx-transposed", ce, input=randn(4, 5, layout="T"), target=index(5, 4))
    case(f"ce-{r}-idx-uint8", ce, input=randn(4, 5), target=index(5, 4, dtype=torch.uint8))
    case(f"ce-{r}-idx-extreme", ce, smooth=False, input=const(EXTREME_LOGITS), target=classes([1, 0, 2]))
    case(f"ce-{r}-idx-extreme-smoothing", ce, smooth=False, input=const(EXTREME_LOGITS),
         target=classes([1, 0, 2]), weight=fixed(None), ignore_index=fixed(-100), label_smoothing=fixed(0.1))  # fmt: skip
    case(f"ce-{r}-idx-nan-inf", ce, smooth=False, equal_nan=True, input=const(NAN_LOGITS), target=classes([1, 0, 0, 2]))
    # class-probability targets (differentiable: target and weight get gradients too)
    case(f"ce-{r}-prob", ce, input=randn(4, 5), target=probs(4, 5))
    case(f"ce-{r}-prob-weight", ce, input=randn(4, 5), target=probs(4, 5), weight=uniform(5, lo=0.2))
    case(f"ce-{r}-prob-smoothing", ce, input=randn(4, 5), target=probs(4, 5), weight=fixed(None),
         ignore_index=fixed(-100), label_smoothing=fixed(0.2))  # fmt: skip
    case(f"ce-{r}-prob-weight-smoothing", ce, input=randn(4, 5), target=probs(4, 5), weight=uniform(5, lo=0.2),
         ignore_index=fixed(-100), label_smoothing=fixed(0.2))  # fmt: skip
    case(f"ce-{r}-prob-spatial", ce, input=randn(2, 5, 3, 2), target=probs(2, 5, 3, 2), weight=uniform(5, lo=0.2))
    case(f"ce-{r}-prob-unbatched", ce, input=randn(5), target=probs(5), weight=uniform(5, lo=0.2),
         ignore_index=fixed(-100), label_smoothing=fixed(0.1))  # fmt: skip
    case(f"ce-{r}-prob-N1", ce, input=randn(1, 5), target=probs(1, 5))
    case(f"ce-{r}-prob-N0", ce, smooth=False, equal_nan=True, input=randn(0, 5), target=probs(0, 5))
    case(f"ce-{r}-prob-unnormalised", ce, input=randn(4, 5), target=uniform(4, 5))
    case(f"ce-{r}-prob-transposed", ce, input=randn(4, 5, layout="T"), target=uniform(4, 5, layout="slice"))
    case(f"ce-{r}-prob-target-no-grad", ce, input=randn(4, 5), target=probs(4, 5, grad=False))
    case(f"ce-{r}-prob-extreme", ce, smooth=False, input=const(EXTREME_LOGITS), target=probs(3, 4),
         weight=uniform(4, lo=0.2), ignore_index=fixed(-100), label_smoothing=fixed(0.1))  # fmt: skip
    case(f"ce-{r}-prob-nan-inf", ce, smooth=False, equal_nan=True, input=const(NAN_LOGITS), target=probs(4, 3))

# --------------------------------------------------------------------------------------------------
# binary_cross_entropy, binary_cross_entropy_with_logits
# --------------------------------------------------------------------------------------------------


def _bce(reduction, M, input, target, weight=None):
    return M.binary_cross_entropy(input, target, weight, reduction=reduction)


def _bcel(reduction, M, input, target, weight=None, pos_weight=None):
    return M.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)


def A(*shape, **kw):  # probabilities away from 0 and 1
    return uniform(*shape, lo=0.05, hi=0.95, **kw)


for r in REDUCTIONS:
    bce, bcel = partial(_bce, r), partial(_bcel, r)
    case(f"bce-{r}", bce, input=A(4, 3), target=uniform(4, 3))
    case(f"bce-{r}-binary-target", bce, input=A(4, 3), target=binary(4, 3, grad=False))
    case(f"bce-{r}-weight", bce, input=A(4, 3), target=uniform(4, 3), weight=uniform(4, 3, grad=False))
    case(f"bce-{r}-weight-broadcast", bce, input=A(4, 3), target=uniform(4, 3), weight=uniform(3, grad=False))
    case(f"bce-{r}-weight-column", bce, input=A(4, 3), target=uniform(4, 3), weight=uniform(4, 1, grad=False))
    case(f"bce-{r}-3d", bce, input=A(2, 3, 2), target=uniform(2, 3, 2))
    case(f"bce-{r}-1d", bce, input=A(5), target=uniform(5))
    case(f"bce-{r}-0d", bce, input=A(), target=uniform())
    case(f"bce-{r}-N0", bce, smooth=False, equal_nan=True, input=A(0, 3), target=uniform(0, 3))
    case(f"bce-{r}-transposed", bce, input=A(4, 3, layout="T"), target=uniform(4, 3, layout="slice"))
    case(f"bce-{r}-target-no-grad", bce, input=A(4, 3), target=uniform(4, 3, grad=False))
    # a exactly 0 or 1: torch clamps the logs at -100 and a(1 - a) at 1e-12
    case(f"bce-{r}-saturated", bce, smooth=False, input=const([0.0, 1.0, 0.0, 1.0, 1e-30, 0.5]),
         target=const([0.0, 1.0, 1.0, 0.0, 1.0, 0.5], grad=False))  # fmt: skip
    case(f"bce-{r}-saturated-target-grad", bce, smooth=False, input=const([0.0, 1.0, 0.0, 1.0, 1e-30, 0.5]),
         target=const([0.0, 1.0, 1.0, 0.0, 1.0, 0.5]))  # fmt: skip

    case(f"bcel-{r}", bcel, input=randn(4, 3), target=uniform(4, 3))
    case(f"bcel-{r}-weight", bcel, input=randn(4, 3), target=uniform(4, 3), weight=uniform(4, 3, grad=False))
    case(f"bcel-{r}-pos-weight", bcel, input=randn(4, 3), target=uniform(4, 3), weight=fixed(None),
         pos_weight=uniform(3, lo=0.5, hi=3.0, grad=False))  # fmt: skip
    case(f"bcel-{r}-weight-pos-weight", bcel, input=randn(4, 3), target=uniform(4, 3), weight=uniform(3, grad=False),
         pos_weight=uniform(3, lo=0.5, hi=3.0, grad=False))  # fmt: skip
    case(f"bcel-{r}-3d-pos-weight", bcel, input=randn(2, 3, 4), target=uniform(2, 3, 4),
         weight=uniform(2, 1, 4, grad=False), pos_weight=uniform(4, lo=0.5, hi=3.0, grad=False))  # fmt: skip
    case(f"bcel-{r}-1d", bcel, input=randn(5), target=uniform(5))
    case(f"bcel-{r}-0d", bcel, input=randn(), target=uniform())
    case(f"bcel-{r}-N0", bcel, smooth=False, equal_nan=True, input=randn(0, 3), target=uniform(0, 3))
    case(f"bcel-{r}-transposed", bcel, input=randn(4, 3, layout="T"), target=uniform(4, 3, layout="slice"))
    case(f"bcel-{r}-target-no-grad", bcel, input=randn(4, 3), target=uniform(4, 3, grad=False),
         weight=fixed(None), pos_weight=uniform(3, lo=0.5, hi=3.0, grad=False))  # fmt: skip
    case(f"bcel-{r}-extreme", bcel, smooth=False, input=const([[1e4, -1e4, 0.0], [-1e4, 1e4, 30.0]]),
         target=const([[0.0, 1.0, 0.5], [0.3, 1.0, 0.0]]), weight=uniform(3, grad=False),
         pos_weight=uniform(3, lo=0.5, hi=3.0, grad=False))  # fmt: skip
    case(f"bcel-{r}-nan-inf", bcel, smooth=False, equal_nan=True, input=const(SPECIALS), target=uniform(6))

"""Bad input (issue section 3), each checked against PyTorch on the same input.

Where torch raises, ours raises the same exception type, and its message names what was expected and
what came. Where torch does not raise (it promotes, broadcasts or accepts), ours does not either, and
gives torch's value. Nothing changes when a call fails.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import DEVICES, OpRecorder, assert_close_labelled, torch_ref
from torch import nn

import torchbp
import torchbp.functional as BF
import torchbp.nn as bnn

pytestmark = pytest.mark.filterwarnings("ignore:Using a target size")


# --------------------------------------------------------------------------------------------------
# What a message must name
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A shape, as any of the usual spellings: (3, 5), [3, 5], 3x5, torch.Size([3, 5])."""

    dims: tuple[int, ...]

    def found_in(self, msg: str) -> bool:
        d = self.dims
        spellings = {str(d), str(list(d)), "x".join(map(str, d)), str(torch.Size(d))}
        if len(d) == 1:
            spellings |= {f"({d[0]})", f"[{d[0]}]"}
        return any(s in msg for s in spellings)


@dataclass(frozen=True)
class AnyOf:
    words: tuple[str, ...]

    def found_in(self, msg: str) -> bool:
        return any(w.lower() in msg.lower() for w in self.words)


_DTYPE_NAMES = {
    torch.float64: ("float64", "Double"),
    torch.float32: ("float32", "Float"),
    torch.int64: ("int64", "Long"),
    torch.int32: ("int32", "Int"),
    torch.bool: ("bool", "Bool"),
}


def _mentions(msg: str, item) -> bool:
    if isinstance(item, torch.dtype):
        return any(name in msg for name in _DTYPE_NAMES[item])
    if isinstance(item, (Shape, AnyOf)):
        return item.found_in(msg)
    return str(item).lower() in msg.lower()


# --------------------------------------------------------------------------------------------------
# The cases: call(M) runs the bad call with namespace M (torchbp.functional or torch's reference)
# --------------------------------------------------------------------------------------------------


@dataclass
class BadInput:
    id: str
    build: Callable[[str], Callable]  # device -> call(M)
    mentions: tuple = ()  # what our message must name, where torch raises
    metadata_only: bool = True  # the error is decidable from shapes/dtypes/types: raised before any op


CASES: list[BadInput] = []


def bad(id, mentions=(), metadata_only=True):
    def register(build):
        CASES.append(BadInput(id, build, tuple(mentions), metadata_only))
        return build

    return register


def t(*shape, dtype=torch.float32, device="cpu", lo=None):
    x = (
        torch.randn(shape, dtype=dtype, device=device)
        if lo is None
        else lo + (1 - 2 * lo) * torch.rand(shape, dtype=dtype, device=device)
    )
    return x


# linear -------------------------------------------------------------------------------------------
@bad("linear-wrong-features-2d", [Shape((2, 5)), "7"])
def _(dev):
    x, w, b = t(2, 5, device=dev), t(3, 7, device=dev), t(3, device=dev)
    return lambda M: M.linear(x, w, b)


@bad("linear-wrong-features-1d", [Shape((5,)), "7"])
def _(dev):
    x, w = t(5, device=dev), t(3, 7, device=dev)
    return lambda M: M.linear(x, w)


@bad("linear-wrong-features-3d", [Shape((2, 4, 5)), "7"])
def _(dev):
    x, w = t(2, 4, 5, device=dev), t(3, 7, device=dev)
    return lambda M: M.linear(x, w)


@bad("linear-0d-input", [AnyOf(("0-D", "0D", "()"))])
def _(dev):
    x, w = torch.tensor(1.0, device=dev), t(3, 7, device=dev)
    return lambda M: M.linear(x, w)


@bad("linear-dtype-input-vs-weight", [torch.float64, torch.float32])
def _(dev):
    x, w, b = t(2, 4, dtype=torch.float64, device=dev), t(3, 4, device=dev), t(3, device=dev)
    return lambda M: M.linear(x, w, b)


@bad("linear-dtype-bias", [torch.float64, torch.float32])
def _(dev):
    x, w, b = t(2, 4, device=dev), t(3, 4, device=dev), t(3, dtype=torch.float64, device=dev)
    return lambda M: M.linear(x, w, b)


@bad("linear-bias-wrong-shape", [Shape((4,)), "3"])
def _(dev):
    x, w, b = t(2, 4, device=dev), t(3, 4, device=dev), t(4, device=dev)
    return lambda M: M.linear(x, w, b)


@bad("linear-input-not-tensor", ["input", "list"])
def _(dev):
    w = t(3, 2, device=dev)
    return lambda M: M.linear([[1.0, 2.0]], w)


@bad("linear-weight-not-tensor", ["weight", "float"])
def _(dev):
    x = t(2, 4, device=dev)
    return lambda M: M.linear(x, 3.0)


@bad("linear-bias-not-tensor", ["bias", "int"])
def _(dev):
    x, w = t(2, 4, device=dev), t(3, 4, device=dev)
    return lambda M: M.linear(x, w, 1)


@bad("module-linear-wrong-features", [Shape((2, 5)), "4"])
def _(dev):
    x = t(2, 5, device=dev)
    ours, ref = bnn.Linear(4, 3, device=dev), nn.Linear(4, 3, device=dev)
    return lambda M: (ours if M is BF else ref)(x)


# activations --------------------------------------------------------------------------------------
@bad("sigmoid-not-tensor", ["input", "list"])
def _(dev):
    return lambda M: M.sigmoid([1.0, 2.0])


@bad("relu-not-tensor", ["input", "int"])
def _(dev):
    return lambda M: M.relu(3)


# mse_loss -----------------------------------------------------------------------------------------
@bad("mse-unknown-reduction", ["avg"])
def _(dev):
    x, y = t(3, 4, device=dev), t(3, 4, device=dev)
    return lambda M: M.mse_loss(x, y, reduction="avg")


@bad("mse-target-shape-not-broadcastable", [Shape((3, 5)), Shape((3, 4))])
def _(dev):
    x, y = t(3, 4, device=dev), t(3, 5, device=dev)
    return lambda M: M.mse_loss(x, y)


@bad("mse-target-not-tensor", ["target", "float"])
def _(dev):
    x = t(3, 4, device=dev)
    return lambda M: M.mse_loss(x, 1.0)


@bad("mse-weight-wrong-shape", [Shape((4,)), Shape((3, 4))])
def _(dev):
    x, y, w = t(3, 4, device=dev), t(3, 4, device=dev), t(4, device=dev)
    return lambda M: M.mse_loss(x, y, weight=w)


@bad("mse-weight-shaped-like-broadcast-not-like-input", [Shape((3, 4)), Shape((4,))])
def _(dev):
    x, y, w = t(4, device=dev), t(3, 4, device=dev), t(3, 4, device=dev)
    return lambda M: M.mse_loss(x, y, weight=w)


@bad("mse-target-float64-promotes")
def _(dev):
    x, y = t(3, 4, device=dev), t(3, 4, dtype=torch.float64, device=dev)
    return lambda M: M.mse_loss(x, y)


@bad("mse-target-int64-promotes")
def _(dev):
    x, y = t(3, 4, device=dev), torch.randint(0, 3, (3, 4), device=dev)
    return lambda M: M.mse_loss(x, y)


@bad("mse-weight-float64-promotes")
def _(dev):
    x, y, w = t(3, 4, device=dev), t(3, 4, device=dev), t(3, 4, dtype=torch.float64, device=dev).abs()
    return lambda M: M.mse_loss(x, y, weight=w)


@bad("mse-integer-input-and-target", [torch.int64], metadata_only=False)
def _(dev):
    x, y = torch.randint(0, 3, (3, 4), device=dev), torch.randint(0, 3, (3, 4), device=dev)
    return lambda M: M.mse_loss(x, y)


# cross_entropy ------------------------------------------------------------------------------------
@bad("ce-index-out-of-range", ["9", AnyOf(("3", "4"))], metadata_only=False)
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 9, 1], device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-index-equal-to-classes", ["4"], metadata_only=False)
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 4, 1], device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-index-negative", ["-1"], metadata_only=False)
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, -1, 1], device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-index-negative-is-ignore-index", metadata_only=False)
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, -1, 1], device=dev)
    return lambda M: M.cross_entropy(z, y, ignore_index=-1)


@bad("ce-index-out-of-range-spatial", ["7"], metadata_only=False)
def _(dev):
    z, y = t(2, 4, 3, device=dev), torch.tensor([[0, 1, 2], [3, 7, 0]], device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-index-out-of-range-unbatched", ["6"], metadata_only=False)
def _(dev):
    z, y = t(4, device=dev), torch.tensor(6, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-index-out-of-range-with-weight-and-smoothing", ["5"], metadata_only=False)
def _(dev):
    z, y, w = t(3, 4, device=dev), torch.tensor([0, 5, 1], device=dev), t(4, device=dev).abs()
    return lambda M: M.cross_entropy(z, y, w, label_smoothing=0.1)


@bad("ce-target-batch-mismatch", ["2", "3"])
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 1], device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-0d-for-batched-input", ["3"])
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor(1, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-extra-dim", [Shape((3, 1))])
def _(dev):
    z, y = t(3, 4, device=dev), torch.zeros(3, 1, dtype=torch.long, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-spatial-mismatch", [Shape((2, 3, 4))])
def _(dev):
    z, y = t(2, 5, 3, 3, device=dev), torch.zeros(2, 3, 4, dtype=torch.long, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-spatial-batch-mismatch", ["1", "2"])
def _(dev):
    z, y = t(2, 5, 3, 3, device=dev), torch.zeros(1, 3, 3, dtype=torch.long, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-unbatched-size-2", [Shape((2,))])
def _(dev):
    z, y = t(5, device=dev), torch.zeros(2, dtype=torch.long, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-unbatched-size-1-accepted")
def _(dev):
    z, y = t(5, device=dev), torch.tensor([3], device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-int32", [torch.int32])
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 1, 2], dtype=torch.int32, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-bool", [torch.bool])
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 1, 1], dtype=torch.bool, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-uint8-accepted", metadata_only=False)
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 1, 3], dtype=torch.uint8, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-probs-wrong-classes", [Shape((3, 5)), Shape((3, 4))])
def _(dev):
    z, y = t(3, 4, device=dev), torch.rand(3, 5, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-probs-wrong-batch", [Shape((2, 4)), "3"])
def _(dev):
    z, y = t(3, 4, device=dev), torch.rand(2, 4, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-probs-extra-leading-dim", [Shape((2, 3, 4))])
def _(dev):
    z, y = t(3, 4, device=dev), torch.rand(2, 3, 4, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-probs-spatial-mismatch", [Shape((2, 5, 3, 4))])
def _(dev):
    z, y = t(2, 5, 3, 3, device=dev), torch.rand(2, 5, 3, 4, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-probs-unbatched-wrong-classes", [Shape((4,)), "5"])
def _(dev):
    z, y = t(5, device=dev), torch.rand(4, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-probs-float64-target-accepted")
def _(dev):
    z, y = t(3, 4, device=dev), torch.rand(3, 4, dtype=torch.float64, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-unknown-reduction", ["avg"])
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 1, 2], device=dev)
    return lambda M: M.cross_entropy(z, y, reduction="avg")


@bad("ce-label-smoothing-above-1", ["1.5"])
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 1, 2], device=dev)
    return lambda M: M.cross_entropy(z, y, label_smoothing=1.5)


@bad("ce-label-smoothing-above-1-probs", ["1.5"])
def _(dev):
    z, y = t(3, 4, device=dev), torch.rand(3, 4, device=dev)
    return lambda M: M.cross_entropy(z, y, label_smoothing=1.5)


@bad("ce-label-smoothing-negative-accepted-by-torch")
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 1, 2], device=dev)
    return lambda M: M.cross_entropy(z, y, label_smoothing=-0.1)


@bad("ce-weight-wrong-shape", [Shape((3,)), "4"])
def _(dev):
    z, y, w = t(3, 4, device=dev), torch.tensor([0, 1, 2], device=dev), torch.rand(3, device=dev)
    return lambda M: M.cross_entropy(z, y, w)


@bad("ce-weight-wrong-shape-probs", [Shape((5,)), "4"])
def _(dev):
    z, y, w = t(3, 4, device=dev), torch.rand(3, 4, device=dev), torch.rand(5, device=dev)
    return lambda M: M.cross_entropy(z, y, w)


@bad("ce-weight-2d", [Shape((1, 4))])
def _(dev):
    z, y, w = t(3, 4, device=dev), torch.tensor([0, 1, 2], device=dev), torch.rand(1, 4, device=dev)
    return lambda M: M.cross_entropy(z, y, w)


@bad("ce-weight-dtype", [torch.float32, torch.float64], metadata_only=False)
def _(dev):
    z, y, w = t(3, 4, device=dev), torch.tensor([0, 1, 2], device=dev), torch.rand(4, dtype=torch.float64, device=dev)
    return lambda M: M.cross_entropy(z, y, w)


@bad("ce-weight-requires-grad-with-indices", ["weight"], metadata_only=False)
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 1, 2], device=dev)
    w = torch.rand(4, device=dev, requires_grad=True)
    return lambda M: M.cross_entropy(z, y, w)


@bad("ce-integer-input", [torch.int64])
def _(dev):
    z, y = torch.randint(0, 3, (3, 4), device=dev), torch.tensor([0, 1, 2], device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-0d-input", [AnyOf(("0-D", "0D", "()", "dimension"))])
def _(dev):
    z, y = torch.tensor(1.0, device=dev), torch.tensor(0, device=dev)
    return lambda M: M.cross_entropy(z, y)


@bad("ce-target-not-tensor", ["target", "list"])
def _(dev):
    z = t(3, 4, device=dev)
    return lambda M: M.cross_entropy(z, [0, 1, 2])


@bad("ce-input-not-tensor", ["input", "list"])
def _(dev):
    y = torch.tensor([0, 1], device=dev)
    return lambda M: M.cross_entropy([[0.0, 1.0], [1.0, 0.0]], y)


@bad("module-ce-unknown-reduction", ["avg"])
def _(dev):
    z, y = t(3, 4, device=dev), torch.tensor([0, 1, 2], device=dev)
    ours, ref = bnn.CrossEntropyLoss(reduction="avg"), nn.CrossEntropyLoss(reduction="avg")
    return lambda M: (ours if M is BF else ref)(z, y)


# binary_cross_entropy -----------------------------------------------------------------------------
@bad("bce-input-above-1", [AnyOf(("between 0 and 1", "[0, 1]"))], metadata_only=False)
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1) + 1, t(3, 4, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy(a, y)


@bad("bce-input-negative", [AnyOf(("between 0 and 1", "[0, 1]"))], metadata_only=False)
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1) - 1, t(3, 4, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy(a, y)


@bad("bce-input-nan", [AnyOf(("between 0 and 1", "[0, 1]", "nan"))], metadata_only=False)
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1), t(3, 4, device=dev, lo=0.1)
    a[1, 1] = float("nan")
    return lambda M: M.binary_cross_entropy(a, y)


@bad("bce-target-above-1", [AnyOf(("between 0 and 1", "[0, 1]"))], metadata_only=False)
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1), t(3, 4, device=dev, lo=0.1) + 1
    return lambda M: M.binary_cross_entropy(a, y)


@bad("bce-target-shape", [Shape((3, 5)), Shape((3, 4))])
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1), t(3, 5, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy(a, y)


@bad("bce-target-broadcastable-shape", [Shape((1, 4)), Shape((3, 4))])
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1), t(1, 4, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy(a, y)


@bad("bce-target-dtype", [torch.float64, torch.float32])
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1), t(3, 4, dtype=torch.float64, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy(a, y)


@bad("bce-target-int64", [torch.int64, torch.float32])
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1), torch.randint(0, 2, (3, 4), device=dev)
    return lambda M: M.binary_cross_entropy(a, y)


@bad("bce-weight-wrong-shape", [Shape((5,))])
def _(dev):
    a, y, w = t(3, 4, device=dev, lo=0.1), t(3, 4, device=dev, lo=0.1), torch.rand(5, device=dev)
    return lambda M: M.binary_cross_entropy(a, y, w)


@bad("bce-weight-float64-accepted")
def _(dev):
    a, y, w = t(3, 4, device=dev, lo=0.1), t(3, 4, device=dev, lo=0.1), torch.rand(4, dtype=torch.float64, device=dev)
    return lambda M: M.binary_cross_entropy(a, y, w)


@bad("bce-weight-requires-grad", ["weight"])
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1), t(3, 4, device=dev, lo=0.1)
    w = torch.rand(4, device=dev, requires_grad=True)
    return lambda M: M.binary_cross_entropy(a, y, w)


@bad("bce-unknown-reduction", ["avg"])
def _(dev):
    a, y = t(3, 4, device=dev, lo=0.1), t(3, 4, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy(a, y, reduction="avg")


@bad("bce-integer-input", [torch.int64])
def _(dev):
    a, y = torch.randint(0, 2, (3, 4), device=dev), torch.randint(0, 2, (3, 4), device=dev)
    return lambda M: M.binary_cross_entropy(a, y)


# binary_cross_entropy_with_logits -----------------------------------------------------------------
@bad("bcel-target-shape", [Shape((3, 5)), Shape((3, 4))])
def _(dev):
    z, y = t(3, 4, device=dev), t(3, 5, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy_with_logits(z, y)


@bad("bcel-target-int64", [torch.int64])
def _(dev):
    z, y = t(3, 4, device=dev), torch.randint(0, 2, (3, 4), device=dev)
    return lambda M: M.binary_cross_entropy_with_logits(z, y)


@bad("bcel-target-float64-promotes")
def _(dev):
    z, y = t(3, 4, device=dev), t(3, 4, dtype=torch.float64, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy_with_logits(z, y)


@bad("bcel-weight-wrong-shape", [Shape((5,))])
def _(dev):
    z, y, w = t(3, 4, device=dev), t(3, 4, device=dev, lo=0.1), torch.rand(5, device=dev)
    return lambda M: M.binary_cross_entropy_with_logits(z, y, w)


@bad("bcel-pos-weight-wrong-shape", [Shape((5,))])
def _(dev):
    z, y, p = t(3, 4, device=dev), t(3, 4, device=dev, lo=0.1), torch.rand(5, device=dev)
    return lambda M: M.binary_cross_entropy_with_logits(z, y, pos_weight=p)


@bad("bcel-pos-weight-bigger-than-input", [Shape((2, 3, 4))])
def _(dev):
    z, y, p = t(3, 4, device=dev), t(3, 4, device=dev, lo=0.1), torch.rand(2, 3, 4, device=dev)
    return lambda M: M.binary_cross_entropy_with_logits(z, y, pos_weight=p)


@bad("bcel-weight-float64-promotes")
def _(dev):
    z, y, w = t(3, 4, device=dev), t(3, 4, device=dev, lo=0.1), torch.rand(4, dtype=torch.float64, device=dev)
    return lambda M: M.binary_cross_entropy_with_logits(z, y, w, pos_weight=w)


@bad("bcel-pos-weight-requires-grad", ["pos_weight"])
def _(dev):
    z, y = t(3, 4, device=dev), t(3, 4, device=dev, lo=0.1)
    p = torch.rand(4, device=dev, requires_grad=True)
    return lambda M: M.binary_cross_entropy_with_logits(z, y, pos_weight=p)


@bad("bcel-unknown-reduction", ["avg"])
def _(dev):
    z, y = t(3, 4, device=dev), t(3, 4, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy_with_logits(z, y, reduction="avg")


@bad("bcel-integer-input", [torch.int64])
def _(dev):
    z, y = torch.randint(0, 2, (3, 4), device=dev), t(3, 4, device=dev, lo=0.1)
    return lambda M: M.binary_cross_entropy_with_logits(z, y)


@bad("bcel-target-not-tensor", ["target", "float"])
def _(dev):
    z = t(3, 4, device=dev)
    return lambda M: M.binary_cross_entropy_with_logits(z, 0.5)


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------


def _outcome(call, M):
    try:
        return call(M), None
    except Exception as e:  # noqa: BLE001 - the exception is the result under test
        return None, e


def _expected_type(torch_exc: Exception) -> type:
    # torch.nn.functional's Python code calls a tensor method on a non-tensor argument and fails with
    # AttributeError ("'float' object has no attribute 'size'"); torch's own bindings raise TypeError
    # for a non-Tensor argument (F.linear, F.relu, torch.sigmoid). TypeError is the type asked for there.
    if isinstance(torch_exc, AttributeError) and "object has no attribute" in str(torch_exc):
        return TypeError
    return type(torch_exc)


def check_like_torch(call: Callable, mentions=()) -> Exception | None:
    expected, torch_exc = _outcome(call, torch_ref)
    value, ours_exc = _outcome(call, BF)
    if torch_exc is None:
        assert ours_exc is None, f"torch accepts this input; ours raises {type(ours_exc).__name__}: {ours_exc}"
        assert_close_labelled(value, expected, "forward value")
        return None
    assert ours_exc is not None, f"torch raises {type(torch_exc).__name__}: {torch_exc}; ours does not"
    want = _expected_type(torch_exc)
    assert type(ours_exc) is want, (
        f"torch raises {type(torch_exc).__name__} ({torch_exc}); ours raises {type(ours_exc).__name__} ({ours_exc})"
    )
    msg = str(ours_exc)
    missing = [m for m in mentions if not _mentions(msg, m)]
    assert not missing, f"our message {msg!r} does not name {missing}"
    return ours_exc


CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def test_case_ids_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bad_input_like_torch(case: BadInput, device):
    check_like_torch(case.build(device), case.mentions)


# Ops that may run before an error: views, and checks on values (e.g. of the class-index target).
VALIDATION_OPS = {
    "view", "expand", "alias", "detach", "t", "transpose", "unsqueeze", "squeeze", "_unsafe_view", "select",
    "slice", "eq", "ne", "lt", "le", "gt", "ge", "bitwise_and", "bitwise_or", "bitwise_not", "logical_and",
    "logical_or", "logical_not", "any", "all", "min", "max", "aminmax", "amin", "amax", "stack", "isnan",
    "isinf", "isfinite", "_local_scalar_dense", "index", "masked_select", "nonzero", "lift_fresh",
}  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.metadata_only])
def test_raised_before_any_computation(case: BadInput):
    """Errors decidable from types, shapes and dtypes are raised before the function's math runs.

    (Where ours does not raise at all, test_bad_input_like_torch reports it; nothing to check here.)
    """
    call = case.build("cpu")
    with OpRecorder() as rec:
        _, ours_exc = _outcome(call, BF)
    if ours_exc is not None:
        assert set(rec.ops) <= VALIDATION_OPS, f"ops before the error: {rec.ops}"


# --------------------------------------------------------------------------------------------------
# Device mismatch (needs a GPU)
# --------------------------------------------------------------------------------------------------

CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def _device_cases(dev):
    x, w, b = t(2, 4, device=dev), t(3, 4), t(3, device=dev)
    z, y = t(3, 4, device=dev), torch.tensor([0, 1, 2])
    a, p = t(3, 4, device=dev, lo=0.1), t(3, 4, lo=0.1)
    return {
        "linear-weight-on-cpu": lambda M: M.linear(x, w, b),
        "linear-bias-on-cpu": lambda M: M.linear(x, w.to(dev), b.cpu()),
        "linear-input-on-cpu": lambda M: M.linear(x.cpu(), w.to(dev), b),
        "mse-target-on-cpu": lambda M: M.mse_loss(z, p),
        "ce-target-on-cpu": lambda M: M.cross_entropy(z, y),
        "ce-weight-on-cpu": lambda M: M.cross_entropy(z, y.to(dev), torch.rand(4)),
        "bce-target-on-cpu": lambda M: M.binary_cross_entropy(a, p),
        "bcel-pos-weight-on-cpu": lambda M: M.binary_cross_entropy_with_logits(z, p.to(dev), pos_weight=torch.rand(4)),
    }


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("name", list(_device_cases("cpu")))
def test_device_mismatch_like_torch(name, device):
    check_like_torch(_device_cases(device)[name], [AnyOf(("cuda",)), AnyOf(("cpu",))])


# --------------------------------------------------------------------------------------------------
# A failed call changes nothing
# --------------------------------------------------------------------------------------------------


def _snapshot(model):
    return {n: (p, p.detach().clone(), p.grad, p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
def test_failed_calls_change_no_parameter_and_no_grad(device):
    torch.manual_seed(0)
    model = nn.Sequential(bnn.Linear(4, 6), bnn.ReLU(inplace=True), bnn.Linear(6, 3)).to(device)
    x, t_ok = torch.randn(5, 4, device=device), torch.tensor([0, 1, 2, 1, 0], device=device)
    bnn.CrossEntropyLoss()(model(x), t_ok).backward()  # every parameter has a .grad now
    before = _snapshot(model)

    failing = [
        lambda: model(torch.randn(5, 7, device=device)),  # wrong feature size
        lambda: model(x.double()),  # dtype mismatch with the parameters
        lambda: bnn.CrossEntropyLoss()(model(x), torch.tensor([0, 1, 9, 1, 0], device=device)),  # class 9
        lambda: bnn.CrossEntropyLoss()(model(x), torch.tensor([0, 1], device=device)),  # batch mismatch
        lambda: bnn.CrossEntropyLoss(reduction="avg")(model(x), t_ok),
        lambda: bnn.BCELoss()(model(x), torch.rand(5, 3, device=device)),  # outputs outside [0, 1]
        lambda: bnn.MSELoss()(model(x), torch.randn(5, 4, device=device)),
        lambda: bnn.BCEWithLogitsLoss(pos_weight=torch.ones(4, device=device))(
            model(x), torch.rand(5, 3, device=device)
        ),
        lambda: BF.linear(x, model[0].weight, torch.zeros(5, device=device)),
    ]
    for i, call in enumerate(failing):
        with pytest.raises((RuntimeError, ValueError, IndexError, TypeError)):
            call()
        for name, p in model.named_parameters():
            obj, value, grad_obj, grad_value = before[name]
            assert p is obj and p.grad is grad_obj, f"call {i}: {name} or its .grad was replaced"
            assert torch.equal(p, value), f"call {i}: {name} changed"
            assert torch.equal(p.grad, grad_value), f"call {i}: {name}.grad changed"

    # and after the failures, training goes on exactly as torch.nn's would
    bnn.CrossEntropyLoss()(model(x), t_ok).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * before[name][3], msg=lambda m, name=name: f"{name}.grad: {m}")


def test_failed_module_call_leaves_input_untouched():
    """A failing in-place ReLU model call must not have overwritten its input."""
    model = nn.Sequential(bnn.ReLU(inplace=True), bnn.Linear(4, 2))
    x = torch.randn(3, 5)
    before = x.clone()
    with pytest.raises(RuntimeError):
        nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2))(x.clone())
    with pytest.raises(RuntimeError):
        model(x)
    # torch's ReLU(inplace=True) has run before its Linear failed; so has ours: compare with torch
    torch.testing.assert_close(x, torch.relu(before))


# --------------------------------------------------------------------------------------------------
# Warnings as torch's
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_shape, target_shape", [((3, 4), (4,)), ((4,), (3, 4)), ((3, 4), (3, 4)), ((3, 1), (3, 4))]
)
def test_mse_size_warning_like_torch(input_shape, target_shape):
    x, y = torch.randn(input_shape), torch.randn(target_shape)
    caught = []
    for M in (torch_ref, BF):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            M.mse_loss(x, y)
        caught.append([type(i.message) for i in w if "target size" in str(i.message)])
    ref, ours = caught
    assert ours == ref


def test_convert_rejects_non_module_with_type_error():
    with pytest.raises(TypeError, match="list"):
        torchbp.convert([])

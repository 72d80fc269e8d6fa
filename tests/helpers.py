"""Shared test helpers: the device list, torch's reference functions and ``assert_matches_torch``.

Every comparison here is against PyTorch's own result (or, for ``quadratic_cost``, its formula written
with torch ops), never against torchbp itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from torchbp.cli.check import TOLERANCES, quadratic_cost_formula

#: The reason a CUDA variant skips on a machine without a GPU (the test summary sums these up in one line).
CUDA_SKIP_REASON = "no CUDA device"
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
REDUCTIONS = ("mean", "sum", "none")

# Tolerances per dtype, and the quadratic cost's formula: one definition, shared with ``torchbp check``; the
# reasons for each tolerance are in torchbp/cli/check.py (TOLERANCES). The formula is torch ops, not torchbp.
_TOLERANCES = TOLERANCES


#: torch's counterparts of torchbp.functional, under the same names.
torch_ref = SimpleNamespace(
    linear=F.linear,
    sigmoid=torch.sigmoid,
    relu=F.relu,
    mse_loss=F.mse_loss,
    quadratic_cost=quadratic_cost_formula,
    cross_entropy=F.cross_entropy,
    binary_cross_entropy=F.binary_cross_entropy,
    binary_cross_entropy_with_logits=F.binary_cross_entropy_with_logits,
)


def leaf_copy(x: Any) -> Any:
    """An independent leaf with the same values, dtype, device, strides and ``requires_grad``."""
    if not isinstance(x, Tensor):
        return x
    with torch.no_grad():
        y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        y.copy_(x)
    return y.requires_grad_(x.requires_grad)


def tolerance(expected: Tensor, rtol: float | None = None, atol: float | None = None) -> dict:
    """assert_close keyword arguments for a comparison with ``expected`` (torch's result), per its dtype.

    ``rtol``/``atol`` given: used as they are. Otherwise ``_TOLERANCES[dtype]``, the atol scaled by
    ``max(1, max|expected|)`` over the finite elements. Other dtypes (integers, complex): assert_close's defaults.
    """
    if rtol is not None or atol is not None:
        return {"rtol": rtol, "atol": atol}
    if expected.dtype not in _TOLERANCES:
        return {}
    r, a = _TOLERANCES[expected.dtype]
    finite = expected[torch.isfinite(expected)] if expected.numel() else expected
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return {"rtol": r, "atol": a * scale}


def assert_close_labelled(actual: Any, expected: Any, label: str, *, rtol=None, atol=None, equal_nan=False) -> None:
    """``torch.testing.assert_close`` whose failure message starts with ``label``."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{label}: ours gives {actual!r}, torch gives {expected!r}"
        return
    tol = tolerance(expected, rtol, atol) if isinstance(expected, Tensor) else {}
    torch.testing.assert_close(actual, expected, equal_nan=equal_nan, msg=lambda m: f"{label}: {m}", **tol)


def assert_matches_torch(
    ours: Callable,
    ref: Callable,
    inputs: Mapping[str, Any],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    equal_nan: bool = False,
    seed: int = 0,
) -> None:
    """Check ours against torch's reference: the forward value, then every gradient.

    ``inputs`` maps each keyword argument's name (also used in failure messages: ``"grad of weight"``) to
    its value; ``ours(**inputs)`` and ``ref(**inputs)`` are called with copies.
    Each side gets its own leaf copies (same values, strides and ``requires_grad``), so the two never
    share ``.grad``. Every floating tensor input that requires grad is differentiated, under the same
    random upstream gradient for both. Where torch gives no gradient, ours must give none (or zeros).
    """
    names = list(inputs)
    ours_args = [leaf_copy(v) for v in inputs.values()]
    ref_args = [leaf_copy(v) for v in inputs.values()]
    out = ours(**dict(zip(names, ours_args)))
    expected = ref(**dict(zip(names, ref_args)))
    assert_close_labelled(out, expected, "forward value", rtol=rtol, atol=atol, equal_nan=equal_nan)

    wrt = [
        i for i, v in enumerate(inputs.values()) if isinstance(v, Tensor) and v.requires_grad and v.is_floating_point()
    ]
    if not wrt or not expected.requires_grad:
        return
    assert out.requires_grad, "forward value: torch's output requires grad, ours does not"
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(expected.dtype)
    upstream = upstream.to(expected.device)
    grads_ref = torch.autograd.grad(expected, [ref_args[i] for i in wrt], upstream.clone(), allow_unused=True)
    grads_ours = torch.autograd.grad(out, [ours_args[i] for i in wrt], upstream.clone(), allow_unused=True)
    for i, g_ours, g_ref in zip(wrt, grads_ours, grads_ref):
        label = f"grad of {names[i]}"
        if g_ref is None:
            assert g_ours is None or not g_ours.any(), f"{label}: torch gives no gradient, ours gives {g_ours}"
            continue
        assert g_ours is not None, f"{label}: torch gives a gradient, ours gives None"
        assert_close_labelled(g_ours, g_ref, label, rtol=rtol, atol=atol, equal_nan=equal_nan)


GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear"})


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op that runs inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def gemms(self) -> list[str]:
        return [op for op in self.ops if op in GEMM_OPS]


def tfrecord_payloads(path) -> list[bytes]:
    """The payloads (serialized ``Event``\\ s) of a TensorBoard event file, in order: each TFRecord is the length
    (8 bytes, little-endian), its masked CRC (4), the payload, the payload's masked CRC (4)."""
    import struct

    data, pos, payloads = Path(path).read_bytes(), 0, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        payloads.append(data[pos + 12 : pos + 12 + length])
        pos += 16 + length
    return payloads

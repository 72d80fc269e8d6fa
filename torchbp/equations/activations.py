r"""The activations' equations: BP1/BP2's second half, :math:`∇_a C ⊙ σ'(z)`, one function per activation.

σ'(z) is diagonal, so the same product is each activation's forward-mode derivative, :math:`σ'(z) ⊙ dz`. A fast kernel
trick (:func:`_select_by_bits`, :func:`_times_a_one_minus_a`) sits beside the plain one-line equation it computes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _torch_private
from ._common import _differentiated


def sigmoid_backward(grad: Tensor, a: Tensor) -> Tensor:
    r"""BP1/BP2's second half for the sigmoid: :math:`∇_a C ⊙ σ'(z)` with :math:`σ'(z) = a (1 − a)`, from the output a."""
    if _differentiated():  # out of place, so the graph stays differentiable
        return grad * a * (1 - a)  # BP1/BP2: ∇_a C ⊙ σ'(z)
    return _times_a_one_minus_a(grad, a)


def _times_a_one_minus_a(grad: Tensor, a: Tensor) -> Tensor:
    """``grad * a * (1 - a)`` in one buffer: grad·a, minus grad·a·a in place."""
    out = grad * a
    return out.addcmul_(out, a, value=-1)  # BP1/BP2: ∇_a C ⊙ a(1 − a), in one buffer


def relu_backward(grad: Tensor, a: Tensor) -> Tensor:
    r"""BP1/BP2's second half for ReLU: :math:`∇_a C ⊙ σ'(z)` with :math:`σ'(z) = 1[z > 0]`, read from the output a.

    σ'(0) = 0, as torch's. Where a is NaN (z was NaN) the gradient passes, as torch's.
    """
    if _select_by_bits_applies(grad, a):
        return _select_by_bits(grad, a)
    return torch.where(a <= 0, 0.0, grad)  # BP1/BP2: ∇_a C ⊙ σ'(z), a select as torch's threshold_backward


# Integer types of the floating dtypes' width, for ReLU's bit-pattern select.
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _select_by_bits_applies(grad: Tensor, a: Tensor) -> bool:
    return not (
        # grad mode, a torch.func transform, forward AD: the select must stay differentiable
        _differentiated()
        or torch.compiler.is_compiling()  # (the compiler fuses the select by itself)
        or a.dtype not in _BITS
        or grad.dtype != a.dtype  # (a saved-tensor hook may change a's dtype)
        or grad.is_neg()
        or _torch_private.is_legacy_batched(grad)  # autograd.grad(is_grads_batched=True): no bit views
    )


def _select_by_bits(grad: Tensor, a: Tensor) -> Tensor:
    """``torch.where(a <= 0, 0, grad)`` exactly (a is a ReLU's output: ≥ 0 or NaN), fast on CPU (where bool-mask kernels are slow), in one buffer.

    The bits of |a| as integers, clamped to 1, are σ'(z) (1 also where a is NaN); an integer product
    with the bits of ``grad`` selects them exactly: 0, not NaN, for an Inf or NaN gradient where σ'(z) = 0.
    """
    d_sigma = a.abs().view(_BITS[a.dtype]).clamp_(max=1)
    return d_sigma.mul_(grad.view(_BITS[a.dtype])).view(a.dtype)  # BP1/BP2: ∇_a C ⊙ σ'(z)


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_TANH_C = 0.044715


def gelu_backward(grad: Tensor, z: Tensor, approximate: str = "none") -> Tensor:
    r"""BP1/BP2's second half for GELU, :math:`∇_a C ⊙ σ'(z)`, from the input z.

    ``'none'``, :math:`σ(z) = z Φ(z)`: :math:`σ'(z) = Φ(z) + z φ(z)` (Φ, φ the standard normal's CDF and density).
    ``'tanh'``, :math:`σ(z) = \frac{z}{2}(1 + \tanh u)`, :math:`u = \sqrt{2/π}(z + 0.044715 z^3)`:
    :math:`σ'(z) = \frac{1}{2}(1 + \tanh u) + \frac{z}{2}(1 − \tanh^2 u)\sqrt{2/π}(1 + 3 · 0.044715 z^2)`.
    """
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z))
        d_sigma = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * z * z)
    else:
        cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))  # Φ(z)
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))  # φ(z)
        d_sigma = cdf + z * pdf
    return grad * d_sigma  # BP1/BP2: ∇_a C ⊙ σ'(z)


def silu_backward(grad: Tensor, z: Tensor) -> Tensor:
    r"""BP1/BP2's second half for SiLU :math:`σ(z) = z\,s(z)`, s the logistic sigmoid:
    :math:`σ'(z) = s(z)(1 + z(1 − s(z)))`, from the input z."""
    s = torch.sigmoid(z)
    return grad * (s * (1 + z * (1 - s)))  # BP1/BP2: ∇_a C ⊙ σ'(z)


def tanh_backward(grad: Tensor, a: Tensor) -> Tensor:
    r"""BP1/BP2's second half for tanh: :math:`σ'(z) = 1 − a^2`, from the output a."""
    return grad * (1 - a * a)  # BP1/BP2: ∇_a C ⊙ σ'(z)

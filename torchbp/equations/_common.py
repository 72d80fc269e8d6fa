r"""What the equation families share: the test for a differentiated backward, and exact numbers as cached tensors.

:func:`_differentiated` says when a backward is itself being differentiated (its one-buffer fast paths must then
stay off); :func:`_number` and :func:`_divide` divide by a count without wrapping a Python number on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _torch_private


def _divide(grad: Tensor, count: int | float | Tensor) -> Tensor:
    """``grad / count`` to the bit; a number ``count`` as a cached 0-dim tensor of grad's dtype (:func:`_number`),
    which torch divides by without wrapping a Python number (half the time on a small tensor)."""
    if isinstance(count, Tensor):
        return grad / count
    return grad / _number(count, grad)


def _number(value: int | float, like: Tensor) -> Tensor | int | float:
    """``value`` as a cached 0-dim CPU tensor of ``like``'s dtype, where that is float32 or float64 and ``value``
    is exact in it (a count, 1): an op with it gives the bits of the op with the Python number, without wrapping
    the number on every call. The number itself elsewhere (other dtypes; while compiling)."""
    if like.dtype not in _EXACT or torch.compiler.is_compiling():
        return value
    key = (value, like.dtype)
    number = _NUMBERS.get(key)
    if number is None:
        if len(_NUMBERS) > 256:  # (a bound: one entry per batch size in use)
            _NUMBERS.clear()
        with torch.inference_mode(False):  # (a normal tensor, whatever mode the first backward runs in)
            number = _NUMBERS[key] = torch.tensor(float(value), dtype=like.dtype, device="cpu")
    return number


_EXACT = (torch.float32, torch.float64)
_NUMBERS: dict[tuple[int | float, torch.dtype], Tensor] = {}


def _differentiated() -> bool:
    """Whether the equations may themselves be differentiated: grad mode is on (``create_graph``), a torch.func
    transform is active (``hessian``, ``jacfwd(jacrev(f))``) or a ``torch.autograd.forward_ad.dual_level`` is open.

    Then they must not take their one-buffer fast paths (in-place ops, integer bit views), which neither
    autograd nor forward-mode AD can differentiate.
    """
    return torch.is_grad_enabled() or _torch_private.functorch_transforms_active() or _torch_private.forward_ad_active()

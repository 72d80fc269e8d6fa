r"""The dense layers' equations: :math:`z = a w^T + b` (``nn.Linear``) and :math:`z = a W + b` (GPT-2's ``Conv1D``).

:func:`linear_backward` is BP2's :math:`(w^{l+1})^T δ^{l+1}`, BP3 and BP4; :func:`linear_jvp` its forward-mode twin,
:math:`dz = da\,w^T + a\,dw^T + db`. :func:`conv1d_backward` and :func:`conv1d_jvp` are the same with ``W`` stored
(in, out).
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_backward(
    delta: Tensor,
    input: Tensor | None,
    weight: Tensor | None,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    bias_shape: torch.Size | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    r"""The gradients of :math:`z = a w^T + b` from :math:`δ^l = ∂C/∂z^l`: BP2's first half, BP4, BP3.

    Returns ``(∂C/∂a^{l-1}, ∂C/∂w^l, ∂C/∂b^l)``, each ``None`` unless asked for. ``input`` is
    :math:`a^{l-1}` (needed for BP4 only), ``weight`` is :math:`w^l` (needed for BP2 only);
    ``bias_shape`` is the bias's shape when it is not ``(out,)`` (a bias that broadcasts further).
    """
    grad_input = grad_weight = grad_bias = None
    if need_input:
        grad_input = delta @ weight  # BP2: (w^l)^T δ^l, the error moved back to a^{l-1}
    delta_2d = delta if delta.dim() == 2 else delta.reshape(-1, delta.shape[-1])
    if need_weight:
        grad_weight = delta_2d.mT @ input.reshape(-1, input.shape[-1])  # BP4: Σ_n δ_n a_n^T
    if need_bias:
        if bias_shape is None:
            grad_bias = delta_2d.sum(0)  # BP3: Σ_n δ_n
        else:
            grad_bias = delta.sum_to_size(bias_shape)  # BP3, summed over the dims the bias broadcast over
    return grad_input, grad_weight, grad_bias


def conv1d_backward(
    delta: Tensor,
    input: Tensor | None,
    weight: Tensor | None,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    r"""The gradients of :math:`z = a W + b` (``W`` stored (in, out)) from :math:`δ^l = ∂C/∂z^l`: BP2's first half,
    BP4, BP3.

    Returns ``(∂C/∂a^{l-1}, ∂C/∂W, ∂C/∂b^l)``, each ``None`` unless asked for; ``∂C/∂W`` has ``W``'s (in, out)
    layout. ``input`` is :math:`a^{l-1}` (needed for BP4 only), ``weight`` is ``W`` (needed for BP2 only).
    """
    grad_input = grad_weight = grad_bias = None
    if need_input:
        grad_input = delta @ weight.mT  # BP2: δ W^T = (w^l)^T δ^l, the error moved back to a^{l-1}
    delta_2d = delta if delta.dim() == 2 else delta.reshape(-1, delta.shape[-1])
    if need_weight:
        grad_weight = input.reshape(-1, input.shape[-1]).mT @ delta_2d  # BP4: Σ_n a_n δ_n^T, (in, out)
    if need_bias:
        grad_bias = delta_2d.sum(0)  # BP3: Σ_n δ_n
    return grad_input, grad_weight, grad_bias


def linear_jvp(
    input: Tensor, weight: Tensor, d_input: Tensor | None, d_weight: Tensor | None, d_bias: Tensor | None
) -> Tensor | None:
    r"""The forward-mode derivative of :math:`z = a w^T + b`: :math:`dz = da\,w^T + a\,dw^T + db`.

    Each tangent may be ``None`` (no term); ``None`` if all are. ``input`` is needed for dw only, ``weight`` for
    da only.
    """
    dz = None
    if d_input is not None:
        dz = d_input @ weight.mT  # da w^T
    if d_weight is not None:
        a_dw = input @ d_weight.mT  # a dw^T
        dz = a_dw if dz is None else dz + a_dw
    if d_bias is not None:
        if dz is None:  # z's shape: (*, out), broadcast with the bias's
            dz = d_bias.expand(torch.broadcast_shapes(input.shape[:-1] + weight.shape[:1], d_bias.shape))
        else:
            dz = dz + d_bias  # db
    return dz  # dz = da w^T + a dw^T + db


def conv1d_jvp(
    input: Tensor, weight: Tensor, d_input: Tensor | None, d_weight: Tensor | None, d_bias: Tensor | None
) -> Tensor | None:
    r"""The forward-mode derivative of :math:`z = a W + b`: :math:`dz = da\,W + a\,dW + db`.

    Each tangent may be ``None`` (no term); ``None`` if all are. ``input`` is needed for dW only, ``weight`` for
    da only.
    """
    dz = None
    if d_input is not None:
        dz = d_input @ weight  # da W
    if d_weight is not None:
        a_dw = input @ d_weight  # a dW
        dz = a_dw if dz is None else dz + a_dw
    if d_bias is not None:
        dz = d_bias.expand(input.shape[:-1] + d_bias.shape) if dz is None else dz + d_bias  # db
    return dz  # dz = da W + a dW + db

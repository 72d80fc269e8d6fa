r"""The convolutions' equations (``nn.Conv1d``, ``nn.Conv2d``), written with forward convolutions.

:math:`z = w ⋆ a + b` (a cross-correlation with stride s, padding p, dilation d, groups g). With δ = ∂C/∂z:

- BP2's counterpart, the error carried back: :math:`∂C/∂a = δ ⋆^T w`, a transposed convolution of δ with the kernel
  (stride s, padding p, dilation d, groups g; its output padding restores a's size);
- BP4's: :math:`∂C/∂w_{o,c,k} = Σ_n Σ_t δ_{n,o,t}\, a_{n,c,s t + d k − p}`, a convolution of the input with δ (the
  batch as the channels being summed, stride d, dilation s);
- BP3's: :math:`∂C/∂b_o = Σ_n Σ_t δ_{n,o,t}`, δ summed over the batch and the positions.

Not torch's ``convolution_backward``: each gradient is one forward op (``conv_transpose``, ``conv``, ``sum``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

_CONV = {1: F.conv1d, 2: F.conv2d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d}


def conv_backward(
    delta: Tensor,
    input: Tensor | None,
    weight: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    input_shape: tuple[int, ...] | None = None,
    weight_shape: tuple[int, ...] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    r"""The gradients of a batched convolution (input ``(N, C, *spatial)``) from δ = ∂C/∂z: ``(∂C/∂a, ∂C/∂w, ∂C/∂b)``.

    ``input`` is needed for ∂C/∂w only, ``weight`` for ∂C/∂a only; ``input_shape`` and ``weight_shape`` are their
    shapes (given, where a tensor is not kept).
    """
    shape = tuple(input.shape) if input is not None else tuple(input_shape)
    kernel = tuple(weight.shape if weight is not None else weight_shape)[2:]
    dims = len(kernel)
    grad_input = grad_weight = grad_bias = None
    if need_input:
        out_padding = tuple(
            shape[2 + i] - ((delta.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
            for i in range(dims)
        )
        grad_input = _CONV_TRANSPOSE[dims](
            delta, weight, None, stride, padding, out_padding, groups, dilation
        )  # BP2: ∂C/∂a = δ ⋆ᵀ w, the error carried back through the kernel
    if need_weight:
        n, c = shape[0], shape[1]
        cg = c // groups
        if n == 0:  # (an empty batch: no term, and no convolution over zero channels)
            grad_weight = delta.new_zeros((delta.shape[1], cg, *kernel))
        else:
            # a as (C/g, g·N, *spatial): the batch becomes the channels a convolution sums over, group by group
            a_t = input.reshape(n, groups, cg, *shape[2:]).transpose(0, 2).reshape(cg, groups * n, *shape[2:])
            grad_weight = _CONV[dims](a_t, delta.transpose(0, 1), None, dilation, padding, stride, groups)
            grad_weight = grad_weight.transpose(0, 1)  # BP4: ∂C/∂w = Σ_n Σ_t δ_{n,o,t} a_{n,c,st+dk−p}
            for i in range(dims):  # (the convolution reaches past the kernel where the stride does not divide evenly)
                grad_weight = grad_weight.narrow(2 + i, 0, kernel[i])
    if need_bias:
        grad_bias = delta.sum((0, *range(2, delta.dim())))  # BP3: ∂C/∂b = Σ_n Σ_t δ
    return grad_input, grad_weight, grad_bias


def conv_jvp(
    input: Tensor,
    weight: Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    d_input: Tensor | None,
    d_weight: Tensor | None,
    d_bias: Tensor | None,
) -> Tensor | None:
    r"""The forward-mode derivative of a convolution: :math:`dz = w ⋆ da + dw ⋆ a + db` (linear in each)."""
    conv = _CONV[weight.dim() - 2]
    dz = None
    if d_input is not None:
        dz = conv(d_input, weight, None, stride, padding, dilation, groups)  # w ⋆ da
    if d_weight is not None:
        term = conv(input, d_weight, None, stride, padding, dilation, groups)  # dw ⋆ a
        dz = term if dz is None else dz + term
    if d_bias is not None:
        db = d_bias.view(1, -1, *([1] * (weight.dim() - 2)))
        if dz is None:
            dz = conv(input, weight, None, stride, padding, dilation, groups).zero_() + db
        else:
            dz = dz + db  # db
    return dz  # dz = w ⋆ da + dw ⋆ a + db

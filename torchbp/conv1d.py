r"""GPT-2's ``Conv1D`` layer (``transformers.pytorch_utils.Conv1D``): the dense layer with its weight transposed.

Hugging Face's ``Conv1D`` (OpenAI GPT and GPT-2's attention and MLP projections) is a dense layer that stores
its weight as ``(in, out)``: :math:`z = a W + b` with :math:`W = (w^l)^T`. Its backward pass is the
backpropagation equations of Nielsen, *Neural Networks and Deep Learning*, ch. 2, with :math:`w^l` read as
:math:`W^T`:

==============================  =====================================  ==========================
equation                        dense layer (``weight`` (out, in))     Conv1D (``weight`` (in, out))
==============================  =====================================  ==========================
z^l = w^l a^{l-1} + b^l         ``input @ weight.T + bias``            ``input @ weight + bias``
BP2  (w^l)^T delta^l            ``delta @ weight``                     ``delta @ weight.T``
BP3  dC/db^l = delta^l          ``delta`` summed over batch dims       the same
BP4  dC/dw^l = delta^l a^T      ``delta.T @ input``  (out, in)         ``input.T @ delta``  (in, out)
==============================  =====================================  ==========================

Nothing here imports ``transformers``: :func:`conv1d_backward`, :class:`Conv1DFunction` and :func:`_conv1d`
work on tensors, and :func:`torchbp.convert` gives a model's ``Conv1D`` modules this backward (see
``torchbp.nn``), only when ``transformers`` is already imported.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from . import functional as F

__all__ = ["conv1d_backward", "conv1d_jvp", "Conv1DFunction"]


# ==================================================================================================
# The equations (plain functions of tensors).
# ==================================================================================================


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


# ==================================================================================================
# The autograd Function: forward computes, setup_context saves, backward calls the equations.
# ==================================================================================================


class Conv1DFunction(torch.autograd.Function):
    r"""z^l = a^{l-1} W + b^l with ``W`` (in, out), as ``transformers.pytorch_utils.Conv1D``; backward is BP2's
    δ W^T, BP3 and BP4's a^T δ (:func:`conv1d_backward`).

    Forward mode: dz = da W + a dW + db (:func:`conv1d_jvp`).

    ``slot`` is ``None``, or the record of a :class:`torchbp.DeltaMonitor` for this layer: backward hands it
    δ^l and the gradients it has just computed (``slot.record``; the weight's gradient in W's (in, out) layout),
    as :class:`torchbp.functional.LinearFunction` does.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor, slot=None) -> Tensor:
        # transformers' Conv1D.forward, operation for operation (so the results are the same to the bit).
        size_out = input.size()[:-1] + (weight.size(-1),)
        z = torch.addmm(bias, input.view(-1, input.size(-1)), weight).view(size_out)
        # A custom Function's output must not be a view if it is to be modified in place.
        return z.detach() if not torch.compiler.is_compiling() and z._is_view() else z

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, slot = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep_input = need_weight or (slot is not None and slot.needs_input)
        # Save only what a requested gradient needs: BP2 needs W, BP4 needs a^{l-1}.
        ctx.save_for_backward(input if keep_input else None, weight if need_input else None)
        ctx.save_for_forward(input, weight)  # (held until jvp has run, during forward only)
        ctx.set_materialize_grads(False)  # None, not zeros, for a missing tangent (jvp) or gradient (backward)
        ctx.slot = slot  # (the monitor reads the data flow from this attribute of the autograd node)

    @staticmethod
    def backward(ctx, delta: Tensor):  # delta = δ^l = ∂C/∂z^l
        if delta is None:  # an undefined upstream gradient (materialize_grads is off): none flows back
            return None, None, None, None
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input, grad_weight, grad_bias = conv1d_backward(delta, input, weight, need_input, need_weight, need_bias)
        if ctx.slot is not None:
            ctx.slot.record(delta, input, grad_weight, grad_bias)  # the monitor's statistics of δ^l
        return grad_input, grad_weight, grad_bias, None

    @staticmethod
    def jvp(ctx, d_input: Tensor | None, d_weight: Tensor | None, d_bias: Tensor | None, _slot=None):
        input, weight = ctx.saved_tensors
        return conv1d_jvp(input, weight, d_input, d_weight, d_bias)  # dz = da W + a dW + db


# What torch.compile runs: Dynamo traces no Function that defines a jvp (see functional._without_jvp).
_Conv1DFunctionTraceable = F._without_jvp(Conv1DFunction)


# ==================================================================================================
# The entry point the module calls: validate, cast, apply.
# ==================================================================================================


def check_conv1d(input: Tensor, weight: Tensor, bias: Tensor) -> None:
    """Conv1D's arguments: what ``torch.addmm`` would reject, said in the layer's own terms."""
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        _checks.check_tensor("Conv1D", name, t)
    if weight.dim() != 2:
        raise RuntimeError(f"Conv1D expected a 2-D weight (nx, nf), got shape {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[0]:
        raise RuntimeError(
            f"Conv1D expected input with last dimension {weight.shape[0]} (nx), got shape {tuple(input.shape)}"
        )
    if bias.shape != weight.shape[1:]:
        raise RuntimeError(f"Conv1D expected bias of shape ({weight.shape[1]},) (nf), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != input.device:
            _checks.check_device("Conv1D", input, name, t)
        if t.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
            _checks.check_dtype("Conv1D", input, name, t)


def _conv1d(input: Tensor, weight: Tensor, bias: Tensor, slot=None) -> Tensor:
    """``Conv1D.forward`` with torchbp's backward; ``slot`` as :class:`Conv1DFunction`'s."""
    if slot is not None and slot.needs_input and torch.compiler.is_compiling():
        return _conv1d_eagerly(input, weight, bias, slot)  # a monitor's per-sample norms are eager-only
    check_conv1d(input, weight, bias)
    input, weight, bias = F._autocast(None, input, weight, bias)  # (autocast runs torch.addmm in its lower dtype)
    if torch.compiler.is_compiling():
        z = _Conv1DFunctionTraceable.apply(input, weight, bias, slot)
    else:
        z = F._apply(Conv1DFunction, input, weight, bias, slot)
    if slot is not None and not torch.compiler.is_compiling() and slot.discovering:
        slot.discover(input)  # the monitor reads the data flow into this layer from the autograd graph
    return z


_conv1d_eagerly = torch.compiler.disable(_conv1d)

r"""The per-op autograd Functions: ``forward`` computes, ``setup_context`` saves, ``backward`` calls the equations.

Each follows PyTorch's "forward + setup_context" template, with a ``jvp`` for forward mode, so ``torch.func``
transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``jacfwd``, ``hessian``) and ``torch.compile`` work; every
backward is made of differentiable torch ops (:mod:`torchbp.equations`), so double backward works too. They take
their arguments as checked by the public functions of :mod:`torchbp.functional`, which apply them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _torch_private
from .equations import (
    _difference_tangent,
    _differentiated,
    _directional_derivative,
    _one,
    _reduce,
    binary_cross_entropy_backward,
    binary_cross_entropy_with_logits_backward,
    conv1d_backward,
    conv1d_jvp,
    conv_backward,
    conv_jvp,
    cross_entropy_backward,
    cross_entropy_log_p_backward,
    embedding_backward,
    embedding_jvp,
    gelu_backward,
    layer_norm_backward,
    layer_norm_jvp,
    layer_norm_statistics,
    linear_backward,
    linear_jvp,
    mse_loss_backward,
    quadratic_cost_backward,
    relu_backward,
    rms_norm_backward,
    rms_norm_jvp,
    rms_norm_statistics,
    sigmoid_backward,
    silu_backward,
    tanh_backward,
)
from .slots import LayerSlot

_is_view = _torch_private.is_view  # (one C call per forward)

__all__ = [
    "HandWrittenFunction",
    "LinearFunction",
    "SigmoidFunction",
    "ReLUFunction",
    "GELUFunction",
    "SiLUFunction",
    "TanhFunction",
    "LayerNormFunction",
    "RMSNormFunction",
    "EmbeddingFunction",
    "ConvFunction",
    "MSELossFunction",
    "QuadraticCostFunction",
    "CrossEntropyFunction",
    "BCEFunction",
    "BCEWithLogitsFunction",
]


# ==================================================================================================
# What every Function below shares, written once.
# ==================================================================================================


class HandWrittenFunction(torch.autograd.Function):
    """The base of torchbp's Functions: each backward is written by hand from the equations.

    ``vmap`` runs a Function's forward and backward over the batch (``generate_vmap_rule``): they are plain torch
    ops. Each ``setup_context`` ends with :func:`_save`; each ``backward`` is wrapped in
    :func:`_none_for_undefined`.
    """

    generate_vmap_rule = True


def _save(ctx, for_backward: tuple[Tensor | None, ...], for_jvp: tuple[Tensor | None, ...]) -> None:
    """Save ``for_backward`` (``ctx.saved_tensors`` in backward) and ``for_jvp`` (``ctx.saved_tensors`` in jvp,
    held during forward only, and only while a dual level or a torch.func transform is active, as jvp runs only
    then), and turn ``materialize_grads`` off: a missing tangent (jvp) or upstream
    gradient (backward) arrives as ``None``, not as zeros."""
    ctx.save_for_backward(*for_backward)
    if _torch_private.forward_ad_active() or _torch_private.functorch_transforms_active():  # (jvp runs only then)
        ctx.save_for_forward(*for_jvp)
    ctx.set_materialize_grads(False)


def _none_for_undefined(backward):
    """``backward``, except that an undefined upstream gradient (``None``: materialize_grads is off) sends no
    gradient to any input."""

    @functools.wraps(backward)
    def wrapper(ctx, grad, *more):
        if grad is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, grad, *more)

    return wrapper


def _apply(fn: type[torch.autograd.Function], *args):
    """``fn.apply(*args)``; in plain eager mode without ``Function.apply``'s Python prologue.

    That prologue binds the arguments to ``forward``'s signature on every call (for default values;
    every call here passes all arguments) and routes torch.func transforms; skipping it when no
    transform is active and nothing is being compiled halves the per-call overhead. Under
    ``torch.compile`` it applies ``fn`` without its ``jvp`` (:func:`_without_jvp`).
    """
    if torch.compiler.is_compiling():
        return _TRACEABLE.get(id(fn), fn).apply(*args)  # (without its jvp: Dynamo traces no custom jvp)
    if _torch_private.functorch_transforms_active():
        return fn.apply(*args)
    return _torch_private.function_apply_without_prologue(fn)(*args)


class LinearFunction(HandWrittenFunction):
    r"""z^l = a^{l-1} (w^l)^T + b^l; backward is BP2's (w^l)^T δ^l, BP3 and BP4 (:func:`linear_backward`).

    Forward mode: dz = da w^T + a dw^T + db (:func:`linear_jvp`).

    ``slot`` is ``None``, or the record of a :class:`torchbp.DeltaMonitor` for this layer (a
    :class:`torchbp.slots.LayerSlot`): backward hands it δ^l and the gradients it has just computed
    (``slot.record``), which it reduces to the layer's statistics with tensor ops.
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor | None, slot: LayerSlot | None = None) -> Tensor:
        z = F.linear(input, weight, bias)
        # For 1-D and N-D inputs F.linear returns a reshaped view of its 2-D product; a custom
        # Function's output must not be a view if it is to be modified in place (ReLU(inplace=True)).
        return z.detach() if not torch.compiler.is_compiling() and _is_view(z) else z

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, slot = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep_input = need_weight or (slot is not None and slot.needs_input)
        # Save only what a requested gradient needs: BP2 needs w, BP4 needs a^{l-1}.
        _save(ctx, (input if keep_input else None, weight if need_input else None), (input, weight))
        ctx.slot = slot
        ctx.bias_shape = None if bias is None or bias.shape == weight.shape[:1] else bias.shape

    @staticmethod
    @_none_for_undefined
    def backward(ctx, delta: Tensor):  # delta = δ^l = ∂C/∂z^l
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input, grad_weight, grad_bias = linear_backward(
            delta, input, weight, need_input, need_weight, need_bias, ctx.bias_shape
        )
        if ctx.slot is not None:
            ctx.slot.record(delta, input, grad_weight, grad_bias)  # the monitor's statistics of δ^l
        return grad_input, grad_weight, grad_bias, None

    @staticmethod
    def jvp(ctx, d_input: Tensor | None, d_weight: Tensor | None, d_bias: Tensor | None, _slot=None):
        input, weight = ctx.saved_tensors
        return linear_jvp(input, weight, d_input, d_weight, d_bias)  # dz = da w^T + a dw^T + db


class Conv1DFunction(HandWrittenFunction):
    r"""z^l = a^{l-1} W + b^l with ``W`` (in, out), as ``transformers.pytorch_utils.Conv1D``; backward is BP2's
    δ W^T, BP3 and BP4's a^T δ (:func:`conv1d_backward`).

    Forward mode: dz = da W + a dW + db (:func:`conv1d_jvp`).

    ``slot`` is ``None``, or the record of a :class:`torchbp.DeltaMonitor` for this layer: backward hands it
    δ^l and the gradients it has just computed (``slot.record``; the weight's gradient in W's (in, out) layout),
    as :class:`torchbp.functional.LinearFunction` does.
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor, slot=None) -> Tensor:
        # transformers' Conv1D.forward, operation for operation (so the results are the same to the bit).
        size_out = input.size()[:-1] + (weight.size(-1),)
        z = torch.addmm(bias, input.view(-1, input.size(-1)), weight).view(size_out)
        # A custom Function's output must not be a view if it is to be modified in place.
        return z.detach() if not torch.compiler.is_compiling() and _is_view(z) else z

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, slot = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep_input = need_weight or (slot is not None and slot.needs_input)
        # Save only what a requested gradient needs: BP2 needs W, BP4 needs a^{l-1}.
        _save(ctx, (input if keep_input else None, weight if need_input else None), (input, weight))
        ctx.slot = slot  # (the monitor reads the data flow from this attribute of the autograd node)

    @staticmethod
    @_none_for_undefined
    def backward(ctx, delta: Tensor):  # delta = δ^l = ∂C/∂z^l
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


class SigmoidFunction(HandWrittenFunction):
    r"""a = σ(z); backward multiplies by σ'(z) = σ(z)(1 − σ(z)), from the saved output a; so does forward mode."""

    @staticmethod
    def forward(input: Tensor) -> Tensor:
        return torch.sigmoid(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, (output,), (output,))  # σ(z): its derivative needs nothing else

    @staticmethod
    @_none_for_undefined
    def backward(ctx, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return sigmoid_backward(grad, a)  # BP1/BP2: ∇_a C ⊙ σ'(z)

    @staticmethod
    def jvp(ctx, d_input: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return sigmoid_backward(d_input, a)  # dσ = σ'(z) ⊙ dz: σ'(z) is diagonal, the product of BP2


class ReLUFunction(HandWrittenFunction):
    r"""a = max(z, 0); backward multiplies by σ'(z) = 1[z > 0] (0 at z = 0, as torch), from the output.

    ``slot`` is ``None``, or the monitor's record of the Linear whose output z this is: backward
    hands it a, from which it counts the units with σ'(z) = 0 for every sample (dead units).
    Forward mode: da = 1[z > 0] ⊙ dz; in place (``inplace=True``) it overwrites dz, as the forward overwrites z.
    """

    @staticmethod
    def forward(input: Tensor, inplace: bool = False, slot: LayerSlot | None = None) -> Tensor:
        if inplace:
            input.relu_()
            return input  # (the input itself, as torch.compile wants a dirty input returned)
        return torch.relu(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, inplace, slot = inputs
        if inplace:
            ctx.mark_dirty(input)
        _save(ctx, (output,), (output,))  # a > 0 exactly where z > 0; torch's relu saves the same
        ctx.inplace = inplace
        ctx.dead_slot = slot

    @staticmethod
    @_none_for_undefined
    def backward(ctx, grad: Tensor):
        (a,) = ctx.saved_tensors
        if ctx.dead_slot is not None:
            ctx.dead_slot.record_relu(a)  # the monitor counts the units with σ'(z) = 0 for every sample
        return relu_backward(grad, a), None, None  # BP1/BP2: ∇_a C ⊙ σ'(z)

    @staticmethod
    def jvp(ctx, d_input: Tensor, _inplace=None, _slot=None) -> Tensor:
        (a,) = ctx.saved_tensors
        if ctx.inplace:  # z was overwritten by a: its tangent dz is overwritten by da
            return d_input.copy_(relu_backward(d_input, a))  # da = σ'(z) ⊙ dz, in place
        return relu_backward(d_input, a)  # da = σ'(z) ⊙ dz: σ'(z) is diagonal, the product of BP2


def _in_opmath(equation, grad: Tensor, x: Tensor, *args) -> Tensor:
    """``equation(grad, x, *args)`` in float32 for half-precision tensors (as torch's kernels compute them), cast back
    to ``grad``'s dtype; as it is otherwise."""
    if x.dtype in (torch.float16, torch.bfloat16) or grad.dtype in (torch.float16, torch.bfloat16):
        return equation(grad.float(), x.float(), *args).to(grad.dtype)
    return equation(grad, x, *args)


class GELUFunction(HandWrittenFunction):
    r"""a = z Φ(z) (``'none'``) or its tanh approximation (``'tanh'``); backward multiplies by σ'(z)
    (:func:`gelu_backward`), from the saved input z (torch's saves the same); so does forward mode."""

    @staticmethod
    def forward(input: Tensor, approximate: str) -> Tensor:
        return F.gelu(input, approximate=approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, approximate = inputs
        _save(ctx, (input,), (input,))  # z: σ'(z) needs it
        ctx.approximate = approximate

    @staticmethod
    @_none_for_undefined
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        return _in_opmath(gelu_backward, grad, z, ctx.approximate), None  # BP1/BP2: ∇_a C ⊙ σ'(z)

    @staticmethod
    def jvp(ctx, d_input: Tensor, _approximate=None) -> Tensor:
        (z,) = ctx.saved_tensors
        return _in_opmath(gelu_backward, d_input, z, ctx.approximate)  # da = σ'(z) ⊙ dz


class SiLUFunction(HandWrittenFunction):
    r"""a = z s(z), s the logistic sigmoid; backward multiplies by σ'(z) = s(z)(1 + z(1 − s(z)))
    (:func:`silu_backward`), from the saved input z (torch's saves the same); so does forward mode."""

    @staticmethod
    def forward(input: Tensor) -> Tensor:
        return F.silu(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs, inputs)  # z: σ'(z) needs it (it is not a function of a alone)

    @staticmethod
    @_none_for_undefined
    def backward(ctx, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return _in_opmath(silu_backward, grad, z)  # BP1/BP2: ∇_a C ⊙ σ'(z)

    @staticmethod
    def jvp(ctx, d_input: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return _in_opmath(silu_backward, d_input, z)  # da = σ'(z) ⊙ dz


class TanhFunction(HandWrittenFunction):
    r"""a = tanh(z); backward multiplies by σ'(z) = 1 − a² (:func:`tanh_backward`), from the saved output a (torch's
    saves the same); so does forward mode."""

    @staticmethod
    def forward(input: Tensor) -> Tensor:
        return torch.tanh(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, (output,), (output,))  # tanh(z): its derivative needs nothing else

    @staticmethod
    @_none_for_undefined
    def backward(ctx, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return _in_opmath(tanh_backward, grad, a)  # BP1/BP2: ∇_a C ⊙ σ'(z)

    @staticmethod
    def jvp(ctx, d_input: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return _in_opmath(tanh_backward, d_input, a)  # da = σ'(z) ⊙ dz


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """``grad`` in ``like``'s dtype (a half-precision input with float32 parameters mixes dtypes, as torch allows)."""
    return grad if grad is None or grad.dtype == like.dtype else grad.to(like.dtype)


class LayerNormFunction(HandWrittenFunction):
    r"""y = γ ⊙ (x − μ)/σ + β over the last ``len(normalized_shape)`` dims; backward is
    :func:`layer_norm_backward`: δ_x = (1/σ)(g − mean(g) − x̂·mean(g·x̂)) with g = γ ⊙ δ, ∂C/∂γ = Σ δ ⊙ x̂, ∂C/∂β = Σ δ.

    Forward returns ``(y, μ, 1/σ)`` (torch's ``native_layer_norm``); it saves x, γ, μ and 1/σ, as torch's saves
    (less β, which no gradient needs). When the backward is itself differentiated, μ and σ are recomputed from x with
    plain ops (:func:`layer_norm_statistics`), so that a double backward sees their dependence on x.
    Forward mode: dy = γ dx̂ + dγ x̂ + dβ (:func:`layer_norm_jvp`).
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor | None, bias: Tensor | None, normalized_shape: tuple, eps: float):
        return torch.native_layer_norm(input, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, normalized_shape, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        _save(ctx, (input, weight, mean, rstd), (input, weight, mean, rstd))
        ctx.n, ctx.eps = len(normalized_shape), eps

    @staticmethod
    @_none_for_undefined
    def backward(ctx, delta: Tensor, *_statistics):  # delta = ∂C/∂y
        input, weight, mean, rstd = ctx.saved_tensors
        if _differentiated():  # (the statistics as functions of x, for a double backward)
            mean, rstd = layer_norm_statistics(input, tuple(range(-ctx.n, 0)), ctx.eps)
        need = ctx.needs_input_grad
        grad_input, grad_weight, grad_bias = layer_norm_backward(
            delta, input, mean, rstd, weight, ctx.n, need[0], need[1], need[2]
        )
        return _cast(grad_input, input), _cast(grad_weight, weight), _cast(grad_bias, weight), None, None

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, _normalized_shape=None, _eps=None):
        input, weight, mean, rstd = ctx.saved_tensors
        dy = layer_norm_jvp(input, mean, rstd, weight, ctx.n, d_input, d_weight, d_bias)
        if dy is None:
            dy = torch.zeros_like(input)
        return _cast(dy, input), None, None  # (μ and 1/σ are not differentiable outputs)


class RMSNormFunction(HandWrittenFunction):
    r"""y = γ ⊙ x/rms(x) over the last ``len(normalized_shape)`` dims, rms(x) = √(mean(x²) + ε); backward is
    :func:`rms_norm_backward`: δ_x = (g − x̂·mean(g·x̂))/rms(x) with g = γ ⊙ δ, ∂C/∂γ = Σ δ ⊙ x̂.

    Forward returns ``(y, 1/rms(x))``; it saves x, γ and 1/rms(x) (torch's composite saves x, 1/rms(x), x·(1/rms(x))
    and γ). When the backward is itself differentiated, 1/rms(x) is recomputed from x (:func:`rms_norm_statistics`).
    Forward mode: dy = γ dx̂ + dγ x̂ (:func:`rms_norm_jvp`).
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor | None, normalized_shape: tuple, eps: float):
        dims = tuple(range(-len(normalized_shape), 0))
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input  # (as torch's: in float32)
        rstd = rms_norm_statistics(x, dims, eps)
        return F.rms_norm(input, normalized_shape, weight, eps), rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, normalized_shape, eps = inputs
        rstd = output[1]
        ctx.mark_non_differentiable(rstd)
        _save(ctx, (input, weight, rstd), (input, weight, rstd))
        ctx.n, ctx.eps = len(normalized_shape), eps

    @staticmethod
    @_none_for_undefined
    def backward(ctx, delta: Tensor, _rstd=None):  # delta = ∂C/∂y
        input, weight, rstd = ctx.saved_tensors
        if _differentiated():  # (the statistic as a function of x, for a double backward)
            rstd = rms_norm_statistics(input, tuple(range(-ctx.n, 0)), ctx.eps)
        need = ctx.needs_input_grad
        grad_input, grad_weight = rms_norm_backward(delta, input, rstd, weight, ctx.n, need[0], need[1])
        return _cast(grad_input, input), _cast(grad_weight, weight), None, None

    @staticmethod
    def jvp(ctx, d_input, d_weight, _normalized_shape=None, _eps=None):
        input, weight, rstd = ctx.saved_tensors
        dy = rms_norm_jvp(input, rstd, weight, ctx.n, d_input, d_weight)
        if dy is None:
            dy = torch.zeros_like(input)
        return _cast(dy, input), None  # (1/rms(x) is not a differentiable output)


class EmbeddingFunction(HandWrittenFunction):
    r"""y_n = E_{i_n}, a lookup; backward is BP4's scatter-add ∂C/∂E_i = Σ_{n: i_n = i} δ_n
    (:func:`embedding_backward`; none for ``padding_idx``, divided by each index's count with
    ``scale_grad_by_freq``). Saves the indices only (torch's saves the same). Forward mode: dy = dE[i]
    (:func:`embedding_jvp`).
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor, padding_idx: int | None, scale_grad_by_freq: bool) -> Tensor:
        return F.embedding(input, weight, padding_idx, scale_grad_by_freq=scale_grad_by_freq)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, padding_idx, scale_grad_by_freq = inputs
        _save(ctx, (input,), (input,))  # the indices: which rows each δ_n goes to
        ctx.num_embeddings, ctx.padding_idx, ctx.scale_grad_by_freq = weight.shape[0], padding_idx, scale_grad_by_freq

    @staticmethod
    @_none_for_undefined
    def backward(ctx, delta: Tensor):  # delta = δ = ∂C/∂y
        (indices,) = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = embedding_backward(
                delta, indices, ctx.num_embeddings, ctx.padding_idx, ctx.scale_grad_by_freq
            )  # BP4
        return None, grad_weight, None, None

    @staticmethod
    def jvp(ctx, _d_input, d_weight, _padding_idx=None, _scale_grad_by_freq=None):
        (indices,) = ctx.saved_tensors
        return embedding_jvp(indices, d_weight)  # dy = dE[i]


class ConvFunction(HandWrittenFunction):
    r"""z = w ⋆ a + b, ``nn.Conv1d``'s and ``nn.Conv2d``'s batched convolution (zero padding, a number per dim);
    backward is :func:`conv_backward`: BP2 as a transposed convolution of δ with the kernel, BP4 as a convolution of
    the input with δ, BP3 as δ summed over the batch and the positions. Saves a (for BP4) and w (for BP2) only when
    their gradient is asked for. Forward mode: dz = w ⋆ da + dw ⋆ a + db (:func:`conv_jvp`).
    """

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return (F.conv1d if weight.dim() == 3 else F.conv2d)(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Save only what a requested gradient needs: BP2 needs w (and a's shape), BP4 needs a (and w's shape).
        _save(ctx, (input if need_weight else None, weight if need_input else None), (input, weight))
        ctx.options = stride, padding, dilation, groups
        ctx.shapes = tuple(input.shape), tuple(weight.shape)

    @staticmethod
    @_none_for_undefined
    def backward(ctx, delta: Tensor):  # delta = δ = ∂C/∂z
        input, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = conv_backward(delta, input, weight, *ctx.options, need[0], need[1], need[2], *ctx.shapes)
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, *_options):
        input, weight = ctx.saved_tensors
        return conv_jvp(input, weight, *ctx.options, d_input, d_weight, d_bias)  # dz = w ⋆ da + dw ⋆ a + db


class MSELossFunction(HandWrittenFunction):
    r"""C = reduce(w (a − y)^2): ``mean`` divides by the number of elements (by Σw when weighted).

    Forward mode: dC = ⟨∇_a C, da − dy⟩ + ⟨∂C/∂w, dw⟩, with backward's gradients.
    """

    @staticmethod
    def forward(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
        if weight is None:  # (torch's kernel; the public mse_loss has broadcast input and target already)
            return _torch_private.mse_loss(input, target, _torch_private.REDUCTION_ENUM[reduction])
        loss = (input - target).pow(2) * weight
        return loss.sum() / weight.sum() if reduction == "mean" else _reduce(loss, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        _save(ctx, (input, target, weight), (input, target, weight, output))
        ctx.reduction = reduction

    @staticmethod
    @_none_for_undefined
    def backward(ctx, grad: Tensor):
        input, target, weight = ctx.saved_tensors
        grad_a, grad_weight = mse_loss_backward(input, target, weight, ctx.reduction, grad, ctx.needs_input_grad[2])
        return (
            grad_a if ctx.needs_input_grad[0] else None,
            -grad_a if ctx.needs_input_grad[1] else None,
            grad_weight,
            None,
        )

    @staticmethod
    def jvp(ctx, d_input: Tensor | None, d_target: Tensor | None, d_weight: Tensor | None, _reduction=None):
        input, target, weight, loss = ctx.saved_tensors
        if ctx.reduction == "none" and d_weight is not None:  # ∂ℓ/∂w per element, not summed where w broadcasts
            weight = weight.expand(input.shape)
        grad_a, grad_w = mse_loss_backward(input, target, weight, ctx.reduction, _one(loss), d_weight is not None)
        d_diff = _difference_tangent(d_input, d_target)
        return _directional_derivative(loss, ctx.reduction, (), (grad_a, d_diff), (grad_w, d_weight))


class QuadraticCostFunction(HandWrittenFunction):
    r"""Nielsen's quadratic cost C = 1/(2n) Σ_x ‖y(x) − a(x)‖²; ∇_a C = (a − y)/n; dC = ⟨(a − y)/n, da − dy⟩."""

    @staticmethod
    def forward(input: Tensor, target: Tensor, reduction: str) -> Tensor:
        diff = input - target
        per_sample = 0.5 * (diff * diff).flatten(1).sum(1) if diff.dim() > 1 else 0.5 * diff.pow(2).sum()
        return _reduce(per_sample, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, reduction = inputs
        _save(ctx, (input, target), (input, target, output))
        ctx.reduction = reduction

    @staticmethod
    @_none_for_undefined
    def backward(ctx, grad: Tensor):
        input, target = ctx.saved_tensors
        grad_a = quadratic_cost_backward(input, target, ctx.reduction, grad)  # BP1: ∇_a C = (a − y)/n
        return (
            grad_a if ctx.needs_input_grad[0] else None,
            -grad_a if ctx.needs_input_grad[1] else None,
            None,
        )

    @staticmethod
    def jvp(ctx, d_input: Tensor | None, d_target: Tensor | None, _reduction=None):
        input, target, cost = ctx.saved_tensors
        grad_a = quadratic_cost_backward(input, target, ctx.reduction, _one(cost))  # ∇_a C = (a − y)/n
        sample = tuple(range(1, input.dim())) if input.dim() > 1 else (0,)  # a sample's elements ('none')
        return _directional_derivative(cost, ctx.reduction, sample, (grad_a, _difference_tangent(d_input, d_target)))


class CrossEntropyFunction(HandWrittenFunction):
    r"""Softmax with cross-entropy. C = −Σ_c q_c log softmax(z)_c, reduced; δ^L = softmax(z) Σq − q.

    See :func:`cross_entropy_backward`. Without weights and smoothing, δ^L = softmax(z) − y (BP1 for the
    softmax output layer). Forward mode: dC = ⟨δ^L, dz⟩ + ⟨∂C/∂y, dy⟩ + C(z, y; w = dw), summed over each
    sample's classes for ``'none'``. C is linear in the class weights (they are differentiable for probability
    targets only, where the mean does not divide by them), so its derivative along dw is C with the weights dw.

    ``keep_log_p`` (the common call in plain eager mode, see :func:`cross_entropy_log_p_backward`): forward
    returns ``(C, log softmax(z))`` and saves log p, as torch's does, so that backward reads softmax(z) = exp(log p)
    instead of recomputing it from z; log p is an output so that a double backward differentiates through it.
    """

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, label_smoothing, maybe_ignored=True, keep_log_p=False):
        if keep_log_p:  # the common call: log-softmax, then the mean of −log p at the targets, as torch's
            log_p = torch.log_softmax(input, 1)
            return F.nll_loss(log_p, target, ignore_index=ignore_index, reduction=reduction), log_p
        return F.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, reduction, label_smoothing, maybe_ignored, keep_log_p = inputs
        ctx.keep_log_p = keep_log_p
        if keep_log_p:  # log p, an output (so that a double backward differentiates through it), saved as torch's
            _save(ctx, (output[1], target), ())  # (no jvp: the call is plain eager, no dual level open)
            ctx.reduction = reduction
            return
        _save(ctx, (input, target, weight), (input, target, weight, output))
        ctx.options = ignore_index, reduction, label_smoothing, maybe_ignored

    @staticmethod
    def backward(ctx, grad: Tensor | None, *grad_log_p: Tensor | None):
        if ctx.keep_log_p:
            log_p, target = ctx.saved_tensors
            delta = cross_entropy_log_p_backward(log_p, target, ctx.reduction, grad, grad_log_p[0])
            return delta, None, None, None, None, None, None, None  # BP1: δ^L = softmax(z) − y
        if grad is None:  # (materialize_grads is off)
            return (None,) * 8
        z, target, weight = ctx.saved_tensors
        ignore_index, reduction, eps, maybe_ignored = ctx.options
        delta, grad_target, grad_weight = cross_entropy_backward(
            z, target, weight, ignore_index, reduction, eps, grad, maybe_ignored, *ctx.needs_input_grad[1:3]
        )
        return delta, grad_target, grad_weight, None, None, None, None, None  # BP1: δ^L = softmax(z) − y

    @staticmethod
    def jvp(ctx, d_input: Tensor | None, d_target: Tensor | None, d_weight: Tensor | None, *_options):
        z, target, weight, loss = ctx.saved_tensors
        ignore_index, reduction, eps, maybe_ignored = ctx.options
        if not target.is_floating_point():
            d_weight = None  # class weights of class-index targets are constants, as torch's backward has them
        need_target = d_target is not None
        delta, grad_target, _ = cross_entropy_backward(
            z, target, weight, ignore_index, reduction, eps, _one(loss), maybe_ignored, need_target
        )
        classes = (0 if z.dim() == 1 else 1,)
        dc = _directional_derivative(loss, reduction, classes, (delta, d_input), (grad_target, d_target))
        if d_weight is not None:  # C is linear in w: ⟨∂C/∂w, dw⟩ = C(z, y; w = dw)
            dc_w = F.cross_entropy(z, target, d_weight, reduction=reduction, label_smoothing=eps)
            dc = dc_w if dc is None else dc + dc_w
        return dc  # dC = ⟨δ^L, dz⟩ + ⟨∂C/∂y, dy⟩ + ⟨∂C/∂w, dw⟩


class BCEFunction(HandWrittenFunction):
    r"""Cross-entropy on sigmoid outputs (Nielsen's cost): C = −w [y log a + (1 − y) log(1 − a)].

    ∇_a C = w (a − y) / (a (1 − a)); after the sigmoid's σ'(z) = a(1 − a) this is δ^L = a − y.
    Forward mode: dC = ⟨∇_a C, da⟩ + ⟨∂C/∂y, dy⟩; the weight is a constant, as torch's backward has it.
    """

    @staticmethod
    def forward(input, target, weight, reduction):
        return F.binary_cross_entropy(input, target, weight, reduction=reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        _save(ctx, (input, target, weight), (input, target, weight, output))
        ctx.reduction = reduction

    @staticmethod
    @_none_for_undefined
    def backward(ctx, grad: Tensor):
        a, y, weight = ctx.saved_tensors
        grad_a, grad_y = binary_cross_entropy_backward(a, y, weight, ctx.reduction, grad, *ctx.needs_input_grad[:2])
        return grad_a, grad_y, None, None  # BP1: ∇_a C

    @staticmethod
    def jvp(ctx, d_input: Tensor | None, d_target: Tensor | None, _weight=None, _reduction=None):
        a, y, weight, loss = ctx.saved_tensors
        grad_a, grad_y = binary_cross_entropy_backward(
            a, y, weight, ctx.reduction, _one(loss), d_input is not None, d_target is not None
        )
        return _directional_derivative(loss, ctx.reduction, (), (grad_a, d_input), (grad_y, d_target))


class BCEWithLogitsFunction(HandWrittenFunction):
    r"""Sigmoid and binary cross-entropy in one: C = −w [p y log σ(z) + (1 − y) log(1 − σ(z))].

    The σ'(z) of BP1 cancels the cost's 1/(a(1 − a)): δ^L = w [(p y + 1 − y) σ(z) − p y],
    which is σ(z) − y without weights. Forward mode: dC = ⟨δ^L, dz⟩ + ⟨∂C/∂y, dy⟩; the weight and the
    pos_weight are constants, as torch's backward has them.
    """

    @staticmethod
    def forward(input, target, weight, pos_weight, reduction):
        return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction = inputs
        _save(ctx, (input, target, weight, pos_weight), (input, target, weight, pos_weight, output))
        ctx.reduction = reduction

    @staticmethod
    @_none_for_undefined
    def backward(ctx, grad: Tensor):
        z, y, weight, pos_weight = ctx.saved_tensors
        grad_z, grad_y = binary_cross_entropy_with_logits_backward(
            z, y, weight, pos_weight, ctx.reduction, grad, *ctx.needs_input_grad[:2]
        )
        return grad_z, grad_y, None, None, None  # BP1: δ^L = σ(z) − y

    @staticmethod
    def jvp(ctx, d_input: Tensor | None, d_target: Tensor | None, _weight=None, _pos_weight=None, _reduction=None):
        z, y, weight, pos_weight, loss = ctx.saved_tensors
        grad_z, grad_y = binary_cross_entropy_with_logits_backward(
            z, y, weight, pos_weight, ctx.reduction, _one(loss), d_input is not None, d_target is not None
        )
        return _directional_derivative(loss, ctx.reduction, (), (grad_z, d_input), (grad_y, d_target))


def _without_jvp(fn: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``fn`` without its ``jvp``: what ``torch.compile`` runs, as Dynamo cannot trace a Function that defines one.

    (torch 2.13: "Unsupported custom jvp". Forward-mode AD does not run inside compiled code anyway.)
    """
    body = {k: v for k, v in vars(fn).items() if k not in ("jvp", "__dict__", "__weakref__")}
    return type(fn.__name__, fn.__bases__, body)


# What _apply runs under torch.compile, by id (the lookup Dynamo can trace).
_TRACEABLE = {
    id(fn): _without_jvp(fn)
    for fn in (
        LinearFunction,
        Conv1DFunction,
        SigmoidFunction,
        ReLUFunction,
        GELUFunction,
        SiLUFunction,
        TanhFunction,
        LayerNormFunction,
        RMSNormFunction,
        EmbeddingFunction,
        ConvFunction,
        MSELossFunction,
        QuadraticCostFunction,
        CrossEntropyFunction,
        BCEFunction,
        BCEWithLogitsFunction,
    )
}

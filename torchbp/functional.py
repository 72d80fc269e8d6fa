r"""Backpropagation written by hand: the equations, and autograd Functions for layers, activations and costs.

Every backward below is the backpropagation equations of Nielsen, *Neural Networks and Deep Learning*,
ch. 2 (also in Andrew Ng's and Hung-yi Lee's lecture notes), written once as plain functions of
tensors and tagged line by line. The per-op autograd Functions call them.

==============================  ==============================  ====================================
symbol                          meaning                         here (batch-first rows)
==============================  ==============================  ====================================
a^{l-1}                         activation entering layer l     ``input``, shape ``(N, *, in)``
w^l, b^l                        weight (out x in), bias (out)   ``weight``, ``bias`` (as ``nn.Linear``)
z^l = w^l a^{l-1} + b^l         weighted input                  ``z = input @ weight.T + bias``
a^l = sigma(z^l)                activation                      ``sigmoid(z)``, ``relu(z)``
delta^l = dC/dz^l               the error of layer l            ``grad_output`` of the Linear backward
BP1  delta^L = grad_a C * s'(z) output error                    cost backward, then activation backward
BP2  delta^l = (w^{l+1})^T delta^{l+1} * s'(z^l)                ``delta @ weight``, then ``* s'(z)``
BP3  dC/db^l = delta^l          bias gradient                   ``delta`` summed over batch dims
BP4  dC/dw^l_jk = a^{l-1}_k delta^l_j  weight gradient          ``delta.T @ input``
==============================  ==============================  ====================================

Each Function follows PyTorch's "forward + setup_context" template, with a ``jvp`` for forward mode, so ``torch.func``
transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``jacfwd``, ``hessian``) and ``torch.compile`` work; every backward
is made of differentiable torch ops, so double backward works too. Inputs are validated by the lowercase wrappers (same
names, arguments, defaults and exception types as ``torch.nn.functional``; the checks live in
``torchbp._checks``), never inside backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks

__all__ = [
    "linear",
    "sigmoid",
    "relu",
    "mse_loss",
    "quadratic_cost",
    "cross_entropy",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "linear_backward",
    "sigmoid_backward",
    "relu_backward",
    "mse_loss_backward",
    "quadratic_cost_backward",
    "cross_entropy_backward",
    "binary_cross_entropy_backward",
    "binary_cross_entropy_with_logits_backward",
    "LinearFunction",
    "SigmoidFunction",
    "ReLUFunction",
    "MSELossFunction",
    "QuadraticCostFunction",
    "CrossEntropyFunction",
    "BCEFunction",
    "BCEWithLogitsFunction",
    "ChainFunction",
]

# The number of attached DeltaMonitors (see torchbp.monitor). While it is 0, no forward pass does any
# monitoring work.
_monitors = 0


# ==================================================================================================
# The equations. Each is a plain function of tensors, called by the autograd Functions below.
# ==================================================================================================


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
        or torch._C._functorch.is_legacy_batchedtensor(grad)  # autograd.grad(is_grads_batched=True): no bit views
    )


def _select_by_bits(grad: Tensor, a: Tensor) -> Tensor:
    """``torch.where(a <= 0, 0, grad)`` exactly (a is a ReLU's output: ≥ 0 or NaN), fast on CPU (where bool-mask kernels are slow), in one buffer.

    The bits of |a| as integers, clamped to 1, are σ'(z) (1 also where a is NaN); an integer product
    with the bits of ``grad`` selects them exactly: 0, not NaN, for an Inf or NaN gradient where σ'(z) = 0.
    """
    d_sigma = a.abs().view(_BITS[a.dtype]).clamp_(max=1)
    return d_sigma.mul_(grad.view(_BITS[a.dtype])).view(a.dtype)  # BP1/BP2: ∇_a C ⊙ σ'(z)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _scale(grad: Tensor, reduction: str, count: int | Tensor) -> Tensor:
    """The upstream gradient of a reduced loss, as a factor for each element: dL/d(loss element)."""
    return grad / count if reduction == "mean" else grad


def mse_loss_backward(
    input: Tensor, target: Tensor, weight: Tensor | None, reduction: str, grad: Tensor, need_weight: bool = False
) -> tuple[Tensor, Tensor | None]:
    r"""BP1's :math:`∇_a C` for torch's MSE, :math:`C = \text{reduce}(w (a − y)^2)`: :math:`2 w (a − y) / \text{count}`.

    ``count`` is the number of elements (:math:`Σw` when weighted) for ``'mean'``, 1 otherwise. Returns
    ``(∇_a C, ∂C/∂w)``; ∂C/∂y is :math:`−∇_a C`.
    """
    count = input.numel() if weight is None else weight.sum()
    g = _scale(grad, reduction, count)
    diff = input - target
    grad_a = 2 * diff * g if weight is None else 2 * diff * weight * g  # BP1: ∇_a C = 2w(a − y)/count
    grad_weight = None
    if need_weight:  # ∂C/∂w_i, including the mean's 1/Σw
        sq = diff.pow(2)
        grad_weight = (sq * g).sum_to_size(weight.shape)  # summed where a bigger target broadcast it
        if reduction == "mean":
            grad_weight = grad_weight - (sq * weight).sum() * g / count
    return grad_a, grad_weight


def quadratic_cost_backward(input: Tensor, target: Tensor, reduction: str, grad: Tensor) -> Tensor:
    r"""BP1's :math:`∇_a C` for the quadratic cost :math:`C = \frac{1}{2n} Σ_x ‖y(x) − a(x)‖^2`: :math:`(a − y)/n`."""
    n = input.shape[0] if input.dim() > 1 else 1
    g = _scale(grad, reduction, n)
    if reduction == "none" and input.dim() > 1:
        g = g.reshape((-1,) + (1,) * (input.dim() - 1))
    return (input - target) * g  # BP1: ∇_a C = (a − y)/n   (Nielsen ch. 2, eq. 26)


def _view_classes(t: Tensor, logits: Tensor, class_dim: int) -> Tensor:
    """A (C,) tensor shaped to broadcast along the class dimension of ``logits``."""
    shape = [1] * logits.dim()
    shape[class_dim] = -1
    return t.view(shape)


def cross_entropy_backward(
    z: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    grad: Tensor,
    maybe_ignored: bool = True,
    need_target: bool = False,
    need_weight: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    r"""BP1 for softmax with cross-entropy on logits z: :math:`δ^L = \text{softmax}(z) Σ_c q_c − q`, reduced.

    ``q`` are the target's coefficients: one-hot (or the given probabilities), times the class weight,
    mixed with label smoothing; ignored targets have ``q = 0``. Without weights and smoothing this is
    :math:`δ^L = \text{softmax}(z) − y`. Returns ``(δ^L, ∂C/∂y, ∂C/∂w)`` (the last two for probability
    targets and class weights that require grad).
    """
    eps = label_smoothing
    class_dim = 0 if z.dim() == 1 else 1
    n_classes = z.shape[class_dim]
    if reduction == "none":
        grad = grad.unsqueeze(class_dim)
    if not target.is_floating_point():
        index = target.unsqueeze(class_dim)
        if maybe_ignored:
            keep = index != ignore_index
            index = index.masked_fill(~keep, 0)
        if weight is None and eps == 0 and not maybe_ignored:
            if not _differentiated():
                return _softmax_minus_one_hot(z, index, class_dim, _scale(grad, reduction, target.numel())), None, None
            y = _view_classes(torch.arange(n_classes, device=z.device), z, class_dim) == index  # one-hot y
            delta = (torch.softmax(z, class_dim) - y.to(z.dtype)) * _scale(grad, reduction, target.numel())
            return delta, None, None  # BP1: δ^L = a − y
        y = _view_classes(torch.arange(n_classes, device=z.device), z, class_dim) == index  # one-hot y
    # General case: C = −Σ_c q_c log softmax(z)_c, with q the weighted, smoothed target.
    log_p = torch.log_softmax(z, class_dim)
    w = None if weight is None else _view_classes(weight, z, class_dim)
    if target.is_floating_point():  # class probabilities y
        q = target * (1 - eps) + eps / n_classes if eps > 0 else target
        count = z.numel() / n_classes if z.numel() else 0
    else:  # class indices: one-hot, smoothed (in z's dtype); ignored samples have q = 0
        q = y.to(z.dtype) * (1 - eps) + eps / n_classes if eps > 0 else y.to(z.dtype)
        if maybe_ignored:
            q = q * keep
        if not maybe_ignored and weight is None:
            count = target.numel()
        elif weight is None:
            count = keep.sum()
        else:
            count = (weight[index] * keep).sum() if maybe_ignored else weight[index].sum()
    if reduction == "mean" and isinstance(count, Tensor):
        g = torch.where(count != 0, grad / count, torch.nan)  # 0/0 is NaN, as torch's
    else:
        g = _scale(grad, reduction, count)
    qw = q if w is None else q * w
    delta = (log_p.exp() * qw.sum(class_dim, keepdim=True) - qw) * g  # BP1: δ^L = softmax(z)Σq − q
    if maybe_ignored and not target.is_floating_point():
        delta = delta.masked_fill(~keep, 0)  # an ignored target passes no error back, even if 0/0
    grad_target = grad_weight = None
    if need_target:  # ∂C/∂y for probability targets
        grad_target = -log_p * g * (1 - eps) if w is None else -log_p * w * g * (1 - eps)
    if need_weight:  # ∂C/∂w_c for probability targets
        dims = [d for d in range(z.dim()) if d != class_dim]
        grad_weight = -(q * log_p * g).sum(dims) if dims else -(q * log_p * g)
    return delta, grad_target, grad_weight


def _softmax_minus_one_hot(z: Tensor, index: Tensor, class_dim: int, g: Tensor) -> Tensor:
    """``(softmax(z) − onehot(index)) * g`` in one buffer: softmax, then −1 added at the targets in place."""
    delta = torch.softmax(z, class_dim).scatter_(class_dim, index, -1.0, reduce="add")
    return delta.mul_(g)  # BP1: δ^L = a − y


def binary_cross_entropy_backward(
    a: Tensor, y: Tensor, weight: Tensor | None, reduction: str, grad: Tensor, need_input=True, need_target=False
) -> tuple[Tensor | None, Tensor | None]:
    r"""BP1's :math:`∇_a C` for cross-entropy on sigmoid outputs: :math:`w (a − y) / (a (1 − a))`.

    After the sigmoid's :math:`σ'(z) = a (1 − a)` this is Nielsen's :math:`δ^L = a − y`. Returns
    ``(∇_a C, ∂C/∂y)``.
    """
    g = _scale(grad, reduction, a.numel())
    if weight is not None:
        g = g * weight
    grad_a = grad_y = None
    if need_input:
        grad_a = (a - y) / (a * (1 - a)).clamp_min(_BCE_EPS) * g  # BP1: ∇_a C (clamped as torch)
    if need_target:
        grad_y = -torch.logit(a) * g  # ∂C/∂y = log(1 − a) − log(a), unclamped as torch
    return grad_a, grad_y


def binary_cross_entropy_with_logits_backward(
    z: Tensor,
    y: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: str,
    grad: Tensor,
    need_input=True,
    need_target=False,
) -> tuple[Tensor | None, Tensor | None]:
    r"""BP1 for sigmoid and cross-entropy on logits: :math:`δ^L = w [(p y + 1 − y) σ(z) − p y]`, σ(z) − y unweighted.

    Returns ``(δ^L, ∂C/∂y)``.
    """
    g = _scale(grad, reduction, z.numel())
    if weight is not None:
        g = g * weight
    grad_z = grad_y = None
    if need_input:
        if pos_weight is None:
            grad_z = (torch.sigmoid(z) - y) * g  # BP1: δ^L = a − y
        else:
            py = pos_weight * y
            grad_z = ((py + 1 - y) * torch.sigmoid(z) - py) * g  # BP1 with pos_weight
    if need_target:  # ∂C/∂y = −[p log σ(z) − log(1 − σ(z))]
        log_sig = F.logsigmoid(z)
        grad_y = (F.logsigmoid(-z) - (log_sig if pos_weight is None else pos_weight * log_sig)) * g
    return grad_z, grad_y


# ==================================================================================================
# Forward mode: the same equations pushed forward, for each Function's jvp. A layer's tangent is the
# product rule, dz = da w^T + a dw^T + db; an activation's is σ'(z) ⊙ dz, the very product of BP1/BP2
# (σ'(z) is diagonal); a cost's is its gradient, as backward computes it, contracted with the tangents:
# dC = Σ_x ⟨∂C/∂x, dx⟩.
# ==================================================================================================


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


def _one(output: Tensor) -> Tensor:
    """The upstream gradient ∂C/∂C = 1, of the loss's shape: given to a cost's backward, it returns ∂C/∂x."""
    return torch.ones(output.shape, dtype=output.dtype, device=output.device)


def _difference_tangent(d_input: Tensor | None, d_target: Tensor | None) -> Tensor | None:
    """d(a − y) = da − dy (``None`` for a missing tangent): the costs of a − y pair ∇_a C with it, as ∇_y C = −∇_a C."""
    if d_target is None:
        return d_input
    return -d_target if d_input is None else d_input - d_target


def _directional_derivative(
    cost: Tensor, reduction: str, dims: tuple[int, ...], *partials: tuple[Tensor | None, Tensor | None]
) -> Tensor | None:
    r"""A cost's forward-mode derivative :math:`dC = Σ_x ⟨∂C/∂x, dx⟩` from ``(∂C/∂x, dx)`` pairs (``None``: no term).

    For a reduced C the sums run over every element. For ``'none'``, ∂C/∂x is what backward gives for an
    upstream gradient of ones: each element of x feeds one element of C, so ∂C/∂x holds every nonzero
    partial, and each element of dC sums its own: over ``dims`` (a sample's classes, its features), or
    element-wise for ``dims = ()``. Where C is NaN, so is dC, as torch's: a NaN has no derivative, and a
    mean over nothing (no samples, every target ignored) is 0/0 even though no partial is.
    """
    dc = None
    for partial, tangent in partials:
        if partial is None or tangent is None:
            continue
        term = partial * tangent
        if reduction != "none":
            term = term.sum()
        elif dims:
            term = term.sum(dims)
        dc = term if dc is None else dc + term  # dC = Σ_x ⟨∂C/∂x, dx⟩
    if dc is not None:
        dc = torch.where(cost.isnan(), cost, dc)  # d(NaN) = NaN; d(0/0) = NaN
    return dc


def _differentiated() -> bool:
    """Whether the equations may themselves be differentiated: grad mode is on (``create_graph``), a torch.func
    transform is active (``hessian``, ``jacfwd(jacrev(f))``) or a ``torch.autograd.forward_ad.dual_level`` is open.

    Then they must not take their one-buffer fast paths (in-place ops, integer bit views), which neither
    autograd nor forward-mode AD can differentiate.
    """
    return (
        torch.is_grad_enabled()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0  # (the innermost open dual level; -1: none)
    )


# binary_cross_entropy_backward clamps a(1 − a) where torch's does: at its C++ constant ``float EPSILON = 1e-12``,
# 1e-12 rounded to float32 (1e-12 · (1 − 4.0e-9)), also in float64.
_BCE_EPS = float(torch.tensor(1e-12, dtype=torch.float32))


# ==================================================================================================
# The per-op autograd Functions: forward computes, setup_context saves, backward calls the equations.
# ==================================================================================================

_base_apply = torch._C._FunctionBase.__dict__["apply"]


def _apply(fn: type[torch.autograd.Function], *args):
    """``fn.apply(*args)``; in plain eager mode without ``Function.apply``'s Python prologue.

    That prologue binds the arguments to ``forward``'s signature on every call (for default values;
    every call here passes all arguments) and routes torch.func transforms; skipping it when no
    transform is active and nothing is being compiled halves the per-call overhead. Under
    ``torch.compile`` it applies ``fn`` without its ``jvp`` (:func:`_without_jvp`).
    """
    if torch.compiler.is_compiling():
        return _TRACEABLE.get(id(fn), fn).apply(*args)  # (without its jvp: Dynamo traces no custom jvp)
    if torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return _base_apply.__get__(None, fn)(*args)


class LinearFunction(torch.autograd.Function):
    r"""z^l = a^{l-1} (w^l)^T + b^l; backward is BP2's (w^l)^T δ^l, BP3 and BP4 (:func:`linear_backward`).

    Forward mode: dz = da w^T + a dw^T + db (:func:`linear_jvp`).

    ``slot`` is ``None``, or the record of a :class:`torchbp.DeltaMonitor` for this layer: backward
    hands it δ^l and the gradients it has just computed (``slot.record``), which it reduces to the
    layer's statistics with tensor ops.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor | None, slot=None) -> Tensor:
        z = F.linear(input, weight, bias)
        # For 1-D and N-D inputs F.linear returns a reshaped view of its 2-D product; a custom
        # Function's output must not be a view if it is to be modified in place (ReLU(inplace=True)).
        return z.detach() if not torch.compiler.is_compiling() and z._is_view() else z

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, slot = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep_input = need_weight or (slot is not None and slot.needs_input)
        # Save only what a requested gradient needs: BP2 needs w, BP4 needs a^{l-1}.
        ctx.save_for_backward(input if keep_input else None, weight if need_input else None)
        ctx.save_for_forward(input, weight)  # (held until jvp has run, during forward only)
        ctx.set_materialize_grads(False)  # None, not zeros, for a missing tangent (jvp) or gradient (backward)
        ctx.slot = slot
        ctx.bias_shape = None if bias is None or bias.shape == weight.shape[:1] else bias.shape

    @staticmethod
    def backward(ctx, delta: Tensor):  # delta = δ^l = ∂C/∂z^l
        if delta is None:  # an undefined upstream gradient (materialize_grads is off): none flows back
            return None, None, None, None
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


class SigmoidFunction(torch.autograd.Function):
    r"""a = σ(z); backward multiplies by σ'(z) = σ(z)(1 − σ(z)), from the saved output a; so does forward mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor) -> Tensor:
        return torch.sigmoid(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # σ(z): its derivative needs nothing else
        ctx.save_for_forward(output)
        ctx.set_materialize_grads(False)  # None, not zeros, for a missing tangent (jvp) or gradient (backward)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if grad is None:  # an undefined upstream gradient (materialize_grads is off): none flows back
            return None
        (a,) = ctx.saved_tensors
        return sigmoid_backward(grad, a)  # BP1/BP2: ∇_a C ⊙ σ'(z)

    @staticmethod
    def jvp(ctx, d_input: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return sigmoid_backward(d_input, a)  # dσ = σ'(z) ⊙ dz: σ'(z) is diagonal, the product of BP2


class ReLUFunction(torch.autograd.Function):
    r"""a = max(z, 0); backward multiplies by σ'(z) = 1[z > 0] (0 at z = 0, as torch), from the output.

    ``slot`` is ``None``, or the monitor's record of the Linear whose output z this is: backward
    hands it a, from which it counts the units with σ'(z) = 0 for every sample (dead units).
    Forward mode: da = 1[z > 0] ⊙ dz; in place (``inplace=True``) it overwrites dz, as the forward overwrites z.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, inplace: bool = False, slot=None) -> Tensor:
        if inplace:
            input.relu_()
            return input  # (the input itself, as torch.compile wants a dirty input returned)
        return torch.relu(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, inplace, slot = inputs
        if inplace:
            ctx.mark_dirty(input)
        ctx.save_for_backward(output)  # a > 0 exactly where z > 0; torch's relu saves the same
        ctx.save_for_forward(output)
        ctx.set_materialize_grads(False)  # None, not zeros, for a missing tangent (jvp) or gradient (backward)
        ctx.inplace = inplace
        ctx.dead_slot = slot

    @staticmethod
    def backward(ctx, grad: Tensor):
        if grad is None:  # an undefined upstream gradient (materialize_grads is off): none flows back
            return None, None, None
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


class MSELossFunction(torch.autograd.Function):
    r"""C = reduce(w (a − y)^2): ``mean`` divides by the number of elements (by Σw when weighted).

    Forward mode: dC = ⟨∇_a C, da − dy⟩ + ⟨∂C/∂w, dw⟩, with backward's gradients.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
        if weight is None:
            return F.mse_loss(input, target, reduction=reduction)
        loss = (input - target).pow(2) * weight
        return loss.sum() / weight.sum() if reduction == "mean" else _reduce(loss, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        ctx.save_for_backward(input, target, weight)
        ctx.save_for_forward(input, target, weight, output)
        ctx.set_materialize_grads(False)  # None, not zeros, for a missing tangent (jvp) or gradient (backward)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad: Tensor):
        if grad is None:  # an undefined upstream gradient (materialize_grads is off): none flows back
            return None, None, None, None
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


class QuadraticCostFunction(torch.autograd.Function):
    r"""Nielsen's quadratic cost C = 1/(2n) Σ_x ‖y(x) − a(x)‖²; ∇_a C = (a − y)/n; dC = ⟨(a − y)/n, da − dy⟩."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, target: Tensor, reduction: str) -> Tensor:
        diff = input - target
        per_sample = 0.5 * (diff * diff).flatten(1).sum(1) if diff.dim() > 1 else 0.5 * diff.pow(2).sum()
        return _reduce(per_sample, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, reduction = inputs
        ctx.save_for_backward(input, target)
        ctx.save_for_forward(input, target, output)
        ctx.set_materialize_grads(False)  # None, not zeros, for a missing tangent (jvp) or gradient (backward)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad: Tensor):
        if grad is None:  # an undefined upstream gradient (materialize_grads is off): none flows back
            return None, None, None
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


class CrossEntropyFunction(torch.autograd.Function):
    r"""Softmax with cross-entropy. C = −Σ_c q_c log softmax(z)_c, reduced; δ^L = softmax(z) Σq − q.

    See :func:`cross_entropy_backward`. Without weights and smoothing, δ^L = softmax(z) − y (BP1 for the
    softmax output layer). Forward mode: dC = ⟨δ^L, dz⟩ + ⟨∂C/∂y, dy⟩ + C(z, y; w = dw), summed over each
    sample's classes for ``'none'``. C is linear in the class weights (they are differentiable for probability
    targets only, where the mean does not divide by them), so its derivative along dw is C with the weights dw.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, label_smoothing, maybe_ignored=True):
        return F.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, reduction, label_smoothing, maybe_ignored = inputs
        ctx.save_for_backward(input, target, weight)
        ctx.save_for_forward(input, target, weight, output)
        ctx.set_materialize_grads(False)  # None, not zeros, for a missing tangent (jvp) or gradient (backward)
        ctx.options = ignore_index, reduction, label_smoothing, maybe_ignored

    @staticmethod
    def backward(ctx, grad: Tensor):
        if grad is None:  # an undefined upstream gradient (materialize_grads is off): none flows back
            return None, None, None, None, None, None, None
        z, target, weight = ctx.saved_tensors
        ignore_index, reduction, eps, maybe_ignored = ctx.options
        delta, grad_target, grad_weight = cross_entropy_backward(
            z, target, weight, ignore_index, reduction, eps, grad, maybe_ignored, *ctx.needs_input_grad[1:3]
        )
        return delta, grad_target, grad_weight, None, None, None, None  # BP1: δ^L = softmax(z) − y

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


class BCEFunction(torch.autograd.Function):
    r"""Cross-entropy on sigmoid outputs (Nielsen's cost): C = −w [y log a + (1 − y) log(1 − a)].

    ∇_a C = w (a − y) / (a (1 − a)); after the sigmoid's σ'(z) = a(1 − a) this is δ^L = a − y.
    Forward mode: dC = ⟨∇_a C, da⟩ + ⟨∂C/∂y, dy⟩; the weight is a constant, as torch's backward has it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, reduction):
        return F.binary_cross_entropy(input, target, weight, reduction=reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        ctx.save_for_backward(input, target, weight)
        ctx.save_for_forward(input, target, weight, output)
        ctx.set_materialize_grads(False)  # None, not zeros, for a missing tangent (jvp) or gradient (backward)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad: Tensor):
        if grad is None:  # an undefined upstream gradient (materialize_grads is off): none flows back
            return None, None, None, None
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


class BCEWithLogitsFunction(torch.autograd.Function):
    r"""Sigmoid and binary cross-entropy in one: C = −w [p y log σ(z) + (1 − y) log(1 − σ(z))].

    The σ'(z) of BP1 cancels the cost's 1/(a(1 − a)): δ^L = w [(p y + 1 − y) σ(z) − p y],
    which is σ(z) − y without weights. Forward mode: dC = ⟨δ^L, dz⟩ + ⟨∂C/∂y, dy⟩; the weight and the
    pos_weight are constants, as torch's backward has them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, pos_weight, reduction):
        return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction = inputs
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.save_for_forward(input, target, weight, pos_weight, output)
        ctx.set_materialize_grads(False)  # None, not zeros, for a missing tangent (jvp) or gradient (backward)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad: Tensor):
        if grad is None:  # an undefined upstream gradient (materialize_grads is off): none flows back
            return None, None, None, None, None
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


# ==================================================================================================
# The backprop loop: a run of Linear and activation layers as one Function, whose backward is the
# algorithm of Nielsen's backprop(): δ^L, then for l = L … 1: BP3, BP4, and δ^{l-1} = (w^l)^T δ^l ⊙ σ'(z^{l-1}).
# ==================================================================================================

LINEAR, SIGMOID, RELU = "linear", "sigmoid", "relu"


class _LoopPlan:
    """What the loop needs to know of a run of layer kinds, worked out once per kind sequence (and cached).

    ``saves[i]``: whether the loop keeps layer i's output (an activation's: its σ'(z) and the next layer's
    a^{i-1}; a Linear's that another Linear reads directly; never the last layer's, the run's output).
    ``param[i]``: the index of layer i's weight in the parameters (its bias follows), or -1.
    ``inplace[i]``: a ReLU may overwrite its input, a Linear's z that nothing else reads.
    """

    def __init__(self, kinds: tuple[str, ...]) -> None:
        n = len(kinds)
        self.kinds, self.n = kinds, n
        self.saves = tuple(i < n - 1 and (k != LINEAR or kinds[i + 1] == LINEAR) for i, k in enumerate(kinds))
        params, p = [], 0
        for k in kinds:
            params.append(p if k == LINEAR else -1)
            p += 2 if k == LINEAR else 0
        self.param, self.n_params, self.kept = tuple(params), p, sum(self.saves)
        self.inplace = tuple(
            k == RELU and i > 0 and kinds[i - 1] == LINEAR and not self.saves[i - 1] for i, k in enumerate(kinds)
        )
        self.linears = tuple(i for i, k in enumerate(kinds) if k == LINEAR)
        self.kept_at = tuple(sum(self.saves[:i]) if self.saves[i] else -1 for i in range(n))  # its index in kept


_PLANS: dict[tuple[str, ...], _LoopPlan] = {}


def _loop_plan(kinds: tuple[str, ...]) -> _LoopPlan:
    plan = _PLANS.get(kinds)
    if plan is None:
        plan = _PLANS[kinds] = _LoopPlan(kinds)
    return plan


class _Held:
    """What a saved tensor of the loop is packed into: the loop's backward empties it once that tensor is used,
    so each activation is freed where the per-op backward frees it (peak memory as per-op)."""

    __slots__ = ("obj",)


def _holding_saved_tensors() -> tuple[list[_Held], Any, Any]:
    """saved_tensors_hooks that pack each saved tensor into a :class:`_Held` (on top of any hooks in effect,
    e.g. ``save_on_cpu``), and a list that unpacking fills with the holders, in the order of the saved tensors."""
    unpacked: list[_Held] = []
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(t: Tensor) -> _Held:
        h = _Held()
        h.obj = t if outer_pack is None else outer_pack(t)
        return h

    def unpack(h: _Held) -> Tensor:
        if h.obj is None:
            raise RuntimeError(
                "torchbp: the backprop loop's saved tensors were freed by a backward pass; "
                "pass retain_graph=True to backward through the graph a second time"
            )
        unpacked.append(h)
        return h.obj if outer_unpack is None else outer_unpack(h.obj)

    return unpacked, pack, unpack


class _LoopTensors:
    """The loop's saved tensors, per layer: ``ins`` (a^{l-1}, for BP4), ``acts`` (the output, for σ'(z^l)) and
    ``weights`` (w^l, for BP2). :meth:`release` lets a layer's go once the loop has passed it (unless the graph
    is kept for another backward pass), so each activation is freed where the per-op backward frees it."""

    def __init__(self, ctx) -> None:
        unpacked = ctx.held  # the holders, filled in the order ctx.saved_tensors unpacks them
        if unpacked is not None:
            unpacked.clear()
        saved = list(ctx.saved_tensors)
        n = ctx.plan.n
        self.ins, self.acts, self.weights = saved[:n], saved[n : 2 * n], saved[2 * n :]
        self.holders = None
        if unpacked is not None and not torch._C._autograd._get_current_graph_task_keep_graph():
            holders = iter(unpacked)  # one per saved tensor that is not None
            self.holders = [next(holders) if t is not None else None for t in saved[: 2 * n]]

    def release(self, i: int) -> None:
        if self.holders is not None:
            for h in (self.holders[i], self.holders[len(self.ins) + i]):
                if h is not None:
                    h.obj = None
            self.ins[i] = self.acts[i] = None


class ChainFunction(torch.autograd.Function):
    r"""A run of layers, z^l = w^l a^{l-1} + b^l and a^l = σ(z^l), as one Function; backward is the backprop loop.

    ``layers`` is a tuple of ``(kind, slot)``: ``("linear", slot)`` (``slot``: the monitor's record of the layer
    or ``None``), ``("sigmoid", None)``, ``("relu", None)``; ``params`` are each Linear's weight and bias (``None``
    without), in order. ``forward`` returns the run's output, then the activations the backward reads (outputs
    too, so that a double backward differentiates through them). It saves what the per-op Functions save (a^{l-1} where BP4 needs it, w^l where BP2 does,
    each activation's output), so memory is the same; the per-op Python cost is paid once per run.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, layers: tuple, *params: Tensor | None):
        plan = _loop_plan(tuple(kind for kind, _ in layers))
        a, kept = input, []
        for kind, p, inplace, keep in zip(plan.kinds, plan.param, plan.inplace, plan.saves):
            if kind == LINEAR:
                a = F.linear(a, params[p], params[p + 1])  # z^l = w^l a^{l-1} + b^l
            elif kind == SIGMOID:
                a = torch.sigmoid(a)  # a^l = σ(z^l)
            else:
                a = a.relu_() if inplace else torch.relu(a)  # a^l = max(z^l, 0) (in place over a z nothing reads)
            if keep:
                kept.append(a)
        return (a, *kept)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, layers, *params = inputs
        plan = _loop_plan(tuple(kind for kind, _ in layers))
        needs = ctx.needs_input_grad
        n = plan.n
        ins, acts, weights = [None] * n, [None] * n, [None] * n  # per layer: a^{i-1} (BP4), output (σ'), w^i (BP2)
        kept = iter(output[1:])
        a = input
        flows = needs[0]  # whether a gradient flows to this layer's input (some earlier tensor needs one)
        for i, (kind, slot) in enumerate(layers):
            out = next(kept) if plan.saves[i] else None
            if kind == LINEAR:
                p = plan.param[i]
                if needs[2 + p] or (slot is not None and slot.needs_input):
                    ins[i] = a  # BP4 needs a^{i-1}
                if flows:
                    weights[i] = params[p]  # BP2 needs w^i
                flows = flows or needs[2 + p] or needs[3 + p]
            else:
                acts[i] = out if flows else None  # σ'(z^i), where a gradient flows back
            a = out
        if plan.kinds[-1] != LINEAR and flows:
            acts[-1] = output[0]  # the last activation's σ'(z) needs the run's output
        ctx.save_for_backward(*ins, *acts, *weights)
        ctx.save_for_forward(input, *[t for t in params if t is not None], *output)  # (None is not kept)
        ctx.present = tuple(t is not None for t in params)
        ctx.set_materialize_grads(False)
        ctx.layers, ctx.plan, ctx.held = layers, plan, _holding[-1] if _holding else None
        last = layers[-1][1] if plan.kinds[-1] == LINEAR else None
        ctx.slot = last  # the Linear whose output z is the run's output (a ReLU after it records its dead units)
        ctx.producer_slot = layers[plan.linears[-1]][1]

    @staticmethod
    def backward(ctx, delta: Tensor | None, *grad_kept: Tensor | None):  # ∇_a C at the run's output
        layers, plan, needs = ctx.layers, ctx.plan, ctx.needs_input_grad
        saved = _LoopTensors(ctx)
        grads: list[Tensor | None] = [None] * plan.n_params
        for i in reversed(range(plan.n)):  # l = L, …, 1
            if plan.saves[i] and grad_kept[plan.kept_at[i]] is not None:  # (only a double backward sends these)
                delta = grad_kept[plan.kept_at[i]] if delta is None else delta + grad_kept[plan.kept_at[i]]
            kind, slot = layers[i]
            a = saved.acts[i]  # a^l = σ(z^l)
            if delta is None or (kind != LINEAR and a is None):
                delta = None  # no gradient flows back through this layer
            elif kind == SIGMOID:
                delta = sigmoid_backward(delta, a)  # BP1/BP2: δ^l = ∇_a C ⊙ σ'(z^l)
            elif kind == RELU:
                if layers[i - 1][1] is not None:  # (a run starts with a Linear: layer i - 1 is one here or before)
                    layers[i - 1][1].record_relu(a)  # the monitor: units with σ'(z) = 0 for every sample
                delta = relu_backward(delta, a)  # BP1/BP2: δ^l = ∇_a C ⊙ σ'(z^l)
            else:  # delta is δ^l = ∂C/∂z^l
                p = plan.param[i]
                flows = needs[0] or any(needs[2 : 2 + p])  # does any tensor before layer l need a gradient?
                grad_input, grads[p], grads[p + 1] = linear_backward(
                    delta, saved.ins[i], saved.weights[i], flows, needs[2 + p], needs[3 + p]
                )  # BP4 ∂C/∂w^l = δ^l (a^{l-1})^T, BP3 ∂C/∂b^l = δ^l, and BP2's (w^l)^T δ^l
                if slot is not None:
                    slot.record(delta, saved.ins[i], grads[p], grads[p + 1])  # the monitor's statistics of δ^l
                delta, grad_input = grad_input, None  # (the name must not keep this δ alive: peak memory as per-op)
            saved.release(i)
        return delta, None, *grads

    @staticmethod
    def jvp(ctx, d_input: Tensor | None, _layers, *d_params: Tensor | None):
        input, *rest = ctx.saved_tensors
        plan = ctx.plan
        given = iter(rest)
        params = [next(given) if present else None for present in ctx.present]
        outputs = list(given)
        kept = iter(outputs[1:])
        a, da, tangents = input, d_input, []
        for i, kind in enumerate(plan.kinds):
            out = next(kept) if plan.saves[i] else (outputs[0] if i == plan.n - 1 else None)
            if kind == LINEAR:
                p = plan.param[i]
                da = linear_jvp(a, params[p], da, d_params[p], d_params[p + 1])  # dz = da w^T + a dw^T + db
            elif da is not None:
                da = (sigmoid_backward if kind == SIGMOID else relu_backward)(da, out)  # da^i = σ'(z^i) ⊙ dz^i
            if plan.saves[i]:  # the kept activation's own tangent (zeros, not None: functorch wants one)
                tangents.append(da if da is not None else torch.zeros_like(out))
            a = out
        return (da, *tangents)


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
        SigmoidFunction,
        ReLUFunction,
        MSELossFunction,
        QuadraticCostFunction,
        CrossEntropyFunction,
        BCEFunction,
        BCEWithLogitsFunction,
        ChainFunction,
    )
}


# ==================================================================================================
# The public functions: torch.nn.functional's signatures; validate (torchbp._checks), then apply.
# ==================================================================================================


def _autocast(dtype: torch.dtype | None, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors as torch.autocast would (``dtype=None``: the autocast dtype), else no-op."""
    first = tensors[0]
    if not torch._C._is_any_autocast_enabled() or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = dtype or torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None, slot=None) -> Tensor:
    if slot is not None and slot.needs_input and torch.compiler.is_compiling():
        return _linear_eagerly(input, weight, bias, slot)  # a monitor's per-sample norms are eager-only
    _checks.check_linear(input, weight, bias)
    input, weight, bias = _autocast(None, input, weight, bias)
    z = _apply(LinearFunction, input, weight, bias, slot)
    if slot is not None and not torch.compiler.is_compiling() and slot.discovering:
        slot.discover(input)  # the monitor reads the data flow into this layer from the autograd graph
    return z


_linear_eagerly = torch.compiler.disable(_linear)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""Applies :math:`z = a w^T + b`, with the backward pass of BP2 (first half), BP3 and BP4.

    Args:
        input: :math:`a^{l-1}`, shape ``(*, in_features)``.
        weight: :math:`w^l`, shape ``(out_features, in_features)``.
        bias: :math:`b^l`, shape ``(out_features)``. Default: ``None``.

    Shape:
        ``(*, in_features)`` -> ``(*, out_features)``, as :func:`torch.nn.functional.linear`.

    Example::

        >>> z = torchbp.functional.linear(torch.randn(4, 3), torch.randn(2, 3), torch.zeros(2))
        >>> z.shape
        torch.Size([4, 2])
    """
    if bias is None and isinstance(weight, Tensor) and weight.dim() == 1:  # z = a·w, as torch allows
        return _linear(input, weight.unsqueeze(0), None).squeeze(-1)
    return _linear(input, weight, bias)


def _chain(input: Tensor, layers: tuple, params: list[Tensor | None]) -> Tensor:
    """Run ``layers`` (see :class:`ChainFunction`) as one Function: what ``torchbp.nn.Sequential`` calls for a run
    of torchbp Linear and activation layers. Checked as each layer's own call would be."""
    if not _chain_applies(input, layers, params):
        return _per_op(input, layers, params)  # (the per-op path raises the Linear's own error)
    if torch._C._is_any_autocast_enabled():
        input, *params = _autocast(None, input, *params)
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _apply(ChainFunction, input, layers, *params)[0]
    held, pack, unpack = _holding_saved_tensors()
    _holding.append(held)
    torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
    try:
        out = _apply(ChainFunction, input, layers, *params)[0]
    finally:
        torch._C._autograd._pop_saved_tensors_default_hooks()
        _holding.pop()
    if _monitors:
        _discover_chain(input, layers)
    return out


# The holders of the saved tensors of the ChainFunction being applied (read by its setup_context).
_holding: list[list] = []


def _chain_applies(input: Tensor, layers: tuple, params: list[Tensor | None]) -> bool:
    """The checks of each Linear's own call (shapes, dtypes, devices), on the run at once."""
    if not isinstance(input, Tensor) or not input.dim():
        return False
    features, dtype, device = input.shape[-1], input.dtype, input.device
    autocast = torch._C._is_any_autocast_enabled()
    p = 0
    for kind, slot in layers:
        if kind == LINEAR:
            weight, bias = params[p], params[p + 1]
            if (
                weight.dim() != 2
                or features != weight.shape[1]
                or (bias is not None and bias.shape != weight.shape[:1])
                or (not autocast and (weight.dtype != dtype or (bias is not None and bias.dtype != dtype)))
                or weight.device != device
                or (slot is not None and slot.needs_input and torch.compiler.is_compiling())
            ):
                return False
            features, p = weight.shape[0], p + 2
    return input.is_floating_point() or autocast


def _discover_chain(input: Tensor, layers: tuple) -> None:
    """The data flow for the monitor: into the first Linear from the autograd graph, then along the run."""
    previous = None
    for kind, slot in layers:
        if kind == LINEAR and slot is not None and slot.discovering:
            if previous is None:
                slot.discover(input)
            else:
                slot.consumes(previous)
        if kind == LINEAR:
            previous = slot


def _per_op(input: Tensor, layers: tuple, params: list[Tensor | None]) -> Tensor:
    """``layers`` one Function each (where the run cannot be one)."""
    p = 0
    for kind, slot in layers:
        if kind == LINEAR:
            input = _linear(input, params[p], params[p + 1], slot)
            p += 2
        elif kind == SIGMOID:
            input = sigmoid(input)
        else:
            input = _relu(input, False)
    return input


def sigmoid(input: Tensor) -> Tensor:
    r"""Applies :math:`σ(z) = 1 / (1 + e^{-z})` element-wise; backward: :math:`⊙ σ(z)(1 − σ(z))`.

    Shape: any; the output has the input's shape.

    Example::

        >>> torchbp.functional.sigmoid(torch.zeros(2))
        tensor([0.5000, 0.5000])
    """
    _checks.check_tensor("sigmoid", "input", input)
    return _apply(SigmoidFunction, input)


def _relu(input: Tensor, inplace: bool, slot=None) -> Tensor:
    """relu(), handing the monitor's record of the Linear that produced ``input`` (if any) to backward.

    ``slot`` is the ReLU module's own monitor record (:class:`torchbp.nn.ReLU`), which remembers that
    Linear for compiled runs; in eager mode the Linear is read from the autograd graph.
    """
    _checks.check_tensor("relu", "input", input)
    if _monitors and not torch.compiler.is_compiling():
        producer = getattr(input.grad_fn, "slot", None)
        if slot is not None:
            slot.target = producer
        slot = producer
    elif slot is not None:
        slot = slot.target
    return _apply(ReLUFunction, input, inplace, slot)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    r"""Applies :math:`\max(z, 0)` element-wise; backward: :math:`⊙ 1[z > 0]` (0 at exactly 0).

    Args:
        input: any shape.
        inplace: overwrite ``input`` with the result. Default: ``False``.

    Example::

        >>> torchbp.functional.relu(torch.tensor([-1.0, 0.0, 2.0]))
        tensor([0., 0., 2.])
    """
    return _relu(input, inplace)


def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Mean squared error :math:`\ell = (a − y)^2`, as :func:`torch.nn.functional.mse_loss`.

    ``'mean'`` divides :math:`\sum (a − y)^2` by the number of elements (by :math:`\sum w` with
    ``weight``) and has no ½; ``'sum'`` does not divide; ``'none'`` keeps every element. Backward:
    :math:`∇_a C = 2 (a − y) / \text{numel}` for ``'mean'``.

    Args:
        input: :math:`a`, any shape.
        target: :math:`y`, broadcastable to ``input`` (a warning is given when the sizes differ).
        size_average, reduce: deprecated, as in torch.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
        weight: per-element weights, the shape of ``input``. Default: ``None``.
    """
    reduction = _checks.check_mse_loss(input, target, weight, reduction, size_average, reduce)
    input, target = torch.broadcast_tensors(input, target)
    input, target, weight = _autocast(torch.float32, input, target, weight)
    return _apply(MSELossFunction, input, target, weight, reduction)


def quadratic_cost(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""The seeds' quadratic cost :math:`C = \frac{1}{2n} \sum_x \lVert y(x) − a(x) \rVert^2`.

    ``n`` is the batch size (the first dimension; a 1-D input is one sample). Unlike
    :func:`mse_loss` it has the ½ and divides by ``n`` only, not by every element, so
    :math:`∇_a C = (a − y)/n` (BP1's first factor).

    Args:
        input: :math:`a^L`, shape ``(N, *)`` or ``(out,)``.
        target: :math:`y`, the same shape.
        reduction: ``'mean'``: divide by ``n``; ``'sum'``: no ``1/n``; ``'none'``: ½‖y − a‖² per
            sample, shape ``(N,)``. Default: ``'mean'``.

    Example::

        >>> torchbp.functional.quadratic_cost(torch.ones(2, 3), torch.zeros(2, 3))
        tensor(1.5000)
    """
    reduction = _checks.check_quadratic_cost(input, target, reduction)
    input, target = _autocast(torch.float32, input, target)
    return _apply(QuadraticCostFunction, input, target, reduction)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Softmax with cross-entropy on logits, as :func:`torch.nn.functional.cross_entropy`.

    Backward gives the output error directly (BP1 with softmax): :math:`δ^L = \text{softmax}(z) − y`,
    scaled by the class weights and the reduction.

    Args:
        input: logits :math:`z^L`, shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``.
        target: class indices (int64, shape ``()``, ``(N,)`` or ``(N, d1, ...)``, values in
            ``[0, C)`` or ``ignore_index``) or class probabilities (floating, the input's shape).
        weight: per-class weights, shape ``(C,)``. Default: ``None``.
        size_average, reduce: deprecated, as in torch.
        ignore_index: a class-index target value that contributes nothing. Default: ``-100``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``; ``'mean'`` divides by the summed weight of
            the non-ignored targets (by ``N * d1 * ...`` for probabilities). Default: ``'mean'``.
        label_smoothing: in ``[0, 1]``; mixes the target with the uniform distribution. Default: ``0.0``.
    """
    maybe_ignored = _checks.check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    reduction = _checks.resolve_reduction("cross_entropy", reduction, size_average, reduce)
    label_smoothing = max(label_smoothing, 0.0)  # torch smooths only when label_smoothing > 0
    if not target.is_floating_point():
        _checks.check_not_differentiable("cross_entropy", weight=weight)
        target = target.long() if input.dim() > 1 or target.dim() == 0 else target.long().reshape(())
    input, target, weight = _autocast(torch.float32, input, target, weight)
    return _apply(CrossEntropyFunction, input, target, weight, ignore_index, reduction, label_smoothing, maybe_ignored)


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Binary cross-entropy on probabilities (sigmoid outputs), as torch's.

    :math:`\ell = −w [y \log a + (1 − y) \log(1 − a)]`, logs clamped at −100 as torch's. Backward:
    :math:`∇_a C = w (a − y) / (a(1 − a))`; through :func:`sigmoid` this is Nielsen's δ^L = a − y.

    Args:
        input: :math:`a` in [0, 1], any shape.
        target: :math:`y`, the input's shape.
        weight: broadcastable to the input. Default: ``None``.
        size_average, reduce: deprecated, as in torch.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
    """
    fn = "binary_cross_entropy"
    reduction = _checks.check_binary(fn, input, target, weight, reduction, size_average, reduce)
    if input.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        raise RuntimeError(  # torch's autocast bans it on CUDA for the same reason
            f"{fn}() and BCELoss are unsafe to autocast: under torch.autocast('cuda') use "
            "binary_cross_entropy_with_logits / BCEWithLogitsLoss on the logits instead"
        )
    input, target, weight = _autocast(torch.float32, input, target, weight)  # CPU autocast: float32
    _checks.check_dtype(fn, input, "target", target)
    if not _checks.is_traced(input) and input.numel() and not _checks.within_0_1(input):
        raise RuntimeError(f"{fn}(): all elements of input should be between 0 and 1 (probabilities)")
    if weight is not None:
        weight = weight.expand(input.shape)
    return _apply(BCEFunction, input, target, weight, reduction)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    r"""Sigmoid followed by binary cross-entropy, computed stably on logits, as torch's.

    Backward is the output error of Ng's notes / Nielsen ch. 3: :math:`δ^L = σ(z) − y` (weighted).

    Args:
        input: logits :math:`z`, any shape.
        target: :math:`y`, the input's shape.
        weight: broadcastable to the input. Default: ``None``.
        size_average, reduce: deprecated, as in torch.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
        pos_weight: weight of positive examples, broadcastable to the input (usually ``(C,)``).
            Default: ``None``.
    """
    fn = "binary_cross_entropy_with_logits"
    reduction = _checks.check_binary(fn, input, target, weight, reduction, size_average, reduce, pos_weight)
    if not target.is_floating_point():
        raise RuntimeError(f"{fn}(): expected a floating-point target, got dtype {target.dtype}; use target.float()")
    input, target, weight, pos_weight = _autocast(torch.float32, input, target, weight, pos_weight)
    return _apply(BCEWithLogitsFunction, input, target, weight, pos_weight, reduction)

r"""The costs' equations: BP1's :math:`∇_a C` (or δ^L directly, for the costs on logits), one function per cost.

Below them, the forward-mode derivative of a cost, :math:`dC = Σ_x ⟨∂C/∂x, dx⟩`
(:func:`_directional_derivative`), that each cost Function's ``jvp`` calls. A fast kernel trick
(:func:`_softmax_minus_one_hot`, :func:`_exp_minus_one_hot`, :func:`_bce_input_grad_in_one_buffer`) sits beside
the plain one-line equation it computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _torch_private
from ._common import _differentiated, _divide, _number


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _scale(grad: Tensor, reduction: str, count: int | Tensor) -> Tensor:
    """The upstream gradient of a reduced loss, as a factor for each element: dL/d(loss element)."""
    return _divide(grad, count) if reduction == "mean" else grad


def mse_loss_backward(
    input: Tensor, target: Tensor, weight: Tensor | None, reduction: str, grad: Tensor, need_weight: bool = False
) -> tuple[Tensor, Tensor | None]:
    r"""BP1's :math:`∇_a C` for torch's MSE, :math:`C = \text{reduce}(w (a − y)^2)`: :math:`2 w (a − y) / \text{count}`.

    ``count`` is the number of elements (:math:`Σw` when weighted) for ``'mean'``, 1 otherwise. Returns
    ``(∇_a C, ∂C/∂w)``; ∂C/∂y is :math:`−∇_a C`.
    """
    diff = input - target
    if weight is None:  # (2/count folded into one factor: one op fewer)
        two_g = _divide(grad, input.numel() / 2) if reduction == "mean" else 2 * grad
        return diff * two_g, None  # BP1: ∇_a C = 2(a − y)/count
    count = weight.sum()
    g = _scale(grad, reduction, count)
    grad_a = 2 * diff * weight * g  # BP1: ∇_a C = 2w(a − y)/count
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


def cross_entropy_log_p_backward(
    log_p: Tensor, target: Tensor, reduction: str, grad: Tensor | None, grad_log_p: Tensor | None = None
) -> Tensor | None:
    r"""BP1 for softmax with cross-entropy from the saved log-softmax: :math:`δ^L = (\text{softmax}(z) − y) g / n`.

    The common call: (N, C) logits, class-index targets none of which is ignored, no weights, no smoothing,
    ``'mean'`` (n = N) or ``'sum'`` (n = 1). softmax(z) = exp(log p), so nothing is recomputed from z (torch's
    backward reads its saved log-softmax too). ``grad_log_p`` is the gradient of log p itself (a double backward
    sends one): log-softmax's backward, :math:`h − \text{softmax}(z) Σ_c h_c`, is added.
    """
    delta = None
    if grad is not None:
        g = _divide(grad, target.numel()) if reduction == "mean" else grad
        index = target.unsqueeze(1)
        if _differentiated():  # out of place, so the graph stays differentiable
            y = _view_classes(torch.arange(log_p.shape[1], device=log_p.device), log_p, 1) == index  # one-hot y
            delta = (log_p.exp() - y.to(log_p.dtype)) * g  # BP1: δ^L = a − y
        else:
            delta = _exp_minus_one_hot(log_p, index, g)
    if grad_log_p is not None:  # d log softmax(z) = h − softmax(z) Σ_c h_c
        d = grad_log_p - log_p.exp() * grad_log_p.sum(1, keepdim=True)
        delta = d if delta is None else delta + d
    return delta


def _exp_minus_one_hot(log_p: Tensor, index: Tensor, g: Tensor) -> Tensor:
    """``(exp(log_p) − onehot(index)) * g`` in one buffer: exp, then −1 added at the targets in place."""
    delta = torch.exp(log_p).scatter_(1, index, -1.0, reduce="add")
    return delta.mul_(g)  # BP1: δ^L = a − y


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
        if _differentiated() or torch.compiler.is_compiling() or _torch_private.is_legacy_batched(g):
            grad_a = (a - y) / (a * (1 - a)).clamp_min(_BCE_EPS) * g  # BP1: ∇_a C (clamped as torch)
        else:
            grad_a = _bce_input_grad_in_one_buffer(a, y, g)
    if need_target:
        grad_y = -torch.logit(a) * g  # ∂C/∂y = log(1 − a) − log(a), unclamped as torch
    return grad_a, grad_y


def _bce_input_grad_in_one_buffer(a: Tensor, y: Tensor, g: Tensor) -> Tensor:
    """``(a - y) / (a * (1 - a)).clamp_min(eps) * g`` to the bit, in two buffers instead of five: a(1 − a) clamped in
    place, then a − y divided and scaled in place."""
    den = torch.sub(_number(1, a), a).mul_(a).clamp_min_(_BCE_EPS)
    return torch.sub(a, y).div_(den).mul_(g)  # BP1: ∇_a C (clamped as torch)


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
# Forward mode: a cost's tangent is its gradient, as backward computes it, contracted with the tangents:
# dC = Σ_x ⟨∂C/∂x, dx⟩.
# ==================================================================================================


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


# binary_cross_entropy_backward clamps a(1 − a) where torch's does: at its C++ constant ``float EPSILON = 1e-12``,
# 1e-12 rounded to float32 (1e-12 · (1 − 4.0e-9)), also in float64.
_BCE_EPS = float(torch.tensor(1e-12, dtype=torch.float32))

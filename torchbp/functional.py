r"""Backpropagation written by hand: autograd Functions for dense layers, activations and costs.

Every backward below is the backpropagation equations (Nielsen, *Neural Networks and Deep Learning*,
ch. 2; the seed notes in ``shared/seeds``), written with plain torch ops and tagged line by line.

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

Each Function follows PyTorch's "forward + setup_context" template, so ``torch.func`` transforms
(``grad``, ``vmap``, ``jacrev``) and ``torch.compile`` work; every backward is made of differentiable
torch ops, so double backward works too. Inputs are validated by the lowercase wrappers (same
names, arguments, defaults and exception types as ``torch.nn.functional``), never inside backward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "linear",
    "sigmoid",
    "relu",
    "mse_loss",
    "quadratic_cost",
    "cross_entropy",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "LinearFunction",
    "SigmoidFunction",
    "ReLUFunction",
    "MSELossFunction",
    "QuadraticCostFunction",
    "CrossEntropyFunction",
    "BCEFunction",
    "BCEWithLogitsFunction",
]

# Monitored layers -> their tap (see torchbp.monitor). While it is empty, no forward pass does any
# monitoring work; keeping taps here rather than on the modules keeps models picklable and copyable.
_taps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_base_apply = torch._C._FunctionBase.__dict__["apply"]


def _apply(fn: type[torch.autograd.Function], *args):
    """``fn.apply(*args)``; in plain eager mode without ``Function.apply``'s Python prologue.

    That prologue binds the arguments to ``forward``'s signature on every call (for default values;
    every call here passes all arguments) and routes torch.func transforms; skipping it when no
    transform is active and nothing is being compiled halves the per-call overhead.
    """
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return fn.apply(*args)
    return _base_apply.__get__(None, fn)(*args)


# --------------------------------------------------------------------------------------------------
# Validation helpers (public entry points only)
# --------------------------------------------------------------------------------------------------


def _is_traced(*tensors: Tensor | None) -> bool:
    """True under torch.compile or inside a torch.func transform, where data-dependent checks can't run."""
    if torch.compiler.is_compiling():
        return True
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t) for t in tensors)


def _check_tensor(fn: str, name: str, value: object, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        kind = "Tensor or None" if optional else "Tensor"
        raise TypeError(f"{fn}(): argument '{name}' must be a {kind}, got {type(value).__name__}")


def _check_device(fn: str, input: Tensor, name: str, other: Tensor | None) -> None:
    if other is not None and other.device != input.device:
        raise RuntimeError(
            f"{fn}(): expected {name} on the same device as input ({input.device}), got {other.device}; "
            f"move it with {name}.to(input.device)"
        )


def _check_dtype(fn: str, input: Tensor, name: str, other: Tensor | None) -> None:
    if other is not None and other.dtype != input.dtype:
        raise RuntimeError(
            f"{fn}(): expected {name} of dtype {input.dtype} like input, got {other.dtype}; "
            f"cast one of them with .to(dtype)"
        )


def _check_float(fn: str, name: str, t: Tensor) -> None:
    if not t.is_floating_point():  # torch's kernels: "not implemented for 'Long'"
        raise NotImplementedError(f"{fn}(): expected a floating-point {name}, got dtype {t.dtype}; use {name}.float()")


def _reduction(fn: str, reduction: str, size_average: bool | None = None, reduce: bool | None = None) -> str:
    """The reduction string, from the legacy ``size_average``/``reduce`` pair when one is given."""
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        return "none" if not reduce else ("mean" if size_average else "sum")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction; {fn}() expects 'none', 'mean' or 'sum'")
    return reduction


def _check_not_differentiable(fn: str, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"{fn}(): '{name}' is not differentiable, as in torch.nn.functional; pass {name}.detach()"
            )


def _autocast(dtype: torch.dtype | None, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors as torch.autocast would (``dtype=None``: the autocast dtype), else no-op."""
    first = tensors[0]
    assert first is not None
    if not torch._C._is_any_autocast_enabled() or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = dtype or torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _scale(grad: Tensor, reduction: str, count: int | Tensor) -> Tensor:
    """The upstream gradient of a reduced loss, as a factor for each element: dL/d(loss element)."""
    return grad / count if reduction == "mean" else grad


# --------------------------------------------------------------------------------------------------
# Dense layer: z = a W^T + b
# --------------------------------------------------------------------------------------------------


class LinearFunction(torch.autograd.Function):
    r"""z^l = a^{l-1} (w^l)^T + b^l; backward is BP2's (w^l)^T delta^l, BP3 and BP4.

    ``tap`` is an optional callable (used by :class:`torchbp.DeltaMonitor`) that receives
    ``(delta, input, grad_weight, grad_bias)`` in backward; ``None`` costs nothing.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor | None, tap=None) -> Tensor:
        z = F.linear(input, weight, bias)
        # For 1-D and N-D inputs F.linear returns a reshaped view of its 2-D product; a custom
        # Function's output must not be a view if it is to be modified in place (ReLU(inplace=True)).
        return z.detach() if not torch.compiler.is_compiling() and z._is_view() else z

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, tap = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Save only what a requested gradient needs: BP2 needs w, BP4 needs a^{l-1}.
        ctx.save_for_backward(input if need_weight or tap is not None else None, weight if need_input else None)
        ctx.tap = tap
        ctx.bias_shape = None if bias is None or bias.shape == weight.shape[:1] else bias.shape

    @staticmethod
    def backward(ctx, delta: Tensor):  # delta = δ^l = ∂C/∂z^l
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = delta @ weight  # BP2: (w^l)^T δ^l, the error moved back to a^{l-1}
        delta_2d = delta if delta.dim() == 2 else delta.reshape(-1, delta.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = delta_2d.mT @ input.reshape(-1, input.shape[-1])  # BP4: Σ_n δ_n a_n^T
        if ctx.needs_input_grad[2]:
            grad_bias = delta_2d.sum(0)  # BP3: Σ_n δ_n
            if ctx.bias_shape is not None:  # a bias broadcast over more than the batch (rare)
                grad_bias = delta.sum_to_size(ctx.bias_shape)  # BP3, summed over the broadcast dims
        if ctx.tap is not None:
            ctx.tap(delta, input, grad_weight, grad_bias)
        return grad_input, grad_weight, grad_bias, None


def _check_linear(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))):
        _check_tensor("linear", "input", input)
        _check_tensor("linear", "weight", weight)
        _check_tensor("linear", "bias", bias, optional=True)
    if weight.dim() != 2:
        raise RuntimeError(
            f"linear(): expected a 2-D weight (out_features, in_features) (or 1-D without bias), "
            f"got shape {tuple(weight.shape)}"
        )
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"linear(): expected input with last dimension {weight.shape[1]} (in_features), "
            f"got shape {tuple(input.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:  # torch also takes a bias that broadcasts
        out_shape = input.shape[:-1] + weight.shape[:1]
        try:
            ok = torch.broadcast_shapes(bias.shape, out_shape) == out_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise RuntimeError(
                f"linear(): expected bias of shape ({weight.shape[0]},) (or broadcastable to the output "
                f"{tuple(out_shape)}), got {tuple(bias.shape)}"
            )
    dtype, device = input.dtype, input.device
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != device:
            _check_device("linear", input, name, t)
        if t is not None and t.dtype != dtype and not torch._C._is_any_autocast_enabled():
            _check_dtype("linear", input, name, t)


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None, tap) -> Tensor:
    _check_linear(input, weight, bias)
    if tap is not None and torch.compiler.is_compiling():
        tap = None  # the monitor records eager backward passes only
    input, weight, bias = _autocast(None, input, weight, bias)
    return _apply(LinearFunction, input, weight, bias, tap)


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
        return _linear(input, weight.unsqueeze(0), None, None).squeeze(-1)
    return _linear(input, weight, bias, None)


# --------------------------------------------------------------------------------------------------
# Activations: the ⊙σ'(z) half of BP1 and BP2
# --------------------------------------------------------------------------------------------------


class SigmoidFunction(torch.autograd.Function):
    r"""a = σ(z); backward multiplies by σ'(z) = σ(z)(1 − σ(z)), from the saved output a."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor) -> Tensor:
        return torch.sigmoid(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # σ(z): its derivative needs nothing else

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: out-of-place, so the graph stays differentiable
            return grad * a * (1 - a)  # BP1/BP2: ∇_a C ⊙ σ'(z)
        delta = grad * a
        return delta.addcmul_(delta, a, value=-1)  # BP1/BP2: ∇_a C ⊙ a(1 − a), in one buffer


# Integer types of the floating dtypes' width, for ReLU's bit-mask backward.
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


class ReLUFunction(torch.autograd.Function):
    r"""a = max(z, 0); backward multiplies by σ'(z) = 1[z > 0] (0 at z = 0, as torch), from the output."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, inplace: bool = False) -> Tensor:
        return input.relu_() if inplace else torch.relu(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, inplace = inputs
        if inplace:
            ctx.mark_dirty(input)
        ctx.save_for_backward(output)  # a > 0 exactly where z > 0; torch's relu saves the same
        # A monitored Linear right before this ReLU learns which of its units are dead.
        ctx.tap = getattr(input.grad_fn, "tap", None) if _taps and not torch.compiler.is_compiling() else None

    @staticmethod
    def backward(ctx, grad: Tensor):
        (a,) = ctx.saved_tensors
        if ctx.tap is not None:
            ctx.tap.relu_output(a)  # the monitor counts the units with σ'(z) = 0 for every sample
        if (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()  # (the compiler fuses the select by itself)
            or torch._C._are_functorch_transforms_active()
            or a.dtype not in _BITS
            or grad.dtype != a.dtype  # (a saved-tensor hook may change a's dtype)
            or grad.is_neg()
        ):
            return torch.where(a.bool(), grad, 0.0), None  # BP1/BP2: ∇_a C ⊙ σ'(z), a select as torch's
        # The same select, fast on CPU (where bool-mask kernels are slow) and in one buffer: the bits of
        # |a| as integers, clamped to 1, are σ'(z) (1 also where a is NaN), and an integer product with
        # the bits of ∇_a C selects them exactly: 0, not NaN, for an Inf or NaN gradient where σ'(z) = 0.
        d_sigma = a.abs().view(_BITS[a.dtype]).clamp_(max=1)
        return d_sigma.mul_(grad.view(_BITS[a.dtype])).view(a.dtype), None  # BP1/BP2: ∇_a C ⊙ σ'(z)


def sigmoid(input: Tensor) -> Tensor:
    r"""Applies :math:`σ(z) = 1 / (1 + e^{-z})` element-wise; backward: :math:`⊙ σ(z)(1 − σ(z))`.

    Shape: any; the output has the input's shape.

    Example::

        >>> torchbp.functional.sigmoid(torch.zeros(2))
        tensor([0.5000, 0.5000])
    """
    _check_tensor("sigmoid", "input", input)
    return _apply(SigmoidFunction, input)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    r"""Applies :math:`\max(z, 0)` element-wise; backward: :math:`⊙ 1[z > 0]` (0 at exactly 0).

    Args:
        input: any shape.
        inplace: overwrite ``input`` with the result. Default: ``False``.

    Example::

        >>> torchbp.functional.relu(torch.tensor([-1.0, 0.0, 2.0]))
        tensor([0., 0., 2.])
    """
    _check_tensor("relu", "input", input)
    return _apply(ReLUFunction, input, inplace)


# --------------------------------------------------------------------------------------------------
# Costs: each backward is ∇_a C (or, fused with its output activation, δ^L itself: BP1)
# --------------------------------------------------------------------------------------------------


class MSELossFunction(torch.autograd.Function):
    r"""C = reduce(w (a − y)^2): ``mean`` divides by the number of elements (by Σw when weighted)."""

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
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad: Tensor):
        input, target, weight = ctx.saved_tensors
        count = input.numel() if weight is None else weight.sum()
        g = _scale(grad, ctx.reduction, count)
        diff = input - target
        grad_a = 2 * diff * g if weight is None else 2 * diff * weight * g  # BP1: ∇_a C = 2w(a − y)/count
        grad_weight = None
        if ctx.needs_input_grad[2]:  # ∂C/∂w_i, including the mean's 1/Σw
            sq = diff.pow(2)
            grad_weight = (sq * g).sum_to_size(weight.shape)  # summed where a bigger target broadcast it
            if ctx.reduction == "mean":
                grad_weight = grad_weight - (sq * weight).sum() * g / count
        return (
            grad_a if ctx.needs_input_grad[0] else None,
            -grad_a if ctx.needs_input_grad[1] else None,
            grad_weight,
            None,
        )


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
    for name, t in (("input", input), ("target", target)):
        _check_tensor("mse_loss", name, t)
    _check_tensor("mse_loss", "weight", weight, optional=True)
    reduction = _reduction("mse_loss", reduction, size_average, reduce)
    _check_device("mse_loss", input, "target", target)
    _check_device("mse_loss", input, "weight", weight)
    if target.shape != input.shape:
        import warnings

        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=2,
        )
    input_shape = input.shape
    try:
        input, target = torch.broadcast_tensors(input, target)
    except RuntimeError as e:
        raise RuntimeError(
            f"mse_loss(): target of shape {tuple(target.shape)} does not broadcast to input of shape "
            f"{tuple(input.shape)}: {e}"
        ) from None
    if weight is not None and weight.shape != input_shape:  # the input's own shape, as torch
        raise ValueError(
            f"mse_loss(): weights and input must have the same size: expected {tuple(input_shape)}, "
            f"got {tuple(weight.shape)}"
        )
    input, target, weight = _autocast(torch.float32, input, target, weight)
    return _apply(MSELossFunction, input, target, weight, reduction)


class QuadraticCostFunction(torch.autograd.Function):
    r"""Nielsen's quadratic cost C = 1/(2n) Σ_x ‖y(x) − a(x)‖²; ∇_a C = (a − y)/n."""

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
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad: Tensor):
        input, target = ctx.saved_tensors
        n = input.shape[0] if input.dim() > 1 else 1
        g = _scale(grad, ctx.reduction, n)
        if ctx.reduction == "none" and input.dim() > 1:
            g = g.reshape((-1,) + (1,) * (input.dim() - 1))
        grad_a = (input - target) * g  # BP1: ∇_a C = (a − y)/n   (seed 003, eq. 26)
        return (
            grad_a if ctx.needs_input_grad[0] else None,
            -grad_a if ctx.needs_input_grad[1] else None,
            None,
        )


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
    _check_tensor("quadratic_cost", "input", input)
    _check_tensor("quadratic_cost", "target", target)
    reduction = _reduction("quadratic_cost", reduction)
    if input.dim() == 0 or target.shape != input.shape:
        raise ValueError(
            f"quadratic_cost(): expected target of the input's shape {tuple(input.shape)} (at least 1-D), "
            f"got {tuple(target.shape)}"
        )
    _check_device("quadratic_cost", input, "target", target)
    _check_float("quadratic_cost", "input", input)
    input, target = _autocast(torch.float32, input, target)
    return _apply(QuadraticCostFunction, input, target, reduction)


def _view_classes(t: Tensor, logits: Tensor, class_dim: int) -> Tensor:
    """A (C,) tensor shaped to broadcast along the class dimension of ``logits``."""
    shape = [1] * logits.dim()
    shape[class_dim] = -1
    return t.view(shape)


class CrossEntropyFunction(torch.autograd.Function):
    r"""Softmax with cross-entropy. C = −Σ_c q_c log softmax(z)_c, reduced; δ^L = softmax(z) Σq − q.

    ``q`` are the target's coefficients: one-hot (or the given probabilities), times the class
    weight, mixed with label smoothing; ignored targets have ``q = 0``. Without weights and smoothing,
    δ^L = softmax(z) − y (BP1 for the softmax output layer).
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
        ctx.options = ignore_index, reduction, label_smoothing, maybe_ignored

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, target, weight = ctx.saved_tensors
        ignore_index, reduction, eps, maybe_ignored = ctx.options
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
                if not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()):  # one buffer
                    delta = torch.softmax(z, class_dim).scatter_(class_dim, index, -1.0, reduce="add")
                    delta = delta.mul_(grad) if reduction != "mean" else delta.mul_(grad).div_(target.numel())
                    return delta, None, None, None, None, None, None  # BP1: δ^L = a − y
                y = _view_classes(torch.arange(n_classes, device=z.device), z, class_dim) == index  # one-hot y
                delta = (torch.softmax(z, class_dim) - y.to(z.dtype)) * _scale(grad, reduction, target.numel())
                return delta, None, None, None, None, None, None  # BP1: δ^L = a − y
            y = _view_classes(torch.arange(n_classes, device=z.device), z, class_dim) == index  # one-hot y
        # General case: C = −Σ_c q_c log softmax(z)_c, with q the weighted, smoothed target.
        log_p = torch.log_softmax(z, class_dim)
        w = None if weight is None else _view_classes(weight, z, class_dim)
        if target.is_floating_point():  # class probabilities y
            q = target * (1 - eps) + eps / n_classes if eps > 0 else target
            count = z.numel() / n_classes if z.numel() else 0
        else:  # class indices: one-hot, smoothed; ignored samples have q = 0
            q = torch.where(y, 1 - eps + eps / n_classes, eps / n_classes).to(z.dtype)
            if maybe_ignored:
                q = q * keep
            count = (
                target.numel()
                if not maybe_ignored and weight is None
                else (
                    keep.sum()
                    if weight is None
                    else (weight[index] * keep).sum()
                    if maybe_ignored
                    else weight[index].sum()
                )
            )
        if reduction == "mean" and isinstance(count, Tensor):
            g = torch.where(count != 0, grad / count, torch.nan)  # 0/0 is NaN, as torch's
        else:
            g = _scale(grad, reduction, count)
        qw = q if w is None else q * w
        delta = (log_p.exp() * qw.sum(class_dim, keepdim=True) - qw) * g  # BP1: δ^L = softmax(z)Σq − q
        if maybe_ignored and not target.is_floating_point():
            delta = delta.masked_fill(~keep, 0)  # an ignored target passes no error back, even if 0/0
        grad_target = grad_weight = None
        if ctx.needs_input_grad[1]:  # ∂C/∂y for probability targets
            grad_target = -log_p * g * (1 - eps) if w is None else -log_p * w * g * (1 - eps)
        if ctx.needs_input_grad[2]:  # ∂C/∂w_c for probability targets
            dims = [d for d in range(z.dim()) if d != class_dim]
            grad_weight = -(q * log_p * g).sum(dims) if dims else -(q * log_p * g)
        return delta, grad_target, grad_weight, None, None, None, None


def _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing) -> bool:
    """Validate; returns whether some target may equal ``ignore_index`` (False only when known)."""
    if (  # the common case, (N, C) logits and (N,) int64 indices, in few checks
        weight is None
        and isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dim() == 2
        and target.dtype == torch.int64
        and target.shape == input.shape[:1]
        and input.is_floating_point()
        and target.device == input.device
        and label_smoothing <= 1.0
    ):
        return _check_class_indices(input, target, input.shape[1], ignore_index)
    fn = "cross_entropy"
    _check_tensor(fn, "input", input)
    _check_tensor(fn, "target", target)
    _check_tensor(fn, "weight", weight, optional=True)
    if input.dim() == 0:
        raise RuntimeError(f"{fn}(): expected input of shape (C,), (N, C) or (N, C, d1, ...), got a 0-D tensor")
    _check_float(fn, "input", input)
    _check_device(fn, input, "target", target)
    _check_device(fn, input, "weight", weight)
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    if not label_smoothing <= 1.0:  # torch ignores a negative one
        raise RuntimeError(f"{fn}(): label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if weight is not None and tuple(weight.shape) != (n_classes,):
        raise RuntimeError(f"{fn}(): expected weight of shape ({n_classes},), one per class, got {tuple(weight.shape)}")
    if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"{fn}(): expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({target.shape[0]}); got input {tuple(input.shape)} and target {tuple(target.shape)}"
        )
    if target.is_floating_point():
        if target.shape != input.shape:
            raise RuntimeError(
                f"{fn}(): expected probabilities target of the input's shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}; for class indices pass an int64 target"
            )
        return False
    expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"{fn}(): expected class-index target of dtype torch.int64, got {target.dtype}; use target.long()"
        )
    if input.dim() >= 2 and target.dim() == 0:
        raise ValueError(
            f"{fn}(): expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"(none: 0-D target); target shape should be {tuple(expected)}"
        )
    if input.dim() == 1 and target.dim() == 1 and target.shape != (1,):
        raise ValueError(
            f"{fn}(): for 1-D input (C,) the class-index target must be 0-D or of shape (1,), "
            f"got shape {tuple(target.shape)}"
        )
    if input.dim() == 1 and target.shape == (1,):
        expected = target.shape  # torch takes (1,) for one unbatched sample too
    if target.shape != expected:
        raise RuntimeError(f"{fn}(): expected target of shape {tuple(expected)}, got {tuple(target.shape)}")
    return _check_class_indices(input, target, n_classes, ignore_index)


def _check_class_indices(input: Tensor, target: Tensor, n_classes: int, ignore_index: int) -> bool:
    """Raise IndexError for a class index out of range; returns whether one may be ``ignore_index``."""
    if _is_traced(input, target):
        return True
    if not target.numel():
        return False
    if target.is_cpu:
        lo, hi = (t.item() for t in torch.aminmax(target))
    else:
        lo, hi = torch.stack(torch.aminmax(target)).tolist()  # one host read (a sync on CUDA)
    if not (0 <= lo and hi < n_classes):
        bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
        if bad.any():
            raise IndexError(
                f"cross_entropy(): target {target[bad][0].item()} is out of bounds: expected class indices "
                f"in [0, {n_classes - 1}] or ignore_index={ignore_index}"
            )
    return lo <= ignore_index <= hi


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
    maybe_ignored = _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    reduction = _reduction("cross_entropy", reduction, size_average, reduce)
    label_smoothing = max(label_smoothing, 0.0)  # torch smooths only when label_smoothing > 0
    if not target.is_floating_point():
        _check_not_differentiable("cross_entropy", weight=weight)
        target = target.long() if input.dim() > 1 or target.dim() == 0 else target.long().reshape(())
    input, target, weight = _autocast(torch.float32, input, target, weight)
    return _apply(CrossEntropyFunction, input, target, weight, ignore_index, reduction, label_smoothing, maybe_ignored)


class BCEFunction(torch.autograd.Function):
    r"""Cross-entropy on sigmoid outputs (Nielsen's cost): C = −w [y log a + (1 − y) log(1 − a)].

    ∇_a C = w (a − y) / (a (1 − a)); after the sigmoid's σ'(z) = a(1 − a) this is δ^L = a − y.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, reduction):
        return F.binary_cross_entropy(input, target, weight, reduction=reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        ctx.save_for_backward(input, target, weight)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, y, weight = ctx.saved_tensors
        g = _scale(grad, ctx.reduction, a.numel())
        if weight is not None:
            g = g * weight
        grad_a = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_a = (a - y) / (a * (1 - a)).clamp_min(1e-12) * g  # BP1: ∇_a C (clamped as torch)
        if ctx.needs_input_grad[1]:
            grad_y = -torch.logit(a) * g  # ∂C/∂y = log(1 − a) − log(a), unclamped as torch
        return grad_a, grad_y, None, None


def _within_0_1(t: Tensor) -> bool:
    lo, hi = torch.stack(torch.aminmax(t.detach())).tolist()  # one host read; NaN fails, as in torch
    return lo >= 0 and hi <= 1


def _check_binary(fn: str, input, target, weight, reduction, size_average, reduce, pos_weight=None) -> str:
    _check_tensor(fn, "input", input)
    _check_tensor(fn, "target", target)
    _check_tensor(fn, "weight", weight, optional=True)
    _check_tensor(fn, "pos_weight", pos_weight, optional=True)
    reduction = _reduction(fn, reduction, size_average, reduce)
    if target.shape != input.shape:
        raise ValueError(f"{fn}(): expected target of the input's size {tuple(input.shape)}, got {tuple(target.shape)}")
    _check_float(fn, "input", input)
    for name, t in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
        _check_device(fn, input, name, t)
        if t is not None:
            try:
                torch.broadcast_shapes(t.shape, input.shape)
            except RuntimeError:
                raise RuntimeError(
                    f"{fn}(): expected {name} broadcastable to the input's shape {tuple(input.shape)}, "
                    f"got {tuple(t.shape)}"
                ) from None
    if pos_weight is not None and torch.broadcast_shapes(pos_weight.shape, input.shape) != input.shape:
        raise RuntimeError(
            f"{fn}(): expected pos_weight broadcastable to the input's shape {tuple(input.shape)}, "
            f"got {tuple(pos_weight.shape)}"
        )
    _check_not_differentiable(fn, weight=weight, pos_weight=pos_weight)
    return reduction


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
    reduction = _check_binary(fn, input, target, weight, reduction, size_average, reduce)
    if input.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        raise RuntimeError(  # torch's autocast bans it on CUDA for the same reason
            f"{fn}() and BCELoss are unsafe to autocast: under torch.autocast('cuda') use "
            "binary_cross_entropy_with_logits / BCEWithLogitsLoss on the logits instead"
        )
    input, target, weight = _autocast(torch.float32, input, target, weight)  # CPU autocast: float32
    _check_dtype(fn, input, "target", target)
    if not _is_traced(input) and input.numel() and not _within_0_1(input):
        raise RuntimeError(f"{fn}(): all elements of input should be between 0 and 1 (probabilities)")
    if weight is not None:
        weight = weight.expand(input.shape)
    return _apply(BCEFunction, input, target, weight, reduction)


class BCEWithLogitsFunction(torch.autograd.Function):
    r"""Sigmoid and binary cross-entropy in one: C = −w [p y log σ(z) + (1 − y) log(1 − σ(z))].

    The σ'(z) of BP1 cancels the cost's 1/(a(1 − a)): δ^L = w [(p y + 1 − y) σ(z) − p y],
    which is σ(z) − y without weights.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, pos_weight, reduction):
        return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction = inputs
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, y, weight, pos_weight = ctx.saved_tensors
        g = _scale(grad, ctx.reduction, z.numel())
        if weight is not None:
            g = g * weight
        grad_z = grad_y = None
        if ctx.needs_input_grad[0]:
            if pos_weight is None:
                grad_z = (torch.sigmoid(z) - y) * g  # BP1: δ^L = a − y
            else:
                py = pos_weight * y
                grad_z = ((py + 1 - y) * torch.sigmoid(z) - py) * g  # BP1 with pos_weight
        if ctx.needs_input_grad[1]:  # ∂C/∂y = −[p log σ(z) − log(1 − σ(z))]
            log_sig = F.logsigmoid(z)
            grad_y = (F.logsigmoid(-z) - (log_sig if pos_weight is None else pos_weight * log_sig)) * g
        return grad_z, grad_y, None, None, None


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

    Backward is the output error of seed 004 / Nielsen ch. 3: :math:`δ^L = σ(z) − y` (weighted).

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
    reduction = _check_binary(fn, input, target, weight, reduction, size_average, reduce, pos_weight)
    if not target.is_floating_point():
        raise RuntimeError(f"{fn}(): expected a floating-point target, got dtype {target.dtype}; use target.float()")
    input, target, weight, pos_weight = _autocast(torch.float32, input, target, weight, pos_weight)
    return _apply(BCEWithLogitsFunction, input, target, weight, pos_weight, reduction)

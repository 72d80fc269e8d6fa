r"""The public functions, with :mod:`torch.nn.functional`'s names, arguments, defaults and exception types.

Each validates its arguments (:mod:`torchbp._checks`), casts them as ``torch.autocast`` would, and applies its
autograd Function (:mod:`torchbp.functions`; a run of layers: :mod:`torchbp.backprop`), whose backward is written
from the backpropagation equations (:mod:`torchbp.equations`), never validating inside backward. The equations,
the Functions and the loop are re-exported here, under the names they have always had.

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
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _torch_private
from .backprop import LINEAR, SIGMOID, ChainFunction, apply_chain
from .backprop import RELU as RELU  # (the layer kinds torchbp.nn.Sequential passes to _chain)
from .equations import (
    binary_cross_entropy_backward,
    binary_cross_entropy_with_logits_backward,
    conv1d_backward,
    cross_entropy_backward,
    embedding_backward,
    gelu_backward,
    layer_norm_backward,
    linear_backward,
    mse_loss_backward,
    quadratic_cost_backward,
    relu_backward,
    rms_norm_backward,
    sigmoid_backward,
    silu_backward,
    tanh_backward,
)
from .equations import linear_jvp as linear_jvp  # (the forward-mode twin of linear_backward)
from .functions import (
    BCEFunction,
    BCEWithLogitsFunction,
    Conv1DFunction,
    ConvFunction,
    CrossEntropyFunction,
    EmbeddingFunction,
    GELUFunction,
    LayerNormFunction,
    LinearFunction,
    MSELossFunction,
    QuadraticCostFunction,
    ReLUFunction,
    RMSNormFunction,
    SigmoidFunction,
    SiLUFunction,
    TanhFunction,
    _apply,
)

__all__ = [
    "linear",
    "sigmoid",
    "relu",
    "gelu",
    "silu",
    "tanh",
    "layer_norm",
    "rms_norm",
    "embedding",
    "conv1d",
    "conv2d",
    "mse_loss",
    "quadratic_cost",
    "cross_entropy",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "linear_backward",
    "conv1d_backward",
    "sigmoid_backward",
    "relu_backward",
    "gelu_backward",
    "silu_backward",
    "tanh_backward",
    "layer_norm_backward",
    "rms_norm_backward",
    "embedding_backward",
    "mse_loss_backward",
    "quadratic_cost_backward",
    "cross_entropy_backward",
    "binary_cross_entropy_backward",
    "binary_cross_entropy_with_logits_backward",
    "LinearFunction",
    "Conv1DFunction",
    "SigmoidFunction",
    "ReLUFunction",
    "GELUFunction",
    "SiLUFunction",
    "TanhFunction",
    "LayerNormFunction",
    "RMSNormFunction",
    "EmbeddingFunction",
    "MSELossFunction",
    "QuadraticCostFunction",
    "CrossEntropyFunction",
    "BCEFunction",
    "BCEWithLogitsFunction",
    "ChainFunction",
]

# ==================================================================================================
# The public functions: torch.nn.functional's signatures; validate (torchbp._checks), then apply.
# ==================================================================================================


def _autocast(dtype: torch.dtype | None, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors as torch.autocast would (``dtype=None``: the autocast dtype), else no-op."""
    first = tensors[0]
    if not _torch_private.any_autocast_enabled() or not torch.is_autocast_enabled(first.device.type):
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


def _conv1d(input: Tensor, weight: Tensor, bias: Tensor, slot=None) -> Tensor:
    """``Conv1D.forward`` with torchbp's backward; ``slot`` as :class:`Conv1DFunction`'s."""
    if slot is not None and slot.needs_input and torch.compiler.is_compiling():
        return _conv1d_eagerly(input, weight, bias, slot)  # a monitor's per-sample norms are eager-only
    _checks.check_conv1d(input, weight, bias)
    input, weight, bias = _autocast(None, input, weight, bias)  # (autocast runs torch.addmm in its lower dtype)
    z = _apply(Conv1DFunction, input, weight, bias, slot)
    if slot is not None and not torch.compiler.is_compiling() and slot.discovering:
        slot.discover(input)  # the monitor reads the data flow into this layer from the autograd graph
    return z


_conv1d_eagerly = torch.compiler.disable(_conv1d)


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
    if _torch_private.any_autocast_enabled():
        input, *params = _autocast(None, input, *params)
    out = apply_chain(input, layers, params)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        _discover_chain(input, layers)  # (only while a monitored layer's slot is discovering)
    return out


def _chain_applies(input: Tensor, layers: tuple, params: list[Tensor | None]) -> bool:
    """The checks of each Linear's own call (shapes, dtypes, devices), on the run at once."""
    if not isinstance(input, Tensor) or not input.dim():
        return False
    features, dtype, device = input.shape[-1], input.dtype, input.device
    autocast = _torch_private.any_autocast_enabled()
    p = 0
    for kind, slot in layers:
        if kind == LINEAR:
            weight, bias = params[p], params[p + 1]
            shape = weight.shape  # (read once: each read makes a torch.Size)
            if (
                len(shape) != 2
                or features != shape[1]
                or (bias is not None and bias.shape != shape[:1])
                or (not autocast and (weight.dtype != dtype or (bias is not None and bias.dtype != dtype)))
                or weight.device != device
                or (slot is not None and slot.needs_input and torch.compiler.is_compiling())
            ):
                return False
            features, p = shape[0], p + 2
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

    ``slot`` is the ReLU module's own monitor record (:class:`torchbp.nn.ReLU`, a
    :class:`torchbp.slots.ReLUSlot`), which remembers that Linear for compiled runs; in eager mode the Linear is
    read from the autograd graph. Without one (the functional call), no dead units are recorded.
    """
    _checks.check_tensor("relu", "input", input)
    if slot is not None:  # a ReLU module a monitor watches (a torchbp.slots.ReLUSlot)
        if not torch.compiler.is_compiling():
            slot.target = getattr(input.grad_fn, "slot", None)  # the LayerSlot of the Linear (run) that made input
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


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    r"""Applies GELU element-wise, as :func:`torch.nn.functional.gelu`; backward: :math:`⊙ σ'(z)`.

    ``'none'``: :math:`σ(z) = z Φ(z)`, :math:`σ'(z) = Φ(z) + z φ(z)`; ``'tanh'``:
    :math:`σ(z) = \frac{z}{2}(1 + \tanh(\sqrt{2/π}(z + 0.044715 z^3)))` (see :func:`gelu_backward`).

    Args:
        input: any shape.
        approximate: ``'none'`` | ``'tanh'``. Default: ``'none'``.

    Example::

        >>> torchbp.functional.gelu(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.8413])
    """
    _checks.check_tensor("gelu", "input", input)
    if approximate not in ("none", "tanh"):
        raise RuntimeError(f"gelu(): approximate argument must be either none or tanh., got {approximate!r}")
    return _apply(GELUFunction, input, approximate)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    r"""Applies SiLU :math:`σ(z) = z\,s(z)` (s the logistic sigmoid) element-wise, as :func:`torch.nn.functional.silu`;
    backward: :math:`⊙ s(z)(1 + z(1 − s(z)))`.

    Args:
        input: any shape.
        inplace: overwrite ``input`` with the result (the input is kept for backward, as torch's keeps it).
            Default: ``False``.

    Example::

        >>> torchbp.functional.silu(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.7311])
    """
    _checks.check_tensor("silu", "input", input)
    if inplace:  # (the input is needed by backward: a copy of it is kept, and the result written over it)
        return input.copy_(_apply(SiLUFunction, input.clone()))
    return _apply(SiLUFunction, input)


def tanh(input: Tensor) -> Tensor:
    r"""Applies :math:`\tanh(z)` element-wise; backward: :math:`⊙ (1 − \tanh^2 z)`, from the output.

    Example::

        >>> torchbp.functional.tanh(torch.zeros(2))
        tensor([0., 0.])
    """
    _checks.check_tensor("tanh", "input", input)
    return _apply(TanhFunction, input)


def layer_norm(
    input: Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Applies Layer Normalization over the last dims, as :func:`torch.nn.functional.layer_norm`:
    :math:`y = γ ⊙ (x − μ)/σ + β`, :math:`σ = \sqrt{\mathrm{var}(x) + ε}` (biased variance).

    Backward (:func:`layer_norm_backward`): :math:`δ_x = \frac{1}{σ}(g − \mathrm{mean}(g) − \hat x\,
    \mathrm{mean}(g ⊙ \hat x))` with :math:`g = γ ⊙ δ`; :math:`∂C/∂γ = Σ δ ⊙ \hat x`, :math:`∂C/∂β = Σ δ`.

    Args:
        input: shape ``(*, *normalized_shape)``.
        normalized_shape: the sizes of the last dims, normalized over.
        weight: γ, of shape ``normalized_shape``. Default: ``None``.
        bias: β, of shape ``normalized_shape``. Default: ``None``.
        eps: ε, added to the variance. Default: ``1e-5``.

    Example::

        >>> torchbp.functional.layer_norm(torch.tensor([[1.0, 3.0]]), (2,))
        tensor([[-1.0000,  1.0000]])
    """
    shape = _checks.normalized_shape("layer_norm", input, normalized_shape, {"weight": weight, "bias": bias})
    return _apply(LayerNormFunction, input, weight, bias, shape, float(eps))[0]


def rms_norm(
    input: Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    r"""Applies Root Mean Square Layer Normalization over the last dims, as :func:`torch.nn.functional.rms_norm`:
    :math:`y = γ ⊙ x/\mathrm{rms}(x)`, :math:`\mathrm{rms}(x) = \sqrt{\mathrm{mean}(x^2) + ε}`.

    Backward (:func:`rms_norm_backward`): :math:`δ_x = (g − \hat x\,\mathrm{mean}(g ⊙ \hat x))/\mathrm{rms}(x)`
    with :math:`g = γ ⊙ δ`; :math:`∂C/∂γ = Σ δ ⊙ \hat x`.

    Args:
        input: shape ``(*, *normalized_shape)``.
        normalized_shape: the sizes of the last dims, normalized over.
        weight: γ, of shape ``normalized_shape``. Default: ``None``.
        eps: ε. Default: ``None``, the machine epsilon of the input's dtype (of float32 for float16 and bfloat16,
            which are computed in float32), as torch's.

    Example::

        >>> torchbp.functional.rms_norm(torch.tensor([[3.0, 4.0]]), (2,), eps=0.0)
        tensor([[0.8485, 1.1314]])
    """
    shape = _checks.normalized_shape("rms_norm", input, normalized_shape, {"weight": weight})
    if eps is None:
        half = input.dtype in (torch.float16, torch.bfloat16)
        eps = torch.finfo(torch.float32 if half else input.dtype).eps
    return _apply(RMSNormFunction, input, weight, shape, float(eps))[0]


def embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    r"""Looks up rows of ``weight``, :math:`y_n = E_{i_n}`, as :func:`torch.nn.functional.embedding`.

    Backward (:func:`embedding_backward`): :math:`∂C/∂E_i = Σ_{n: i_n = i} δ_n`, a scatter-add of δ into the rows
    used (BP4's counterpart); none into ``padding_idx``'s row.

    Args:
        input: indices (int64 or int32), any shape.
        weight: E, shape ``(num_embeddings, embedding_dim)``.
        padding_idx: the row that gets no gradient (negative: counted from the end). Default: ``None``.
        max_norm: rows looked up with a larger ``norm_type``-norm are renormalized to it in place, before the
            lookup, as torch's (a constant step: no derivative through it; torch's forward mode has none at all,
            ours treats it as constant). Default: ``None``.
        norm_type: the p of the p-norm for ``max_norm``. Default: ``2.0``.
        scale_grad_by_freq: divide each position's δ by the number of times its index appears in ``input``.
            Default: ``False``.
        sparse: not supported: torchbp gives a dense gradient (a clear error for ``True``).

    Shape:
        ``(*)`` -> ``(*, embedding_dim)``.

    Example::

        >>> torchbp.functional.embedding(torch.tensor([2, 0]), torch.arange(6.0).reshape(3, 2))
        tensor([[4., 5.],
                [0., 1.]])
    """
    padding_idx = _checks.check_embedding(input, weight, padding_idx)
    if sparse:
        raise NotImplementedError(
            "embedding(): sparse=True is not supported: torchbp's backward gives a dense gradient of the weight; "
            "pass sparse=False (or keep torch.nn.Embedding for sparse gradients)"
        )
    if max_norm is not None:  # rows renormalized in place, as torch's embedding does (no derivative through it)
        with torch.no_grad():  # (on the values alone: torch's forward AD has no embedding_renorm_, ours needs none)
            torch.embedding_renorm_(weight.detach(), input.contiguous(), max_norm, norm_type)
    return _apply(EmbeddingFunction, input, weight, padding_idx, bool(scale_grad_by_freq))


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _conv(dims: int, input, weight, bias, stride, padding, dilation, groups) -> Tensor:
    """The convolution of :func:`conv1d` / :func:`conv2d`: string padding made numbers (an uneven ``'same'``
    padding as an explicit zero pad, torch's extra element on the right), an unbatched input given a batch of 1."""
    fn = f"conv{dims}d"
    _checks.check_tensor(fn, "input", input)
    _checks.check_tensor(fn, "weight", weight)
    _checks.check_tensor(fn, "bias", bias, optional=True)
    if input.dim() not in (dims + 1, dims + 2):
        raise RuntimeError(
            f"{fn}(): Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) input to {fn}, but got input of size: "
            f"{list(input.shape)}"
        )
    stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
    unbatched = input.dim() == dims + 1
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise RuntimeError(f"{fn}(): Invalid padding string: {padding!r}; expected 'valid', 'same' or numbers")
        if padding == "same" and any(s != 1 for s in stride):
            raise RuntimeError(f"{fn}(): padding='same' is not supported for strided convolutions; use stride=1")
        total = [0] * dims
        if padding == "same" and weight.dim() == dims + 2:
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        if any(t % 2 for t in total):  # (uneven: one more on the right, as torch's)
            pad = [x for t in reversed(total) for x in (t // 2, t - t // 2)]
            input, total = torch.nn.functional.pad(input, pad), [0] * dims
        padding = tuple(t // 2 for t in total)
    else:
        padding = _tuple(padding, dims)
    input, weight, bias = _autocast(None, input, weight, bias)
    z = _apply(ConvFunction, input, weight, bias, stride, padding, dilation, groups)
    return z.squeeze(0) if unbatched else z


def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups=1):
    r"""A 1-D convolution :math:`z = w ⋆ a + b`, as :func:`torch.nn.functional.conv1d` (zero padding).

    Backward (:func:`torchbp.equations.conv.conv_backward`): BP2 as a transposed convolution of δ with the kernel,
    BP4 as a convolution of the input with δ, BP3 as δ summed over the batch and the positions.

    Args:
        input: ``(N, C_in, L)`` or ``(C_in, L)``.
        weight: ``(C_out, C_in / groups, k)``.
        bias: ``(C_out,)``. Default: ``None``.
        stride, dilation: an int or a 1-tuple. Default: 1.
        padding: an int, a 1-tuple, ``'valid'`` or ``'same'``. Default: 0.
        groups: the number of blocked connections from input to output channels. Default: 1.
    """
    return _conv(1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups=1):
    r"""A 2-D convolution :math:`z = w ⋆ a + b`, as :func:`torch.nn.functional.conv2d` (zero padding).

    Backward as :func:`conv1d`'s.

    Args:
        input: ``(N, C_in, H, W)`` or ``(C_in, H, W)``.
        weight: ``(C_out, C_in / groups, kH, kW)``.
        bias: ``(C_out,)``. Default: ``None``.
        stride, dilation: an int or a 2-tuple. Default: 1.
        padding: an int, a 2-tuple, ``'valid'`` or ``'same'``. Default: 0.
        groups: the number of blocked connections from input to output channels. Default: 1.
    """
    return _conv(2, input, weight, bias, stride, padding, dilation, groups)


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
    if target.shape != input.shape:
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
    if size_average is not None or reduce is not None or reduction not in _checks.REDUCTIONS:
        reduction = _checks.resolve_reduction("cross_entropy", reduction, size_average, reduce)
    if label_smoothing < 0:
        label_smoothing = 0.0  # torch smooths only when label_smoothing > 0
    if target.dtype is not torch.int64 or weight is not None or input.dim() == 1:  # (not the common call)
        if not target.is_floating_point():
            _checks.check_not_differentiable("cross_entropy", weight=weight)
            target = target.long() if input.dim() > 1 or target.dim() == 0 else target.long().reshape(())
    if _torch_private.any_autocast_enabled():
        input, target, weight = _autocast(torch.float32, input, target, weight)
    if (  # the common call, in plain eager mode (maybe_ignored is True while tracing): backward reads log-softmax
        not maybe_ignored
        and weight is None
        and label_smoothing == 0
        and reduction != "none"
        and input.dim() == 2
        and target.dtype is torch.int64
        and not _torch_private.forward_ad_active()
        and not _torch_private.functorch_transforms_active()
    ):
        args = (input, target, None, ignore_index, reduction, 0.0, False, True)
        return _apply(CrossEntropyFunction, *args)[0]
    args = (input, target, weight, ignore_index, reduction, label_smoothing, maybe_ignored, False)
    return _apply(CrossEntropyFunction, *args)


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

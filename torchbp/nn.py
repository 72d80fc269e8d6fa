r"""Drop-in replacements for ``torch.nn`` layers and losses, with hand-written backward passes.

Each class subclasses its ``torch.nn`` counterpart and only replaces ``forward``, so constructor
arguments and defaults, parameter names, ``state_dict`` keys, ``reset_parameters`` (the same seed
gives the same weights), ``repr`` and ``isinstance(m, torch.nn.Linear)`` are torch's own.
:func:`convert` swaps them into an existing model.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from . import _torch_private
from . import functional as F
from ._torch_private import global_module_hooks_present

__all__ = [
    "Sequential",
    "Linear",
    "Sigmoid",
    "ReLU",
    "GELU",
    "SiLU",
    "Tanh",
    "LayerNorm",
    "RMSNorm",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "MSELoss",
    "QuadraticCost",
    "CrossEntropyLoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "convert",
    "is_monitored_layer",
]


class Linear(nn.Linear):
    r"""Applies :math:`z = a w^T + b`, as :class:`torch.nn.Linear`, with backward from BP2-BP4.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer learns no additive bias. Default: ``True``.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.

    Example::

        >>> m = torchbp.nn.Linear(20, 30)
        >>> m(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    _torchbp_slot = None  # set by a DeltaMonitor while it watches this layer

    def forward(self, input: Tensor) -> Tensor:
        return F._linear(input, self.weight, self.bias, self._torchbp_slot)


class Sigmoid(nn.Sigmoid):
    r"""Applies :math:`σ(z) = 1/(1 + e^{-z})` element-wise; backward :math:`⊙ σ(z)(1 − σ(z))`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.sigmoid(input)


class ReLU(nn.ReLU):
    r"""Applies :math:`\max(z, 0)` element-wise; backward :math:`⊙ 1[z > 0]`.

    Args:
        inplace: overwrite the input. Default: ``False``.
    """

    _torchbp_slot = None  # set by a DeltaMonitor: the monitored Linear this ReLU follows

    def forward(self, input: Tensor) -> Tensor:
        return F._relu(input, self.inplace, self._torchbp_slot)


class GELU(nn.GELU):
    r"""Applies GELU element-wise, as :class:`torch.nn.GELU`; backward :math:`⊙ σ'(z)`
    (:func:`torchbp.equations.gelu_backward`).

    Args:
        approximate: ``'none'`` (:math:`z Φ(z)`) | ``'tanh'`` (its tanh approximation). Default: ``'none'``.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.gelu(input, approximate=self.approximate)


class SiLU(nn.SiLU):
    r"""Applies SiLU :math:`z\,s(z)` element-wise, as :class:`torch.nn.SiLU`; backward :math:`⊙ s(z)(1 + z(1 − s(z)))`.

    Args:
        inplace: overwrite the input. Default: ``False``.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.silu(input, inplace=self.inplace)


class Tanh(nn.Tanh):
    r"""Applies :math:`\tanh(z)` element-wise, as :class:`torch.nn.Tanh`; backward :math:`⊙ (1 − \tanh^2 z)`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.tanh(input)


class LayerNorm(nn.LayerNorm):
    r"""Applies Layer Normalization over the last dims, as :class:`torch.nn.LayerNorm`:
    :math:`y = γ ⊙ (x − μ)/σ + β`, with backward from its Jacobian (:func:`torchbp.equations.layer_norm_backward`).

    Args: as :class:`torch.nn.LayerNorm` (``normalized_shape``, ``eps=1e-5``, ``elementwise_affine=True``,
    ``bias=True``, ``device``, ``dtype``); parameters ``weight`` (γ) and ``bias`` (β), initialized to 1 and 0.

    Shape:
        - Input: ``(*, *normalized_shape)``; output: the same.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    r"""Applies Root Mean Square Layer Normalization over the last dims, as :class:`torch.nn.RMSNorm`:
    :math:`y = γ ⊙ x/\mathrm{rms}(x)`, with backward from its Jacobian (:func:`torchbp.equations.rms_norm_backward`).

    Args: as :class:`torch.nn.RMSNorm` (``normalized_shape``, ``eps=None``: the dtype's machine epsilon,
    ``elementwise_affine=True``, ``device``, ``dtype``); parameter ``weight`` (γ), initialized to 1.

    Shape:
        - Input: ``(*, *normalized_shape)``; output: the same.
    """

    def forward(self, x: Tensor) -> Tensor:  # (torch's argument name)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class Embedding(nn.Embedding):
    r"""A lookup table, as :class:`torch.nn.Embedding`: :math:`y_n = E_{i_n}`; backward is the scatter-add
    :math:`∂C/∂E_i = Σ_{n: i_n = i} δ_n` (:func:`torchbp.equations.embedding_backward`).

    Args: as :class:`torch.nn.Embedding` (``num_embeddings``, ``embedding_dim``, ``padding_idx``, ``max_norm``,
    ``norm_type``, ``scale_grad_by_freq``, ``sparse``, ``_weight``, ``_freeze``, ``device``, ``dtype``), the same
    initialization (normal, the padding row zeroed). ``sparse=True`` raises a clear error in forward (torchbp gives
    a dense gradient); :func:`convert` leaves such a layer as torch's.

    Shape:
        - Input: indices, ``(*)``; output: ``(*, embedding_dim)``.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


class _ConvForward:
    """torch's ``_ConvNd._conv_forward`` with torchbp's convolution: a padding mode other than zeros pads first."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = F.conv1d if isinstance(self, nn.Conv1d) else F.conv2d
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, _torch_private.conv_padding(self), mode=self.padding_mode)
            return conv(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class Conv1d(_ConvForward, nn.Conv1d):
    r"""A 1-D convolution, as :class:`torch.nn.Conv1d` (every argument, padding mode and initialization its own),
    with backward from its equations (:func:`torchbp.equations.conv.conv_backward`). Not transformers' ``Conv1D``
    (GPT-2's dense layer, :class:`torchbp.nn.Conv1D`)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)


class Conv2d(_ConvForward, nn.Conv2d):
    r"""A 2-D convolution, as :class:`torch.nn.Conv2d` (every argument, padding mode and initialization its own),
    with backward from its equations (:func:`torchbp.equations.conv.conv_backward`)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)


class MSELoss(nn.MSELoss):
    r"""Mean squared error, as :class:`torch.nn.MSELoss`: ``'mean'`` divides by every element, no ½.

    Args:
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class QuadraticCost(_torch_private.LossBase):
    r"""Nielsen's quadratic cost :math:`C = \frac{1}{2n} \sum_x \lVert y(x) − a(x) \rVert^2`.

    ``n`` is the batch size; see :func:`torchbp.functional.quadratic_cost`.

    Args:
        reduction: ``'mean'`` (divide by ``n``) | ``'sum'`` | ``'none'`` (½‖y − a‖² per sample).
            Default: ``'mean'``.

    Shape:
        - Input: ``(N, *)`` or ``(out,)``; target: the same shape.
        - Output: scalar, or ``(N,)`` with ``reduction='none'``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.quadratic_cost(input, target, reduction=self.reduction)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    r"""Softmax with cross-entropy, as :class:`torch.nn.CrossEntropyLoss`; δ^L = softmax(z) − y.

    Args: as :class:`torch.nn.CrossEntropyLoss` (``weight``, ``ignore_index``, ``reduction``,
    ``label_smoothing``).
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class BCELoss(nn.BCELoss):
    r"""Binary cross-entropy on probabilities, as :class:`torch.nn.BCELoss`; after a sigmoid, δ^L = a − y."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    r"""Sigmoid and binary cross-entropy on logits, as :class:`torch.nn.BCEWithLogitsLoss`; δ^L = σ(z) − y."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )


_CHAINED = (Linear, Sigmoid, ReLU)
_ACTIVATION = {Sigmoid: (F.SIGMOID, None), ReLU: (F.RELU, None)}


_hooked = _torch_private.module_hooks_present
_submodules = _torch_private.submodules
_own_parameters = _torch_private.own_parameters


class Sequential(nn.Sequential):
    r""":class:`torch.nn.Sequential` that runs each run of torchbp layers as one Function: the backprop loop.

    A run is two or more consecutive :class:`Linear`, :class:`Sigmoid` and :class:`ReLU` modules, starting
    with a Linear, none with hooks of its own (and no global module hooks). It runs as one
    :class:`torchbp.backprop.ChainFunction`, whose backward is the backpropagation algorithm of *Neural
    Networks and Deep Learning* (Nielsen's ``backprop()``): δ^L, then for each layer from the last, BP3, BP4 and
    δ^{l-1} = (w^l)^T δ^l ⊙ σ'(z^{l-1}). Results, gradients, memory and the :class:`~torchbp.DeltaMonitor`'s
    statistics are those of the per-op path (one Function per layer), which every other module takes; the
    run saves the per-op Functions' Python cost per layer. Constructor, module tree, ``state_dict``, ``repr``
    and parameters are :class:`torch.nn.Sequential`'s; :func:`torchbp.convert` makes an ``nn.Sequential``
    one. :meth:`chained_runs` tells which modules run as one Function; ``chain = False`` (on an instance)
    runs every module on its own.

    Example::

        >>> model = torchbp.nn.Sequential(torchbp.nn.Linear(4, 8), torchbp.nn.ReLU(), torchbp.nn.Linear(8, 3))
        >>> model.chained_runs()
        [(0, 3)]
    """

    chain: bool = True

    def _plan(self) -> list[nn.Module | tuple[nn.Module, ...]]:
        """The modules in order, each run of layers (see the class) as one tuple."""
        modules = list(_submodules(self).values())
        if not self.chain or global_module_hooks_present():
            return modules
        plan: list[nn.Module | tuple[nn.Module, ...]] = []
        i = 0
        while i < len(modules):
            j = _run_end(modules, i)
            if j > i:
                plan.append(tuple(modules[i:j]))
                i = j
            else:
                plan.append(modules[i])
                i += 1
        return plan

    def chained_runs(self) -> list[tuple[int, int]]:
        """The ``(start, stop)`` index ranges of the modules that run as one Function (see the class)."""
        runs, at = [], 0
        for item in self._plan():
            n = len(item) if isinstance(item, tuple) else 1
            if isinstance(item, tuple):
                runs.append((at, at + n))
            at += n
        return runs

    def forward(self, input):
        modules = list(_submodules(self).values())  # (the plan of _plan, walked as it is made)
        if not self.chain or global_module_hooks_present():
            for m in modules:
                input = m(input)
            return input
        i, n = 0, len(modules)
        while i < n:
            j = _run_end(modules, i)
            if j == i:
                input = modules[i](input)
                i += 1
                continue
            layers, params = [], []
            for m in modules[i:j]:
                if type(m) is Linear:
                    layers.append((F.LINEAR, m._torchbp_slot))
                    p = _own_parameters(m)  # (Module.__getattr__ is slow)
                    params += (p["weight"], p["bias"])
                else:
                    layers.append(_ACTIVATION[type(m)])
            input = F._chain(input, tuple(layers), params)
            i = j
        return input


def _run_end(modules: list[nn.Module], i: int) -> int:
    """The end of the run of layers (see :class:`Sequential`) that starts at ``modules[i]``; ``i`` if none does."""
    m = modules[i]
    if type(m) is not Linear or _hooked(m):
        return i
    j = i + 1
    while j < len(modules) and type(modules[j]) in _CHAINED and not _hooked(modules[j]):
        j += 1
    return j if j - i >= 2 else i


# --------------------------------------------------------------------------------------------------
# transformers' Conv1D (GPT-2). Its torchbp subclass is made the first time it is needed, so that
# torchbp never imports transformers itself: a model holding a Conv1D has imported it already.
# --------------------------------------------------------------------------------------------------

_HF_CONV1D_MODULE = "transformers.pytorch_utils"
_conv1d_class: type[nn.Module] | None = None


def _hf_conv1d() -> type[nn.Module] | None:
    """``transformers.pytorch_utils.Conv1D`` when transformers is imported already, else ``None`` (no import)."""
    module = sys.modules.get(_HF_CONV1D_MODULE)
    return getattr(module, "Conv1D", None) if module is not None else None


def _torchbp_conv1d() -> type[nn.Module]:
    """:class:`torchbp.nn.Conv1D`, the subclass of transformers' Conv1D with torchbp's backward (made once)."""
    global _conv1d_class
    if _conv1d_class is None:
        from transformers.pytorch_utils import Conv1D as HFConv1D

        class Conv1D(HFConv1D):
            r"""Applies :math:`z = a W + b` with ``W`` stored (in, out), as ``transformers.pytorch_utils.Conv1D``
            (GPT-2's projections), with backward from BP2-BP4 (:class:`torchbp.functions.Conv1DFunction`).

            Constructor (``nf`` outputs, ``nx`` inputs), parameters, ``state_dict`` keys and layout, ``repr``
            and ``isinstance(m, transformers.pytorch_utils.Conv1D)`` are transformers' own; :func:`convert`
            swaps it into a model. ``in_features`` and ``out_features`` name ``nx`` and ``nf`` as
            :class:`Linear` does, for the :class:`~torchbp.DeltaMonitor`.

            Shape:
                - Input: ``(*, nx)``.
                - Output: ``(*, nf)``.
            """

            _torchbp_slot = None  # set by a DeltaMonitor while it watches this layer

            @property
            def in_features(self) -> int:
                return self.weight.shape[0]

            @property
            def out_features(self) -> int:
                return self.nf

            def forward(self, x: Tensor) -> Tensor:
                return F._conv1d(x, self.weight, self.bias, self._torchbp_slot)

        Conv1D.__module__, Conv1D.__qualname__ = __name__, "Conv1D"  # (pickle finds it as torchbp.nn.Conv1D)
        _conv1d_class = Conv1D
    return _conv1d_class


def __getattr__(name: str):
    if name == "Conv1D":  # (made on first use: only this imports transformers)
        try:
            return _torchbp_conv1d()
        except ImportError as e:
            raise AttributeError(
                f"torchbp.nn.Conv1D is transformers' Conv1D with torchbp's backward: it needs transformers ({e}); "
                "install it with pip install transformers"
            ) from e
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_monitored_layer(m: nn.Module) -> bool:
    """Whether a :class:`~torchbp.DeltaMonitor` records δ of ``m``: a :class:`Linear` or a converted Conv1D.

    Each such layer has ``_torchbp_slot``, ``in_features``, ``out_features``, ``weight`` and ``bias``, and its
    Function's backward calls ``slot.record(delta, input, grad_weight, grad_bias)``.
    """
    return isinstance(m, Linear) or (_conv1d_class is not None and isinstance(m, _conv1d_class))


_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: Linear,
    nn.Sigmoid: Sigmoid,
    nn.ReLU: ReLU,
    nn.MSELoss: MSELoss,
    nn.CrossEntropyLoss: CrossEntropyLoss,
    nn.BCELoss: BCELoss,
    nn.BCEWithLogitsLoss: BCEWithLogitsLoss,
}

# The layers beyond Linear, converted with convert(all_layers=True) only, for now: the DeltaMonitor does not yet
# record them, and eagerly their plain-op backward costs more than torch's fused kernels (a converted
# TinyTransformer step with its LayerNorms and Embedding converted: 1.05x torch's, 2-core CPU, 2026-12-08), so by
# default convert() leaves them to torch, at no cost and no loss of what the monitor sees.
_BEYOND_LINEAR: dict[type[nn.Module], type[nn.Module]] = {
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.Embedding: Embedding,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.GELU: GELU,
    nn.SiLU: SiLU,
    nn.Tanh: Tanh,
}

_TORCHBP = frozenset(_REPLACEMENTS.values()) | frozenset(_BEYOND_LINEAR.values()) | {QuadraticCost, Sequential}


def convert(module: nn.Module, *, all_layers: bool = False) -> nn.Module:
    r"""Make every ``torch.nn`` layer and loss that torchbp replaces use torchbp's backward, in place.

    Converts ``Linear``, ``Sigmoid``, ``ReLU``, ``MSELoss``, ``CrossEntropyLoss``, ``BCELoss`` and
    ``BCEWithLogitsLoss`` anywhere inside ``module`` (``module`` itself included), recursively, Hugging Face's
    ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections) to :class:`torchbp.nn.Conv1D` where
    transformers is imported (torchbp never imports it), and
    ``Sequential`` to :class:`torchbp.nn.Sequential` (its runs of Linear and activation layers then run as
    one Function, the backprop loop). Only those exact classes are converted; subclasses (which may have a
    forward of their own) are left alone. Each converted module keeps its identity, its Parameter and buffer objects, hooks and
    mode: an optimizer built before still trains the model, and references to submodules stay valid.

    Args:
        module: the model.
        all_layers: also convert ``LayerNorm``, ``RMSNorm``, ``Embedding`` (but one with ``sparse=True``, whose
            gradient torchbp does not make), ``Conv1d``, ``Conv2d``, ``GELU``, ``SiLU`` and ``Tanh`` (see
            docs/layers.md). The monitor does not yet record these layers, and eagerly their backward costs more
            than torch's fused kernels, so by default they stay torch's. Default: ``False``.

    Returns:
        ``module``, converted.

    Warns:
        UserWarning: when ``module`` holds none of these classes and no torchbp layer either (nothing
            was converted, and nothing of torchbp's will run).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> torchbp.convert(model)
        Sequential(
          (0): Linear(in_features=4, out_features=3, bias=True)
          (1): ReLU()
        )
        >>> type(model[0])
        <class 'torchbp.nn.Linear'>
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert(): expected a torch.nn.Module, got {type(module).__name__}")
    converted = already = False
    hf_conv1d = _hf_conv1d()
    sequentials = []
    for m in module.modules():
        cls = type(m)
        if cls is nn.Sequential:  # runs of torchbp layers in it then run as one Function (the backprop loop)
            m.__class__ = Sequential
            sequentials.append(m)  # (a container: it counts as converted only with a torchbp layer in the model)
            continue
        new_class = _REPLACEMENTS.get(cls) or (_BEYOND_LINEAR.get(cls) if all_layers else None)
        if new_class is Embedding and m.sparse:
            new_class = None  # (torchbp's gradient is dense: a sparse Embedding stays torch's)
        if new_class is None and hf_conv1d is not None and cls is hf_conv1d:
            new_class = _torchbp_conv1d()
        if new_class is not None:
            # The torchbp class adds only a forward to torch's, so the object stays valid as it is.
            m.__class__ = new_class
            converted = True
        elif cls in _TORCHBP or (_conv1d_class is not None and cls is _conv1d_class):
            already = True
    if not converted and not already:
        import warnings

        for m in sequentials:  # nothing of torchbp's would run in them: the model stays exactly as it was
            m.__class__ = nn.Sequential

        looked_for = ", ".join(f"torch.nn.{cls.__name__}" for cls in _REPLACEMENTS) + f", {_HF_CONV1D_MODULE}.Conv1D"
        warnings.warn(
            f"torchbp.convert(): found nothing to convert in {type(module).__name__}: it converts {looked_for} "
            "(those exact classes, not subclasses); the model is returned unchanged and runs torch's backward",
            UserWarning,
            stacklevel=2,
        )
    return module

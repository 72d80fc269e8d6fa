r"""The backpropagation equations, each a plain function of tensors: the first package to read.

These are the equations of Nielsen, *Neural Networks and Deep Learning*, ch. 2 (also in Andrew Ng's and
Hung-yi Lee's lecture notes), written once and tagged line by line. Two drivers call them: the per-op autograd
Functions (:mod:`torchbp.functions`) and the backprop loop (:mod:`torchbp.backprop`). One file per family:

- :mod:`~torchbp.equations.dense`: ``nn.Linear`` and GPT-2's ``Conv1D`` (BP2's first half, BP3, BP4; their jvp);
- :mod:`~torchbp.equations.activations`: BP1/BP2's second half, :math:`⊙ σ'(z)`;
- :mod:`~torchbp.equations.costs`: each cost's BP1 (:math:`∇_a C`, or δ^L on logits), and a cost's jvp;
- :mod:`~torchbp.equations.norms`: LayerNorm and RMSNorm (δ through the normalization's Jacobian, ∂C/∂γ, ∂C/∂β);
- :mod:`~torchbp.equations.embedding`: the lookup's BP4, a scatter-add of δ into the rows used;
- :mod:`~torchbp.equations.conv`: ``nn.Conv1d``/``Conv2d``, BP2 as a transposed convolution, BP4 as a convolution.

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

Each cost's backward gives BP1's :math:`∇_a C` (or δ^L directly, for the costs on logits); each activation's
backward is BP1/BP2's :math:`⊙ σ'(z)`; :func:`linear_backward` is BP2's :math:`(w^{l+1})^T δ^{l+1}`, BP3 and BP4.
Forward mode: a layer's tangent is the product rule, dz = da w^T + a dw^T + db (:func:`linear_jvp`); an
activation's is σ'(z) ⊙ dz, the very product of BP1/BP2 (σ'(z) is diagonal); a cost's is its gradient contracted
with the tangents, dC = Σ_x ⟨∂C/∂x, dx⟩ (:func:`_directional_derivative`).
"""

from __future__ import annotations

# (the private names are re-exported for the Functions and the tests, which import them from here)
from ._common import _differentiated as _differentiated
from ._common import _divide as _divide
from ._common import _number as _number
from .activations import _select_by_bits as _select_by_bits
from .activations import _times_a_one_minus_a as _times_a_one_minus_a
from .activations import gelu_backward, relu_backward, sigmoid_backward, silu_backward, tanh_backward
from .conv import conv_backward, conv_jvp
from .costs import _bce_input_grad_in_one_buffer as _bce_input_grad_in_one_buffer
from .costs import _difference_tangent as _difference_tangent
from .costs import _directional_derivative as _directional_derivative
from .costs import _exp_minus_one_hot as _exp_minus_one_hot
from .costs import _one as _one
from .costs import _reduce as _reduce
from .costs import _scale as _scale
from .costs import _softmax_minus_one_hot as _softmax_minus_one_hot
from .costs import (
    binary_cross_entropy_backward,
    binary_cross_entropy_with_logits_backward,
    cross_entropy_backward,
    cross_entropy_log_p_backward,
    mse_loss_backward,
    quadratic_cost_backward,
)
from .dense import conv1d_backward as conv1d_backward
from .dense import conv1d_jvp as conv1d_jvp
from .dense import linear_backward, linear_jvp
from .embedding import embedding_backward, embedding_jvp
from .norms import (
    layer_norm_backward,
    layer_norm_jvp,
    layer_norm_statistics,
    rms_norm_backward,
    rms_norm_jvp,
    rms_norm_statistics,
)

__all__ = [
    "linear_backward",
    "sigmoid_backward",
    "relu_backward",
    "mse_loss_backward",
    "quadratic_cost_backward",
    "cross_entropy_backward",
    "cross_entropy_log_p_backward",
    "binary_cross_entropy_backward",
    "binary_cross_entropy_with_logits_backward",
    "linear_jvp",
    "gelu_backward",
    "silu_backward",
    "tanh_backward",
    "layer_norm_backward",
    "rms_norm_backward",
    "embedding_backward",
    "layer_norm_jvp",
    "rms_norm_jvp",
    "embedding_jvp",
    "conv_backward",
    "conv_jvp",
    "layer_norm_statistics",
    "rms_norm_statistics",
]

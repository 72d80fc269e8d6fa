"""torchbp: backpropagation written by hand from BP1-BP4, checkable against PyTorch, and visible.

- :mod:`torchbp.equations`: BP1-BP4 and each cost's δ^L as plain tensor functions (the first file to read).
- :mod:`torchbp.functions`: the per-op autograd Functions that call them; :mod:`torchbp.backprop`: the backprop
  loop, a run of layers as one Function.
- :mod:`torchbp.functional`: the public ``torch.nn.functional``-style functions that apply them.
- :mod:`torchbp.nn`: drop-in ``torch.nn`` layers and losses built on them, a ``Sequential`` that runs a run of
  layers as one Function (the backprop loop); :func:`convert`.
- :class:`DeltaMonitor`: the per-layer error δ^l = ∂C/∂z^l, recorded in backward, logged to TensorBoard;
  :func:`monitor_of` finds a model's monitor.
"""

from . import functional, nn
from .monitor import DeltaMonitor, monitor_of
from .nn import (
    GELU,
    BCELoss,
    BCEWithLogitsLoss,
    Conv1d,
    Conv2d,
    CrossEntropyLoss,
    Embedding,
    LayerNorm,
    Linear,
    MSELoss,
    QuadraticCost,
    ReLU,
    RMSNorm,
    Sequential,
    Sigmoid,
    SiLU,
    Tanh,
    convert,
)

__version__ = "0.1.0"

__all__ = [
    "functional",
    "nn",
    "convert",
    "DeltaMonitor",
    "monitor_of",
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
    "__version__",
]

"""The slot interface: what the Functions' backward passes call on a monitor's record of a layer.

A :class:`torchbp.nn.Linear` carries a :class:`LayerSlot` (its ``_torchbp_slot``) while a monitor watches it, and a
:class:`torchbp.nn.ReLU` after it a :class:`ReLUSlot`; ``None`` otherwise, and then no Function does any monitoring
work. The Functions (:mod:`torchbp.functions`, :mod:`torchbp.backprop`) only call these methods; what they compute
is the monitor's (:class:`torchbp.DeltaMonitor`). The autograd node of a Linear (and of a run of layers ending in
one) exposes its slot as ``grad_fn.slot``, so the ReLU that follows finds the layer whose output it reads.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

__all__ = ["LayerSlot", "ReLUSlot"]


class LayerSlot(Protocol):
    """A monitor's record of one Linear layer, :math:`z^l = w^l a^{l-1} + b^l`."""

    #: Whether backward needs the layer's input a^{l-1} (per-sample gradient norms): the Linear then saves it even
    #: when no weight gradient is asked for.
    needs_input: bool
    #: Whether the monitor still learns the data flow between layers (its first eager forward pass).
    discovering: bool

    def record(self, delta: Tensor, input: Tensor | None, grad_weight: Tensor | None, grad_bias: Tensor | None) -> None:
        """Called by the Linear's backward with δ^l = ∂C/∂z^l, a^{l-1} (``None`` unless saved) and the BP4/BP3
        gradients it has just computed (``None`` where not asked for)."""

    def record_relu(self, a: Tensor) -> None:
        """Called by the backward of the ReLU applied to this layer's output z, with a = relu(z) (dead units)."""

    def discover(self, input: Tensor) -> None:
        """Called in forward, while :attr:`discovering`, with the layer's input: the monitor reads where it came
        from in the autograd graph."""

    def consumes(self, producer: LayerSlot | None) -> None:
        """Called in forward, while :attr:`discovering`, for a layer of a run of layers (the backprop loop) whose
        input is the output of the run's previous Linear, ``producer``."""


class ReLUSlot(Protocol):
    """A monitor's record on a ReLU module: which monitored layer's output the ReLU reads."""

    #: The slot of the Linear that produced the ReLU's input (``None``: none monitored). Set in eager forward
    #: passes, read by compiled ones (where the autograd graph cannot be read).
    target: LayerSlot | None

"""The data flow between monitored layers: which Linear consumes which one's output (for ``delta_gain``).

It is read from the autograd graph of one eager forward pass (:meth:`DataFlow.producers` walks back from a
layer's input through element-wise operations only), or told by the backprop loop
(``slot.consumes(producer)``). Until that forward pass, ``torch.compile`` runs eagerly
(:func:`force_eager`), so that a compiled model's first forward pass is seen too.
"""

from __future__ import annotations

import numpy as np

from .. import _torch_private

# Autograd nodes of element-wise operations: the data flow from a Linear to the Linear consuming its output
# passes only through these (activations, additions such as residual connections, casts, dropout).
_ELEMENTWISE = frozenset(
    "Add Sub Mul Div Neg Gelu Relu Sigmoid Tanh Silu Elu Celu Selu LeakyRelu Hardtanh Hardswish Hardsigmoid "
    "Softplus Mish NativeDropout ToCopy Clone Threshold Exp Pow SigmoidFunction ReLUFunction GELUFunction SiLUFunction "
    "TanhFunction".split()
)


def _is_elementwise(node) -> bool:
    name = node.name().rstrip("0123456789")
    return name.endswith("Backward") and name[: -len("Backward")] in _ELEMENTWISE


class DataFlow:
    """Consumers of each monitored layer (by row), and whether the forward pass that reads them is awaited."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.discovering = False
        self.consumers: dict[int, set[int]] = {}
        self._matrix: np.ndarray | None = None

    def reset(self) -> None:
        self.consumers, self._matrix = {}, None

    def add(self, producer: int, consumer: int) -> None:
        self.consumers.setdefault(producer, set()).add(consumer)
        self._matrix = None

    def producers(self, node) -> list:
        """The slots of this monitor's Linears whose output reaches autograd node ``node`` through
        element-wise operations only."""
        found, stack, seen = [], [node], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            slot = getattr(node, "producer_slot", None) or getattr(node, "slot", None)  # (a run of layers: its last)
            if slot is not None and hasattr(slot, "flow"):
                if slot.flow is self:
                    found.append(slot)
            elif _is_elementwise(node):
                stack.extend(next_node for next_node, _ in node.next_functions)
        return found

    def matrix(self) -> np.ndarray:
        """``[l, c]``: layer c consumes layer l's output."""
        if self._matrix is None:
            self._matrix = np.zeros((self.layers, self.layers), dtype=bool)
            for row, consumers in self.consumers.items():
                self._matrix[row, list(consumers)] = True
        return self._matrix


def gains(fro: np.ndarray, reached: np.ndarray, consumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``delta_gain`` of every layer from ‖δ‖ over the batch (``fro``, shape (..., layers)): ‖δ^l‖ / ‖δ^c‖ with
    ‖δ^c‖ the norm of all the reached consumers' δ together, and where a gain exists."""
    consumes = consumes * reached[..., None, :]  # [l, c]: c (reached) consumes l's output
    has_gain = consumes.any(-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # x/0: inf; 0/0 and NaN: NaN
        below = np.sqrt((consumes * np.where(reached, fro * fro, 0.0)[..., None, :]).sum(-1))
        return fro / below, has_gain


# torch.compile's stance while some monitor waits for its first eager forward pass.
_discovery = {"count": 0, "prior": None}


def force_eager(on: bool) -> None:
    """Count a monitor waiting for (``on``) or done with its first eager forward pass; while any waits,
    ``torch.compile`` runs eagerly (``torch.compiler.set_stance("force_eager")``, restored when the last is done)."""
    if on:
        _discovery["count"] += 1
        if _discovery["count"] == 1:
            _discovery["prior"] = _torch_private.force_compile_eager()
    else:
        _discovery["count"] -= 1
        if _discovery["count"] == 0:
            _torch_private.restore_compile_stance(_discovery["prior"])

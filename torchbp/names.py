"""The names the monitor, the report and the picture share: the statistics, the root layer's name, the tensors a
non-finite value can be born in.

A leaf module: it imports neither torch nor the rest of torchbp, so that :mod:`torchbp.report` reads a log
without importing the monitor, and the monitor imports the report only when :meth:`DeltaMonitor.report` is called.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["STATS", "ROOT_NAME", "LINKS_TAG", "NONFINITE_TENSORS", "NONFINITE_WORDS", "Nonfinite"]

#: The statistics recorded for each layer and logged step, with their TensorBoard tag prefix.
STATS = {
    "delta_norm": "‖Σ_n δ_n‖, the norm of the bias gradient ∂C/∂b (BP3): the layer's speed of learning",
    "delta_fro": "‖δ‖, the Frobenius norm of δ over the whole batch (√Σ_n ‖δ_n‖²): the size of the error itself, "
    "which a cancellation between samples cannot hide (delta_norm can be ≈ 0 while every ‖δ_n‖ is not)",
    "delta_sample_norm_mean": "mean over samples n of ‖δ_n‖",
    "delta_sample_norm_max": "max over samples n of ‖δ_n‖",
    "weight_grad_norm": "‖∂C/∂W‖ (BP4)",
    "delta_gain": "‖δ^l‖ / ‖δ^c‖ (Frobenius norms over the batch), c the monitored Linear that consumes layer l's "
    "output through element-wise operations; <1 vanishing, >1 exploding",
    "dead_fraction": "for a layer followed by ReLU: fraction of units with σ'(z) = 0 for every sample",
    "delta_nonfinite": "1 if δ held a NaN or Inf, else 0",
}

#: The tag of the text summary that holds the data flow's links between the monitored layers (written once per
#: event file; read back by the report).
LINKS_TAG = "torchbp/links"

#: The name of a monitored layer that is the model itself (a bare ``torchbp.nn.Linear``): its qualified name is
#: empty, and a tag needs one (``delta_norm/model``).
ROOT_NAME = "model"

#: The tensors whose finiteness every backward pass checks, in the columns of
#: :class:`torchbp.monitor.records.Finiteness`; a TensorBoard tag ``nonfinite/<layer>`` holds ``1 +`` the index of
#: the tensor a non-finite value was born in, at its step.
NONFINITE_TENSORS = ("delta", "input", "weight_grad", "bias_grad")
#: How each is named in messages.
NONFINITE_WORDS = {
    "delta": "δ = ∂C/∂z",
    "input": "the input a^{l-1}",
    "weight_grad": "∂C/∂W",
    "bias_grad": "∂C/∂b",
}


class Nonfinite(NamedTuple):
    """Where a non-finite value (NaN or Inf) was born: the ``step``, the ``layer`` (qualified name) and the
    ``tensor`` (one of ``"delta"``, ``"input"``, ``"weight_grad"``, ``"bias_grad"``)."""

    step: int
    layer: str
    tensor: str

    def __str__(self) -> str:
        return f"{NONFINITE_WORDS[self.tensor]} of layer {self.layer!r} at step {self.step}"

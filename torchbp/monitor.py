r"""Watch error propagation: the per-layer error δ^l = ∂C/∂z^l, recorded where backward holds it.

δ^l is the ``grad_output`` that :class:`torchbp.functional.LinearFunction`'s hand-written backward
receives. A :class:`DeltaMonitor` gives each :class:`torchbp.nn.Linear` of a model a *slot*: one row
of a small buffer on the model's device. The backward reduces δ^l and the BP3/BP4 gradients it has
just computed to a fixed-size record with tensor ops and writes it into that row in place. The same
code runs eager and under ``torch.compile`` (AOTAutograd keeps a buffer mutated in backward; Inductor
fuses the reductions), and nothing synchronises with the device until a logged step copies the buffer
out; events are written by a background thread.

No module backward hooks are used, and no second backward pass. Without a monitor the slots are
``None`` and cost nothing.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import _events, functional
from .nn import Linear, ReLU

__all__ = ["DeltaMonitor", "STATS"]

#: The statistics recorded for each layer and backward pass, with their TensorBoard tag prefix.
STATS = {
    "delta_norm": "‖Σ_n δ_n‖, the norm of the bias gradient ∂C/∂b (BP3): the layer's speed of learning",
    "delta_sample_norm_mean": "mean over samples n of ‖δ_n‖",
    "delta_sample_norm_max": "max over samples n of ‖δ_n‖",
    "weight_grad_norm": "‖∂C/∂W‖ (BP4)",
    "delta_gain": "‖δ^l‖ / ‖δ^c‖ (Frobenius norms over the batch), c the monitored Linear that consumes layer l's "
    "output through element-wise operations; <1 vanishing, >1 exploding",
    "dead_fraction": "for a layer followed by ReLU: fraction of units with σ'(z) = 0 for every sample",
    "delta_nonfinite": "1 if δ held a NaN or Inf, else 0",
}

# The columns of a layer's record, written by its backward.
DELTA_NORM, WEIGHT_NORM, SAMPLE_MEAN, SAMPLE_MAX, FRO, COUNT, GEN, DEAD, DEAD_GEN = range(9)
COLUMNS = 9
#: Columns that scale with the loss (divided by a GradScaler's scale).
_NORM_COLUMNS = (DELTA_NORM, WEIGHT_NORM, SAMPLE_MEAN, SAMPLE_MAX, FRO)
HISTOGRAM_BINS = 64


def _norm(t: Tensor, dim: int | None = None) -> Tensor:
    """‖t‖ (over ``dim``, or Frobenius), accumulated in float32 for half-precision t (whose norms overflow
    at 65504) and in t's dtype otherwise; a whole float32/64 tensor's as the square root of a BLAS dot product."""
    if dim is None and t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        v = t.view(-1)
        return torch.dot(v, v).sqrt()
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(t, dim=dim, dtype=dtype)


def _wrapped(t: Tensor) -> bool:
    """Inside a torch.func transform: not a real backward pass."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t)


def layer_record(
    delta: Tensor, grad_weight: Tensor | None, grad_bias: Tensor | None, gen: Tensor, out: Tensor | None = None
) -> Tensor:
    r"""The fixed-size record of one layer's δ^l and gradients, as a tensor (columns ``DELTA_NORM`` … ``GEN``).

    ‖Σ_n δ_n‖ (= ‖∂C/∂b‖, BP3), ‖∂C/∂W‖ (BP4; −1 when not computed), the mean and max over samples n of
    ‖δ_n‖, ‖δ‖ over the batch, the number of samples, and ``gen`` (the step's generation number); written
    into ``out`` (the layer's row of the monitor's buffer) when given.
    """
    n = delta.shape[0] if delta.dim() > 1 else 1
    per_sample = _norm(delta.reshape(n, -1), dim=1)  # ‖δ_n‖, one pass over δ
    bias_grad = grad_bias if grad_bias is not None else delta.reshape(-1, delta.shape[-1]).sum(0)  # BP3
    count = per_sample.new_full((), n)
    if n:
        mean, largest = per_sample.mean(), per_sample.amax()
    else:
        mean = largest = per_sample.new_zeros(())
    weight_norm = _norm(grad_weight) if grad_weight is not None else per_sample.new_full((), -1.0)
    values = [_norm(bias_grad), weight_norm, mean, largest, _norm(per_sample), count, gen]
    return torch.stack([v.to(gen.dtype) for v in values], out=out)


def dead_record(a: Tensor, gen: Tensor, out: Tensor | None = None) -> Tensor:
    """[fraction of units whose activation a (the ReLU's output, shape (*, out)) is 0 for every sample, gen].

    A unit is dead when σ'(z) = 0 for every sample, i.e. its largest activation is 0 (NaN is not)."""
    rows = a.reshape(-1, a.shape[-1])
    if rows.shape[0]:
        dead = (rows.amax(0) == 0).sum(dtype=gen.dtype) / rows.shape[1]
    else:
        dead = gen.new_ones(())
    return torch.stack([dead, gen], out=out)


class _LayerSlot:
    """A monitored Linear's row in the monitor's buffer; its backward calls :meth:`record`."""

    def __init__(self, monitor: DeltaMonitor, name: str, row: int) -> None:
        self.monitor = monitor
        self.name = name
        self.row = row
        self.needs_input = monitor.per_sample_norms  # per-sample gradient norms need a^{l-1}

    def __reduce__(self):  # a copied or pickled model is not monitored
        return (_none, ())

    @property
    def discovering(self) -> bool:
        return self.monitor._discovering

    def record(self, delta: Tensor, input: Tensor | None, grad_weight: Tensor | None, grad_bias: Tensor | None):
        """Called by LinearFunction.backward with δ^l = ∂C/∂z^l and the gradients it computed."""
        if _wrapped(delta):
            return
        monitor = self.monitor
        eager = not torch.compiler.is_compiling()
        if eager:
            monitor._backward_seen(delta)
        buffer = monitor._buffer
        with torch.no_grad():
            d = delta.detach()
            layer_record(d, grad_weight, grad_bias, buffer[-1, 0], out=buffer[self.row, :DEAD])
            if monitor._vectors is not None:  # global statistics: Σ_n δ_n itself, for an exact all-ranks sum
                bias_grad = grad_bias if grad_bias is not None else d.reshape(-1, d.shape[-1]).sum(0)
                start = monitor._vector_at[self.row]
                monitor._vectors[start : start + bias_grad.shape[0]].copy_(bias_grad)
            if eager and self.needs_input:
                monitor._per_sample[self.name] = _per_sample_grad_norms(d, input.detach(), grad_bias is not None)
            if eager and monitor._histogram_due():
                monitor._hists[self.name] = _histogram(d)

    def record_relu(self, a: Tensor) -> None:
        """Called by the backward of the ReLU applied to this layer's output z, with a = relu(z)."""
        if _wrapped(a):
            return
        monitor = self.monitor
        with torch.no_grad():
            a = a.detach()
            dead_record(a, monitor._buffer[-1, 0], out=monitor._buffer[self.row, DEAD:])
            if monitor._vectors is not None:
                start = monitor._vector_at[self.row] + monitor._out[self.row]
                rows = a.reshape(-1, a.shape[-1])
                alive = rows.amax(0) if rows.shape[0] else rows.new_zeros(rows.shape[1])
                monitor._vectors[start : start + alive.shape[0]].copy_(alive != 0)

    def discover(self, input: Tensor) -> None:
        """In an eager forward: the monitored Linears whose output reaches this layer's input through
        element-wise operations only are its producers; this layer is their consumer (for delta_gain)."""
        for producer in _linear_producers(input.grad_fn, self.monitor):
            self.monitor._consumers.setdefault(producer.row, set()).add(self.row)


class _ReLUSlot:
    """A torchbp.nn.ReLU's memory of the monitored Linear it follows, for compiled runs (see functional._relu)."""

    def __init__(self) -> None:
        self.target: _LayerSlot | None = None

    def __reduce__(self):
        return (_none, ())


def _none() -> None:
    return None


# Autograd nodes of element-wise operations: the data flow from a Linear to the Linear consuming its output
# passes only through these (activations, additions such as residual connections, casts, dropout).
_ELEMENTWISE = frozenset(
    "Add Sub Mul Div Neg Gelu Relu Sigmoid Tanh Silu Elu Celu Selu LeakyRelu Hardtanh Hardswish Hardsigmoid "
    "Softplus Mish NativeDropout ToCopy Clone Threshold Exp Pow SigmoidFunction ReLUFunction".split()
)


def _is_elementwise(node) -> bool:
    name = node.name().rstrip("0123456789")
    return name.endswith("Backward") and name[: -len("Backward")] in _ELEMENTWISE


def _linear_producers(node, monitor: DeltaMonitor) -> list[_LayerSlot]:
    found, stack, seen = [], [node], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        slot = getattr(node, "slot", None)
        if isinstance(slot, _LayerSlot):
            if slot.monitor is monitor:
                found.append(slot)
        elif _is_elementwise(node):
            stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _histogram(delta: Tensor) -> Tensor | None:
    """On δ's device: [min, max, sum, sum of squares, lower edge, upper edge, counts of 64 equal bins].

    The bins are torch.histc's (64 equal bins over [min, max], the maximum in the last; NaN counted as 0
    and ±Inf as the largest float), computed in one scratch buffer: large temporaries are what makes
    histograms slow on CPU.
    """
    x = delta.detach().float().flatten()
    if x.numel() == 0:
        return None
    mn, mx = torch.aminmax(x)
    stats = [mn, mx, x.sum(), torch.dot(x, x)]
    scratch = x.nan_to_num()
    lo, hi = torch.aminmax(scratch)
    lo, hi = torch.where(lo == hi, lo - 1, lo), torch.where(lo == hi, hi + 1, hi)
    # bin = (x − lo) · bins / (hi − lo), with the scale and offset formed in float64: hi − lo can exceed
    # the float32 range (δ with ±Inf or ±1e38), where float32 arithmetic would give NaN bins.
    scale = HISTOGRAM_BINS / (hi.double() - lo.double())
    bins = scratch.mul_(scale.float()).sub_((lo.double() * scale).float()).clamp_(0, HISTOGRAM_BINS - 1).int()
    if bins.is_cpu:
        counts = torch.bincount(bins, minlength=HISTOGRAM_BINS)
    else:  # bincount reads its maximum back to the host; a fixed-size index_add_ does not
        ones = torch.ones((), dtype=torch.int64, device=bins.device).expand(bins.shape)
        counts = torch.zeros(HISTOGRAM_BINS, dtype=torch.int64, device=bins.device).index_add_(0, bins, ones)
    return torch.cat([torch.stack([*stats, lo, hi]), counts])


def _per_sample_grad_norms(delta: Tensor, a: Tensor, has_bias: bool) -> dict[str, Tensor | None]:
    r"""‖∂C_n/∂W‖ and ‖∂C_n/∂b‖ per sample n, from BP4's rank-1 structure, without per-sample gradients.

    For 2-D inputs ∂C_n/∂W = δ_n a_n^T, so ‖∂C_n/∂W‖ = ‖δ_n‖ ‖a_n‖. For (N, T, in) inputs
    ∂C_n/∂W = Σ_t δ_nt a_nt^T, and ‖·‖² = Σ_{t,s} (δ_nt·δ_ns)(a_nt·a_ns), the sum of the product of the
    two Gram matrices (or the explicit (out, in) sum when that is smaller than T×T).
    """
    n = delta.shape[0] if delta.dim() > 1 else 1
    if delta.dim() <= 2:
        delta_norms = _norm(delta.reshape(n, -1), dim=1)
        a_norms = _norm(a.reshape(n, -1), dim=1)
        return {"weight": delta_norms * a_norms, "bias": delta_norms if has_bias else None}
    d3 = delta.reshape(n, -1, delta.shape[-1])
    a3 = a.reshape(n, -1, a.shape[-1]).to(d3.dtype)
    t = d3.shape[1]
    if t * t <= d3.shape[2] * a3.shape[2]:
        sq = ((d3 @ d3.mT) * (a3 @ a3.mT)).sum((1, 2))
    else:
        sq = (d3.mT @ a3).square().sum((1, 2))
    bias = _norm(d3.sum(1), dim=1) if has_bias else None
    return {"weight": sq.clamp_min(0).sqrt(), "bias": bias}


# torch.compile's stance while some monitor waits for its first eager forward pass (see DeltaMonitor).
_discovery = {"count": 0, "prior": None}


def _force_eager(on: bool) -> None:
    from torch._dynamo import eval_frame

    if on:
        _discovery["count"] += 1
        if _discovery["count"] == 1:
            _discovery["prior"] = eval_frame._set_stance(eval_frame.DynamoStance("force_eager"))
    else:
        _discovery["count"] -= 1
        if _discovery["count"] == 0:
            eval_frame._set_stance(_discovery["prior"])


class DeltaMonitor:
    r"""Records δ^l = ∂C/∂z^l of every :class:`torchbp.nn.Linear` of a model on every backward pass.

    For each layer and backward pass, the hand-written backward computes (on δ's device, with tensor ops,
    eager or compiled, without a host sync):

    ============================  ===================================================================
    TensorBoard tag               value
    ============================  ===================================================================
    ``delta_norm/<layer>``        ‖Σ_n δ_n‖ = ‖∂C/∂b‖ (BP3), Nielsen's speed of learning of the layer
    ``delta_sample_norm_mean/…``  mean over samples of ‖δ_n‖
    ``delta_sample_norm_max/…``   max over samples of ‖δ_n‖
    ``weight_grad_norm/…``        ‖∂C/∂W‖ (BP4)
    ``delta_gain/…``              ‖δ^l‖ / ‖δ^c‖ (Frobenius norms over the batch), where c is the monitored
                                  Linear that consumes layer l's output through element-wise
                                  operations only (activations, residual additions, casts, dropout):
                                  the next layer of an MLP, fc1 → fc2 of a transformer's MLP. With
                                  several consumers, ‖δ^c‖ is the norm of all their δ together
                                  (√Σ_c ‖δ^c‖²). Absent where no monitored Linear consumes the output
                                  that way (the output layer; q/k/v projections feeding attention;
                                  a layer followed by LayerNorm). < 1 vanishing, > 1 exploding
    ``dead_fraction/…``           for a layer whose output goes straight into a torchbp ReLU: the
                                  fraction of units whose σ'(z) was 0 for every sample
    ``delta_nonfinite/…``         1 if δ held a NaN or Inf, else 0 (the other values of that
                                  layer and step are then not written: they are not numbers)
    ============================  ===================================================================

    ``<layer>`` is the module's qualified name in the model (``"0"``, ``"encoder.fc1"``). A *step*
    is one backward pass that reaches a monitored layer (``loss.backward()`` or
    ``torch.autograd.grad``); :attr:`step` counts them from 0. Layers are listed in reverse model
    order (the output layer first: backward order, for a sequential model).

    **Compiled models.** The statistics are tensor ops in the backward, so ``torch.compile`` (also with
    ``fullgraph=True``) compiles them into the backward graph; no recompilation happens between logged
    and unlogged steps. Attaching a monitor to a compiled model, or closing it, changes what the
    layers' forward reads, so the next call recompiles once. The data flow between layers (for
    ``delta_gain`` and ``dead_fraction``) is read from the autograd graph of one eager forward pass: from
    attaching until the first forward pass with gradients, ``torch.compile`` runs eagerly (its stance is
    ``"force_eager"``), then compiles as usual. δ histograms are recorded in eager backward passes only.

    **Logging.** With ``log`` set, the statistics of every ``every``-th step are copied to the host
    (non-blocking, into pinned memory, on CUDA) and written by a background thread. Flush policy: each
    logged step is handed to the operating system within about 50 ms (it then survives the process
    being killed), and all of them by :meth:`close` (or at normal interpreter exit). Histograms of δ
    per layer (tag ``delta/<layer>``) are written every ``histogram_every`` steps; a picture of δ per
    layer and step (the δ map, tag ``delta_map``) every ``image_every`` steps and on close. Under
    ``torch.distributed``, only rank ``log_rank`` writes (default 0).

    Args:
        model: a module containing :class:`torchbp.nn.Linear` layers (built with them or converted by
            :func:`torchbp.convert`); a ``DistributedDataParallel`` or compiled wrapper is unwrapped.
        log: a log directory (created if needed), a ``torch.utils.tensorboard.SummaryWriter``, or
            ``None`` to only record (see :meth:`latest`). Default: ``None``.
        every: log every this many steps. Default: ``10``.
        histogram_every: write δ histograms every this many steps; ``0`` for never. Default:
            ``10 * every``.
        image_every: draw the δ map every this many steps (needs matplotlib); ``0``: only on close.
            Default: ``100 * every``.
        per_sample_norms: also compute each sample's weight- and bias-gradient norm (see
            :meth:`per_sample_grad_norms`; eager backward passes only). Default: ``False``.
        scaler: the ``torch.amp.GradScaler`` scaling the loss: its scale is divided out of the norms
            (on the device). Default: ``None``.
        global_stats: under ``torch.distributed``, log statistics over all ranks' samples (one
            all-gather of the small per-layer records on logged steps only; every rank must run the
            same steps). Default: ``False``: rank ``log_rank``'s own samples.
        log_rank: the rank that writes under ``torch.distributed``; ``None``: every rank writes, to
            ``<log>/rank<r>``. Default: ``0``.

    Example::

        >>> model = torch.nn.Sequential(torchbp.nn.Linear(4, 8), torchbp.nn.ReLU(), torchbp.nn.Linear(8, 3))
        >>> with torchbp.DeltaMonitor(model, log="runs/example") as monitor:
        ...     torchbp.nn.CrossEntropyLoss()(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
        >>> list(monitor.latest())
        ['2', '0']

    A layer called several times in one forward is recorded once per call; :meth:`latest` keeps the
    values of the call whose backward ran last (the first call).
    """

    def __init__(
        self,
        model: nn.Module,
        log: str | os.PathLike | Any | None = None,
        every: int = 10,
        histogram_every: int | None = None,
        image_every: int | None = None,
        per_sample_norms: bool = False,
        scaler: Any = None,
        global_stats: bool = False,
        log_rank: int | None = 0,
    ) -> None:
        model = _unwrap(model)
        for name, value in (("every", every), ("histogram_every", histogram_every), ("image_every", image_every)):
            low = 1 if name == "every" else 0
            if (value is not None or name == "every") and (
                not isinstance(value, int) or isinstance(value, bool) or value < low
            ):
                raise ValueError(f"DeltaMonitor: {name} must be an int >= {low}, got {value!r}")
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise TypeError(f"DeltaMonitor: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
        if not layers:
            plain = [name or "<model>" for name, m in model.named_modules() if isinstance(m, nn.Linear)]
            hint = (
                f"; it has torch.nn.Linear layers ({', '.join(plain[:5])}): call torchbp.convert(model) first"
                if plain
                else "; build the model with torchbp.nn.Linear or call torchbp.convert(model)"
            )
            raise ValueError(f"DeltaMonitor: found no torchbp.nn.Linear in {type(model).__name__}{hint}")
        self.model = model
        self.layers = dict(reversed(layers.items()))  # backward order for a sequential model
        self._relus = [m for m in model.modules() if isinstance(m, ReLU)]
        self.every = every
        self.histogram_every = 10 * every if histogram_every is None else histogram_every
        self.image_every = 100 * every if image_every is None else image_every
        self.per_sample_norms = bool(per_sample_norms)
        self.scaler = scaler
        self.global_stats = bool(global_stats)
        self.rank, self.world_size = _rank_and_world()
        self.step = -1  # index of the current (or last) backward pass
        self._slots = {name: _LayerSlot(self, name, row) for row, name in enumerate(self.layers)}
        self._out = [layer.out_features for layer in self.layers.values()]
        self._vector_at = np.concatenate([[0], np.cumsum([2 * o for o in self._out])]).tolist()
        self._buffer, self._vectors = self._new_buffers()
        self._gen = 0  # the generation number the current step's records carry (also in _buffer[-1, 0])
        self._last_gen = -1
        self._scale_at_step: Tensor | None = None
        self._consumers: dict[int, set[int]] = {}
        self._per_sample: dict[str, dict[str, Tensor | None]] = {}
        self._hists: dict[str, Tensor | None] = {}
        self._task = None
        self._eager_step = False
        self._warned: set[str] = set()
        self._history: dict[str, Any] = {"steps": [], "delta_norm": []}
        self._history_lock = threading.Lock()
        self._attached = False
        self._discovering = self._stance_forced = False
        self._handles: list[Any] = []
        self.writer, self._owns_writer = None, False
        self._layout_written = False
        self._pending: collections.deque = collections.deque()
        self._drawing: threading.Thread | None = None
        self._image_step: int | None = None
        self._sink: _Sink | None = None
        self.attach()
        try:
            if log is not None and (log_rank is None or self.rank == log_rank):
                if log_rank is None and self.world_size > 1 and isinstance(log, (str, os.PathLike)):
                    log = os.path.join(os.fspath(log), f"rank{self.rank}")
                self.writer, self._owns_writer = _open_writer(log)
                self._sink = _Sink(self.writer)
        except BaseException:
            self.detach()
            raise

    def _new_buffers(self) -> tuple[Tensor, Tensor | None]:
        weights = [layer.weight for layer in self.layers.values()]
        device = weights[0].device
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        buffer = torch.full((len(self.layers) + 1, COLUMNS), math.nan, dtype=dtype, device=device)
        buffer[:-1, GEN] = buffer[:-1, DEAD_GEN] = -1.0
        buffer[-1, 0] = 0.0
        vectors = None
        if self.global_stats and self.world_size > 1:
            vectors = torch.zeros(self._vector_at[-1], dtype=dtype, device=device)
        return buffer, vectors

    # -- attaching ---------------------------------------------------------------------------------

    def attach(self) -> DeltaMonitor:
        """Give every monitored layer its slot (done by the constructor)."""
        if self._attached:
            return self
        taken = [name for name, layer in self.layers.items() if layer._torchbp_slot is not None]
        if taken:
            raise RuntimeError(f"DeltaMonitor: layer {taken[0]!r} is already monitored; close the other monitor first")
        for name, layer in self.layers.items():
            layer._torchbp_slot = self._slots[name]
        for relu in self._relus:
            if relu._torchbp_slot is None:
                relu._torchbp_slot = _ReLUSlot()
        # Every backward pass through a monitored layer reaches a parameter's gradient: a hook there tells
        # the monitor a step happened, also when the backward ran compiled.
        for layer in self.layers.values():
            for p in layer.parameters(recurse=False):
                if p.requires_grad:
                    self._handles.append(p.register_hook(self._parameter_hook))
        functional._monitors += 1
        self._attached = True
        self._start_discovery()
        return self

    def detach(self) -> None:
        """Remove the slots: the model runs exactly as without a monitor."""
        if not self._attached:
            return
        self._end_discovery()
        for layer in self.layers.values():
            layer.__dict__.pop("_torchbp_slot", None)
        for relu in self._relus:
            relu.__dict__.pop("_torchbp_slot", None)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        functional._monitors -= 1
        self._attached = False

    def flush(self) -> None:
        """Block until every step logged so far is written and handed to the operating system."""
        if self._sink is not None:
            self._write_arrived(wait=True)
            self._sink.flush()

    def close(self) -> None:
        """Detach, write the δ map, write everything queued and close the writer if the monitor opened it."""
        self.detach()
        if self._sink is not None:
            self._write_arrived(wait=True)
            self._write_image(background=False)
            self._sink.flush()
            if self._owns_writer:
                self.writer.close()
            self._sink = None

    def __enter__(self) -> DeltaMonitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the data flow, from one eager forward pass -------------------------------------------------------

    def _start_discovery(self) -> None:
        self._discovering = True
        self._consumers = {}
        self._stance_forced = True
        _force_eager(True)
        self._discovery_hook = self.model.register_forward_hook(self._forward_done)

    def _forward_done(self, module, args, output) -> None:
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._end_discovery(restore_stance=False)  # (not inside a compiled call's frame)

    def _end_discovery(self, restore_stance: bool = True) -> None:
        if self._discovering:
            self._discovering = False
            self._discovery_hook.remove()
        if restore_stance and self._stance_forced:
            self._stance_forced = False
            _force_eager(False)

    # -- recording (called from backward) ------------------------------------------------------------

    @torch._dynamo.disable
    def _parameter_hook(self, grad: Tensor) -> None:
        if not _wrapped(grad):
            self._backward_seen(None)

    def _backward_seen(self, delta: Tensor | None) -> None:
        """A monitored layer's backward (``delta``) or a monitored parameter's gradient (``None``) ran."""
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first of a new backward pass
            self._task = task
            self.step += 1
            self._per_sample, self._hists, self._eager_step = {}, {}, False
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if delta is not None:
            self._eager_step = True
            if delta.device != self._buffer.device or (
                delta.dtype == torch.float64 and self._buffer.dtype != torch.float64
            ):
                self._move_buffers(delta.device)

    def _move_buffers(self, device: torch.device) -> None:
        """The model moved to another device (or to float64) after the monitor was made: follow it."""
        old = self._buffer
        self._buffer, self._vectors = self._new_buffers()
        self._buffer = self._buffer.to(device)
        self._buffer.copy_(old.to(device=device, dtype=self._buffer.dtype))
        if self._vectors is not None:
            self._vectors = self._vectors.to(device)

    def _histogram_due(self) -> bool:
        return self._sink is not None and self.histogram_every > 0 and self.step % self.histogram_every == 0

    def _end_of_backward(self) -> None:
        self._task = None
        self._end_discovery()  # (a model whose root forward never ran: the data flow is read by now)
        gen, self._last_gen = self._gen, self._gen
        self._gen = (gen + 1) % (1 << 20)
        if self.scaler is not None:
            scale = self.scaler._scale
            self._scale_at_step = None if scale is None else scale.detach().clone()
        logged = self.step % self.every == 0
        if (logged and self._vectors is not None) or (self._sink is not None and (logged or self._hists)):
            self._submit_step(gen, scalars=logged)
        self._buffer[-1, 0].fill_(float(self._gen))  # the next step's records carry the next number
        if not self._eager_step and self._histogram_due():
            self._warn_once(
                "histograms", f"no δ histograms at step {self.step}: recorded in eager backward passes only"
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"DeltaMonitor: {message}", stacklevel=3)

    def _unscaled(self, buffer: Tensor, scale: Tensor | None) -> Tensor:
        """A copy of the records with the GradScaler's scale divided out of the norm columns (on the device)."""
        snapshot = buffer.clone()
        if scale is not None:
            snapshot[:-1, : FRO + 1] /= scale.to(snapshot.dtype)
        return snapshot

    def _submit_step(self, gen: int, scalars: bool) -> None:
        """Start the copy of this step's records (and histograms) to the host; write what has arrived."""
        snapshot = self._unscaled(self._buffer, self._scale_at_step)
        step, hists = self.step, self._hists
        if scalars and self._vectors is not None:  # global statistics: every rank logs the same steps
            # After DistributedDataParallel's own end-of-backward callback (queued before this one), which
            # all-reduces the gradients: then gather every rank's records.
            vectors = self._vectors.clone()
            queue = torch.autograd.Variable._execution_engine.queue_callback
            queue(lambda: self._queue_global(step, gen, snapshot, vectors, hists))
            return
        if self._sink is not None:
            self._queue(step, gen, scalars, [snapshot, None, None], hists)

    def _queue_global(self, step: int, gen: int, snapshot: Tensor, vectors: Tensor, hists: dict) -> None:
        import torch.distributed as dist

        flat = torch.cat([snapshot.flatten(), vectors])
        gathered = flat.new_empty(self.world_size * flat.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (renamed in torch 2.13)
        gather(gathered, flat)  # the one collective, on logged steps only
        gathered = gathered.view(self.world_size, flat.numel())
        if self._sink is None:
            return
        rows = snapshot.numel()
        records = gathered[:, :rows].reshape(self.world_size, *snapshot.shape)
        # ‖∂C/∂W‖ of the global batch: the norm of the gradient the all-reduce averaged over ranks.
        weight_norms = [
            _norm(w.grad) if (w := layer.weight).grad is not None else snapshot.new_full((), -1.0)
            for layer in self.layers.values()
        ]
        weight_norms = torch.stack([n.to(snapshot.dtype) for n in weight_norms])
        if self._scale_at_step is not None:
            weight_norms = weight_norms / self._scale_at_step.to(weight_norms.dtype)
        self._queue(step, gen, True, [records, gathered[:, rows:], weight_norms], hists)

    def _queue(self, step: int, gen: int, scalars: bool, records: list, hists: dict) -> None:
        names = [k for k, v in hists.items() if v is not None]
        self._pending.append((step, gen, scalars, names, _HostCopy(records + [hists[k] for k in names])))
        self._write_arrived()

    def _write_arrived(self, wait: bool = False) -> None:
        """Build and queue the events of the logged steps whose records are on the host (on CPU: at once;
        on CUDA: when their copy has finished, checked without waiting, or waited for with ``wait``).

        This runs in the training thread: a few numpy operations and protobufs per logged step, cheaper
        than handing them to another thread that would contend for the GIL; the file writes happen in
        the writer's background thread."""
        while self._pending and (wait or self._pending[0][-1].ready()):
            step, gen, scalars, names, copy = self._pending.popleft()
            records, vectors, weight_norms, *hists = copy.wait()
            stats = self._decode(records, gen, vectors, weight_norms) if scalars else None
            if stats is not None:
                self._remember(step, stats)
                bad = [layer for layer, s in stats.items() if s["delta_nonfinite"]]
                if bad and self.scaler is None:  # (with a GradScaler, an overflowing step is routine: it skips it)
                    warnings.warn(
                        f"DeltaMonitor: δ is not finite at step {step}, first in layer {bad[0]!r}", stacklevel=2
                    )
            if not self._layout_written:  # TensorBoard's custom-scalars page: every layer's delta_norm in one chart
                self._layout_written = True
                self.writer.add_custom_scalars(
                    {"torchbp": {"delta_norm: ‖∂C/∂b‖ per layer": ["Multiline", [r"delta_norm/.*"]]}}
                )
            self._sink.write(self._event(step, stats, dict(zip(names, hists))))
            if scalars and self.image_every and step % self.image_every == 0 and step > 0:
                self._write_image(background=True)

    # -- reading -------------------------------------------------------------------------------------

    def latest(self) -> dict[str, dict[str, float | bool | None]]:
        """The last backward pass's statistics per layer (qualified name -> {stat: value}).

        Keys are those of :data:`STATS`; ``delta_nonfinite`` is a bool, and a value that does not
        apply (a gain without a consumer, dead units of a layer not followed by ReLU, the weight
        gradient of a frozen weight) is ``None``. Reading synchronises with the device once; the
        values are this rank's (``global_stats`` applies to the logs).
        """
        if self._last_gen < 0:
            return {}
        snapshot = self._unscaled(self._buffer, self._scale_at_step)
        return self._decode(snapshot.cpu().double().numpy(), self._last_gen)

    @property
    def first_nonfinite(self) -> str | None:
        """The first layer, in backward order, whose δ was not finite in the last backward pass."""
        for name, stats in self.latest().items():
            if stats["delta_nonfinite"]:
                return name
        return None

    def per_sample_grad_norms(self) -> dict[str, dict[str, Tensor | None]]:
        """Per layer, each sample's ‖∂C_n/∂W‖ and ‖∂C_n/∂b‖ from the last backward pass.

        Returns ``{layer: {"weight": Tensor(N), "bias": Tensor(N) or None}}``, computed from BP4's
        rank-1 structure without building per-sample gradients. ``C_n`` is sample n's term of the
        loss as it was reduced (a ``'mean'`` loss carries its 1/N). Needs ``per_sample_norms=True``;
        eager backward passes only.
        """
        if not self.per_sample_norms:
            raise RuntimeError("DeltaMonitor: per-sample norms are off; create the monitor with per_sample_norms=True")
        return dict(self._per_sample)

    def history(self) -> dict[str, Any]:
        """The logged steps' ‖δ^l‖ = delta_norm, for the δ map (:mod:`torchbp.picture`).

        Returns ``{"steps": [...], "layers": [...] (network order, input side first),
        "delta_norm": array (layers, steps)}`` (NaN where a layer was not reached or δ was not finite).
        """
        with self._history_lock:
            steps = list(self._history["steps"])
            rows = list(self._history["delta_norm"])
        layers = list(reversed(self.layers))
        values = np.array(rows, dtype=np.float64).T[::-1] if rows else np.empty((len(layers), 0))
        return {"steps": steps, "layers": layers, "delta_norm": np.ascontiguousarray(values)}

    def _remember(self, step: int, stats: dict[str, dict[str, Any]]) -> None:
        row = []
        for name in self.layers:
            s = stats.get(name)
            value = s["delta_norm"] if s is not None and not s["delta_nonfinite"] else math.nan
            row.append(value)
        with self._history_lock:
            self._history["steps"].append(step)
            self._history["delta_norm"].append(row)

    def _decode(
        self, records: np.ndarray, gen: int, vectors: np.ndarray | None = None, weight_norms: np.ndarray | None = None
    ) -> dict[str, dict[str, Any]]:
        """The statistics of generation ``gen`` from a host copy of the records (this rank's, shape
        (layers + 1, COLUMNS), or every rank's, shape (ranks, layers + 1, COLUMNS), with their vectors and
        the norms of the all-reduced weight gradients)."""
        if records.ndim == 3:
            merged, reached_rows = _merge_ranks(records, vectors, gen, self._vector_at, self._out)
            merged[:, WEIGHT_NORM] = weight_norms
        else:
            merged, reached_rows = records[:-1], records[:-1, GEN] == gen
        fro = merged[:, FRO]
        stats: dict[str, dict[str, Any]] = {}
        for row, name in enumerate(self.layers):
            if not reached_rows[row]:
                continue
            r = merged[row]
            consumers = [c for c in self._consumers.get(row, ()) if reached_rows[c]]
            gain = None
            if consumers:
                below = math.sqrt(sum(float(fro[c]) ** 2 for c in consumers))
                f = float(fro[row])
                gain = f / below if below else (math.nan if f == 0 or f != f else math.inf)
            dead = float(r[DEAD]) if r[DEAD_GEN] == gen else None
            stats[name] = {
                "delta_norm": float(r[DELTA_NORM]),
                "delta_sample_norm_mean": float(r[SAMPLE_MEAN]),
                "delta_sample_norm_max": float(r[SAMPLE_MAX]),
                "weight_grad_norm": None if r[WEIGHT_NORM] < 0 else float(r[WEIGHT_NORM]),
                "delta_gain": gain,
                "dead_fraction": dead,
                # A NaN or Inf anywhere in δ reaches its norm (as does an overflow, |δ| > 1e19 in float32).
                "delta_nonfinite": not math.isfinite(float(r[FRO])),
            }
        return stats

    def _event(self, step: int, stats: dict | None, hists: dict[str, np.ndarray]):
        values = []
        if stats is not None:
            for layer, s in stats.items():
                if s["delta_nonfinite"]:  # flagged, not logged as a huge number
                    values.append((f"delta_nonfinite/{layer}", 1.0))
                    continue
                values += [(f"{stat}/{layer}", float(v)) for stat, v in s.items() if v is not None]
        histograms = []
        for layer, h in hists.items():
            (mn, mx, total, squares, lo, hi), counts = h[:6].tolist(), h[6:]
            mn, mx = (mn if math.isfinite(mn) else lo), (mx if math.isfinite(mx) else hi)  # ±Inf: the bins' range
            width = (hi - lo) / HISTOGRAM_BINS
            limits = [lo + width * (i + 1) for i in range(HISTOGRAM_BINS)]
            histograms.append(
                _events.histogram_value(f"delta/{layer}", mn, mx, float(counts.sum()), total, squares, limits, counts)
            )
        summary = _events.scalar_summary(values)
        summary.value.extend(histograms)
        return _event(step, summary)

    def _write_image(self, background: bool) -> None:
        """Draw the δ map of the logged steps so far (matplotlib, in a background thread during training)."""
        if self._sink is None or not self._history["steps"]:
            return
        if self._drawing is not None:
            if background and self._drawing.is_alive():
                return  # one drawing at a time
            self._drawing.join()
        history = self.history()
        step, sink = history["steps"][-1], self._sink
        if step == self._image_step:
            return  # nothing logged since the last image
        self._image_step = step
        from . import picture

        def draw():
            try:
                png = picture.render_png(picture.delta_map_figure({"": history}))
            except ImportError as e:
                self._warn_once("matplotlib", f"no δ map image in TensorBoard: {e}")
                return
            summary = _events.scalar_summary([])
            summary.value.append(_events.image_value("delta_map", png, *_png_size(png)))
            sink.write(_event(step, summary))

        if background:
            self._drawing = threading.Thread(target=draw, name="torchbp-delta-map", daemon=True)
            self._drawing.start()
        else:
            draw()


def _merge_ranks(records, vectors, gen, vector_at, out):
    """Statistics over every rank's samples, from every rank's records: the global batch's, as if the
    loss averaged over ranks (DistributedDataParallel's gradient): δ_n on rank r is δ_rn / ranks."""
    ranks = records.shape[0]
    rows = records[:, :-1]
    reached = (rows[:, :, GEN] == gen).all(0)
    merged = np.full(rows.shape[1:], np.nan)
    count = rows[:, :, COUNT].sum(0)
    merged[:, COUNT] = count
    merged[:, SAMPLE_MEAN] = (rows[:, :, SAMPLE_MEAN] * rows[:, :, COUNT]).sum(0) / np.maximum(count, 1) / ranks
    merged[:, SAMPLE_MAX] = rows[:, :, SAMPLE_MAX].max(0) / ranks
    merged[:, FRO] = np.sqrt((rows[:, :, FRO] ** 2).sum(0)) / ranks
    merged[:, DEAD_GEN] = np.where((rows[:, :, DEAD_GEN] == gen).all(0), gen, -1)
    for row, (start, width) in enumerate(zip(vector_at, out)):
        bias_sum = vectors[:, start : start + width].sum(0) / ranks
        merged[row, DELTA_NORM] = np.linalg.norm(bias_sum)
        alive = vectors[:, start + width : start + 2 * width].max(0)
        merged[row, DEAD] = float((alive == 0).sum()) / width if width else 1.0
    merged[:, GEN] = np.where(reached, gen, -1)
    return merged, reached


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"DeltaMonitor: expected a torch.nn.Module, got {type(model).__name__}")
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _open_writer(log):
    if hasattr(log, "add_scalar") and hasattr(log, "_get_file_writer"):
        return log, False
    if not isinstance(log, (str, os.PathLike)):
        raise TypeError(f"DeltaMonitor: log must be a directory path or a SummaryWriter, got {type(log).__name__}")
    path = os.fspath(log)
    try:
        _events.ensure_writable(path)
    except OSError as e:
        raise type(e)(
            e.errno,
            f"DeltaMonitor: cannot write TensorBoard logs to {path!r} ({e.strerror}); pass a writable directory",
        ) from None
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise ImportError("DeltaMonitor: logging needs the tensorboard package: pip install tensorboard") from e
    return _events.summary_writer(path), True


# --------------------------------------------------------------------------------------------------
# Off the training thread: device-to-host copies, and building and writing events in the background
# --------------------------------------------------------------------------------------------------


class _HostCopy:
    """Tensors on their way to the host: on CUDA, non-blocking copies into pinned memory and an event."""

    def __init__(self, tensors: list[Tensor | None]) -> None:
        self.event = None
        self.copies: list[Tensor | None] = []
        for t in tensors:
            if t is not None and t.is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self.copies.append(host.copy_(t, non_blocking=True))
                self.event = self.event or torch.cuda.Event()
            else:
                self.copies.append(t)
        if self.event is not None:
            self.event.record()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> list[np.ndarray | None]:
        if self.event is not None:
            self.event.synchronize()
        return [None if t is None else t.detach().numpy() for t in self.copies]


class _Sink:
    """Where the monitor's events go: the file writer of ``writer`` (the monitor's own, or a
    SummaryWriter of the user's), whose background thread writes them."""

    def __init__(self, writer) -> None:
        self.writer = writer

    def write(self, event) -> None:
        self.writer._get_file_writer().add_event(event)

    def flush(self) -> None:
        self.writer.flush()


def _event(step: int, summary):
    """An ``Event`` of ``step`` holding ``summary``, at the current wall time."""
    from tensorboard.compat.proto.event_pb2 import Event

    return Event(wall_time=time.time(), step=step, summary=summary)


def _png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return height, width

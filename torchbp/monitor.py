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

import atexit
import collections
import contextlib
import math
import os
import threading
import time
import warnings
import weakref
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
HISTOGRAM_BINS = 64
#: The training thread builds the events of the logged steps in batches, when the oldest is this old (seconds);
#: a background thread writes those left when training pauses. With the writer's own 0.05 s, every logged step
#: is handed to the operating system within about 0.25 s.
BATCH_S = 0.1


def _row_norms(t: Tensor) -> Tensor:
    """‖t_n‖ of each row of a 2-D t, accumulated as :func:`_norm`."""
    return torch.linalg.vector_norm(t, dim=1, dtype=_ACCUMULATE.get(t.dtype))


def _norm(t: Tensor) -> Tensor:
    """‖t‖ (Frobenius), accumulated in float32 for half-precision t (whose norms overflow at 65504) and in t's
    dtype otherwise; a contiguous float32/64 tensor's as the square root of a BLAS dot product (faster)."""
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        v = t.view(-1)
        return torch.dot(v, v).sqrt()
    return torch.linalg.vector_norm(t, dtype=_ACCUMULATE.get(t.dtype))


_ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}  # dtype of sums over half-precision δ


def layer_record(
    delta: Tensor, grad_weight: Tensor | None, grad_bias: Tensor | None, gen: Tensor, out: Tensor, count: bool = False
) -> Tensor:
    r"""Write one layer's record into ``out`` (its row of the monitor's buffer; columns ``DELTA_NORM`` … ``GEN``).

    ‖Σ_n δ_n‖ (= ‖∂C/∂b‖, BP3), ‖∂C/∂W‖ (BP4; −1 when not computed), the mean and max over samples n of
    ‖δ_n‖, ‖δ‖ over the batch, the number of samples (with ``count``; else NaN), and ``gen``, the step's
    generation number (a 0-d tensor).
    """
    n = delta.shape[0] if delta.dim() > 1 else 1
    per_sample = _row_norms(delta.reshape(n, -1))  # ‖δ_n‖, one pass over δ
    bias_grad = grad_bias if grad_bias is not None else delta.reshape(-1, delta.shape[-1]).sum(0)  # BP3: Σ_n δ_n
    if n:
        mean, largest = per_sample.mean(), per_sample.amax()
    else:
        mean = largest = per_sample.new_zeros(())
    weight_norm = _norm(grad_weight) if grad_weight is not None else per_sample.new_full((), -1.0)
    samples = per_sample.new_full((), n if count else math.nan)
    values = [_norm(bias_grad), weight_norm, mean, largest, torch.linalg.vector_norm(per_sample), samples, gen]
    return torch.stack(values, out=out)  # (stack casts to out's dtype)


def dead_record(a: Tensor, gen: Tensor, out: Tensor) -> Tensor:
    """Write [the number of units of a (the ReLU's output, shape (*, out)) active for some sample, gen] into ``out``.

    A unit is dead when σ'(z) = 0 for every sample, i.e. its largest activation is 0 (NaN is not)."""
    rows = a.reshape(-1, a.shape[-1])
    active = torch.count_nonzero(rows.amax(0)) if rows.shape[0] else gen.new_zeros(())
    return torch.stack([active, gen], out=out)


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
        monitor = self.monitor
        if torch.compiler.is_compiling():  # traced into the compiled backward: the tensor ops only
            buffer = monitor._buffer
            layer_record(delta, grad_weight, grad_bias, buffer[-1, 0], buffer[self.row, :DEAD], monitor.global_stats)
            self._record_vector(delta, grad_bias)
            return
        if torch._C._functorch.is_functorch_wrapped_tensor(delta):
            return  # inside a torch.func transform: not a backward pass
        monitor._backward_seen(delta)
        with _no_grad():
            d = delta.detach()
            gen, row, _ = monitor._views[self.row]
            layer_record(d, grad_weight, grad_bias, gen, row, monitor.global_stats)
            self._record_vector(d, grad_bias)
            if self.needs_input:
                monitor._per_sample[self.name] = _per_sample_grad_norms(d, input.detach(), grad_bias is not None)
            if monitor._histogram_due():
                monitor._hists[self.name] = _histogram(d)

    def _record_vector(self, delta: Tensor, grad_bias: Tensor | None) -> None:
        """Global statistics need Σ_n δ_n itself (its norm is not additive over ranks)."""
        vectors = self.monitor._vectors
        if vectors is not None:
            bias_grad = grad_bias if grad_bias is not None else delta.reshape(-1, delta.shape[-1]).sum(0)
            start = self.monitor._vector_at[self.row]
            vectors[start : start + bias_grad.shape[0]].copy_(bias_grad)

    def record_relu(self, a: Tensor) -> None:
        """Called by the backward of the ReLU applied to this layer's output z, with a = relu(z)."""
        monitor = self.monitor
        compiling = torch.compiler.is_compiling()
        if not compiling and torch._C._functorch.is_functorch_wrapped_tensor(a):
            return
        with _no_grad():
            a = a.detach()
            if compiling:
                dead_record(a, monitor._buffer[-1, 0], monitor._buffer[self.row, DEAD:])
            else:
                gen, _, row = monitor._views[self.row]
                dead_record(a, gen, row)
            if monitor._vectors is not None:
                start = monitor._vector_at[self.row] + monitor._out[self.row]
                rows = a.reshape(-1, a.shape[-1])
                alive = rows.amax(0) if rows.shape[0] else rows.new_zeros(rows.shape[1])
                monitor._vectors[start : start + alive.shape[0]].copy_(alive != 0)

    def consumes(self, producer: _LayerSlot) -> None:
        """This layer reads ``producer``'s output through element-wise operations (known without the graph)."""
        self.monitor._consumers.setdefault(producer.row, set()).add(self.row)
        self.monitor._consumer_cache = None

    def discover(self, input: Tensor) -> None:
        """In an eager forward: the monitored Linears whose output reaches this layer's input through
        element-wise operations only are its producers; this layer is their consumer (for delta_gain)."""
        for producer in _linear_producers(input.grad_fn, self.monitor):
            self.monitor._consumers.setdefault(producer.row, set()).add(self.row)
            self.monitor._consumer_cache = None


class _ReLUSlot:
    """A torchbp.nn.ReLU's memory of the monitored Linear it follows, for compiled runs (see functional._relu)."""

    def __init__(self) -> None:
        self.target: _LayerSlot | None = None

    def __reduce__(self):
        return (_none, ())


def _none() -> None:
    return None


def _no_grad():
    """``torch.no_grad()``, or nothing where grad mode is off already (a plain backward pass): cheaper."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


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
        slot = getattr(node, "producer_slot", None) or getattr(node, "slot", None)  # (a run of layers: its last)
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
        delta_norms = _row_norms(delta.reshape(n, -1))
        a_norms = _row_norms(a.reshape(n, -1))
        return {"weight": delta_norms * a_norms, "bias": delta_norms if has_bias else None}
    d3 = delta.reshape(n, -1, delta.shape[-1])
    a3 = a.reshape(n, -1, a.shape[-1]).to(d3.dtype)
    t = d3.shape[1]
    if t * t <= d3.shape[2] * a3.shape[2]:
        sq = ((d3 @ d3.mT) * (a3 @ a3.mT)).sum((1, 2))
    else:
        sq = (d3.mT @ a3).square().sum((1, 2))
    bias = _row_norms(d3.sum(1)) if has_bias else None
    return {"weight": sq.clamp_min(0).sqrt(), "bias": bias}


_logging_monitors: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _write_all_at_exit() -> None:
    """At normal interpreter exit, stop every open monitor's background thread and write the logged steps it
    still holds (before the event files' own exit hook, registered earlier, closes them). A daemon thread still
    running when the interpreter finalizes is ended by ``pthread_exit`` as soon as it takes the GIL again; inside
    torch's C++ code (a CUDA event's wait) that aborts the process (``terminate called without an active
    exception``)."""
    for monitor in list(_logging_monitors):
        monitor._closing.set()
        if monitor._flusher is not None:
            monitor._flusher.join()
        if monitor._sink is not None:
            monitor._write_arrived(wait=True)


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
    (non-blocking, into pinned memory, on CUDA); their events are built in batches and written by a
    background thread. Flush policy: each logged step is handed to the operating system within about
    0.25 s (it then survives the process being killed), and all of them by :meth:`flush`, :meth:`close` or
    normal interpreter exit. Histograms of δ
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
        on_error: what a failure to write the logs (a full disk, a deleted log directory, an error of the
            user's SummaryWriter) does: ``"warn"``: one warning naming the directory and the error,
            training goes on, the writer retries with each new batch of events and counts those it could
            not write (:attr:`dropped`; ``flush()`` and ``close()`` warn with the count, and never raise);
            ``"raise"``: the error is raised by the call that finds it (possibly ``backward()``).
            Default: ``"warn"``.

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
        on_error: str = "warn",
    ) -> None:
        model = _unwrap(model)
        if on_error not in _events.ON_ERROR:
            raise ValueError(f"DeltaMonitor: on_error must be one of {_events.ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
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
        self._outs = np.array(self._out, dtype=np.float64)
        self._vector_at = np.concatenate([[0], np.cumsum([2 * o for o in self._out])]).tolist()
        self._set_buffers(*self._new_buffers())
        self._gen = 0  # the generation number the current step's records carry (also in _buffer[-1, 0])
        self._last_gen = -1
        self._scale_at_step: Tensor | None = None
        self._consumers: dict[int, set[int]] = {}
        self._consumer_cache: tuple | None = None
        self._names = list(self.layers)
        self._encoders: dict[bytes, _events.ScalarEvents] = {}
        self._flag_row = (np.arange(len(STATS)) == len(STATS) - 1)[:, None]  # delta_nonfinite: always logged
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
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._flusher: threading.Thread | None = None
        self._error: BaseException | None = None
        self._drawing: threading.Thread | None = None
        self._image_step: int | None = None
        self._sink: _Sink | None = None
        self._closed_sink: _Sink | None = None
        self.attach()
        try:
            if log is not None and (log_rank is None or self.rank == log_rank):
                if log_rank is None and self.world_size > 1 and isinstance(log, (str, os.PathLike)):
                    log = os.path.join(os.fspath(log), f"rank{self.rank}")
                self.writer, self._owns_writer = _open_writer(log, on_error)
                self._sink = _Sink(self.writer, on_error)
        except BaseException:
            self.detach()
            raise

    def _set_buffers(self, buffer: Tensor, vectors: Tensor | None) -> None:
        """The records' buffer (and the vectors of global statistics), and each layer's views of it."""
        self._buffer, self._vectors = buffer, vectors
        gen = buffer[-1, 0]
        self._views = [(gen, buffer[row, :DEAD], buffer[row, DEAD:]) for row in range(len(self.layers))]

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
        self._raise_error()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            if self.on_error == "warn":
                self._warn_once("write", f"writing the logged steps failed: {type(error).__name__}: {error}")
                return
            raise RuntimeError(f"DeltaMonitor: writing the logged steps failed: {error}") from error

    @property
    def dropped(self) -> int:
        """How many events of the logs were not written (failed writes, a deleted log directory, errors of
        the writer); 0 when all were. Counted with ``on_error="warn"``, the default."""
        sink = self._sink or self._closed_sink
        return 0 if sink is None else sink.dropped

    def close(self) -> None:
        """Detach, write the δ map, write everything queued and close the writer if the monitor opened it."""
        self.detach()
        self._closing.set()
        if self._flusher is not None:
            self._flusher.join()
        if self._sink is not None:
            self._write_arrived(wait=True)
            self._write_image(background=False)
            self._sink.flush()
            if self._owns_writer:
                self._sink.guarded(self.writer.close)
            self._sink, self._closed_sink = None, self._sink
        self._raise_error()

    def __enter__(self) -> DeltaMonitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the data flow, from one eager forward pass -------------------------------------------------------

    def _start_discovery(self) -> None:
        self._discovering = True
        self._consumers, self._consumer_cache = {}, None
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
        if not torch._C._functorch.is_functorch_wrapped_tensor(grad):
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
        buffer, vectors = self._new_buffers()
        buffer = buffer.to(device)
        buffer.copy_(old.to(device=device, dtype=buffer.dtype))
        self._set_buffers(buffer, None if vectors is None else vectors.to(device))

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
        if scale is not None:  # the columns DELTA_NORM … FRO are norms: they scale with the loss
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
        host = _HostCopy(records + [hists[k] for k in names])
        with self._lock:
            self._pending.append((step, gen, scalars, names, host, time.monotonic()))
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_stragglers, name="torchbp-monitor", daemon=True)
            self._flusher.start()
            _logging_monitors.add(self)
        if self._oldest_age() >= BATCH_S:
            self._write_arrived()

    def _oldest_age(self) -> float:
        with self._lock:
            return time.monotonic() - self._pending[0][-1] if self._pending else 0.0

    def _write_arrived(self, wait: bool = False) -> None:
        """Build and queue the events of the logged steps whose records are on the host (on CPU: at once;
        on CUDA: when their copy has finished, checked without waiting, or waited for with ``wait``).

        The training thread does this for all steps logged in the last ``BATCH_S`` seconds together (numpy
        over the stacked records, then one Event per step), which costs far less than doing it per step or
        handing it to another thread that would contend for the GIL; the file writes happen in the writer's
        background thread. A step logged before training pauses is picked up by a background thread."""
        with self._lock:
            batch = []
            while self._pending and (wait or self._pending[0][4].ready()):
                batch.append(self._pending.popleft())
            if not batch:
                return
            arrays = [entry[4].wait() for entry in batch]
            data: list[bytes | None] = [None] * len(batch)
            plain = [k for k, (entry, a) in enumerate(zip(batch, arrays)) if entry[2] and a[1] is None]
            if plain:  # this rank's records: every step of the batch at once
                steps = [batch[k][0] for k in plain]
                block = self._table(np.stack([arrays[k][0] for k in plain]), np.array([batch[k][1] for k in plain]))
                self._scalars_written(steps, block)
                extras = [self._histograms(dict(zip(batch[k][3], arrays[k][3:]))) for k in plain]
                for k, event in zip(plain, self._encode(steps, block, extras)):
                    data[k] = event
            for k, ((step, gen, scalars, names, _, _), (records, vectors, weight_norms, *hists)) in enumerate(
                zip(batch, arrays)
            ):
                if data[k] is None:  # histograms alone, or every rank's records (global statistics)
                    table = self._table(records[None], np.array([gen]), vectors, weight_norms) if scalars else None
                    if table is not None:
                        self._scalars_written([step], table)
                    extra = self._histograms(dict(zip(names, hists)))
                    data[k] = self._encode([step], table, [extra])[0]
            for event in data:
                self._sink.write(event)
            if any(e[2] and self.image_every and e[0] % self.image_every == 0 and e[0] > 0 for e in batch):
                self._write_image(background=True)

    def _scalars_written(self, steps: list[int], block: _Table) -> None:
        """Keep the history of ``steps`` (whose statistics are ``block``), and warn of a non-finite δ."""
        self._remember(steps, block)
        bad = block.reached & block.nonfinite
        if bad.any() and self.scaler is None:  # (with a GradScaler, an overflowing step is routine: it skips it)
            k, j = np.argwhere(bad)[0]
            warnings.warn(
                f"DeltaMonitor: δ is not finite at step {steps[k]}, first in layer {self._names[j]!r}", stacklevel=3
            )
        if not self._layout_written:  # TensorBoard's custom-scalars page: every layer's delta_norm in one chart
            self._layout_written = True
            layout = {"torchbp": {"delta_norm: ‖∂C/∂b‖ per layer": ["Multiline", [r"delta_norm/.*"]]}}
            self._sink.guarded(self.writer.add_custom_scalars, layout)

    def _flush_stragglers(self) -> None:
        """Background thread: write the steps logged before training paused (within ~2 × BATCH_S)."""
        while not self._closing.wait(BATCH_S):
            if self._oldest_age() >= BATCH_S:
                try:
                    self._write_arrived()
                except Exception as e:  # kept for the training thread (flush/close), like the writer's errors
                    self._error = e
                    return

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
        records = snapshot.cpu().double().numpy()[None]
        return self._table(records, np.array([self._last_gen]))[0].as_dict(self._names)

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

    def _remember(self, steps: list[int], block: _Table) -> None:
        rows = np.where(block.reached & ~block.nonfinite, block.values[:, 0], np.nan)
        with self._history_lock:
            self._history["steps"] += steps
            self._history["delta_norm"] += list(rows)

    def _table(
        self,
        records: np.ndarray,
        gen: int | np.ndarray,
        vectors: np.ndarray | None = None,
        weight_norms: np.ndarray | None = None,
    ) -> _Table:
        """The statistics of generation ``gen`` from a host copy of the records, for every layer at once (numpy).

        ``records`` is this rank's buffer, shape (layers + 1, COLUMNS), or several steps' buffers stacked,
        shape (steps, layers + 1, COLUMNS) with ``gen`` an array of their generations; with ``vectors`` it is
        every rank's buffer of one step, shape (ranks, layers + 1, COLUMNS), merged with their vectors and the
        norms of the all-reduced weight gradients."""
        if vectors is not None:  # (one step: records[0] holds every rank's)
            merged, reached = _merge_ranks(records[0], vectors, int(gen[0]), self._vector_at, self._out)
            merged, reached = merged[None], reached[None]
            merged[0, :, WEIGHT_NORM] = weight_norms
        else:
            gen = np.asarray(gen, dtype=np.float64)[..., None]
            merged, reached = records[..., :-1, :].astype(np.float64), records[..., :-1, GEN] == gen
        fro = merged[..., FRO]
        consumes = self._consumer_matrix() * reached[..., None, :]  # [l, c]: c (reached) consumes l's output
        has_gain = consumes.any(-1)
        with np.errstate(divide="ignore", invalid="ignore"):  # x/0: inf; 0/0 and NaN: NaN
            below = np.sqrt((consumes * np.where(reached, fro * fro, 0.0)[..., None, :]).sum(-1))
            gain = fro / below
            dead = np.where(self._outs > 0, 1 - merged[..., DEAD] / self._outs, 0.0)  # (the record: active units)
        has_dead = merged[..., DEAD_GEN] == gen
        has_weight = merged[..., WEIGHT_NORM] >= 0
        nonfinite = ~np.isfinite(fro)  # a NaN or Inf anywhere in δ reaches its norm (as does |δ| > 1e19 in float32)
        columns = [merged[..., DELTA_NORM], merged[..., SAMPLE_MEAN], merged[..., SAMPLE_MAX], merged[..., WEIGHT_NORM]]
        values = np.stack([*columns, gain, dead, nonfinite.astype(np.float64)], axis=-2)
        ones = np.ones_like(reached)
        present = np.stack([ones, ones, ones, has_weight, has_gain, has_dead, ones], axis=-2) & reached[..., None, :]
        return _Table(values, present, reached, nonfinite)

    def _consumer_matrix(self) -> np.ndarray:
        if self._consumer_cache is None:  # (reset when the data flow is read)
            n = len(self._names)
            self._consumer_cache = np.zeros((n, n), dtype=bool)
            for row, consumers in self._consumers.items():
                self._consumer_cache[row, list(consumers)] = True
        return self._consumer_cache

    def _histograms(self, hists: dict[str, np.ndarray]) -> bytes:
        """The serialized Summary values of δ's histograms (empty for none)."""
        if not hists:
            return b""
        summary = _events.scalar_summary([])
        for layer, h in hists.items():
            (mn, mx, total, squares, lo, hi), counts = h[:6].tolist(), h[6:]
            mn, mx = (mn if math.isfinite(mn) else lo), (mx if math.isfinite(mx) else hi)  # ±Inf: the bins' range
            width = (hi - lo) / HISTOGRAM_BINS
            limits = [lo + width * (i + 1) for i in range(HISTOGRAM_BINS)]
            summary.value.append(
                _events.histogram_value(f"delta/{layer}", mn, mx, float(counts.sum()), total, squares, limits, counts)
            )
        return summary.SerializeToString()

    def _encode(self, steps: list[int], block: _Table | None, extras: list[bytes]) -> list[bytes]:
        """The serialized Events of ``steps``: the scalars of ``block`` (a layer whose δ is not finite: only its
        flag), and ``extras`` (serialized histograms). Steps logging the same tags are encoded together."""
        now = time.time()
        if block is None:
            return _events.ScalarEvents([]).events(steps, now, np.zeros((len(steps), 0)), extras)
        logged = block.present & (self._flag_row | ~block.nonfinite[:, None, :])  # (steps, STATS, layers)
        out: list[bytes] = []
        start = 0
        while start < len(steps):
            key = logged[start].tobytes()
            end = start + 1
            while end < len(steps) and logged[end].tobytes() == key:
                end += 1
            encoder = self._encoders.get(key)
            if encoder is None:  # a new set of tags (the first step, or a layer whose δ turned non-finite)
                mask = logged[start]
                tags = [f"{stat}/{n}" for j, n in enumerate(self._names) for i, stat in enumerate(STATS) if mask[i, j]]
                encoder = self._encoders[key] = _events.ScalarEvents(tags)
            picked = logged[start:end].transpose(0, 2, 1)
            values = block.values[start:end].transpose(0, 2, 1)[picked].reshape(end - start, -1)
            out += encoder.events(steps[start:end], now, values, extras[start:end])
            start = end
        return out

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
            sink.write(_events.ScalarEvents([]).event(step, time.time(), [], summary.SerializeToString()))

        if background:
            # Not a daemon: at interpreter exit the drawing finishes (and is written) before the writer closes.
            self._drawing = threading.Thread(target=draw, name="torchbp-delta-map")
            self._drawing.start()
        else:
            draw()


class _Table:
    """One step's statistics for every layer: ``values[s, l]`` of STATS s and layer l (in the monitor's order),
    ``present[s, l]`` where that value applies, and per layer whether its backward ran and δ was finite."""

    def __init__(self, values: np.ndarray, present: np.ndarray, reached: np.ndarray, nonfinite: np.ndarray) -> None:
        self.values, self.present, self.reached, self.nonfinite = values, present, reached, nonfinite

    def __getitem__(self, k: int) -> _Table:
        """Step ``k`` of a table of several steps."""
        return _Table(self.values[k], self.present[k], self.reached[k], self.nonfinite[k])

    def as_dict(self, names: list[str]) -> dict[str, dict[str, Any]]:
        values, present = self.values.T.tolist(), self.present.T.tolist()
        out = {}
        for j, name in enumerate(names):
            if self.reached[j]:
                stats = {stat: (v if ok else None) for stat, v, ok in zip(STATS, values[j], present[j])}
                stats["delta_nonfinite"] = bool(self.nonfinite[j])
                out[name] = stats
        return out


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
        merged[row, DEAD] = float((alive != 0).sum())  # units active for some sample of some rank
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


def _open_writer(log, on_error: str = "warn"):
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
    return _events.summary_writer(path, on_error=on_error), True


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
    """Where the monitor's (serialized) events go: the file writer of ``writer`` (the monitor's own, or a
    SummaryWriter of the user's), whose background thread writes them.

    Every call into the writer is guarded: with ``on_error="warn"`` an exception (a SummaryWriter of the
    user's whose thread died on a full disk, say) is warned of once and the event counted as dropped; the
    monitor's own event file reports its write errors the same way itself (``on_error`` is passed to it)."""

    def __init__(self, writer, on_error: str = "warn") -> None:
        self.writer = writer
        logdir = writer.get_logdir() if hasattr(writer, "get_logdir") else repr(writer)
        self.errors = _events.WriteErrors(str(logdir), on_error, "DeltaMonitor")
        self.failed = 0  # events the writer raised on
        self._file_writer = None
        self._event_files: list = []  # the writer's torchbp EventFiles (a new one after it reopens)

    @property
    def dropped(self) -> int:
        """Events not written: those the writer raised on, and those its event files dropped."""
        return self.failed + sum(f.dropped for f in self._event_files)

    def guarded(self, fn, *args, events: int = 0) -> None:
        """``fn(*args)``; with on_error="warn", an exception is warned of once and ``events`` counted as dropped."""
        try:
            fn(*args)
        except Exception as e:
            if self.errors.on_error == "raise":
                raise
            self.failed += events
            self.errors.failed(e, 0, self.dropped)

    def write(self, data: bytes) -> None:
        self.guarded(self._write, data, events=1)

    def _write(self, data: bytes) -> None:
        file_writer = self.writer._get_file_writer()
        if file_writer is not self._file_writer:
            self._file_writer = file_writer
            event_file = getattr(file_writer, "event_writer", None)
            if hasattr(event_file, "dropped"):
                self._event_files.append(event_file)
        if hasattr(file_writer, "add_serialized_event"):
            file_writer.add_serialized_event(data)
        else:
            from tensorboard.compat.proto.event_pb2 import Event

            file_writer.add_event(Event.FromString(data))

    def flush(self) -> None:
        self.guarded(self.writer.flush)
        self.errors.report(self.failed)  # (the monitor's own event file reports its own)


def _png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return height, width

r"""The records written in backward: tensor math behind the slot interface the Functions call.

A monitored :class:`torchbp.nn.Linear` hands its slot (:class:`LayerSlot`) to
:class:`torchbp.functional.LinearFunction` (or the backprop loop's Function) only for a backward pass
whose statistics are wanted (see :mod:`torchbp.monitor.schedule`). The backward calls
``slot.record(delta, input, grad_weight, grad_bias)`` with δ^l = ∂C/∂z^l and the BP3/BP4 gradients it
has just computed; the slot reduces them to a fixed-size row of :class:`Records`' buffer with tensor ops,
in place, on δ's device, without a host sync: the same code eager and compiled. A ReLU right after the
layer calls ``slot.record_relu(a)``, which writes its count of active units.

On every other backward pass the layer carries a :class:`FiniteSlot` instead, whose ``record`` computes one
finiteness flag per tensor (:func:`finite_sums`) into :class:`Finiteness`' small device buffer, and nothing else.

The slot interface (what the Functions use): ``record(delta, input, grad_weight, grad_bias)``,
``record_relu(a)``, ``needs_input``, ``discovering``, ``discover(input)``, ``consumes(producer)``; a
ReLU's slot (:class:`ReLUSlot`) has ``target``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _torch_private
from ..names import NONFINITE_TENSORS, NONFINITE_WORDS, STATS  # noqa: F401 (re-exported)

# The columns of a layer's record, written by its backward.
DELTA_NORM, WEIGHT_NORM, SAMPLE_MEAN, SAMPLE_MAX, FRO, COUNT, GEN, DEAD, DEAD_GEN = range(9)
COLUMNS = 9
HISTOGRAM_BINS = 64

_ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}  # dtype of sums over half-precision δ


def _samples(t: Tensor) -> Tensor:
    """t as (samples, values): one row per sample n (a 1-D t is one sample); also for a batch of 0 rows."""
    return t.flatten(1) if t.dim() > 1 else t.reshape(1, -1)


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


def layer_record(
    delta: Tensor, grad_weight: Tensor | None, grad_bias: Tensor | None, gen: Tensor, out: Tensor, count: bool = False
) -> Tensor:
    r"""Write one layer's record into ``out`` (its row of the monitor's buffer; columns ``DELTA_NORM`` … ``GEN``).

    ‖Σ_n δ_n‖ (= ‖∂C/∂b‖, BP3), ‖∂C/∂W‖ (BP4; −1 when not computed), the mean and max over samples n of
    ‖δ_n‖, ‖δ‖ over the batch, the number of samples (with ``count``; else NaN), and ``gen``, the step's
    generation number (a 0-d tensor). δ is read once (‖δ_n‖ per row; ‖δ‖ is the norm of those), the weight
    gradient once, and the record is one ``stack`` into ``out``. A batch of 0 rows writes a sample count of 0
    (with or without ``count``): the host then reads its statistics as absent, not as zeros.
    """
    n = delta.shape[0] if delta.dim() > 1 else 1
    per_sample = _row_norms(_samples(delta))  # ‖δ_n‖, one pass over δ
    bias_grad = grad_bias if grad_bias is not None else delta.reshape(-1, delta.shape[-1]).sum(0)  # BP3: Σ_n δ_n
    if n:
        mean, largest = per_sample.mean(), per_sample.amax()
    else:
        mean = largest = per_sample.new_zeros(())
    weight_norm = _norm(grad_weight) if grad_weight is not None else per_sample.new_full((), -1.0)
    samples = per_sample.new_full((), n if count or not n else math.nan)
    values = [_norm(bias_grad), weight_norm, mean, largest, torch.linalg.vector_norm(per_sample), samples, gen]
    return torch.stack(values, out=out)  # (stack casts to out's dtype)


class PendingRecord(NamedTuple):
    """What an eager backward keeps of a layer until the end of the backward pass (see :meth:`Records.add`)."""

    row: int
    per_sample: Tensor  # ‖δ_n‖, shape (n,)
    bias_norm: Tensor  # ‖Σ_n δ_n‖ = ‖∂C/∂b‖ (BP3), 0-d
    weight_norm: Tensor | None  # ‖∂C/∂W‖ (BP4), 0-d; None: not computed


def dead_record(a: Tensor, gen: Tensor, out: Tensor) -> Tensor:
    """Write [the number of units of a (the ReLU's output, shape (*, out)) active for some sample, gen] into ``out``.

    A unit is dead when σ'(z) = 0 for every sample, i.e. its largest activation is 0 (NaN is not)."""
    rows = a.reshape(-1, a.shape[-1])
    active = torch.count_nonzero(rows.amax(0)) if rows.shape[0] else gen.new_zeros(())
    return torch.stack([active, gen], out=out)


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


def _per_sample_grad_norms(
    delta: Tensor, a: Tensor, has_bias: bool, delta_norms: Tensor | None = None
) -> dict[str, Tensor | None]:
    r"""‖∂C_n/∂W‖ and ‖∂C_n/∂b‖ per sample n, from BP4's rank-1 structure, without per-sample gradients.

    For 2-D inputs ∂C_n/∂W = δ_n a_n^T, so ‖∂C_n/∂W‖ = ‖δ_n‖ ‖a_n‖. For (N, T, in) inputs
    ∂C_n/∂W = Σ_t δ_nt a_nt^T, and ‖·‖² = Σ_{t,s} (δ_nt·δ_ns)(a_nt·a_ns), the sum of the product of the
    two Gram matrices (or the explicit (out, in) sum when that is smaller than T×T). ``delta_norms``: the
    ‖δ_n‖ already computed for the layer's record, if any.
    """
    if delta.dim() <= 2:
        if delta_norms is None:
            delta_norms = _row_norms(_samples(delta))
        a_norms = _row_norms(_samples(a))
        return {"weight": delta_norms * a_norms, "bias": delta_norms if has_bias else None}
    d3 = delta.flatten(1, -2)
    a3 = a.flatten(1, -2).to(d3.dtype)
    t = d3.shape[1]
    if t * t <= d3.shape[2] * a3.shape[2]:
        sq = ((d3 @ d3.mT) * (a3 @ a3.mT)).sum((1, 2))
    else:
        sq = (d3.mT @ a3).square().sum((1, 2))
    bias = _row_norms(d3.sum(1)) if has_bias else None
    return {"weight": sq.clamp_min(0).sqrt(), "bias": bias}


def _no_grad():
    """``torch.no_grad()``, or nothing where grad mode is off already (a plain backward pass): cheaper."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


class Records:
    """The buffer the backward writes: one row of ``COLUMNS`` per monitored layer, and a last row whose
    first entry is the generation number the current step's records carry (a record whose GEN column
    differs from its step's generation was not written in that step: the layer was not reached).

    With ``vectors`` (global statistics under ``torch.distributed``), each layer also writes Σ_n δ_n and
    its units' activity there: norms are not additive over ranks, these vectors are.
    """

    def __init__(self, widths: list[int], dtype: torch.dtype, device: torch.device, vectors: bool) -> None:
        self.widths = widths
        self.vector_at = [0]
        for w in widths:
            self.vector_at.append(self.vector_at[-1] + 2 * w)
        self.with_vectors = vectors
        self.per_sample: dict[str, dict[str, Tensor | None]] = {}  # the last recorded step's, per layer
        self.hists: dict[str, Tensor | None] = {}  # the current step's δ histograms, per layer
        self.batch: list[PendingRecord] = []  # the current eager backward pass's layers, written by flush()
        self._rows: dict[tuple[int, ...], Tensor] = {}
        self.set(*self.new(dtype, device))

    def new(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
        buffer = torch.full((len(self.widths) + 1, COLUMNS), math.nan, dtype=dtype, device=device)
        buffer[:-1, GEN] = buffer[:-1, DEAD_GEN] = -1.0
        buffer[-1, 0] = 0.0
        vectors = torch.zeros(self.vector_at[-1], dtype=dtype, device=device) if self.with_vectors else None
        return buffer, vectors

    def set(self, buffer: Tensor, vectors: Tensor | None) -> None:
        """The records' buffer (and vectors), and each layer's views of it."""
        self.buffer, self.vectors = buffer, vectors
        gen = buffer[-1, 0]
        self._columns = buffer[:, :DEAD]  # (the columns flush() writes)
        self._gen = gen
        self._minus_one = buffer.new_full((), -1.0)  # ‖∂C/∂W‖ not computed
        self._nan = buffer.new_full((len(self.widths),), math.nan)  # the sample count, not recorded
        self.views = [(gen, buffer[row, :DEAD], buffer[row, DEAD:]) for row in range(len(self.widths))]

    def follow(self, delta: Tensor) -> None:
        """The model moved to another device (or to float64) after the monitor was made: follow it."""
        if delta.device == self.buffer.device and (delta.dtype != torch.float64 or self.buffer.dtype == torch.float64):
            return
        dtype = torch.float64 if delta.dtype == torch.float64 else self.buffer.dtype
        old = self.buffer
        buffer, vectors = self.new(dtype, delta.device)
        buffer.copy_(old.to(device=delta.device, dtype=dtype))
        self.set(buffer, vectors)

    def add(self, row: int, delta: Tensor, grad_weight: Tensor | None, grad_bias: Tensor | None) -> Tensor:
        """An eager backward's layer: what :func:`layer_record` computes, in two passes now (‖δ_n‖ per row; the
        norms of the bias and weight gradients in one ``_foreach_norm``) and the rest for every layer of the
        backward pass at once, in :meth:`flush`. Nothing of δ or the gradients is held (a gradient held past
        its Function's return would make autograd copy it into ``.grad``). Returns ‖δ_n‖."""
        per_sample = _row_norms(_samples(delta))  # ‖δ_n‖, one pass over δ
        bias_grad = grad_bias if grad_bias is not None else delta.reshape(-1, delta.shape[-1]).sum(0)  # BP3
        grads = [bias_grad] if grad_weight is None else [bias_grad, grad_weight]
        norms = _torch_private.foreach_norm(
            grads, 2, dtype=_ACCUMULATE.get(bias_grad.dtype)
        )  # BP3 and BP4, one pass each
        self.batch.append(PendingRecord(row, per_sample, norms[0], norms[1] if grad_weight is not None else None))
        return per_sample

    def flush(self) -> None:
        """Write the records of :meth:`add` into the buffer: a few ops for all layers together (the same values
        as :func:`layer_record`'s, which the compiled backward uses)."""
        batch, self.batch = self.batch, []
        if not batch:
            return
        if len({p.row for p in batch}) < len(batch):  # a layer called several times: the backward that ran last
            batch = list({p.row: p for p in batch}.values())
        buffer = self.buffer
        dtype = buffer.dtype

        def cast(t: Tensor) -> Tensor:
            return t if t.dtype == dtype else t.to(dtype)

        lengths = {p.per_sample.shape[0] for p in batch}
        if len(lengths) == 1 and 0 not in lengths:  # (the same batch size everywhere: one (layers, n) matrix)
            per_sample = torch.stack([cast(p.per_sample) for p in batch])
            mean, largest, fro = per_sample.mean(1), per_sample.amax(1), torch.linalg.vector_norm(per_sample, dim=1)
        else:
            zero = buffer.new_zeros(())
            per = [cast(p.per_sample) for p in batch]
            mean = torch.stack([v.mean() if v.numel() else zero for v in per])
            largest = torch.stack([v.amax() if v.numel() else zero for v in per])
            fro = torch.stack([torch.linalg.vector_norm(v) for v in per])
        counts = self._nan[: len(batch)]
        if 0 in lengths:  # a batch of 0 rows: its count is 0, read by the host as "no statistics"
            counts = torch.tensor([math.nan if p.per_sample.numel() else 0.0 for p in batch], dtype=dtype).to(
                buffer.device
            )
        layers = len(batch)
        norms = [cast(p.bias_norm) for p in batch] + [
            self._minus_one if p.weight_norm is None else cast(p.weight_norm) for p in batch
        ]
        norms = torch.stack(norms).view(2, layers)
        gen = self._gen.expand(layers)
        columns = [norms[0], norms[1], mean, largest, fro, counts, gen]  # DELTA_NORM … GEN
        block = torch.stack(columns, dim=1)
        key = tuple(p.row for p in batch)
        rows = self._rows.get(key)
        if rows is None or rows.device != buffer.device:
            rows = self._rows[key] = torch.tensor(key, device=buffer.device)
        self._columns.index_copy_(0, rows, block)

    def next_generation(self, gen: int) -> None:
        """The next recorded step's records carry ``gen`` (one device write, after a step that may have recorded)."""
        self._gen.fill_(float(gen))

    def snapshot(self, scale: Tensor | None) -> Tensor:
        """A copy of the records with a GradScaler's ``scale`` divided out of the norm columns (on the device)."""
        snapshot = self.buffer.clone()
        if scale is not None:  # the columns DELTA_NORM … FRO are norms: they scale with the loss
            snapshot[:-1, : FRO + 1] /= scale.to(snapshot.dtype)
        return snapshot


class LayerSlot:
    """A monitored Linear's row in :class:`Records`; its backward calls :meth:`record`.

    ``on_backward(delta)`` tells the monitor a backward pass reached the layer and returns that pass's
    plan (:class:`torchbp.monitor.schedule.StepPlan`): the slot writes nothing when the plan records
    nothing. ``flow`` is the monitor's :class:`torchbp.monitor.dataflow.DataFlow`.
    """

    def __init__(
        self,
        records: Records,
        flow,
        name: str,
        row: int,
        per_sample_norms: bool,
        on_backward: Callable,
        finite: Finiteness | None = None,
    ):
        self.records = records
        self.finite = finite  # (the finiteness flags, written on every backward pass, recorded or not)
        self.flow = flow
        self.name = name
        self.row = row
        self.needs_input = per_sample_norms  # per-sample gradient norms need a^{l-1}
        self.on_backward = on_backward

    def __reduce__(self):  # a copied or pickled model is not monitored
        return (_none, ())

    @property
    def discovering(self) -> bool:
        return self.flow.discovering

    def record(self, delta: Tensor, input: Tensor | None, grad_weight: Tensor | None, grad_bias: Tensor | None):
        """Called by LinearFunction.backward with δ^l = ∂C/∂z^l and the gradients it computed."""
        records = self.records
        if torch.compiler.is_compiling():  # traced into the compiled backward: the tensor ops only
            if self.finite is not None:
                self.finite.add(self.row, delta, input, grad_weight, grad_bias)
            buffer = records.buffer
            layer_record(delta, grad_weight, grad_bias, buffer[-1, 0], buffer[self.row, :DEAD], records.with_vectors)
            self._record_vector(delta, grad_bias)
            return
        if _torch_private.is_functorch_wrapped(delta):
            return  # inside a torch.func transform: not a backward pass
        plan = self.on_backward(delta)
        with _no_grad():
            d = delta.detach() if delta.requires_grad else delta
            if self.finite is not None:
                self.finite.follow(d)
                self.finite.add(self.row, d, input, grad_weight, grad_bias)
            if not plan.record:
                return  # (a step the schedule armed for but does not record: several backward passes per step)
            delta_norms = None
            if records.with_vectors:  # (global statistics also need the sample count)
                gen, row, _ = records.views[self.row]
                layer_record(d, grad_weight, grad_bias, gen, row, count=True)
            else:  # (written with the other layers' at the end of the backward pass)
                delta_norms = records.add(self.row, d, grad_weight, grad_bias)
            self._record_vector(d, grad_bias)
            if self.needs_input:
                per_sample = _per_sample_grad_norms(d, input.detach(), grad_bias is not None, delta_norms)
                records.per_sample[self.name] = per_sample
            if plan.histogram:
                records.hists[self.name] = _histogram(d)

    def _record_vector(self, delta: Tensor, grad_bias: Tensor | None) -> None:
        """Global statistics need Σ_n δ_n itself (its norm is not additive over ranks)."""
        vectors = self.records.vectors
        if vectors is not None:
            bias_grad = grad_bias if grad_bias is not None else delta.reshape(-1, delta.shape[-1]).sum(0)
            start = self.records.vector_at[self.row]
            vectors[start : start + bias_grad.shape[0]].copy_(bias_grad)

    def record_relu(self, a: Tensor) -> None:
        """Called by the backward of the ReLU applied to this layer's output z, with a = relu(z)."""
        records = self.records
        compiling = torch.compiler.is_compiling()
        if not compiling and _torch_private.is_functorch_wrapped(a):
            return
        with _no_grad():
            a = a.detach() if a.requires_grad else a
            if compiling:
                dead_record(a, records.buffer[-1, 0], records.buffer[self.row, DEAD:])
            else:
                if not self.on_backward(None).record:
                    return
                gen, _, row = records.views[self.row]
                dead_record(a, gen, row)
            if records.vectors is not None:
                start = records.vector_at[self.row] + records.widths[self.row]
                rows = a.reshape(-1, a.shape[-1])
                alive = rows.amax(0) if rows.shape[0] else rows.new_zeros(rows.shape[1])
                records.vectors[start : start + alive.shape[0]].copy_(alive != 0)

    def consumes(self, producer: LayerSlot | None) -> None:
        """This layer reads ``producer``'s output through element-wise operations (known without the graph)."""
        if producer is not None and producer.flow is self.flow:
            self.flow.add(producer.row, self.row)

    def discover(self, input: Tensor) -> None:
        """In an eager forward: the monitored Linears whose output reaches this layer's input through
        element-wise operations only are its producers; this layer is their consumer (for delta_gain)."""
        for producer in self.flow.producers(input.grad_fn):
            self.flow.add(producer.row, self.row)


def finite_sums(
    delta: Tensor, input: Tensor | None, grad_weight: Tensor | None, grad_bias: Tensor | None, zero: Tensor
) -> Tensor:
    r"""Four sums, one per tensor of :data:`NONFINITE_TENSORS`, each non-finite when that tensor is (or 0 where the
    tensor was not computed): a sum holds a NaN or Inf of any of its terms (NaN + x, Inf − Inf and 0 · Inf are NaN).

    - ∂C/∂b: Σ_j (∂C/∂b)_j, a pass over the bias gradient (``out`` values) only;
    - δ: Σ_nj δ_nj, which is the same sum (BP3: ∂C/∂b = Σ_n δ_n): with a bias, no pass over δ of its own;
    - a^{l-1} and ∂C/∂W (where the weight gradient was computed, so the input was kept): with the row sums
      u_n = Σ_i δ_ni and t_n = Σ_j a_nj (one pass over δ, one over a), Σ_n t_n for the input and
      Σ_ij (∂C/∂W)_ij = Σ_n u_n t_n for the weight gradient (BP4), without a pass over W. A NaN in a row of a
      whose δ row is 0 (a padded row a loss ignores) is caught: 0 · NaN = NaN.

    Sums are accumulated in float32 for half-precision tensors (whose sums would overflow at 65504)."""
    acc = _ACCUMULATE.get(delta.dtype)
    if grad_bias is not None:
        bias = grad_bias.sum(dtype=acc)
    if grad_weight is not None and input is not None:
        u = delta.sum(-1, dtype=acc).reshape(-1)  # (a pass over δ)
        t = input.sum(-1, dtype=acc).reshape(-1).to(u.dtype)  # (a pass over a)
        d = bias if grad_bias is not None else u.sum()
        values = [d, t.sum(), torch.dot(u, t), bias if grad_bias is not None else zero.to(u.dtype)]
    elif grad_bias is not None:
        values = [bias, zero.to(bias.dtype), zero.to(bias.dtype), bias]
    else:
        d = delta.sum(dtype=acc)
        values = [d, zero.to(d.dtype), zero.to(d.dtype), zero.to(d.dtype)]
    return torch.stack(values)


class Finiteness:
    """Where each layer's tensors first went non-finite: the device buffers every backward pass writes.

    ``sums`` (layers, 4): the :func:`finite_sums` of the current backward pass (added to, so a layer called
    twice keeps both calls'); ``births`` (layers, 4): the number of the backward pass in which each layer's
    tensor first held a non-finite value (−1: never), updated at the end of each backward pass from ``sums``
    and ``pass_number`` with a few tensor ops, without a host sync. With a GradScaler the verdict on a pass
    waits for the next one (or :meth:`settle`): a pass after which the scale fell was an overflow the scaler
    skipped, counted in ``skipped``, not a birth."""

    def __init__(self, layers: int, device: torch.device) -> None:
        self.layers = layers
        self._make(device)

    def _make(self, device: torch.device, old: Finiteness | None = None) -> None:
        self.sums = torch.zeros(self.layers, len(NONFINITE_TENSORS), dtype=torch.float64, device=device)
        self.births = torch.full((self.layers, len(NONFINITE_TENSORS)), -1, dtype=torch.int64, device=device)
        self.pass_number = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        if old is not None:
            for name in ("births", "pass_number", "skipped"):
                getattr(self, name).copy_(getattr(old, name).to(device))
        self.rows = list(self.sums)  # (each layer's row, a view)
        self.pending: tuple[Tensor, Tensor, Tensor] | None = None  # (bad, scale, pass) awaiting the scaler's verdict

    def follow(self, delta: Tensor) -> None:
        """The model moved to another device: follow it."""
        if delta.device != self.sums.device:
            old = Finiteness.__new__(Finiteness)
            old.__dict__.update(self.__dict__)
            self._make(delta.device, old)

    def add(self, row: int, delta: Tensor, input, grad_weight, grad_bias) -> None:
        if torch.compiler.is_compiling():
            self.rows[row].add_(finite_sums(delta, input, grad_weight, grad_bias, self.zero))
            return
        with _no_grad():
            self.rows[row].add_(finite_sums(delta, input, grad_weight, grad_bias, self.zero))

    def end_of_backward(self, next_pass: int, scale: Tensor | None) -> Tensor:
        """Fold this backward pass's sums into ``births``; returns the mask of the tensors born non-finite now."""
        bad = torch.isfinite(self.sums).logical_not_()
        self.sums.zero_()
        if scale is None:
            new = bad.logical_and_(self.births < 0)
            self.births.masked_fill_(new, self.pass_number)
        else:
            new = self.settle(scale)
            self.pending = (bad, scale.detach().clone(), self.pass_number.clone())
        self.pass_number.fill_(next_pass)
        return new

    def settle(self, scale: Tensor | None) -> Tensor:
        """With a GradScaler: the verdict on the pass awaiting one (its scale fell since: skipped, else a birth)."""
        if self.pending is None:
            return torch.zeros_like(self.births, dtype=torch.bool)
        bad, before, number = self.pending
        self.pending = None
        skipped = scale.to(before.dtype) < before if scale is not None else torch.zeros((), dtype=torch.bool)
        skipped = skipped.to(bad.device)
        self.skipped.add_((bad.any() & skipped).to(torch.int64))
        new = bad.logical_and_(skipped.logical_not()).logical_and_(self.births < 0)
        self.births.masked_fill_(new, number)
        return new


class FiniteSlot:
    """A monitored layer's slot on the backward passes that record nothing: :meth:`record` writes the layer's
    :func:`finite_sums` (tensor ops, eager and compiled, no host sync) and nothing else; the rest of the slot
    interface does nothing."""

    needs_input = False
    discovering = False

    def __init__(self, finite: Finiteness, row: int) -> None:
        self.finite = finite
        self.row = row

    def __reduce__(self):  # a copied or pickled model is not monitored
        return (_none, ())

    def record(self, delta: Tensor, input: Tensor | None, grad_weight: Tensor | None, grad_bias: Tensor | None):
        if not torch.compiler.is_compiling() and _torch_private.is_functorch_wrapped(delta):
            return  # inside a torch.func transform: not a backward pass
        if not torch.compiler.is_compiling():
            self.finite.follow(delta)
        self.finite.add(self.row, delta, input, grad_weight, grad_bias)

    def record_relu(self, a: Tensor) -> None:
        pass

    def consumes(self, producer) -> None:
        pass

    def discover(self, input: Tensor) -> None:
        pass


class ReLUSlot:
    """A torchbp.nn.ReLU's memory of the monitored Linear it follows, for compiled runs (see functional._relu)."""

    def __init__(self) -> None:
        self.target: LayerSlot | None = None

    def __reduce__(self):
        return (_none, ())


def _none() -> None:
    return None

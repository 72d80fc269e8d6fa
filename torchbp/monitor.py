r"""Watch error propagation: the per-layer error δ^l = ∂C/∂z^l, recorded where backward holds it.

δ^l is the ``grad_output`` that :class:`torchbp.functional.LinearFunction`'s hand-written backward
receives. A :class:`DeltaMonitor` gives each :class:`torchbp.nn.Linear` of a model a *tap*, a small
callable that the backward calls with δ^l, a^{l-1} and the BP3/BP4 gradients it has just computed.
The tap reduces them to a few numbers on δ's device (no host sync); at the end of each backward pass
the monitor derives the gains between layers and, on logging steps only, copies everything to the
host in one transfer and writes it to TensorBoard.

No module backward hooks are used, and no second backward pass. Without a monitor the taps are
``None`` and cost nothing.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import _events, functional
from .nn import Linear

__all__ = ["DeltaMonitor", "STATS"]

#: The statistics recorded for each layer and backward pass, with their TensorBoard tag prefix.
STATS = {
    "delta_norm": "‖Σ_n δ_n‖, the norm of the bias gradient ∂C/∂b (BP3): the layer's speed of learning",
    "delta_sample_norm_mean": "mean over samples n of ‖δ_n‖",
    "delta_sample_norm_max": "max over samples n of ‖δ_n‖",
    "weight_grad_norm": "‖∂C/∂W‖ (BP4)",
    "delta_gain": "‖δ^l‖ / ‖δ^{l+1}‖ (Frobenius norms over the batch) to the Linear after it; <1 vanishing, >1 exploding",
    "dead_fraction": "for a layer followed by ReLU: fraction of units with σ'(z) = 0 for every sample",
    "delta_nonfinite": "1 if δ held a NaN or Inf, else 0",
}


def _wrapped(t: Tensor) -> bool:
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def _norm(t: Tensor, dim: int | None = None) -> Tensor:
    """‖t‖ (over ``dim``, or Frobenius); in float32 for half-precision t, whose norms overflow at 65504;
    a whole-tensor float32/64 norm as the square root of a BLAS dot product, about twice as fast."""
    if dim is None and t.dtype in (torch.float32, torch.float64):
        v = t.reshape(-1)
        return torch.dot(v, v).sqrt()
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(t, dim=dim, dtype=dtype)


class _LayerTap:
    """Called by LinearFunction.backward (and the ReLU after the layer) with what backward holds."""

    def __init__(self, monitor: DeltaMonitor, name: str) -> None:
        self.monitor = monitor
        self.name = name
        self.dead: Tensor | None = None

    def relu_output(self, a: Tensor) -> None:
        """From the ReLU applied to this layer's output ``a``, shape (*, out): a unit is dead when
        σ'(z) = 0 for every sample, i.e. its largest activation over the samples is 0 (NaN is not)."""
        if _wrapped(a):
            return
        a = a.detach().reshape(-1, a.shape[-1])
        self.dead = a.amax(0) if a.shape[0] else a.new_zeros(a.shape[1])  # dead where 0 (host side)

    @torch.no_grad()
    def __call__(self, delta: Tensor, input: Tensor, grad_weight: Tensor | None, grad_bias: Tensor | None) -> None:
        if _wrapped(delta):  # inside torch.func / torch.compile: not a real backward pass
            return
        d = delta.detach()
        n = d.shape[0] if d.dim() > 1 else 1
        per_sample = _norm(d if d.dim() == 2 else d.reshape(n, -1), dim=1)  # ‖δ_n‖
        bias_grad = grad_bias if grad_bias is not None else d.reshape(-1, d.shape[-1]).sum(0)  # BP3
        # The reductions over δ and ∂C/∂W happen here, in backward; the statistics that follow from
        # the small tensors kept (per-sample norms, dead units) are finished on the host when read (_to_host).
        stats = {
            "delta_norm": _norm(bias_grad, dim=0),
            "weight_grad_norm": None if grad_weight is None else _norm(grad_weight),
            "_per_sample": per_sample,
            "_dead": self.dead,
        }
        self.dead = None
        per_sample_grads = None
        if self.monitor.per_sample_norms:
            per_sample_grads = _per_sample_grad_norms(d, input.detach(), per_sample, grad_bias is not None)
        self.monitor._record(self.name, stats, per_sample_grads)
        if self.monitor.histogram_due:
            self.monitor._hists[self.name] = _histogram(d)


HISTOGRAM_BINS = 64


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


def _per_sample_grad_norms(delta: Tensor, a: Tensor, delta_norms: Tensor, has_bias: bool) -> dict[str, Tensor | None]:
    r"""‖∂C_n/∂W‖ and ‖∂C_n/∂b‖ per sample n, from BP4's rank-1 structure, without per-sample gradients.

    For 2-D inputs ∂C_n/∂W = δ_n a_n^T, so ‖∂C_n/∂W‖ = ‖δ_n‖ ‖a_n‖. For (N, T, in) inputs
    ∂C_n/∂W = Σ_t δ_nt a_nt^T, and ‖·‖² = Σ_{t,s} (δ_nt·δ_ns)(a_nt·a_ns), the sum of the product of the
    two Gram matrices (or the explicit (out, in) sum when that is smaller than T×T).
    """
    if delta.dim() <= 2:
        a_norms = torch.linalg.vector_norm(a.reshape(delta_norms.shape[0], -1), dim=1)
        return {"weight": delta_norms * a_norms, "bias": delta_norms if has_bias else None}
    n = delta.shape[0]
    d3 = delta.reshape(n, -1, delta.shape[-1])
    a3 = a.reshape(n, -1, a.shape[-1]).to(d3.dtype)
    t = d3.shape[1]
    if t * t <= d3.shape[2] * a3.shape[2]:
        sq = ((d3 @ d3.mT) * (a3 @ a3.mT)).sum((1, 2))
    else:
        sq = (d3.mT @ a3).square().sum((1, 2))
    bias = torch.linalg.vector_norm(d3.sum(1), dim=1) if has_bias else None
    return {"weight": sq.clamp_min(0).sqrt(), "bias": bias}


class DeltaMonitor:
    r"""Records δ^l = ∂C/∂z^l of every :class:`torchbp.nn.Linear` of a model on every backward pass.

    For each layer and backward pass it computes, on δ's device and without a host sync:

    ============================  ===================================================================
    TensorBoard tag               value
    ============================  ===================================================================
    ``delta_norm/<layer>``        ‖Σ_n δ_n‖ = ‖∂C/∂b‖ (BP3), Nielsen's speed of learning of the layer
    ``delta_sample_norm_mean/…``  mean over samples of ‖δ_n‖
    ``delta_sample_norm_max/…``   max over samples of ‖δ_n‖
    ``weight_grad_norm/…``        ‖∂C/∂W‖ (BP4)
    ``delta_gain/…``              ‖δ^l‖ / ‖δ^{l+1}‖, Frobenius norms over the batch, where l+1 is the
                                  Linear whose backward ran just before (the next layer of an MLP);
                                  < 1 vanishing, > 1 exploding; absent for the output layer
    ``dead_fraction/…``           for a layer whose output goes straight into a torchbp ReLU: the
                                  fraction of units whose σ'(z) was 0 for every sample
    ``delta_nonfinite/…``         1 if δ held a NaN or Inf, else 0
    ============================  ===================================================================

    ``<layer>`` is the module's qualified name in the model (``"0"``, ``"encoder.fc1"``). A *step*
    is one backward pass that reaches a monitored layer (``loss.backward()`` or
    ``torch.autograd.grad``); :attr:`step` counts them from 0.

    Logging. With ``log`` set, the scalars of every ``every``-th step are written in one event and the
    file is flushed right away, so every finished log interval is on disk even if the process is
    killed. Histograms of δ per layer (tag ``delta/<layer>``) are written every ``histogram_every``
    steps. A custom-scalars layout draws all layers' ``delta_norm`` in one chart. On logging steps
    the values are copied to the host in one transfer; other steps never synchronise.

    Args:
        model: a module containing :class:`torchbp.nn.Linear` layers (built with them or converted by
            :func:`torchbp.convert`).
        log: a log directory (created if needed), a ``torch.utils.tensorboard.SummaryWriter``, or
            ``None`` to only record (see :meth:`latest`). Default: ``None``.
        every: log every this many steps. Default: ``1``.
        histogram_every: write δ histograms every this many steps; ``0`` for never. Default:
            ``10 * every``.
        per_sample_norms: also compute each sample's weight- and bias-gradient norm (see
            :meth:`per_sample_grad_norms`). Default: ``False``.

    Example::

        >>> model = torch.nn.Sequential(torchbp.nn.Linear(4, 8), torchbp.nn.ReLU(), torchbp.nn.Linear(8, 3))
        >>> with torchbp.DeltaMonitor(model, log="runs/example") as monitor:
        ...     torchbp.nn.CrossEntropyLoss()(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
        >>> sorted(monitor.latest())
        ['0', '2']

    Limitations: only eager backward passes are recorded; code compiled with ``torch.compile`` and
    ``torch.func`` transforms run without the taps. A layer called several times in one forward is
    recorded once per call; :meth:`latest` keeps the last call's values.
    """

    def __init__(
        self,
        model: nn.Module,
        log: str | os.PathLike | Any | None = None,
        every: int = 1,
        histogram_every: int | None = None,
        per_sample_norms: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"DeltaMonitor: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"DeltaMonitor: every must be a positive int, got {every!r}")
        histogram_every = 10 * every if histogram_every is None else histogram_every
        if not isinstance(histogram_every, int) or histogram_every < 0:
            raise ValueError(f"DeltaMonitor: histogram_every must be an int >= 0, got {histogram_every!r}")
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
        if not self.layers:
            plain = [name or "<model>" for name, m in model.named_modules() if isinstance(m, nn.Linear)]
            hint = (
                f"; it has torch.nn.Linear layers ({', '.join(plain[:5])}): call torchbp.convert(model) first"
                if plain
                else "; build the model with torchbp.nn.Linear or call torchbp.convert(model)"
            )
            raise ValueError(f"DeltaMonitor: found no torchbp.nn.Linear in {type(model).__name__}{hint}")
        self.every = every
        self.histogram_every = histogram_every
        self.per_sample_norms = bool(per_sample_norms)
        self.step = -1  # index of the current (or last) backward pass
        self.writer, self._owns_writer = None, False
        self._layout_written = False
        self._records: dict[str, dict[str, Tensor | None]] = {}
        self._order: list[str] = []
        self._per_sample: dict[str, dict[str, Tensor | None]] = {}
        self._hists: dict[str, Tensor | None] = {}
        self._last: dict[str, dict[str, Tensor | None]] = {}
        self._last_order: list[str] = []
        self._finished: dict[str, dict[str, Any]] | None = None
        self._task = None
        self._attached = False
        self.attach()
        try:
            self.writer, self._owns_writer = _open_writer(log)
        except BaseException:
            self.detach()
            raise

    # -- attaching ---------------------------------------------------------------------------------

    def attach(self) -> DeltaMonitor:
        """Give every monitored layer its tap (done by the constructor)."""
        if not self._attached:
            taken = [name for name, layer in self.layers.items() if layer in functional._taps]
            if taken:
                raise RuntimeError(
                    f"DeltaMonitor: layer {taken[0]!r} is already monitored; close the other monitor first"
                )
            for name, layer in self.layers.items():
                functional._taps[layer] = _LayerTap(self, name)
            self._attached = True
        return self

    def detach(self) -> None:
        """Remove the taps: the model runs exactly as without a monitor."""
        if self._attached:
            for layer in self.layers.values():
                functional._taps.pop(layer, None)
            self._attached = False

    def close(self) -> None:
        """Detach, flush the writer, and close it if the monitor opened it."""
        self.detach()
        if self.writer is not None:
            self.writer.flush()
            if self._owns_writer:
                self.writer.close()

    def __enter__(self) -> DeltaMonitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- recording (called from backward) ------------------------------------------------------------

    def _record(self, name: str, stats: dict[str, Tensor | None], per_sample: dict | None) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # first monitored layer of a new backward pass
            self._task = task
            self.step += 1
            self._records, self._order, self._per_sample, self._hists = {}, [], {}, {}
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if name not in self._records:
            self._order.append(name)
        self._records[name] = stats
        if per_sample is not None:
            self._per_sample[name] = per_sample

    @property
    def histogram_due(self) -> bool:
        """Whether the backward pass under way writes histograms."""
        return self.writer is not None and self.histogram_every > 0 and self._pending_step() % self.histogram_every == 0

    def _pending_step(self) -> int:
        return self.step if torch._C._current_graph_task_id() == self._task else self.step + 1

    def _end_of_backward(self) -> None:
        self._last, self._last_order, self._finished = self._records, self._order, None
        self._task = None
        if self.writer is not None and (self.step % self.every == 0 or self._hists):
            self._write(self.step, scalars=self.step % self.every == 0)

    # -- reading -------------------------------------------------------------------------------------

    def latest(self) -> dict[str, dict[str, float | None]]:
        """The last backward pass's statistics per layer (qualified name -> {stat: value}).

        Keys are those of :data:`STATS`; ``delta_nonfinite`` is a bool, and a value that does not
        apply (the output layer's gain, dead units of a layer not followed by ReLU, the weight
        gradient of a frozen weight) is ``None``. Reading synchronises with the device once.
        """
        if self._finished is None:
            self._finished, _ = self._to_host({})
        return {layer: dict(stats) for layer, stats in self._finished.items()}

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
        loss as it was reduced (a ``'mean'`` loss carries its 1/N). Needs ``per_sample_norms=True``.
        """
        if not self.per_sample_norms:
            raise RuntimeError("DeltaMonitor: per-sample norms are off; create the monitor with per_sample_norms=True")
        return dict(self._per_sample)

    def _to_host(self, hists: dict[str, Tensor | None]) -> tuple[dict[str, dict[str, Any]], list[list[float]]]:
        """Copy what backward kept to the host in one transfer and finish the statistics there.

        Backward kept, per layer, ‖∂C/∂b‖, ‖∂C/∂W‖, the per-sample norms ‖δ_n‖ and the dead-unit mask:
        the mean, max, ‖δ‖, gain, dead fraction and non-finite flag follow from them in a few numpy
        operations, cheaper than as many small device ops. Returns the statistics and the histograms.
        """
        pieces, sizes = [], []
        for name in self._last_order:
            raw = self._last[name]
            parts = [raw["delta_norm"].reshape(1)]
            if raw["weight_grad_norm"] is not None:
                parts.append(raw["weight_grad_norm"].reshape(1))
            parts.append(raw["_per_sample"])
            if raw["_dead"] is not None:
                parts.append(raw["_dead"])
            pieces += parts
            sizes.append([p.numel() for p in parts])
        hist_list = [h for h in hists.values() if h is not None]
        if not pieces and not hist_list:
            return {}, []
        flat = torch.cat([p.detach() for p in pieces + hist_list]).cpu().double().numpy()  # the one transfer
        stats: dict[str, dict[str, Any]] = {}
        at, previous = 0, None
        for name, layer_sizes in zip(self._last_order, sizes):
            raw = self._last[name]
            delta_norm = flat[at]
            at += 1
            weight_norm = None
            if raw["weight_grad_norm"] is not None:
                weight_norm, at = float(flat[at]), at + 1
            n = layer_sizes[len(layer_sizes) - (2 if raw["_dead"] is not None else 1)]
            per_sample, at = flat[at : at + n], at + n
            dead = None
            if raw["_dead"] is not None:
                out = layer_sizes[-1]
                dead, at = int((flat[at : at + out] == 0).sum()) / out if out else 0.0, at + out
            squares = float(per_sample.dot(per_sample))
            fro = math.sqrt(squares) if squares == squares else squares  # ‖δ‖ over the batch
            if previous is None:
                gain = None
            else:
                gain = fro / previous if previous else (math.nan if fro == 0 or fro != fro else math.inf)
            stats[name] = {
                "delta_norm": float(delta_norm),
                "delta_sample_norm_mean": float(per_sample.sum()) / n if n else 0.0,
                "delta_sample_norm_max": float(per_sample.max()) if n else 0.0,
                "weight_grad_norm": weight_norm,
                "delta_gain": gain,
                "dead_fraction": dead,
                # A NaN or Inf anywhere in δ reaches its norm (as does an overflow, |δ| > 1e19 in float32).
                "delta_nonfinite": not math.isfinite(fro),
            }
            previous = fro
        width = 6 + HISTOGRAM_BINS
        histograms = [flat[at + k * width : at + (k + 1) * width].tolist() for k in range(len(hist_list))]
        return stats, histograms

    def _write(self, step: int, scalars: bool = True) -> None:
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        hists, self._hists = self._hists, {}
        self._finished, histograms = self._to_host(hists)
        values = []
        if scalars:
            for layer, stats in self._finished.items():
                values += [(f"{stat}/{layer}", float(v)) for stat, v in stats.items() if v is not None]
        histos = []
        for layer, h in zip([k for k, v in hists.items() if v is not None], histograms):
            (mn, mx, total, squares, lo, hi), counts = h[:6], h[6:]
            width = (hi - lo) / HISTOGRAM_BINS
            proto = HistogramProto(
                min=mn,
                max=mx,
                num=sum(counts),
                sum=total,
                sum_squares=squares,
                bucket_limit=[lo + width * (i + 1) for i in range(HISTOGRAM_BINS)],
                bucket=counts,
            )
            histos.append(Summary.Value(tag=f"delta/{layer}", histo=proto))
        if not self._layout_written:
            self.writer.add_custom_scalars(
                {"torchbp": {"delta_norm: ‖∂C/∂b‖ per layer": ["Multiline", [r"delta_norm/.*"]]}}
            )
            self._layout_written = True
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values] + histos)
        self.writer._get_file_writer().add_summary(summary, step)
        self.writer.flush()  # the flush policy: each logged step is on disk before training goes on
        bad = [layer for layer, stats in self._finished.items() if stats["delta_nonfinite"]] if scalars else []
        if bad:
            warnings.warn(f"DeltaMonitor: δ is not finite at step {step}, first in layer {bad[0]!r}", stacklevel=2)


def _open_writer(log):
    if log is None:
        return None, False
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

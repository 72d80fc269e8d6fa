r"""Watch error propagation: the per-layer error δ^l = ∂C/∂z^l, recorded where backward holds it.

δ^l is the ``grad_output`` that :class:`torchbp.functional.LinearFunction`'s hand-written backward
receives. A :class:`DeltaMonitor` gives each :class:`torchbp.nn.Linear` of a model a *slot*, for the
backward passes whose statistics it logs: the backward reduces δ^l and the BP3/BP4 gradients it has
just computed to a fixed-size record with tensor ops and writes it into a small buffer in place. The same
code runs eager and under ``torch.compile``; nothing synchronises with the device until a logged step
copies the buffer out. On the other steps the layers get a finiteness slot (:class:`records.FiniteSlot`) and
run exactly as without a monitor, plus one finiteness flag per layer: where a NaN or Inf was born is known on
every step.

The package, one job per module:

- :mod:`torchbp.monitor.records`: the records written in backward (tensor math behind the slot interface)
- :mod:`torchbp.monitor.schedule`: which step is recorded and logged, the step axis
- :mod:`torchbp.monitor.dataflow`: the data flow between layers (for the gains)
- :mod:`torchbp.monitor.host`: the host side: the copy, the statistics table, the bounded history, events
- :mod:`torchbp.monitor.writer`: opening the event writer, and the sink events go to
- :mod:`torchbp.monitor.ranks`: the merge across ranks
- this module: :class:`DeltaMonitor`, the facade (configuration, attach/detach, reading)
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..names import ROOT_NAME, Nonfinite
from ..nn import ReLU, is_monitored_layer
from . import host, options, ranks, writer
from .backward import Backward
from .dataflow import DataFlow
from .host import BATCH_S, MAX_HISTORY, HostSide, Layout
from .owners import _Hook, _monitors_of, _owner, _owners, _replace, _replacements, _unwrap, monitor_of
from .records import (  # noqa: F401 (the record's columns, re-exported)
    COLUMNS,
    DEAD,
    DEAD_GEN,
    DELTA_NORM,
    FRO,
    GEN,
    HISTOGRAM_BINS,
    NONFINITE_TENSORS,
    NONFINITE_WORDS,
    STATS,
    WEIGHT_NORM,
    Finiteness,
    FiniteSlot,
    LayerSlot,
    Records,
    ReLUSlot,
    _norm,
    dead_record,
    layer_record,
)
from .schedule import Schedule

__all__ = ["DeltaMonitor", "monitor_of", "Nonfinite", "STATS", "layer_record", "dead_record", "BATCH_S", "MAX_HISTORY"]


def _monitored_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a monitor records, by qualified name, in model order: every :class:`torchbp.nn.Linear`; the
    model itself, if it is one, named :data:`ROOT_NAME`."""
    layers = {name: m for name, m in model.named_modules() if is_monitored_layer(m)}
    if "" in layers:
        root = ROOT_NAME
        while root in layers:  # (a child of that name: never in a real model)
            root = "_" + root
        layers = {(name or root): m for name, m in layers.items()}
    return layers


def _out_features(layer: nn.Module) -> int:
    """The width of a monitored layer's output z (every monitored layer has ``out_features``)."""
    return int(layer.out_features)


class DeltaMonitor:
    r"""Records δ^l = ∂C/∂z^l of every :class:`torchbp.nn.Linear` of a model, on the steps it logs.

    For each layer and logged step, the hand-written backward computes (on δ's device, with tensor ops,
    eager or compiled, without a host sync):

    ============================  ===================================================================
    TensorBoard tag               value
    ============================  ===================================================================
    ``delta_norm/<layer>``        ‖Σ_n δ_n‖ = ‖∂C/∂b‖ (BP3), Nielsen's speed of learning of the layer
    ``delta_fro/…``               ‖δ‖ over the whole batch (Frobenius, √Σ_n ‖δ_n‖²)
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

    ``<layer>`` is the module's qualified name in the model (``"0"``, ``"encoder.fc1"``). Layers are
    listed in reverse model order (the output layer first: backward order, for a sequential model).

    **Steps.** A backward pass that reaches a monitored layer (``loss.backward()`` or
    ``torch.autograd.grad``) has a step number: by default they count backward passes from 0; with
    ``step=`` (the one documented way to follow your own counter, e.g. ``step=lambda: trainer.global_step``
    or the number of optimizer steps) it is that callable's value when the backward pass begins, so δ
    charts share their x-axis with your loss. :attr:`step` is the last backward pass's number. Step ``s`` is
    logged when ``s % every == 0``. **Gradient accumulation** (several backward passes with the same step):
    the first backward pass of a logged step is recorded and logged; the others of that step record
    nothing. A backward pass run inside another one (a reentrant ``torch.utils.checkpoint``'s) belongs to
    the step of the one enclosing it. :attr:`every`, :attr:`histogram_every` and :attr:`image_every` can
    be set after construction (from the next forward pass). A layer replaced or added after attaching is
    not monitored, with one warning naming it: make a new monitor after changing the model.

    **Free when not logging, but for a finiteness flag.** Only a backward pass that is logged (or writes
    histograms) computes statistics: for the others the layers' forward and backward are exactly those of
    an unmonitored model, plus one finiteness flag per layer (what else remains is a hook per monitored
    parameter that counts the pass). **Every** backward pass checks each layer's δ, ∂C/∂W, ∂C/∂b and input
    for a NaN or Inf (a few sums written into a device buffer, no host sync; read at the next logged step,
    :meth:`flush`, :meth:`close` or :meth:`nonfinite`): :meth:`nonfinite` and :attr:`first_nonfinite` name
    the step, layer and tensor where it was born, logged or not, and the log holds it (``nonfinite/<layer>``).
    :meth:`latest` and :meth:`per_sample_grad_norms` read the last logged step.

    **Compiled models.** The statistics are tensor ops in the backward, so ``torch.compile`` (also with
    ``fullgraph=True``) compiles them into the backward graph. A logged and an unlogged step run two
    compiled graphs (with and without the records), each compiled once and cached: no recompilation
    after the first of each. Attaching a monitor to a compiled model, or closing it, changes what the
    layers' forward reads, so the next call recompiles once. The data flow between layers (for
    ``delta_gain`` and ``dead_fraction``) is read from the autograd graph of the eager forward passes before
    the first backward pass ends (forward passes recomputed by activation checkpointing included): until
    then, ``torch.compile`` runs eagerly (its stance is ``"force_eager"``), then compiles as usual. δ histograms are recorded in eager backward passes only.
    With a step callable, see :mod:`torchbp.monitor.schedule` for when a compiled model is armed.

    **Logging.** With ``log`` set, the statistics of every logged step are copied to the host
    (non-blocking, into pinned memory, on CUDA); their events are built in batches and written by a
    background thread. Flush policy: each logged step is handed to the operating system within about
    0.25 s (it then survives the process being killed), and all of them by :meth:`flush`, :meth:`close` or
    normal interpreter exit. Histograms of δ per layer (tag ``delta/<layer>``) are written every
    ``histogram_every`` steps; a picture of δ per layer and step (the δ map, tag ``delta_map``) every
    ``image_every`` steps, but no sooner after the last one than keeps its drawing (matplotlib, ~0.2 s) under
    1% of the time (``torchbp.monitor.host.IMAGE_SHARE``), and on close. Under ``torch.distributed``, only rank ``log_rank`` writes
    (default 0). :meth:`history` keeps at most ``max_history`` logged steps (evenly spaced over the run, and
    the newest: see :class:`torchbp.monitor.host.History`), so memory is bounded in the run's length.

    **One monitor per log directory, one per model.** TensorBoard shows one run per directory: a monitor whose
    log directory another open monitor of this process writes to (however the path is spelled) fails, saying
    to give each model its own subdirectory; once that one is closed, a new monitor appends to the directory
    (a resumed run). Monitors sharing one ``SummaryWriter`` of the user's may do so when their layer names
    differ. A new monitor on a model (or part of one) that another monitor watches closes that one, with a
    warning naming its log: :func:`monitor_of` finds a model's monitor. A model that is itself the layer (a
    bare :class:`torchbp.nn.Linear`) is named ``model`` in the tags.

    **Copies.** A monitored model can be deep-copied, pickled with ``torch.save`` and wrapped by
    ``torch.optim.swa_utils.AveragedModel``, before and after its first forward pass: the copy is not
    monitored, the original still is.

    Args:
        model: a module containing :class:`torchbp.nn.Linear` layers (built with them or converted by
            :func:`torchbp.convert`); a ``DistributedDataParallel`` or compiled wrapper is unwrapped.
        log: a log directory (created if needed), a ``torch.utils.tensorboard.SummaryWriter``, or
            ``None`` to only record (see :meth:`latest`). Under ``wandb.init(sync_tensorboard=True)`` a
            directory is written through torch's ``SummaryWriter`` (flushed every second), which W&B syncs.
            Default: ``None``.
        every: log (and record) every this many steps. Default: ``10`` with ``log``, ``1`` without (a
            monitor without a log is read with :meth:`latest` after any step).
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
        step: a callable returning the current step number (an int), or ``None`` to count backward
            passes. Default: ``None``.
        max_history: the most logged steps :meth:`history` holds. Default: ``2048``.
        on_error: what a failure to write the logs (a full disk, a deleted log directory, an error of the
            user's SummaryWriter) does: ``"warn"``: one warning naming the directory and the error,
            training goes on, the writer retries with each new batch of events and counts those it could
            not write (:attr:`dropped`; ``flush()`` and ``close()`` warn with the count, and never raise);
            ``"raise"``: the error is raised by the call that finds it (possibly ``backward()``).
            Default: ``"warn"``.
        raise_nonfinite: raise ``FloatingPointError`` at the end of the backward pass in which a NaN or Inf
            was born, naming the tensor, layer and step (reads the flags back every step: a host sync per
            backward pass; eager and compiled). Default: ``False``.

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
        every: int | None = None,
        histogram_every: int | None = None,
        image_every: int | None = None,
        per_sample_norms: bool = False,
        scaler: Any = None,
        global_stats: bool = False,
        log_rank: int | None = 0,
        step: Callable[[], int] | None = None,
        max_history: int = MAX_HISTORY,
        on_error: str = "warn",
        raise_nonfinite: bool = False,
    ) -> None:
        model = _unwrap(model)
        every = options.check(log, every, histogram_every, image_every, max_history, scaler, step)
        layers = _monitored_layers(model)
        options.check_layers(model, layers)
        self.model = model
        self.layers = dict(reversed(layers.items()))  # backward order for a sequential model
        self._names = list(self.layers)
        self._histogram_every = 10 * every if histogram_every is None else histogram_every
        image_every = 100 * every if image_every is None else image_every
        self.per_sample_norms = bool(per_sample_norms)
        self.scaler = scaler
        self.global_stats = bool(global_stats)
        self.rank, self.world_size = ranks.rank_and_world()
        self.max_history = max_history
        self.on_error = options.check_on_error(on_error)
        self._claim = None
        replaced = _monitors_of(self.layers)  # (replaced once the writer is open: a failure here leaves them be)
        self._open(log, log_rank, replaced)  # (the writer first: the histograms' schedule depends on it)
        _replace(replaced)
        self._schedule = Schedule(every, self._histogram_every if self._sink is not None else 0, step)
        widths = [_out_features(layer) for layer in self.layers.values()]
        weights = [layer.weight for layer in self.layers.values()]
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        self._records = Records(widths, dtype, weights[0].device, self.global_stats and self.world_size > 1)
        self._flow = DataFlow(len(self.layers))
        self._backward = Backward(self)  # (what runs during backward)
        self._finite = Finiteness(len(self.layers), weights[0].device)
        self._slots = {
            name: LayerSlot(
                self._records, self._flow, name, row, self.per_sample_norms, self._backward.seen, self._finite
            )
            for row, name in enumerate(self.layers)
        }
        self._finite_slots = {name: FiniteSlot(self._finite, row) for row, name in enumerate(self.layers)}
        self.raise_nonfinite = bool(raise_nonfinite)
        self._host = HostSide(
            Layout(widths, self._records.vector_at, self._flow),
            self._names,
            self._sink,
            self.writer,
            image_every,
            warn_nonfinite=scaler is None,
            on_error=on_error,
        )
        self._host.history = host.History(len(self.layers), max_history)
        if self._claim is not None:
            self._claim.host = self._host
        self._relus: dict[ReLU, ReLUSlot] = {}
        self._attached = False
        self._handles: list[Any] = []
        try:
            self.attach()
        except BaseException:
            if self._owns_writer:
                self.writer.close()  # (nothing was attached: nothing is left behind)
            writer.release_directory(self._claim)
            raise

    def _open(self, log, log_rank, replaced: list[DeltaMonitor]) -> None:
        self.writer, self._owns_writer, self._sink = None, False, None
        if log is not None and (log_rank is None or self.rank == log_rank):
            if log_rank is None and self.world_size > 1 and isinstance(log, (str, os.PathLike)):
                log = os.path.join(os.fspath(log), f"rank{self.rank}")
            owned = isinstance(log, (str, os.PathLike))
            # (one open monitor per directory; those this one replaces give theirs up)
            self._claim = writer.claim_directory(log, self, self._names, owned, replaced)
            try:
                self.writer, self._owns_writer = writer.open_writer(log, self.on_error)
            except BaseException:
                writer.release_directory(self._claim)
                raise
            self._sink = writer._Sink(self.writer, self.on_error)

    # -- the schedule, settable ---------------------------------------------------------------------

    @property
    def every(self) -> int:
        """Log (and record) every this many steps. Settable (an int >= 1): it takes effect from the next forward
        pass (a backward pass whose forward pass has run keeps its plan)."""
        return self._schedule.every

    @every.setter
    def every(self, value: int) -> None:
        self._schedule.every = options.check_count("every", value)
        self._backward.rearm()

    @property
    def histogram_every(self) -> int:
        """Write δ histograms every this many steps (with a log); ``0``: never. Settable, as :attr:`every`."""
        return self._histogram_every

    @histogram_every.setter
    def histogram_every(self, value: int) -> None:
        self._histogram_every = options.check_count("histogram_every", value)
        self._schedule.histogram_every = value if self._sink is not None else 0
        self._backward.rearm()

    @property
    def image_every(self) -> int:
        """Draw the δ map every this many steps; ``0``: only on close. Settable: from the next logged step."""
        return self._host.image_every

    @image_every.setter
    def image_every(self, value: int) -> None:
        self._host.image_every = options.check_count("image_every", value)

    def _log_shown(self) -> str:
        """Where the monitor logs, for a message: ``logging to '<directory>'``, or ``without a log``."""
        directory = self._claim.shown if self._claim is not None else None
        if directory is None and self.writer is not None:
            directory = writer.log_directory(self.writer)
        return f"logging to {directory!r}" if directory is not None else "without a log"

    @property
    def step(self) -> int:
        """The step number of the last backward pass (``-1`` before the first)."""
        return self._schedule.last

    # -- attaching ---------------------------------------------------------------------------------

    def attach(self) -> DeltaMonitor:
        """Take the model's layers (done by the constructor); they get their slots on the steps that record."""
        if self._attached:
            return self
        taken = [name for name, layer in self.layers.items() if _owner(layer) is not None]
        if taken:
            other = _owner(self.layers[taken[0]])
            raise RuntimeError(
                f"DeltaMonitor: layer {taken[0]!r} is already monitored by another DeltaMonitor "
                f"({other._log_shown()}); close that one first: torchbp.monitor_of(model).close()"
            )
        for layer in self.layers.values():
            _owners[layer] = weakref.ref(self)
        self._relus = {}
        for relu in self.model.modules():
            if isinstance(relu, ReLU) and _owner(relu) is None:
                _owners[relu] = weakref.ref(self)
                self._relus[relu] = ReLUSlot()
        # Every backward pass through a monitored layer reaches a parameter's gradient: a hook there tells
        # the monitor a step happened, also when its layers have no slot or the backward ran compiled.
        for layer in self.layers.values():
            for p in layer.parameters(recurse=False):
                if p.requires_grad:
                    self._handles.append(p.register_hook(_Hook(self._backward.parameter_hook)))
        if self._schedule.step_fn is not None:  # an eager forward pass arms the layers from the callable's value
            self._handles.append(self.model.register_forward_pre_hook(_Hook(self._backward.before_forward)))
        # The model holds its monitor while it is attached (also one whose parameters are all frozen), through a
        # hook that never runs during training: a monitor nobody else holds keeps logging.
        self._handles.append(self.model.register_load_state_dict_post_hook(_Hook(self._keep)))
        self._attached = True
        self._tree = weakref.WeakKeyDictionary({m: n for n, m in self.model.named_modules()})  # (the model's modules)
        _replacements.watch(self, True)
        self._backward.start_discovery()
        self._backward.arm(True)  # (the first forward pass: it reads the data flow)
        return self

    def _keep(self, module, incompatible_keys) -> None:
        return None

    def detach(self) -> None:
        """Remove the slots: the model runs exactly as without a monitor."""
        if not self._attached:
            return
        self._backward.end_discovery()
        self._backward.arm(False)
        for module in [*self.layers.values(), *self._relus]:
            module.__dict__.pop("_torchbp_slot", None)
            if _owner(module) is self:
                del _owners[module]
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attached = False
        _replacements.watch(self, False)

    def _changed(self, replaced: list[str], added: list[str]) -> None:
        """The model changed under the monitor: it keeps the layers it attached to and sees no new one."""
        parts = [
            f"replaced: {', '.join(map(repr, replaced))}" if replaced else "",
            f"added: {', '.join(map(repr, added))}" if added else "",
        ]
        self._host.warn_once(
            "changed",  # (once: the fix is the same for every later change)
            f"layers of the monitored model changed after the monitor attached ({'; '.join(filter(None, parts))}): "
            "the replaced and the new layers are not monitored; close this monitor and make a new one, "
            "DeltaMonitor(model, ...), after changing the model",
        )

    def flush(self) -> None:
        """Block until every step logged so far is written and handed to the operating system, with where a
        non-finite value was born (tag ``nonfinite/<layer>``) if one was."""
        self._backward.read_births(wait=True)
        if self._sink is not None:
            self._host.flush()

    @property
    def dropped(self) -> int:
        """How many events of the logs were not written (failed writes, a deleted log directory, errors of
        the writer); 0 when all were. Counted with ``on_error="warn"``, the default."""
        sink = self._host.sink or self._host.closed_sink
        return 0 if sink is None else sink.dropped

    def close(self) -> None:
        """Detach, write the δ map, write everything queued and close the writer if the monitor opened it."""
        self.detach()
        if self._finite.pending is not None:  # (with a GradScaler: its verdict on the last backward pass)
            scale = self.scaler._scale if self.scaler is not None else None
            self._finite.settle(scale)
        self._backward.read_births(wait=True)
        try:
            self._host.close(self._owns_writer)
        finally:
            self._sink = None
            writer.release_directory(self._claim)  # (a new monitor may append to the directory: a resumed run)

    def __enter__(self) -> DeltaMonitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------------

    def latest(self) -> dict[str, dict[str, float | bool | None]]:
        """The last logged step's statistics per layer (qualified name -> {stat: value}).

        Keys are those of :data:`STATS`; ``delta_nonfinite`` is a bool, and a value that does not
        apply (a gain without a consumer, dead units of a layer not followed by ReLU, the weight
        gradient of a frozen weight) is ``None``. Reading synchronises with the device once; the
        values are this rank's (``global_stats`` applies to the logs).
        """
        if self._backward.latest is None:
            return {}
        snapshot, gen = self._backward.latest
        table = self._host.layout.table(snapshot.cpu().double().numpy()[None], np.array([gen]))
        return table[0].as_dict(self._names)

    def nonfinite(self, all: bool = False, read: bool = True) -> Nonfinite | list[Nonfinite] | None:
        """Where the first non-finite value (NaN or Inf) of the run was born: a :class:`Nonfinite` (``step``,
        ``layer``, ``tensor``), or ``None`` while every δ, ∂C/∂W, ∂C/∂b and layer input was finite; with ``all``,
        the first birth of each layer and tensor, earliest first.

        Every backward pass, logged or not, checks these tensors (see the class docstring); reading synchronises
        with the device once. At the first step with a birth, a non-finite *input* is named first (forward ran
        before backward), at the layer nearest the model's input; else a non-finite δ or ∂C/∂b at the layer
        backward reached first (nearest the output: BP2 carries it to every layer below); else ∂C/∂W (an
        overflow of finite δ and inputs). Steps a GradScaler skipped for overflow are not births
        (:attr:`skipped_steps`). ``read=False``: what was read already, without a host sync."""
        if read:
            self._backward.read_births(wait=True)
        ranked = self._backward.ranked_births()
        return ranked if all else (ranked[0] if ranked else None)

    @property
    def first_nonfinite(self) -> str | None:
        """The layer where the run's first non-finite value was born (:meth:`nonfinite`'s ``layer``), or ``None``.

        Found on any step, logged or not (each backward pass checks δ, ∂C/∂W, ∂C/∂b and the layer's input); the
        step and the tensor are :meth:`nonfinite`'s."""
        birth = self.nonfinite()
        return None if birth is None else birth.layer

    @property
    def skipped_steps(self) -> int:
        """How many backward passes held a non-finite value that the GradScaler (``scaler=``) then skipped as an
        overflow (its scale fell): routine in mixed precision, not births of a NaN. Known for a pass at the next
        backward pass or :meth:`close`."""
        return int(self._finite.skipped)

    def per_sample_grad_norms(self) -> dict[str, dict[str, Tensor | None]]:
        """Per layer, each sample's ‖∂C_n/∂W‖ and ‖∂C_n/∂b‖ from the last recorded backward pass.

        Returns ``{layer: {"weight": Tensor(N), "bias": Tensor(N) or None}}``, computed from BP4's
        rank-1 structure without building per-sample gradients. ``C_n`` is sample n's term of the
        loss as it was reduced (a ``'mean'`` loss carries its 1/N). Needs ``per_sample_norms=True``;
        eager backward passes only.
        """
        if not self.per_sample_norms:
            raise RuntimeError("DeltaMonitor: per-sample norms are off; create the monitor with per_sample_norms=True")
        return dict(self._records.per_sample)

    def history(self) -> dict[str, Any]:
        """The logged steps' statistics, for the δ map (:mod:`torchbp.picture`) and the report.

        Returns ``{"steps": [...], "layers": [...] (network order, input side first), <stat>: array
        (layers, steps) for each key of STATS}``: NaN where a value does not apply, a layer was not reached,
        or δ was not finite (``delta_nonfinite`` is then 1). Written with a log only; at most
        ``max_history`` steps: evenly spaced over the run (older steps are thinned by halves when full), and
        always the newest logged step last.
        """
        if self._sink is not None:
            self._host.write_arrived(wait=True)  # (the steps still on their way to the event file)
        history = self._host.read_history()
        births = self.nonfinite(all=True)
        if births:
            history["nonfinite"] = [birth._asdict() for birth in births]
        return history

    def report(self, name: str = "monitor") -> str:
        """What the δ statistics of :meth:`history` say, in words: :func:`torchbp.report.format_report` of
        :func:`torchbp.report.analyze`, as ``torchbp report LOGDIR`` prints it, for one run called ``name``."""
        from .. import report as _report

        history = self.history()
        return _report.format_report({name: history}, {name: _report.analyze(history)})

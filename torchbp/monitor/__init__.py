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
- :mod:`torchbp.monitor.backward`: what runs during backward: the step's begin and end, arming the layers,
  where a non-finite value was born
- :mod:`torchbp.monitor.dataflow`: the data flow between layers (for the gains)
- :mod:`torchbp.monitor.host`: the host side: the copy, the statistics table, the bounded history, events
- :mod:`torchbp.monitor.writer`: opening the event writer, and the sink events go to
- :mod:`torchbp.monitor.ranks`: the merge across ranks
- :mod:`torchbp.monitor.owners`: which monitor owns which module (:func:`monitor_of`), the hooks, a new monitor
  replacing the old one
- :mod:`torchbp.monitor.options`: the checks of the constructor's arguments
- this module: :class:`DeltaMonitor`, the facade (configuration, attach/detach, reading)

The names the monitor and the report share (:data:`STATS`, ``ROOT_NAME``, :class:`Nonfinite`) are in
:mod:`torchbp.names`.
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
from . import host, options, owners, ranks, writer
from .backward import Backward
from .dataflow import DataFlow
from .host import BATCH_S, MAX_HISTORY, HostSide, Layout
from .owners import (
    _Hook,
    _monitors_of,
    _nothing,  # noqa: F401 (a model pickled by an earlier torchbp names it here)
    _replace,
    _replacements,
    _unwrap,
    monitor_of,
)
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

    On each logged step (``step % every == 0``; steps count backward passes, or follow ``step=``) the
    hand-written backward reduces δ^l and its BP3/BP4 gradients to the statistics of :data:`STATS` (tags
    ``<stat>/<layer>``, ``<layer>`` the qualified name; the table: docs/monitor.md, "The tags"), with tensor
    ops, eager or compiled, without a host sync. Other steps run the ops of an unmonitored model plus one
    finiteness flag per layer: :meth:`nonfinite` names where a NaN or Inf was born. Accumulation,
    checkpointing, compiled and data-parallel models, copies, one monitor per directory: docs/monitor.md.

    Args:
        model: a module containing :class:`torchbp.nn.Linear` layers (built with them or converted by
            :func:`torchbp.convert`); a ``DistributedDataParallel`` or compiled wrapper is unwrapped.
        log: a log directory (created if needed; one open monitor per directory), a
            ``torch.utils.tensorboard.SummaryWriter``, or ``None`` to only record (see :meth:`latest`).
            Default: ``None``.
        every: log (and record) every this many steps; settable. Default: ``10`` with ``log``, ``1`` without.
        histogram_every: write δ histograms every this many steps; ``0`` for never. Default: ``10 * every``.
        image_every: draw the δ map every this many steps (needs matplotlib); ``0``: only on close.
            Default: ``100 * every``.
        per_sample_norms: also compute each sample's weight- and bias-gradient norm (see
            :meth:`per_sample_grad_norms`; eager backward passes only). Default: ``False``.
        scaler: the ``torch.amp.GradScaler`` scaling the loss: its scale is divided out of the norms.
            Default: ``None``.
        global_stats: under ``torch.distributed``, statistics over all ranks' samples (every rank must run
            the same steps). Default: ``False``: rank ``log_rank``'s own samples.
        log_rank: the rank that writes; ``None``: every rank, to ``<log>/rank<r>``. Default: ``0``.
        step: a callable returning the current step number, or ``None`` to count backward passes.
            Default: ``None``.
        max_history: the most logged steps :meth:`history` holds. Default: ``2048``.
        on_error: what a failure to write the logs does: ``"warn"`` (one warning, training goes on, the
            events not written are counted in :attr:`dropped`) or ``"raise"``. Default: ``"warn"``.
        raise_nonfinite: raise ``FloatingPointError`` at the end of the backward pass in which a NaN or Inf
            was born, naming the tensor, layer and step (a host sync per backward pass). Default: ``False``.

    Example::

        >>> model = torch.nn.Sequential(torchbp.nn.Linear(4, 8), torchbp.nn.ReLU(), torchbp.nn.Linear(8, 3))
        >>> with torchbp.DeltaMonitor(model, log="runs/example") as monitor:
        ...     torchbp.nn.CrossEntropyLoss()(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
        >>> list(monitor.latest())
        ['2', '0']
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
        replaced = _monitors_of(self.layers)  # (replaced once the writer is open: a failure here leaves them be)
        # (the writer first: the histograms' schedule depends on it)
        self.writer, self._owns_writer, self._sink, self._claim = writer.open_for(self, log, log_rank, replaced)
        _replace(replaced)
        self._schedule = Schedule(every, self._histogram_every if self._sink is not None else 0, step)
        widths = [_out_features(layer) for layer in self.layers.values()]
        weights = [layer.weight for layer in self.layers.values()]
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        self._records = Records(widths, dtype, weights[0].device, self.global_stats and self.world_size > 1)
        self._flow = DataFlow(len(self.layers))
        self._finite = Finiteness(len(self.layers), weights[0].device)
        self._backward = Backward(self)  # (what runs during backward; the layers' slots)
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
        return writer.log_shown(self._claim, self.writer)

    @property
    def step(self) -> int:
        """The step number of the last backward pass (``-1`` before the first)."""
        return self._schedule.last

    # -- attaching ---------------------------------------------------------------------------------

    def attach(self) -> DeltaMonitor:
        """Take the model's layers (done by the constructor); they get their slots on the steps that record."""
        if self._attached:
            return self
        self._relus = {relu: ReLUSlot() for relu in owners.take(self)}
        self._backward.hooks(self._handles)
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
        owners.release(self, [*self.layers.values(), *self._relus])
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attached = False
        _replacements.watch(self, False)

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
        self._backward.settle()
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

        Every backward pass, logged or not, checks these tensors; reading synchronises with the device once. At
        the first step with a birth: a non-finite input first (nearest the model's input), else δ or ∂C/∂b
        (nearest the output), else ∂C/∂W (docs/monitor.md). GradScaler overflows are not births
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

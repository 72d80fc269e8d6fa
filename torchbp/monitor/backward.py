"""The backward pass, as the monitor follows it: what runs while ``backward()`` does.

One :class:`Backward` per :class:`torchbp.monitor.DeltaMonitor` (which owns it and delegates to it) keeps the
state of the running step and moves it on:

- a backward pass begins at the first monitored layer or parameter it reaches (:meth:`Backward.seen`, also
  from the hook on each monitored parameter): the step's plan (:mod:`torchbp.monitor.schedule`), and its
  end-of-backward callback queued;
- a backward pass run inside another one's node (a reentrant ``torch.utils.checkpoint``) belongs to the
  enclosing step, which ends with the enclosing pass (:meth:`Backward.end_of_backward`);
- at the end of a pass: the records flushed, the finiteness flags folded into the births, a logged step's
  records on their way to the host (after the all-reduce, with global statistics), the layers armed for the
  next forward pass (:meth:`Backward.arm`: their slots, or their finiteness slots);
- where each non-finite value was born, read back from the device (:meth:`Backward.read_births`) and written
  to the log;
- the data flow between layers read from the eager forward passes before the first backward pass ends.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .. import _torch_private
from ..names import NONFINITE_TENSORS, Nonfinite
from . import dataflow, host, ranks
from . import events as _events
from .owners import _Hook
from .records import FiniteSlot, LayerSlot, _norm
from .schedule import StepPlan

if TYPE_CHECKING:
    from . import DeltaMonitor


_scaler_scale = _torch_private.grad_scaler_scale  # (the scale tensor, no host sync)

#: The most backward passes whose step differs from their pass number (a step callable) held until their births
#: are read: past it, the births are read at once (one host sync), so memory stays bounded however rarely the
#: monitor logs.
PASS_STEPS_HELD = 4096


class _EndOfBackward:
    """The end-of-backward callback of one backward pass: a fresh object per pass, so that a weak reference
    to it tells whether that pass is still running (torch drops it when the pass ends or fails)."""

    __slots__ = ("fn", "__weakref__")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def __call__(self) -> None:
        self.fn()


def _dead_ref() -> None:
    return None


class Backward:
    """The backward-pass state machine of ``monitor``: the running step, the layers' arming, the births of
    non-finite values, the data flow's discovery."""

    def __init__(self, monitor: DeltaMonitor) -> None:
        self.monitor = monitor
        self.gen = 0  # the generation number the next recorded step's records carry (also in the buffer)
        self.latest: tuple[Tensor, int] | None = None  # the last logged step's records and generation
        self.task = None  # the backward pass whose step is running (its id), and its end-of-backward callback
        self.end: weakref.ref = _dead_ref
        self.eager_step = False
        self.armed = self.dirty = False
        self.stance_forced = False
        self.pass_steps: dict[int, int] = {}  # backward pass number -> its step, for the passes not yet read
        self.births: dict[tuple[int, int], int] = {}  # (row, tensor) -> the step its non-finite value was born
        self.births_copy: tuple[host.HostCopy, int] | None = None  # a copy of the births on its way to the host
        self.births_written: set[int] = set()  # the rows whose birth is in the log
        records, flow, finite, per_sample = monitor._records, monitor._flow, monitor._finite, monitor.per_sample_norms
        self.slots = {
            name: LayerSlot(records, flow, name, row, per_sample, self.seen, finite)
            for row, name in enumerate(monitor.layers)
        }
        self.finite_slots = {name: FiniteSlot(finite, row) for row, name in enumerate(monitor.layers)}

    def hooks(self, handles: list) -> None:
        """Put the monitor's hooks on its model, their handles appended to ``handles``."""
        monitor = self.monitor
        # Every backward pass through a monitored layer reaches a parameter's gradient: a hook there tells
        # the monitor a step happened, also when its layers have no slot or the backward ran compiled.
        for layer in monitor.layers.values():
            for p in layer.parameters(recurse=False):
                if p.requires_grad:
                    handles.append(p.register_hook(_Hook(self.parameter_hook)))
        if monitor._schedule.step_fn is not None:  # an eager forward pass arms the layers from the callable's value
            handles.append(monitor.model.register_forward_pre_hook(_Hook(self.before_forward)))

    def settle(self) -> None:
        """At close: the GradScaler's verdict on the last backward pass, and every birth read."""
        monitor = self.monitor
        if monitor._finite.pending is not None:  # (with a GradScaler: its verdict on the last backward pass)
            scale = _scaler_scale(monitor.scaler) if monitor.scaler is not None else None
            monitor._finite.settle(scale)
        self.read_births(wait=True)

    # -- recording (called from backward) ------------------------------------------------------------

    @torch.compiler.disable
    def parameter_hook(self, grad: Tensor) -> None:
        if not _torch_private.is_functorch_wrapped(grad):
            self.seen(None)

    def seen(self, delta: Tensor | None) -> StepPlan:
        """A monitored layer's backward (``delta``, or ``None`` from a ReLU's) or a monitored parameter's
        gradient (``None``) ran: the plan of this backward pass."""
        task = _torch_private.current_graph_task_id()
        if task != self.task and not self.nested(task):  # the first of a new backward pass
            self.task = task
            plan = self.monitor._schedule.begin()
            number = self.monitor._schedule.passes - 1
            if plan.step != number:  # (counting backward passes, the step is the pass number: nothing to hold)
                self.pass_steps[number] = plan.step
                if len(self.pass_steps) > PASS_STEPS_HELD:
                    self.read_births(wait=True)
            if plan.record:
                self.monitor._records.hists = {}
                if self.monitor.per_sample_norms:
                    self.monitor._records.per_sample = {}
            self.eager_step = False
            end = _EndOfBackward(self.end_of_backward)
            self.end = weakref.ref(end)  # (held by the backward pass until it ends or fails)
            _torch_private.queue_end_of_backward_callback(end)
        if delta is not None:
            self.eager_step = True
            self.monitor._records.follow(delta)
        return self.monitor._schedule.plan

    def nested(self, task: int) -> bool:
        """Whether backward pass ``task`` runs inside the one this monitor's step is in (``self.task``): a
        backward called from a backward, as a reentrant ``torch.utils.checkpoint`` does for its block. Its
        layers belong to the running step. The running one is still alive while its end-of-backward callback
        is (torch frees it with the pass, also when the pass raised: then ``task`` begins a new step)."""
        return self.task is not None and self.end() is not None

    def end_of_backward(self) -> None:
        node = _torch_private.enclosing_backward_node()
        if node is not None:  # this backward pass ran inside another one's node: the step ends with that one
            end = _EndOfBackward(self.end_of_backward)  # (queued on the enclosing pass once that node is done)
            self.end = weakref.ref(end)  # (held by the node's hook, then by the enclosing pass)

            def resume(grad_inputs, grad_outputs) -> None:
                handle.remove()
                self.task = _torch_private.current_graph_task_id()
                _torch_private.queue_end_of_backward_callback(end)

            handle = node.register_hook(resume)
            return
        self.task = None
        self.end_discovery()  # (the data flow is read by now: forward passes and recomputed ones)
        plan, gen = self.monitor._schedule.plan, self.gen
        self.monitor._records.flush()  # (the eager records of this backward pass, all layers at once)
        scale = _scaler_scale(self.monitor.scaler) if self.monitor.scaler is not None else None
        born = self.monitor._finite.end_of_backward(
            self.monitor._schedule.passes, scale
        )  # (a few tensor ops, no host sync)
        if plan.record and self.dirty:  # (recorded: its layers had their slots)
            scale = None
            if self.monitor.scaler is not None and _scaler_scale(self.monitor.scaler) is not None:
                scale = _scaler_scale(self.monitor.scaler).detach().clone()
            snapshot = self.monitor._records.snapshot(scale)
            if plan.logged:
                self.latest = (snapshot, gen)
            if (
                plan.logged and self.monitor._records.vectors is not None
            ):  # global statistics: every rank logs this step
                self.submit_global(plan, gen, snapshot, scale)
            elif self.monitor._sink is not None:
                self.monitor._host.queue(
                    plan.step, gen, plan.logged, [snapshot, None, None], self.monitor._records.hists
                )
            if plan.histogram and not self.eager_step:
                self.monitor._host.warn_once(
                    "histograms", f"no δ histograms at step {plan.step}: recorded in eager backward passes only"
                )
        elif plan.logged:
            self.monitor._host.warn_once(
                "unarmed",
                f"step {plan.step} was not recorded: the step callable's value changed between the forward "
                "and the backward pass of a compiled model",
            )
        if self.dirty:  # the next recorded step's records carry the next number
            self.gen = (gen + 1) % (1 << 20)
            self.monitor._records.next_generation(self.gen)
        self.dirty = False
        self.arm(self.monitor._schedule.arm_next())
        self.dirty = self.armed
        if plan.logged:  # the births so far, on their way to the host (read at the next logged step or on demand)
            self.read_births(wait=False)
            self.births_copy = (host.HostCopy([self.monitor._finite.births.clone()]), self.monitor._schedule.passes)
            self.read_births(wait=False)
        if self.monitor.raise_nonfinite and bool(born.any()):  # (a host sync per backward pass)
            self.read_births(wait=True)
            raise FloatingPointError(
                f"DeltaMonitor: a NaN or Inf was born in {self.monitor.nonfinite()} (raise_nonfinite=True); the backward "
                "pass stopped here, its gradients are not all written. Look at what entered that layer"
            )

    def submit_global(self, plan: StepPlan, gen: int, snapshot: Tensor, scale: Tensor | None) -> None:
        # After DistributedDataParallel's own end-of-backward callback (queued before this one), which
        # all-reduces the gradients: then gather every rank's records.
        vectors, hists = self.monitor._records.vectors.clone(), self.monitor._records.hists
        queue = _torch_private.queue_end_of_backward_callback
        queue(lambda: self.queue_global(plan.step, gen, snapshot, vectors, hists, scale))

    def queue_global(self, step: int, gen: int, snapshot: Tensor, vectors: Tensor, hists: dict, scale) -> None:
        gathered, gathered_vectors = ranks.gather(snapshot, vectors, self.monitor.world_size)  # on logged steps only
        if self.monitor._sink is None:
            return
        # ‖∂C/∂W‖ of the global batch: the norm of the gradient the all-reduce averaged over ranks.
        weight_norms = [
            _norm(w.grad) if (w := layer.weight).grad is not None else snapshot.new_full((), -1.0)
            for layer in self.monitor.layers.values()
        ]
        weight_norms = torch.stack([n.to(snapshot.dtype) for n in weight_norms])
        if scale is not None:
            weight_norms = weight_norms / scale.to(weight_norms.dtype)
        self.monitor._host.queue(step, gen, True, [gathered, gathered_vectors, weight_norms], hists)

    # -- where a non-finite value was born ---------------------------------------------------------------

    def read_births(self, wait: bool) -> None:
        """Read the births of non-finite values into ``_births`` (steps, from the pass numbers) and write the new
        ones to the log: from the copy a logged step started (when it has arrived, or waited for), or, with
        ``wait``, from the device buffer itself (a host sync)."""
        if self.births_copy is not None and (wait or self.births_copy[0].ready()):
            (births,), upto = self.births_copy[0].wait(), self.births_copy[1]
            self.births_copy = None
            self.take_births(births, upto)
        if wait:
            self.take_births(self.monitor._finite.births.cpu().numpy(), self.monitor._schedule.passes)

    def take_births(self, births: np.ndarray, upto: int) -> None:
        new = []
        for row, k in zip(*np.nonzero(births >= 0)):
            key = (int(row), int(k))
            if key not in self.births:
                number = int(births[row, k])
                self.births[key] = self.pass_steps.get(number, number)
                new.append(key)
        # (pass numbers before the copy's are read; with a GradScaler the last one may still be settled)
        for number in [n for n in self.pass_steps if n < upto - 1]:
            del self.pass_steps[number]
        if (
            new and self.monitor._sink is not None
        ):  # one event per layer: its first birth, the tensor nonfinite() would name
            first: dict[int, Nonfinite] = {}
            for birth in self.monitor.nonfinite(all=True, read=False):
                first.setdefault(self.monitor._names.index(birth.layer), birth)
            with self.monitor._host.lock:
                for row, birth in first.items():
                    if row not in self.births_written:
                        self.births_written.add(row)
                        code = float(NONFINITE_TENSORS.index(birth.tensor) + 1)
                        event = _events.ScalarEvents([f"nonfinite/{birth.layer}"]).event(
                            birth.step, time.time(), [code]
                        )
                        self.monitor._host.sink.write(event)
        if new and self.monitor._sink is not None and self.monitor._host.warn_nonfinite:
            self.monitor._host.warn_once(
                "nonfinite-birth", f"a NaN or Inf was born in {self.monitor.nonfinite(read=False)}"
            )

    def ranked_births(self) -> list[Nonfinite]:
        """The births read so far, earliest first (see :meth:`torchbp.monitor.DeltaMonitor.nonfinite`)."""
        order = {"input": 0, "delta": 1, "bias_grad": 1, "weight_grad": 2}

        def rank(key: tuple[int, int]) -> tuple:
            row, k = key
            tensor = NONFINITE_TENSORS[k]
            position = -row if tensor == "input" else row  # rows are in backward order (the output layer first)
            return (self.births[key], order[tensor], position, k)

        names = self.monitor._names
        return [
            Nonfinite(self.births[key], names[key[0]], NONFINITE_TENSORS[key[1]])
            for key in sorted(self.births, key=rank)
        ]

    # -- arming the layers ---------------------------------------------------------------------------

    def arm(self, on: bool) -> None:
        """Hand the layers their slots (``on``) or their finiteness slots, for the coming forward and backward pass.
        Under torch.compile, Dynamo guards on these attributes: a compiled graph with records and one with the
        finiteness flags only."""
        on = on and self.monitor._attached
        if on == self.armed:
            return
        self.armed = on
        self.dirty = self.dirty or on
        for name, layer in self.monitor.layers.items():  # (off: the finiteness flags only)
            layer._torchbp_slot = self.slots[name] if on else self.finite_slots[name]
        for relu, slot in self.monitor._relus.items():
            relu._torchbp_slot = slot if on else None

    def rearm(self) -> None:
        """The schedule changed: arm the layers for the next forward pass as the end of a backward pass does."""
        if self.monitor._attached and _torch_private.current_graph_task_id() == -1:
            self.arm(self.monitor._schedule.arm_next() or self.monitor._flow.discovering)

    def before_forward(self, module, args) -> None:
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return  # (traced by Dynamo as nothing: a compiled model is armed at the end of backward)
        if _torch_private.current_graph_task_id() != -1:
            return  # a forward recomputed in a backward (torch.utils.checkpoint): its step is running
        self.arm(self.monitor._schedule.arm_now() or self.monitor._flow.discovering)

    # -- the data flow, from one eager forward pass -------------------------------------------------------

    def start_discovery(self) -> None:
        self.monitor._flow.discovering = True
        self.monitor._flow.reset()
        self.stance_forced = True
        dataflow.force_eager(True)

    def end_discovery(self) -> None:
        # At the end of the first backward pass, not of the first forward: a block under a reentrant
        # torch.utils.checkpoint runs its forward without gradients, and again, with them, in the backward.
        self.monitor._flow.discovering = False
        if self.stance_forced:
            self.stance_forced = False
            dataflow.force_eager(False)

"""The schedule: which backward pass is recorded and logged, and the step axis.

A *step* is the number on the x-axis of every event, of ``history()`` and of ``latest()``. Without a step
callable it counts backward passes from 0; with one (``step=lambda: trainer.global_step``) it is that
callable's value, read when a backward pass begins. A step ``s`` is logged when ``s % every == 0``; its
δ histograms are written when ``s % histogram_every == 0``.

**Several backward passes with the same step** (gradient accumulation: micro-batches of one optimizer
step): the first backward pass of a logged step is recorded and logged, the others of that step are not
recorded (they cost nothing). So a logged step shows the δ of its first micro-batch, as a trainer that
logs its loss at the first micro-batch of a step would.

The schedule *arms* the monitored layers (hands them their slots) only for a backward pass it records:
an unarmed layer runs exactly as without a monitor, plus its finiteness flag (see :class:`records.FiniteSlot`). Arming happens before the forward pass whose
backward it is for: at the end of the previous backward pass (exact when steps count backward passes),
and, with a step callable, again before each eager forward pass of the monitored model, from the
callable's value then. A compiled model's forward pass does not re-arm (Dynamo would guard on the
value), so with a step callable a compiled model is armed, at the end of a backward pass at step ``s``,
for the next backward pass if step ``s`` or ``s + 1`` is still to be recorded (with accumulation, the
remaining micro-batches of the step before a logged one are then recorded too, and not logged).

A backward pass is seen by a hook on each monitored parameter (and, when it records, by the layers'
backward): one that computes no monitored parameter's gradient (``torch.autograd.grad`` with respect to
inputs only) is counted only when it records. A backward pass run inside another one (the block of a
reentrant ``torch.utils.checkpoint``) is part of the enclosing one's step. ``every`` and
``histogram_every`` may change between backward passes (``DeltaMonitor.every = 5``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class StepPlan(NamedTuple):
    """What one backward pass does: its ``step`` number, whether its statistics are ``logged``, whether
    its δ histograms are written (``histogram``)."""

    step: int
    logged: bool
    histogram: bool

    @property
    def record(self) -> bool:
        """Whether the backward writes records (statistics or histograms) at all."""
        return self.logged or self.histogram


NOTHING = StepPlan(-1, False, False)


class Schedule:
    """Which backward passes are recorded, and their step numbers (see the module docstring).

    Args:
        every: log every this many steps.
        histogram_every: write δ histograms every this many steps; 0: never.
        step: the step callable, or ``None`` to count backward passes.
    """

    def __init__(self, every: int, histogram_every: int, step: Callable[[], int] | None = None) -> None:
        self.every = every
        self.histogram_every = histogram_every
        self.step_fn = step
        self.passes = 0  # backward passes begun
        self.last = -1  # the step number of the last backward pass (-1: none yet)
        self.plan = NOTHING  # the current (or last) backward pass's

    def _number(self) -> int:
        if self.step_fn is None:
            return self.passes
        value = self.step_fn()
        try:
            return int(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"DeltaMonitor: the step callable must return an int, got {type(value).__name__} {value!r}; "
                "pass e.g. step=lambda: trainer.global_step"
            ) from None

    def _due(self, step: int) -> tuple[bool, bool]:
        return step % self.every == 0, bool(self.histogram_every) and step % self.histogram_every == 0

    def begin(self) -> StepPlan:
        """A backward pass begins: its plan."""
        step = self._number()
        self.passes += 1
        first = step != self.last  # (the first backward pass of this step)
        logged, histogram = self._due(step) if first else (False, False)
        self.last = step
        self.plan = StepPlan(step, logged, histogram)
        return self.plan

    def wants(self, step: int) -> bool:
        """Whether a backward pass at ``step`` would record something."""
        return step != self.last and any(self._due(step))

    def arm_next(self) -> bool:
        """At the end of a backward pass: whether the next one may record (so the layers need their slots)."""
        if self.step_fn is None:
            return self.wants(self.passes)
        step = self._number()
        return self.wants(step) or any(self._due(step + 1))

    def arm_now(self) -> bool:
        """Before an eager forward pass (with a step callable): whether its backward records."""
        return self.wants(self._number())

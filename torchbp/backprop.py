r"""The backprop loop: a run of Linear and activation layers as one autograd Function, and its saved tensors.

Its backward is the algorithm of Nielsen's ``backprop()`` (*Neural Networks and Deep Learning*, ch. 2): δ^L,
then for l = L … 1: BP3, BP4, and δ^{l-1} = (w^l)^T δ^l ⊙ σ'(z^{l-1}), each line one call of
:mod:`torchbp.equations`. Its saved tensors are released as the loop passes each layer
(:func:`_holding_saved_tensors`, :class:`_LoopTensors`), so memory is the per-op Functions'.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _torch_private
from .equations import linear_backward, linear_jvp, relu_backward, sigmoid_backward
from .functions import _TRACEABLE, HandWrittenFunction, _apply, _save, _without_jvp

__all__ = ["ChainFunction"]


LINEAR, SIGMOID, RELU = "linear", "sigmoid", "relu"


class _LoopPlan:
    """What the loop needs to know of a run of layer kinds, worked out once per kind sequence (and cached).

    ``saves[i]``: whether the loop keeps layer i's output (an activation's: its σ'(z) and the next layer's
    a^{i-1}; a Linear's that another Linear reads directly; never the last layer's, the run's output).
    ``param[i]``: the index of layer i's weight in the parameters (its bias follows), or -1.
    ``inplace[i]``: a ReLU may overwrite its input, a Linear's z that nothing else reads.
    """

    def __init__(self, kinds: tuple[str, ...]) -> None:
        n = len(kinds)
        self.kinds, self.n = kinds, n
        self.saves = tuple(i < n - 1 and (k != LINEAR or kinds[i + 1] == LINEAR) for i, k in enumerate(kinds))
        params, p = [], 0
        for k in kinds:
            params.append(p if k == LINEAR else -1)
            p += 2 if k == LINEAR else 0
        self.param, self.n_params, self.kept = tuple(params), p, sum(self.saves)
        self.inplace = tuple(
            k == RELU and i > 0 and kinds[i - 1] == LINEAR and not self.saves[i - 1] for i, k in enumerate(kinds)
        )
        self.linears = tuple(i for i, k in enumerate(kinds) if k == LINEAR)
        self.kept_at = tuple(sum(self.saves[:i]) if self.saves[i] else -1 for i in range(n))  # its index in kept


_PLANS: dict[tuple[str, ...], _LoopPlan] = {}


def _loop_plan(kinds: tuple[str, ...]) -> _LoopPlan:
    plan = _PLANS.get(kinds)
    if plan is None:
        plan = _PLANS[kinds] = _LoopPlan(kinds)
    return plan


def _holding_saved_tensors() -> tuple[list[list], Any, Any]:
    """saved_tensors_hooks that pack each saved tensor into a holder, ``[tensor, its version]`` (on top of any hooks
    in effect, e.g. ``save_on_cpu``), and a list that unpacking fills with the holders, in the order of the saved
    tensors. The loop's backward empties a holder (``[None, …]``) once its tensor is used, so each activation is
    freed where the per-op backward frees it (peak memory as per-op).

    A holder keeps a non-leaf tensor as a detached alias (same storage and version counter, no ``grad_fn``): the
    saved outputs of the Function (the kept activations, the run's output) have the Function's own node as
    ``grad_fn``, and a holder that kept them would keep that node, which owns the holder, alive: a cycle through
    C++ that Python's garbage collector cannot see, leaking the graph of a forward without backward or of a
    retained graph once dropped (one ``detach`` per saved non-leaf tensor breaks it).
    Autograd gives the unpacked tensor its ``grad_fn`` back itself (from the saved variable), as without hooks.
    The version is checked at unpacking, as autograd does without hooks (it cannot with them). Under outer hooks
    the outer pack hook sees the tensor itself and what it keeps is its own, as for torch's ops (``save_on_cpu``
    of a CPU tensor keeps the tensor: torch's own ops then keep their graphs alive too), and, as autograd under
    hooks, nothing checks the version (a tensor kept only for that would defeat ``save_on_cpu``)."""
    unpacked: list[list] = []
    outer = _torch_private.top_saved_tensors_hooks()
    if outer is None:

        def pack(t: Tensor) -> list:
            return [t if t.is_leaf else t.detach(), _version(t)]  # (a leaf has no grad_fn: no cycle to break)

        def unpack(h: list) -> Tensor:
            t = h[0]
            if t is None:
                _freed()
            if _version(t) != h[1]:
                _modified(t, h[1])
            unpacked.append(h)
            return t

        return unpacked, pack, unpack
    outer_pack, outer_unpack = outer

    def pack_over(t: Tensor) -> list:  # (the outer hook sees the tensor itself, as it would without the loop)
        return [outer_pack(t)]

    def unpack_over(h: list) -> Tensor:
        if h[0] is None:
            _freed()
        unpacked.append(h)
        return outer_unpack(h[0])

    return unpacked, pack_over, unpack_over


_version = _torch_private.tensor_version


def _freed() -> None:
    raise RuntimeError(
        "torchbp: the backprop loop's saved tensors were freed by a backward pass; "
        "pass retain_graph=True to backward through the graph a second time"
    )


def _modified(t: Tensor, saved_version: int) -> None:
    raise RuntimeError(
        f"torchbp: one of the variables needed for gradient computation has been modified by an inplace "
        f"operation: a tensor of shape {tuple(t.shape)} that the backprop loop saved is at version {_version(t)}, "
        f"expected version {saved_version}; use an out-of-place operation (y = y * 2, not y.mul_(2)) or clone it"
    )


class _LoopTensors:
    """The loop's saved tensors, per layer: ``ins`` (a^{l-1}, for BP4), ``acts`` (the output, for σ'(z^l)) and
    ``weights`` (w^l, for BP2). :meth:`release` lets a layer's go once the loop has passed it (unless the graph
    is kept for another backward pass), so each activation is freed where the per-op backward frees it."""

    def __init__(self, ctx) -> None:
        unpacked = ctx.held  # the holders, filled in the order ctx.saved_tensors unpacks them
        if unpacked is not None:
            unpacked.clear()
        saved = list(ctx.saved_tensors)
        n = ctx.plan.n
        self.ins, self.acts, self.weights = saved[:n], saved[n : 2 * n], saved[2 * n :]
        self.holders = None
        if unpacked is not None and not _torch_private.graph_task_keeps_graph():
            holders = iter(unpacked)  # one per saved tensor that is not None
            self.holders = [next(holders) if t is not None else None for t in saved[: 2 * n]]

    def release(self, i: int) -> None:
        if self.holders is not None:
            for h in (self.holders[i], self.holders[len(self.ins) + i]):
                if h is not None:
                    h[0] = None
            self.ins[i] = self.acts[i] = None


def _lowest_layer(ctx, plan: _LoopPlan) -> tuple[int, bool]:
    """The lowest layer the running backward pass needs (the loop stops there), and whether a gradient is used
    below it (its BP2). ``torch.autograd.grad`` with respect to some of the parameters runs only the per-op
    nodes above the lowest one asked for; the loop does the same (the same gradients, the same monitor
    records). Asked bottom-up, once per backward call: a plain ``backward()`` asks one node."""
    if torch.compiler.is_compiling() or _torch_private.functorch_transforms_active():
        return 0, True  # (the compiled backward is traced once for every call: every layer)
    edges = ctx.next_functions  # one per tensor input: the input, then each parameter that is not None
    if _uses(edges[0][0]):
        return 0, True
    e, present = 1, ctx.present
    for i in plan.linears:
        p = plan.param[i]
        for k in range(present[p] + present[p + 1]):
            if _uses(edges[e + k][0]):
                return i, False
        e += present[p] + present[p + 1]
    return 0, True  # (nothing of the run is asked for: as ctx.needs_input_grad says)


def _uses(node) -> bool:
    return node is not None and _torch_private.will_use_gradient(node)


class ChainFunction(HandWrittenFunction):
    r"""A run of layers, z^l = w^l a^{l-1} + b^l and a^l = σ(z^l), as one Function; backward is the backprop loop.

    ``layers`` is a tuple of ``(kind, slot)``: ``("linear", slot)`` (``slot``: the monitor's record of the layer
    or ``None``), ``("sigmoid", None)``, ``("relu", None)``; ``params`` are each Linear's weight and bias (``None``
    without), in order. ``forward`` returns the run's output, then the activations the backward reads (outputs
    too, so that a double backward differentiates through them). It saves what the per-op Functions save (a^{l-1} where BP4 needs it, w^l where BP2 does,
    each activation's output), so memory is the same; the per-op Python cost is paid once per run.
    """

    @staticmethod
    def forward(input: Tensor, layers: tuple, *params: Tensor | None):
        plan = _loop_plan(tuple([kind for kind, _ in layers]))
        a, kept = input, []
        for kind, p, inplace, keep in zip(plan.kinds, plan.param, plan.inplace, plan.saves):
            if kind == LINEAR:
                a = F.linear(a, params[p], params[p + 1])  # z^l = w^l a^{l-1} + b^l
            elif kind == SIGMOID:
                a = torch.sigmoid(a)  # a^l = σ(z^l)
            else:
                a = a.relu_() if inplace else torch.relu(a)  # a^l = max(z^l, 0) (in place over a z nothing reads)
            if keep:
                kept.append(a)
        return (a, *kept)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, layers, *params = inputs
        plan = _loop_plan(tuple([kind for kind, _ in layers]))
        needs = ctx.needs_input_grad
        n = plan.n
        ins, acts, weights = [None] * n, [None] * n, [None] * n  # per layer: a^{i-1} (BP4), output (σ'), w^i (BP2)
        kept = iter(output[1:])
        a = input
        flows = needs[0]  # whether a gradient flows to this layer's input (some earlier tensor needs one)
        for i, (kind, slot) in enumerate(layers):
            out = next(kept) if plan.saves[i] else None
            if kind == LINEAR:
                p = plan.param[i]
                if needs[2 + p] or (slot is not None and slot.needs_input):
                    ins[i] = a  # BP4 needs a^{i-1}
                if flows:
                    weights[i] = params[p]  # BP2 needs w^i
                flows = flows or needs[2 + p] or needs[3 + p]
            else:
                acts[i] = out if flows else None  # σ'(z^i), where a gradient flows back
            a = out
        if plan.kinds[-1] != LINEAR and flows:
            acts[-1] = output[0]  # the last activation's σ'(z) needs the run's output
        _save(ctx, (*ins, *acts, *weights), (input, *[t for t in params if t is not None], *output))  # (None: not kept)
        ctx.present = tuple(t is not None for t in params)
        ctx.layers, ctx.plan, ctx.held = layers, plan, _holding[-1] if _holding else None
        last = layers[-1][1] if plan.kinds[-1] == LINEAR else None
        ctx.slot = last  # the Linear whose output z is the run's output (a ReLU after it records its dead units)
        ctx.producer_slot = layers[plan.linears[-1]][1]

    @staticmethod
    def backward(ctx, delta: Tensor | None, *grad_kept: Tensor | None):  # ∇_a C at the run's output
        layers, plan, needs = ctx.layers, ctx.plan, ctx.needs_input_grad
        saved = _LoopTensors(ctx)
        grads: list[Tensor | None] = [None] * plan.n_params
        lowest, below = _lowest_layer(ctx, plan)  # (below the lowest layer asked for, no gradient is used)
        for i in reversed(range(lowest, plan.n)):  # l = L, …, 1
            if plan.saves[i] and grad_kept[plan.kept_at[i]] is not None:  # (only a double backward sends these)
                delta = grad_kept[plan.kept_at[i]] if delta is None else delta + grad_kept[plan.kept_at[i]]
            kind, slot = layers[i]
            a = saved.acts[i]  # a^l = σ(z^l)
            if delta is None or (kind != LINEAR and a is None):
                delta = None  # no gradient flows back through this layer
            elif kind == SIGMOID:
                delta = sigmoid_backward(delta, a)  # BP1/BP2: δ^l = ∇_a C ⊙ σ'(z^l)
            elif kind == RELU:
                if layers[i - 1][1] is not None:  # (a run starts with a Linear: layer i - 1 is one here or before)
                    layers[i - 1][1].record_relu(a)  # the monitor: units with σ'(z) = 0 for every sample
                delta = relu_backward(delta, a)  # BP1/BP2: δ^l = ∇_a C ⊙ σ'(z^l)
            else:  # delta is δ^l = ∂C/∂z^l
                p = plan.param[i]
                flows = needs[0] or any(needs[2 : 2 + p])  # does any tensor before layer l need a gradient?
                flows = flows and (below or i > lowest)  # (and does the backward pass use it?)
                grad_input, grads[p], grads[p + 1] = linear_backward(
                    delta, saved.ins[i], saved.weights[i], flows, needs[2 + p], needs[3 + p]
                )  # BP4 ∂C/∂w^l = δ^l (a^{l-1})^T, BP3 ∂C/∂b^l = δ^l, and BP2's (w^l)^T δ^l
                if slot is not None:
                    slot.record(delta, saved.ins[i], grads[p], grads[p + 1])  # the monitor's statistics of δ^l
                delta, grad_input = grad_input, None  # (the name must not keep this δ alive: peak memory as per-op)
            saved.release(i)
        return delta, None, *grads

    @staticmethod
    def jvp(ctx, d_input: Tensor | None, _layers, *d_params: Tensor | None):
        input, *rest = ctx.saved_tensors
        plan = ctx.plan
        given = iter(rest)
        params = [next(given) if present else None for present in ctx.present]
        outputs = list(given)
        kept = iter(outputs[1:])
        a, da, tangents = input, d_input, []
        for i, kind in enumerate(plan.kinds):
            out = next(kept) if plan.saves[i] else (outputs[0] if i == plan.n - 1 else None)
            if kind == LINEAR:
                p = plan.param[i]
                da = linear_jvp(a, params[p], da, d_params[p], d_params[p + 1])  # dz = da w^T + a dw^T + db
            elif da is not None:
                da = (sigmoid_backward if kind == SIGMOID else relu_backward)(da, out)  # da^i = σ'(z^i) ⊙ dz^i
            if plan.saves[i]:  # the kept activation's own tangent (zeros, not None: functorch wants one)
                tangents.append(da if da is not None else torch.zeros_like(out))
            a = out
        return (da, *tangents)


_TRACEABLE[id(ChainFunction)] = _without_jvp(ChainFunction)

# The holders of the saved tensors of the ChainFunction being applied (read by its setup_context).
_holding: list[list] = []


def apply_chain(input: Tensor, layers: tuple, params: list[Tensor | None]) -> Tensor:
    """The run's output, ``ChainFunction`` applied; with grad on, in eager mode, its saved tensors held so that its
    backward releases each layer's as it passes (:class:`_LoopTensors`)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or _torch_private.functorch_transforms_active():
        return _apply(ChainFunction, input, layers, *params)[0]
    held, pack, unpack = _holding_saved_tensors()
    _holding.append(held)
    _torch_private.push_saved_tensors_hooks(pack, unpack)
    try:
        return _apply(ChainFunction, input, layers, *params)[0]
    finally:
        _torch_private.pop_saved_tensors_hooks()
        _holding.pop()

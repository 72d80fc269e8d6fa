"""Every use of torch's private API in torchbp, each behind a small function that says why.

The rest of torchbp reads as if torch had these as public API. Each function below was checked on torch 2.13.0
(the version ``pyproject.toml`` requires at least); where a public API does the same, the function uses it or
names it as the one to move to. A torch upgrade that breaks one of these breaks it here, in one place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules import module as _module  # (imported by torch itself)

__all__ = [
    "any_autocast_enabled",
    "mse_loss",
    "REDUCTION_ENUM",
    "functorch_transforms_active",
    "forward_ad_active",
    "is_legacy_batched",
    "is_functorch_wrapped",
    "function_apply_without_prologue",
    "top_saved_tensors_hooks",
    "tensor_version",
    "push_saved_tensors_hooks",
    "pop_saved_tensors_hooks",
    "graph_task_keeps_graph",
    "global_module_hooks_present",
    "registered_submodule",
    "current_graph_task_id",
    "queue_end_of_backward_callback",
    "enclosing_backward_node",
    "will_use_gradient",
    "force_compile_eager",
    "restore_compile_stance",
    "serialized_event_writer",
    "is_view",
    "foreach_norm",
    "LossBase",
    "module_hooks_present",
    "submodules",
    "own_parameters",
    "grad_scaler_scale",
    "compiled_module_original",
    "conv_padding",
    "is_summary_writer",
    "file_writer_of",
    "summary_writer_class",
]

TORCH_CHECKED = "2.13.0"  # the torch version every function below was checked on

# -- autocast ---------------------------------------------------------------------------------------

#: Whether autocast is on for any device type: one C call, where the public ``torch.is_autocast_enabled(device)``
#: needs the device and is slower; the public functions skip their casting with it. Checked on torch 2.13.0;
#: public: ``torch.is_autocast_enabled(device_type)`` per device.
any_autocast_enabled: Callable[[], bool] = torch._C._is_any_autocast_enabled


# -- loss kernels ----------------------------------------------------------------------------------------

#: torch's MSE kernel, called as ``mse_loss(input, target, reduction_enum)`` (``'none'``, ``'mean'``, ``'sum'``:
#: 0, 1, 2) on tensors of one shape: ``torch.nn.functional.mse_loss`` (which calls it) broadcasts both arguments
#: on every call, two view ops that cost more than the kernel on a small tensor. Checked on torch 2.13.0; public:
#: ``torch.nn.functional.mse_loss``.
mse_loss: Callable[[Tensor, Tensor, int], Tensor] = torch._C._nn.mse_loss
REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}  # torch.nn._reduction.get_enum's values


#: The 2-norms (or ``ord``-norms) of a list of tensors in one fused kernel, ``foreach_norm(tensors, ord, dtype=...)``:
#: the monitor's record takes the norms of the bias and weight gradients in one pass each. Checked on torch
#: 2.13.0; public: ``torch.linalg.vector_norm`` per tensor (one kernel each).
foreach_norm: Callable[..., list[Tensor]] = torch._foreach_norm

#: The base class of torch's loss modules (``torch.nn.modules.loss._Loss``): it takes ``size_average``, ``reduce``
#: and ``reduction`` and sets ``self.reduction`` as torch's losses do, so that a torchbp loss is one of them
#: (``isinstance`` checks of trainers). Checked on torch 2.13.0; public: ``torch.nn.Module`` with the reduction
#: argument handled by hand.
LossBase: type = torch.nn.modules.loss._Loss


# -- transforms and forward-mode AD ------------------------------------------------------------------

#: Whether a torch.func transform (grad, vmap, jacrev, jvp, ...) is active: the one-buffer fast paths and the
#: cheap apply must then stay off. Checked on torch 2.13.0; no public API.
functorch_transforms_active: Callable[[], bool] = torch._C._are_functorch_transforms_active


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (the innermost level is >= 0; -1: none): the
    equations may then be differentiated in forward mode. Checked on torch 2.13.0; no public API."""
    return torch.autograd.forward_ad._current_level >= 0


#: Whether a tensor is a legacy batched tensor (``autograd.grad(is_grads_batched=True)``), which has no integer
#: bit views. Checked on torch 2.13.0; no public API.
is_legacy_batched: Callable[[Tensor], bool] = torch._C._functorch.is_legacy_batchedtensor

#: Whether a tensor is wrapped by a torch.func transform (its values are not known: data-dependent checks must
#: not run; a monitor must not record). Checked on torch 2.13.0; no public API.
is_functorch_wrapped: Callable[[Tensor], bool] = torch._C._functorch.is_functorch_wrapped_tensor


# -- applying a Function -------------------------------------------------------------------------------

_BASE_APPLY = torch._C._FunctionBase.__dict__["apply"]


def function_apply_without_prologue(fn: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``fn.apply`` without its Python prologue: the C ``apply`` of ``torch._C._FunctionBase``, bound to ``fn``.

    ``Function.apply`` binds the arguments to ``forward``'s signature on every call (for default values) and
    routes torch.func transforms; when every argument is passed and no transform is active, the C apply does
    the same work in half the per-call time. Checked on torch 2.13.0; public: ``fn.apply``.
    """
    return _BASE_APPLY.__get__(None, fn)


# -- views ----------------------------------------------------------------------------------------------

#: Whether a tensor is a view of another (``Tensor._is_view``): a Function's output that is a view is returned
#: detached, as autograd refuses in-place ops on views of a custom Function's output. The unbound method, one C call
#: per forward. Checked on torch 2.13.0; no public API (``t._base is not None`` is private too).
is_view: Callable[[Tensor], bool] = torch.Tensor._is_view


# -- saved tensors --------------------------------------------------------------------------------------


def top_saved_tensors_hooks() -> tuple[Callable, Callable] | None:
    """The ``(pack, unpack)`` saved-tensor hooks in effect (e.g. ``save_on_cpu``), or ``None``: the backprop loop
    packs on top of them, as nested ``saved_tensors_hooks`` would replace them. Checked on torch 2.13.0;
    no public API (``torch.autograd.graph.saved_tensors_hooks`` sets hooks but cannot read them)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


#: A tensor's version counter (bumped by each in-place operation): the backprop loop's saved-tensor hooks check it
#: at unpacking, as autograd does for saved tensors without hooks (and cannot with them). An attrgetter, one C
#: call per saved tensor. Checked on torch 2.13.0; no public API (``Tensor._version``).
tensor_version: Callable[[Tensor], int] = operator.attrgetter("_version")


def push_saved_tensors_hooks(pack: Callable, unpack: Callable) -> None:
    """Enter saved-tensor hooks without a context-manager object (per call of the backprop loop). Checked on
    torch 2.13.0; public: ``torch.autograd.graph.saved_tensors_hooks(pack, unpack)``, which calls this."""
    torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def pop_saved_tensors_hooks() -> None:
    """Leave the hooks of :func:`push_saved_tensors_hooks`. Checked on torch 2.13.0; public: as above."""
    torch._C._autograd._pop_saved_tensors_default_hooks()


def graph_task_keeps_graph() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``): the backprop loop then must not
    release its saved tensors. Checked on torch 2.13.0; no public API."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


# -- module hooks ---------------------------------------------------------------------------------------


def global_module_hooks_present() -> bool:
    """Whether global module hooks are registered (``torch.nn.modules.module.register_module_forward_hook`` and
    friends): each module must then run its own forward, so that they fire. Checked on torch 2.13.0; no public
    API reads them (the registration functions are public)."""
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def module_hooks_present(m: torch.nn.Module) -> bool:
    """Whether module ``m`` has forward or backward hooks of its own (it must then run its own forward, so that
    they fire; the backprop loop leaves it out). Checked on torch 2.13.0; no public API reads them (the
    ``register_*_hook`` methods are public)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


# (The next three are functions, not attrgetters: Dynamo traces the forward passes that call them, and cannot
# trace an attrgetter.)


def submodules(m: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """A module's registered submodules (``Module._modules``, name -> module, in order): torchbp's Sequential walks
    its own, as torch's ``Sequential.__iter__`` does. Checked on torch 2.13.0; public: ``iter(sequential)`` or
    ``module.named_children()``."""
    return m._modules


def own_parameters(m: torch.nn.Module) -> dict[str, Any]:
    """A module's own parameters (``Module._parameters``, name -> parameter): read per layer and forward by the
    backprop loop, where ``Module.__getattr__`` is slow. Checked on torch 2.13.0; public: ``m.weight`` (through
    ``Module.__getattr__``) or ``m.named_parameters(recurse=False)``."""
    return m._parameters


def conv_padding(m: torch.nn.Module) -> Any:
    """A convolution's padding as ``torch.nn.functional.pad`` takes it (``_ConvNd._reversed_padding_repeated_twice``,
    the last dimension first), for a padding mode other than zeros, as torch's ``_conv_forward`` pads. Checked on
    torch 2.13.0; public: computed from ``m.padding`` (and ``"same"`` from the kernel size and dilation)."""
    return m._reversed_padding_repeated_twice


def compiled_module_original(model: Any) -> Any:
    """The module a ``torch.compile``-d module (an ``OptimizedModule``) wraps, or ``None`` for any other object:
    a monitor attaches to the original module's layers. Checked on torch 2.13.0; no public API
    (``OptimizedModule._orig_mod``)."""
    return getattr(model, "_orig_mod", None)


def registered_submodule(parent: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The submodule registered in ``parent`` under ``name`` (``parent._modules``), or ``None``; read in a module
    registration hook, before the assignment, to see what it replaces. Not through ``getattr``: a wrapper's
    ``__getattr__`` (torch.compile's ``OptimizedModule``) forwards to what it wraps and raises while being built.
    Checked on torch 2.13.0; public: ``dict(parent.named_children()).get(name)`` (a walk per registration)."""
    modules = parent.__dict__.get("_modules")
    return None if modules is None else modules.get(name)


# -- the backward pass (the DeltaMonitor) ------------------------------------------------------------------


def current_graph_task_id() -> int:
    """An id of the running backward pass (-1 outside one): a monitor counts a step once per backward pass.
    Checked on torch 2.13.0; no public API."""
    return torch._C._current_graph_task_id()


def queue_end_of_backward_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the running backward pass ends (after every gradient is accumulated). Checked on
    torch 2.13.0; no public API (``torch.autograd.Variable._execution_engine.queue_callback``)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def enclosing_backward_node() -> Any:
    """In an end-of-backward callback: the autograd node whose backward called the ending backward pass (the
    ``CheckpointFunction`` of a reentrant ``torch.utils.checkpoint``, whose backward calls
    ``torch.autograd.backward``), or ``None`` for a backward pass called from outside any backward (the node the
    thread is evaluating: none once a top-level pass has run every node). torch says neither whether a graph
    task is nested nor in which. Checked on torch 2.13.0; no public API."""
    return torch._C._current_autograd_node()


def will_use_gradient(node: Any) -> bool:
    """Whether the running backward pass uses the gradient that flows into autograd node ``node`` (an entry of a
    Function's ``ctx.next_functions``): ``False`` for a node that ``torch.autograd.grad(outputs, inputs)`` or
    ``backward(inputs=...)`` needs nothing from. The backprop loop skips the layers below the lowest one asked
    for, as the per-op Functions' nodes are then not run. torch refuses the question for a leaf's
    AccumulateGrad that ``autograd.grad`` captures (a leaf asked for): its gradient is used. Checked on torch
    2.13.0; no public API (``torch.autograd.graph.register_multi_grad_hook`` and ``torch.utils.checkpoint`` use
    ``torch._C._will_engine_execute_node`` the same way)."""
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # (a leaf captured by autograd.grad: one of the inputs asked for)
        return True


#: A ``torch.amp.GradScaler``'s scale as a tensor on the device (``scaler._scale``; ``None`` before its first
#: ``scale()``): the monitor divides it out of its norms without a host sync. An attrgetter. Checked on torch
#: 2.13.0; public: ``scaler.get_scale()``, a Python float (a host sync).
grad_scaler_scale: Callable[[Any], Tensor | None] = operator.attrgetter("_scale")


# -- torch.compile's stance --------------------------------------------------------------------------------


def force_compile_eager() -> Any:
    """Make ``torch.compile``-d code run eagerly until :func:`restore_compile_stance` is given the returned token
    (a monitor discovers the data flow from one eager forward pass). Public: ``torch.compiler.set_stance``, called
    as a function (it sets the stance at once; its ``__exit__`` restores the prior one). Checked on torch 2.13.0.
    """
    return torch.compiler.set_stance("force_eager")


def restore_compile_stance(token: Any) -> None:
    """Restore the stance that was in effect before :func:`force_compile_eager` returned ``token``. Public API.
    Checked on torch 2.13.0."""
    token.__exit__(None, None, None)


# -- SummaryWriter internals ----------------------------------------------------------------------------------


def is_summary_writer(log: Any) -> bool:
    """Whether ``log`` is a ``torch.utils.tensorboard.SummaryWriter`` (or one like it: wandb's patched one), told by
    what the monitor uses of it: ``add_scalar`` and the private ``_get_file_writer``. Checked on torch 2.13.0;
    public: ``isinstance(log, SummaryWriter)``, which needs tensorboard imported and misses look-alikes."""
    return hasattr(log, "add_scalar") and hasattr(log, "_get_file_writer")


#: A ``SummaryWriter``'s current ``FileWriter`` (``writer._get_file_writer()``, a new one after ``close()``), where the
#: monitor hands its serialized events; a methodcaller, one C call per event. Checked on torch 2.13.0; public:
#: ``writer.file_writer`` (not reopened after ``close()``).
file_writer_of: Callable[[Any], Any] = operator.methodcaller("_get_file_writer")


def summary_writer_class(event_file: Callable[[str, str, str], Any]) -> type:
    """A subclass of torch's ``SummaryWriter`` (taking an extra ``on_error=``) whose ``FileWriter`` writes through
    ``event_file(log_dir, filename_suffix, on_error)`` (an object with ``FileWriter.event_writer``'s methods)
    instead of TensorBoard's ``EventFileWriter`` and its thread: the same API as torch's, with another writer
    underneath. It overrides the private ``_get_file_writer`` and sets the ``file_writer`` and ``all_writers``
    attributes as torch's does, and its ``FileWriter`` skips ``FileWriter.__init__`` (which would open a second event
    file). Checked on torch 2.13.0; no public API (``SummaryWriter`` takes no file writer)."""
    from torch.utils.tensorboard.writer import FileWriter
    from torch.utils.tensorboard.writer import SummaryWriter as TorchSummaryWriter

    class _FileWriter(FileWriter):
        def __init__(self, log_dir: str, filename_suffix: str = "", on_error: str = "raise") -> None:
            self.event_writer = event_file(log_dir, filename_suffix, on_error)  # (no tensorboard thread)

    class SummaryWriter(TorchSummaryWriter):
        """torch's SummaryWriter, writing through a :class:`torchbp.monitor.events.EventFile`."""

        def __init__(self, *args, on_error: str = "raise", **kwargs) -> None:
            self.on_error = on_error  # (before torch's __init__ opens the first file writer)
            super().__init__(*args, **kwargs)

        def _get_file_writer(self):
            if self.all_writers is None or self.file_writer is None:
                self.file_writer = _FileWriter(self.log_dir, self.filename_suffix, self.on_error)
                self.all_writers = {self.file_writer.get_logdir(): self.file_writer}
            return self.file_writer

    return SummaryWriter


def serialized_event_writer(file_writer: Any) -> Callable[[bytes], None] | None:
    """The function that queues one serialized ``Event`` (bytes) on ``file_writer`` (a ``SummaryWriter``'s
    ``_get_file_writer()``) as it is, or None if it has none.

    torch's ``FileWriter.add_event`` takes only an ``Event`` object, which its event writer serializes again;
    events built as bytes would have to be parsed back (``Event.FromString``) to be handed over, and then encoded a
    second time. Its ``event_writer`` (public attribute) is torchbp's ``EventFile`` (``add_serialized_event``) for
    the monitor's own writer, or TensorBoard's ``EventFileWriter`` (also wandb's ``sync_tensorboard`` subclass of
    it), whose private ``_async_writer.write(bytes)`` is what its own ``add_event`` calls with the serialized
    event: its thread frames the bytes as a record (TensorBoard's CRC) and appends them to that writer's file.
    Checked on torch 2.13.0 and tensorboard 2.21.0; no public API (``add_event(Event.FromString(data))`` is the
    public way, at the cost of the second encode).
    """
    event_writer = getattr(file_writer, "event_writer", None)
    write = getattr(event_writer, "add_serialized_event", None)
    if write is None:
        write = getattr(getattr(event_writer, "_async_writer", None), "write", None)
    return write if callable(write) else None

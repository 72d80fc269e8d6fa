"""Which monitor owns which module: the hooks the monitor puts on a model, the weak map from each monitored module to
its monitor (:func:`monitor_of`), a new monitor replacing the old one, and the watch for a model changed under
its monitor.

A copy of a monitored model (``copy.deepcopy``, ``torch.save``, ``AveragedModel``) is not monitored: its hooks
(:class:`_Hook`) copy as hooks that do nothing, and its modules are not in the map.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from .. import _torch_private
from ..nn import ReLU, is_monitored_layer

if TYPE_CHECKING:
    from . import DeltaMonitor

__all__ = ["monitor_of"]


class _Hook:
    """A hook the monitor puts on the model or on a parameter. A copy of the model (``copy.deepcopy``,
    ``torch.save``, ``AveragedModel``) gets a hook that does nothing instead: the copy is not monitored,
    and copying needs nothing of the monitor (its threads and locks cannot be copied)."""

    __torch_unserializable__ = True  # (torch.save leaves parameter hooks out: no warning for these)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __reduce__(self):
        return (_Hook, (_nothing,))


def _nothing(*args) -> None:
    return None


# Which monitor owns each monitored module (a copy of a module is not in it), by a weak reference: the monitor holds
# the model, so a strong one would keep both alive for ever once dropped together.
_owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _owner(module: nn.Module) -> DeltaMonitor | None:
    """The monitor that owns ``module``, or ``None``."""
    ref = _owners.get(module)
    return None if ref is None else ref()


def monitor_of(model: nn.Module) -> DeltaMonitor | None:
    """The :class:`DeltaMonitor` attached to ``model``'s layers, or ``None``.

    The handle to a monitor that is no longer held (a notebook cell run again): ``torchbp.monitor_of(model).close()``.
    Where parts of ``model`` have monitors of their own, the one of its first monitored layer (in model order);
    a compiled or data-parallel wrapper is unwrapped, as by :class:`DeltaMonitor`.

    Example::

        >>> model = torchbp.nn.Linear(4, 2)
        >>> monitor = torchbp.DeltaMonitor(model)
        >>> torchbp.monitor_of(model) is monitor
        True
    """
    for module in _unwrap(model).modules():
        owner = _owner(module) if is_monitored_layer(module) else None
        if owner is not None:
            return owner
    return None


class _Replacements:
    """Watches, while some monitor is attached, for its model changed under it: a monitored layer replaced
    (``model[0] = torchbp.nn.Linear(...)``, a block reassigned) or a layer it would monitor added (a second
    ``torchbp.convert``): a global module registration hook of torch (public API), which runs when a
    submodule is assigned, not in training. The monitor then warns, once, naming the layers."""

    def __init__(self) -> None:
        self.monitors: weakref.WeakSet = weakref.WeakSet()  # the attached monitors
        self.handle = None

    def watch(self, monitor: DeltaMonitor, on: bool) -> None:
        if on:
            self.monitors.add(monitor)
        else:
            self.monitors.discard(monitor)
        if self.monitors and self.handle is None:
            self.handle = nn.modules.module.register_module_module_registration_hook(self._registered)
        elif not self.monitors and self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _registered(self, parent: nn.Module, name: str, module: nn.Module | None) -> None:
        old = _torch_private.registered_submodule(parent, name)  # (the hook runs before the assignment)
        if old is module:
            return
        for monitor in list(self.monitors):
            prefix = monitor._tree.get(parent)
            if prefix is None:
                continue  # (not a module of this monitor's model)
            kept = set() if module is None else set(module.modules())
            gone = set() if old is None else set(old.modules()) - kept
            replaced = [n for n, m in monitor.layers.items() if m in gone]
            added = (
                []
                if module is None
                else [
                    ".".join(filter(None, (prefix, name, sub)))
                    for sub, m in module.named_modules()
                    if is_monitored_layer(m) and m not in _owners
                ]
            )
            if replaced or added:
                _changed(monitor, replaced[::-1], added)


def _changed(monitor: DeltaMonitor, replaced: list[str], added: list[str]) -> None:
    """The model changed under the monitor: it keeps the layers it attached to and sees no new one."""
    parts = [
        f"replaced: {', '.join(map(repr, replaced))}" if replaced else "",
        f"added: {', '.join(map(repr, added))}" if added else "",
    ]
    monitor._host.warn_once(
        "changed",  # (once: the fix is the same for every later change)
        f"layers of the monitored model changed after the monitor attached ({'; '.join(filter(None, parts))}): "
        "the replaced and the new layers are not monitored; close this monitor and make a new one, "
        "DeltaMonitor(model, ...), after changing the model",
    )


_replacements = _Replacements()


def _monitors_of(layers: dict[str, nn.Module]) -> list[DeltaMonitor]:
    """The monitors attached to any of ``layers``."""
    others: list[DeltaMonitor] = []
    for layer in layers.values():
        other = _owner(layer)
        if other is not None and other not in others:
            others.append(other)
    return others


def _replace(others: list[DeltaMonitor]) -> None:
    """Close ``others``, with one warning each: a new monitor on a monitored model replaces the old one (a
    notebook cell run again leaves the old one attached, and no handle to it)."""
    for other in others:
        warnings.warn(
            f"DeltaMonitor: closing the monitor already on this model ({other._log_shown()}, last step "
            f"{other.step}): the new one replaces it",
            stacklevel=3,
        )
        other.close()


def _unwrap(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"DeltaMonitor: expected a torch.nn.Module, got {type(model).__name__}")
    while True:
        inner = _torch_private.compiled_module_original(model)  # torch.compile's OptimizedModule
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def take(monitor: DeltaMonitor) -> list[ReLU]:
    """Make ``monitor`` the owner of its layers, and of the torchbp ReLUs of its model no other monitor owns
    (returned); raises if another monitor owns one of its layers."""
    taken = [name for name, layer in monitor.layers.items() if _owner(layer) is not None]
    if taken:
        other = _owner(monitor.layers[taken[0]])
        raise RuntimeError(
            f"DeltaMonitor: layer {taken[0]!r} is already monitored by another DeltaMonitor "
            f"({other._log_shown()}); close that one first: torchbp.monitor_of(model).close()"
        )
    for layer in monitor.layers.values():
        _owners[layer] = weakref.ref(monitor)
    relus = []
    for relu in monitor.model.modules():
        if isinstance(relu, ReLU) and _owner(relu) is None:
            _owners[relu] = weakref.ref(monitor)
            relus.append(relu)
    return relus


def release(monitor: DeltaMonitor, modules: list[nn.Module]) -> None:
    """Take the slots off ``modules`` and give up ``monitor``'s ownership of them."""
    for module in modules:
        module.__dict__.pop("_torchbp_slot", None)
        if _owner(module) is monitor:
            del _owners[module]

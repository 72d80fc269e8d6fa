"""The checks of :class:`torchbp.monitor.DeltaMonitor`'s arguments, made where they are given (the constructor,
the settable :attr:`~torchbp.monitor.DeltaMonitor.every` and its kin): each error says what was expected, what
was received, and the fix.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .events import ON_ERROR


def check_count(name: str, value: Any) -> int:
    """``every``, ``histogram_every``, ``image_every`` or ``max_history``, checked (as given to the constructor)."""
    low = 0 if name in ("histogram_every", "image_every") else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"DeltaMonitor: {name} must be an int >= {low}, got {value!r}")
    return value


def check(log, every, histogram_every, image_every, max_history, scaler, step) -> int:
    """The constructor's counts, ``scaler`` and ``step``, checked; returns ``every`` (its default: ``10`` with a
    log, ``1`` without)."""
    if every is None:
        every = 10 if log is not None else 1
    for name, value in (
        ("every", every),
        ("histogram_every", histogram_every),
        ("image_every", image_every),
        ("max_history", max_history),
    ):
        if value is not None or name == "every":
            check_count(name, value)
    if scaler is not None and not hasattr(scaler, "get_scale"):
        raise TypeError(f"DeltaMonitor: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if step is not None and not callable(step):
        raise TypeError(
            f"DeltaMonitor: step must be a callable returning the step number (e.g. "
            f"step=lambda: trainer.global_step) or None, got {type(step).__name__}"
        )
    return every


def check_layers(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """A model with no layer to monitor: the error names its ``torch.nn.Linear`` layers, to convert."""
    if not layers:
        plain = [name or "<model>" for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        hint = (
            f"; it has torch.nn.Linear layers ({', '.join(plain[:5])}): call torchbp.convert(model) first"
            if plain
            else "; build the model with torchbp.nn.Linear or call torchbp.convert(model)"
        )
        raise ValueError(f"DeltaMonitor: found no torchbp.nn.Linear in {type(model).__name__}{hint}")


def check_on_error(on_error: Any) -> str:
    """``on_error``: one of :data:`torchbp.monitor.events.ON_ERROR`."""
    if on_error not in ON_ERROR:
        raise ValueError(f"DeltaMonitor: on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error

"""What both trainer callbacks share: checking the monitor options, and closing a monitor without failing training."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from ..monitor import DeltaMonitor

#: DeltaMonitor arguments a callback sets itself.
_SET_BY_CALLBACK = ("model", "step")


def check_options(callback: str, options: dict[str, Any]) -> dict[str, Any]:
    """The DeltaMonitor keyword arguments in ``options``, validated by name (the values are checked when the
    monitor is made, at the start of training)."""
    accepted = [name for name in inspect.signature(DeltaMonitor).parameters if name not in _SET_BY_CALLBACK]
    for name in options:
        if name in _SET_BY_CALLBACK:
            raise TypeError(
                f"{callback}: {name}= is set by the callback (the trained model; the trainer's global step), "
                f"got {name}={options[name]!r}; remove it"
            )
        if name not in accepted:
            raise TypeError(
                f"{callback}: unexpected option {name!r}; the options are DeltaMonitor's: {', '.join(accepted)}"
            )
    return dict(options)


def with_scaler(options: dict[str, Any], scaler: Any) -> dict[str, Any]:
    """``options`` with ``scaler=`` the trainer's own loss scaler (float16 mixed precision), unless the user gave
    one: the monitor divides its scale out of the statistics, and flags a step it overflowed rather than warn."""
    if scaler is not None and options.get("scaler") is None:
        return {**options, "scaler": scaler}
    return options


def close_quietly(monitor: DeltaMonitor | None, callback: str) -> None:
    """Close ``monitor``; a failure to write its logs warns instead of failing the training run."""
    if monitor is None:
        return
    try:
        monitor.close()
    except Exception as e:  # (the monitor keeps its error for close(): it must not end a finished run)
        warnings.warn(f"{callback}: closing the DeltaMonitor failed: {e}", RuntimeWarning, stacklevel=3)

"""The event writer: opening the monitor's TensorBoard writer (one function) and the sink its events go to."""

from __future__ import annotations

import os
import sys

from .. import _events


def open_writer(log):
    """``(writer, owned)``: ``log`` itself if it is a ``SummaryWriter`` (not owned), else a SummaryWriter
    writing to the directory ``log`` (created if needed; owned: closed by the monitor)."""
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
    if _wandb_syncs_tensorboard():
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(path, flush_secs=1), True  # (wandb watches the directories of the writers it patched)
    return _events.summary_writer(path), True


def _wandb_syncs_tensorboard() -> bool:
    """``wandb.init(sync_tensorboard=True)`` (or ``wandb.tensorboard.patch()``) is in effect: wandb then replaces
    torch's ``EventFileWriter`` by a subclass that registers each new log directory with the W&B run, and syncs
    only those directories. A monitor logging to a directory then writes through torch's ``SummaryWriter`` (the
    writer that patch sees) instead of :func:`torchbp._events.summary_writer`. wandb is not imported here."""
    wandb = sys.modules.get("wandb")
    return bool(getattr(wandb, "patched", {}).get("tensorboard")) if wandb is not None else False


class _Sink:
    """Where the monitor's (serialized) events go: the file writer of ``writer`` (the monitor's own, or a
    SummaryWriter of the user's), whose background thread writes them."""

    def __init__(self, writer) -> None:
        self.writer = writer

    def write(self, data: bytes) -> None:
        file_writer = self.writer._get_file_writer()
        if hasattr(file_writer, "add_serialized_event"):
            file_writer.add_serialized_event(data)
        else:
            from tensorboard.compat.proto.event_pb2 import Event

            file_writer.add_event(Event.FromString(data))

    def flush(self) -> None:
        self.writer.flush()


def png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return height, width

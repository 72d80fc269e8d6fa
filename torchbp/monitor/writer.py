"""The event writer: opening the monitor's TensorBoard writer (one function) and the sink its events go to."""

from __future__ import annotations

import os

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
    return _events.summary_writer(path), True


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

"""The event writer: opening the monitor's TensorBoard writer (one function) and the sink its events go to."""

from __future__ import annotations

import os
import sys

from .. import _torch_private
from . import events as _events


def open_writer(log, on_error: str = "warn"):
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
    return _events.summary_writer(path, on_error=on_error), True


def _wandb_syncs_tensorboard() -> bool:
    """``wandb.init(sync_tensorboard=True)`` (or ``wandb.tensorboard.patch()``) is in effect: wandb then replaces
    torch's ``EventFileWriter`` by a subclass that registers each new log directory with the W&B run, and syncs
    only those directories. A monitor logging to a directory then writes through torch's ``SummaryWriter`` (the
    writer that patch sees) instead of :func:`torchbp.monitor.events.summary_writer`. wandb is not imported here."""
    wandb = sys.modules.get("wandb")
    return bool(getattr(wandb, "patched", {}).get("tensorboard")) if wandb is not None else False


class _Sink:
    """Where the monitor's (serialized) events go: the file writer of ``writer`` (the monitor's own, or a
    SummaryWriter of the user's), whose background thread writes them.

    :meth:`write` takes any serialized ``Event`` (scalars, histograms, images, text or tensor summaries) and
    hands those very bytes to the writer's event file: each event is encoded once, by the monitor. (torch's
    ``FileWriter.add_event`` takes only ``Event`` objects; see ``_torch_private.serialized_event_writer``.) A
    SummaryWriter of the user's keeps its single event file: the monitor's events are appended to it by that
    writer's own thread, framed with TensorBoard's pure-Python CRC; the monitor's own writer frames them with
    ``google-crc32c``. (A second event file of the monitor's in the user's directory would not do: TensorBoard
    reads the files of a directory one after the other and does not go back to an older one.)

    Every call into the writer is guarded: with ``on_error="warn"`` an exception (a SummaryWriter of the
    user's whose thread died on a full disk, say) is warned of once and the event counted as dropped; the
    monitor's own event file reports its write errors the same way itself (``on_error`` is passed to it)."""

    def __init__(self, writer, on_error: str = "warn") -> None:
        self.writer = writer
        logdir = writer.get_logdir() if hasattr(writer, "get_logdir") else repr(writer)
        self.errors = _events.WriteErrors(str(logdir), on_error, "DeltaMonitor")
        self.failed = 0  # events the writer raised on
        self._file_writer = None
        self._add = None  # queues one serialized event on _file_writer, as it is
        self._event_files: list = []  # the writer's torchbp EventFiles (a new one after it reopens)

    @property
    def dropped(self) -> int:
        """Events not written: those the writer raised on, and those its event files dropped."""
        return self.failed + sum(f.dropped for f in self._event_files)

    def guarded(self, fn, *args, events: int = 0) -> None:
        """``fn(*args)``; with on_error="warn", an exception is warned of once and ``events`` counted as dropped."""
        try:
            fn(*args)
        except Exception as e:
            if self.errors.on_error == "raise":
                raise
            self.failed += events
            self.errors.failed(e, 0, self.dropped)

    def write(self, data: bytes) -> None:
        self.guarded(self._write, data, events=1)

    def _write(self, data: bytes) -> None:
        file_writer = self.writer._get_file_writer()
        if file_writer is not self._file_writer:  # (a new one after the writer was closed and reopened)
            self._file_writer = file_writer
            self._add = _torch_private.serialized_event_writer(file_writer) or self._parse_and_add
            event_file = getattr(file_writer, "event_writer", None)
            if hasattr(event_file, "dropped"):
                self._event_files.append(event_file)
        self._add(data)

    def _parse_and_add(self, data: bytes) -> None:
        """A file writer that takes only ``Event`` objects (none known to torchbp): the event is encoded twice."""
        from tensorboard.compat.proto.event_pb2 import Event

        self._file_writer.add_event(Event.FromString(data))

    def flush(self) -> None:
        self.guarded(self.writer.flush)
        self.errors.report(self.failed)  # (the monitor's own event file reports its own)


def png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return height, width

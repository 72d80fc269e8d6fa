"""The event writer: opening the monitor's TensorBoard writer (one function) and the sink its events go to."""

from __future__ import annotations

import gc
import os
import sys
import threading
import warnings
import weakref

from .. import _torch_private
from . import events as _events


def open_writer(log, on_error: str = "warn"):
    """``(writer, owned)``: ``log`` itself if it is a ``SummaryWriter`` (not owned), else a SummaryWriter
    writing to the directory ``log`` (created if needed; owned: closed by the monitor)."""
    if _torch_private.is_summary_writer(log):
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


def open_for(monitor, log, log_rank, replaced):
    """The writer of ``monitor`` (rank ``monitor.rank`` of ``monitor.world_size``) for its ``log`` argument:
    ``(writer, owns_writer, sink, claim)``, all ``None`` (and ``False``) where this rank does not write. The
    directory is claimed first (one open monitor per directory; those in ``replaced`` give theirs up), and
    released if the writer cannot be opened."""
    claim = None
    if log is not None and (log_rank is None or monitor.rank == log_rank):
        if log_rank is None and monitor.world_size > 1 and isinstance(log, (str, os.PathLike)):
            log = os.path.join(os.fspath(log), f"rank{monitor.rank}")
        owned = isinstance(log, (str, os.PathLike))
        claim = claim_directory(log, monitor, monitor._names, owned, replaced)
        try:
            log_writer, owns = open_writer(log, monitor.on_error)
        except BaseException:
            release_directory(claim)
            raise
        return log_writer, owns, _Sink(log_writer, monitor.on_error), claim
    return None, False, None, claim


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
        file_writer = _torch_private.file_writer_of(self.writer)
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


# -- one log directory, one monitor -------------------------------------------------------------------


class Claim:
    """An open monitor's hold on its log directory (see :func:`claim_directory`): the directory as the user
    named it and its real path, the monitor (a weak reference), the writer and whether the monitor owns it,
    the layer names its tags use, and its host side (closed in its place if the monitor is collected unclosed)."""

    def __init__(self, shown: str, real: str, monitor, writer, owned: bool, names) -> None:
        self.shown, self.real, self.monitor = shown, real, weakref.ref(monitor)
        self.writer, self.owned, self.names = writer, owned, frozenset(names)
        self.host = None  # (set once the monitor has built it)

    def shares_with(self, other: Claim) -> bool:
        """Both write through one SummaryWriter of the user's, to different tags (disjoint layer names)."""
        return not self.owned and not other.owned and self.writer is other.writer and not self.names & other.names


_claims: dict[str, list[Claim]] = {}  # real path -> the claims of the monitors logging there
_claims_lock = threading.Lock()


def log_directory(log) -> str | None:
    """The directory ``log`` (a path, or a SummaryWriter's ``get_logdir()``) names; ``None`` if it names none."""
    if isinstance(log, (str, os.PathLike)):
        return os.fspath(log)
    logdir = getattr(log, "get_logdir", None)
    return str(logdir()) if callable(logdir) else None


def log_shown(claim: Claim | None, log_writer) -> str:
    """Where a monitor logs, for a message: ``logging to '<directory>'``, or ``without a log``."""
    directory = claim.shown if claim is not None else None
    if directory is None and log_writer is not None:
        directory = log_directory(log_writer)
    return f"logging to {directory!r}" if directory is not None else "without a log"


def claim_directory(log, monitor, names, owned: bool, replaced=()) -> Claim | None:
    """Register ``monitor`` (logging its layers ``names``) as the writer of the directory ``log`` names; the
    monitors it ``replaced`` (closed next) do not count.

    TensorBoard shows one run per directory: two open monitors writing to one directory would mix two models'
    δ under the same tags (one run, each step twice). So a directory has one open monitor at a time, whatever
    path string names it (relative or absolute, a trailing slash, a symbolic link); monitors sharing one
    SummaryWriter of the user's may share it when their layer names differ. A monitor collected without being
    closed (its model gone too) gives its directory up: its event file is closed here, with one warning. A
    closed monitor's directory is free: a new monitor appends to it (a resumed run).

    Raises:
        RuntimeError: another open monitor logs to that directory.
    """
    shown = log_directory(log)
    if shown is None:
        return None
    real = os.path.normcase(os.path.realpath(shown))
    claim = Claim(shown, real, monitor, log if not owned else None, owned, names)
    for attempt in range(2):
        with _claims_lock:
            held = _live_claims(real)
            blocking = [other for other in held if not claim.shares_with(other) and other.monitor() not in replaced]
            if not blocking:
                held.append(claim)
            if held:
                _claims[real] = held
            if not blocking:
                return claim
        if attempt == 0:
            gc.collect()  # (a monitor dropped with its model, not yet collected, gives the directory up)
    other = blocking[0]
    holder = other.monitor()
    model = type(holder.model).__name__ if holder is not None else "model"
    raise RuntimeError(
        f"DeltaMonitor: another open DeltaMonitor (of a {model}) already logs to the directory {shown!r} (as "
        f"{other.shown!r}); TensorBoard shows one run per directory, and two models' δ in one run mix under the same "
        f"tags: give each model its own subdirectory (e.g. log={os.path.join(shown, 'model2')!r}), or close the other "
        "monitor first (its close(), or torchbp.monitor_of(its_model).close())"
    )


def _live_claims(real: str) -> list[Claim]:
    """The claims on ``real`` (of monitors still open: closing releases a claim); those of monitors collected unclosed are closed here."""
    live = []
    for claim in _claims.pop(real, []):
        monitor = claim.monitor()
        if monitor is None:
            if claim.host is not None and claim.host.sink is not None:
                warnings.warn(
                    f"DeltaMonitor: closing the monitor logging to {claim.shown!r}, whose model is no longer in use "
                    "(it was not closed)",
                    stacklevel=5,
                )
                try:
                    claim.host.close(claim.owned)
                except Exception as e:  # (its on_error="raise": nobody is left to catch it)
                    warnings.warn(f"DeltaMonitor: closing the log {claim.shown!r} failed: {e}", stacklevel=5)
        else:  # (open: closing releases its claim)
            live.append(claim)
    return live


def release_directory(claim: Claim | None) -> None:
    """The monitor of ``claim`` is closed: its directory is free."""
    if claim is None:
        return
    with _claims_lock:
        held = [other for other in _claims.get(claim.real, []) if other is not claim]
        if held:
            _claims[claim.real] = held
        else:
            _claims.pop(claim.real, None)

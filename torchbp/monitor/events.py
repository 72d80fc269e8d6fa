"""TensorBoard event files written by a background thread, off the training thread's critical path.

An :class:`EventFile` owns one event file, one daemon thread and a bounded queue. The training thread
hands it a finished ``Event`` protobuf (:meth:`EventFile.add_event`, serialized in the caller, a few µs)
or an ``Event`` already serialized (:meth:`EventFile.add_serialized_event`: what the DeltaMonitor writes)
and goes on at once. The writer thread frames each event as a TFRecord (length, masked CRC-32C of the length, payload, masked CRC-32C of the
payload; the CRC from ``google-crc32c``) and writes it. :func:`summary_writer` wraps an EventFile in a
subclass of torch's ``SummaryWriter``, so ``add_scalar``, ``add_histogram``, ``add_image``... go through
the same thread.

**Flush policy.** The writer thread takes each item off the queue as soon as it is there, and writes what
it has taken with one ``write()`` system call (the file is unbuffered: the bytes are handed to the OS,
where they survive the process being killed, though not a power cut) whenever the queue runs empty, and at
least every :data:`FLUSH_INTERVAL_S` (0.05 s) under continuous load. So every event is handed to the OS
within about ``FLUSH_INTERVAL_S`` plus the time to write the events queued before it; all of them when
:meth:`~EventFile.flush` or :meth:`~EventFile.close` returns, and at normal interpreter exit (an
``atexit`` hook closes every open file). The thread sleeps on the queue when there is nothing to do: no
polling, and one system call per batch of events.

**Back-pressure, never data loss.** At most ``max_queue`` (default :data:`MAX_QUEUE`) events wait; a caller
that finds the queue full blocks until the thread has made room.

**Errors.** An exception in the writer thread (a full disk) is kept and reported in the calling thread by
the next call of ``add_event``, ``add_serialized_event``, ``flush`` or ``close``; that
call does its own work first (queues its item, drains, closes), so only the failed items are lost. With
``on_error="raise"`` (:class:`EventFile`'s default) the report is a ``RuntimeError`` naming the log
directory with the original exception as its ``__cause__``; with ``on_error="warn"`` (what the
DeltaMonitor uses: logging must never stop training) it is one warning naming the directory and the error,
later errors are counted in :attr:`EventFile.dropped`, and ``flush()``/``close()`` warn with the number of
events not written. Either way the writer goes on: a batch whose write fails is dropped (counted) and the
file cut back to its last whole record, so that the next batch, retried as usual, follows a readable file
(a full disk resumes being written once space is freed); an event file deleted under the writer (its
directory removed) is noticed before the next batch, and the writer continues in a new file, recreating
the directory (the events of the deleted file are counted as dropped).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import queue
import socket
import struct
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterable

import numpy as np

FLUSH_INTERVAL_S = 0.05
"""Under continuous load, the writer thread hands what it has to the OS at least this often (seconds)."""
MAX_QUEUE = 256
"""Default bound on the events queued; beyond it, ``add_event`` and ``add_serialized_event`` block."""
_BATCH_BYTES = 1 << 20  # a batch is also written once it holds this many bytes

_counter = itertools.count()
_CLOSE = object()  # queue item: write what is left, close the file, end the thread
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_live_writers: set[_Writer] = set()  # writers whose thread may still have events to write
ON_ERROR = ("raise", "warn")


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C of ``data`` that TFRecord framing stores, equal to TensorBoard's ``masked_crc32c``.

    .. math:: \\text{masked} = (\\operatorname{rotr}_{15}(\\operatorname{crc32c}(data)) + \\text{0xa282ead8}) \\bmod 2^{32}

    The CRC-32C (Castagnoli) itself is ``google_crc32c.value(data)`` (hardware instructions where the CPU
    has them).
    """
    import google_crc32c  # (here, not at the top: import torchbp loads it only once a monitor writes)

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
    header = _U64.pack(len(data))
    return b"".join((header, _U32.pack(masked_crc32c(header)), data, _U32.pack(masked_crc32c(data))))


def ensure_writable(path: str) -> None:
    """Create the log directory ``path`` if needed and check that a file can be written in it.

    Safe to call from several processes at once (DDP ranks): each probes with its own temporary file.

    Raises:
        OSError: if the directory cannot be created or written.
    """
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".torchbp-write-test-", dir=path)
    os.close(fd)
    os.remove(probe)


def _create_event_file(logdir: str, suffix: str):
    """Create a new event file whose name no other writer uses, in this process or another."""
    while True:  # "torchbp<n>" keeps it apart from TensorBoard's "<pid>.<n>"; "xb" makes a clash a retry
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
            f".torchbp{next(_counter)}{suffix}"
        )
        path = os.path.join(logdir, name)
        try:
            return open(path, "xb", buffering=0), path  # noqa: SIM115 (the writer thread closes it)
        except FileExistsError:
            continue


def _identity(file_or_path) -> tuple[int, int] | None:
    """(device, inode) of an open file or a path; None if there is none (a deleted path, a file-like object)."""
    try:
        st = os.stat(file_or_path) if isinstance(file_or_path, str) else os.fstat(file_or_path.fileno())
    except (OSError, AttributeError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _write_error(logdir: str, error: BaseException, more: int) -> RuntimeError:
    also = f" (and {more} later error{'s' if more > 1 else ''})" if more else ""
    return RuntimeError(
        f"EventFile: writing TensorBoard events to {logdir!r} failed in the writer thread: "
        f"{type(error).__name__}: {error}{also}. The events that failed are lost; the others are written. "
        "Check the free disk space."
    )


class WriteErrors:
    """What a writer does with its write errors, in the calling thread: ``"raise"`` them, or ``"warn"``
    once (naming the directory and the error) and count what was not written.

    Args:
        logdir (str): the directory written to, named in the messages.
        on_error (str): ``"raise"`` or ``"warn"``.
        who (str): the writer, at the head of each message. Default: ``"torchbp"``.
    """

    def __init__(self, logdir: str, on_error: str, who: str = "torchbp") -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"{who}: on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.logdir, self.on_error, self.who = logdir, on_error, who
        self.first: BaseException | None = None
        self.reported = 0  # dropped count at the last warning

    def failed(self, error: BaseException, more: int, dropped: int) -> None:
        """``error`` (and ``more`` later errors) happened; ``dropped`` items are lost in all so far."""
        if self.on_error == "raise":
            raise _write_error(self.logdir, error, more) from error
        if self.first is None:
            self.first, self.reported = error, dropped
            warnings.warn(
                f"{self.who}: writing TensorBoard events to {self.logdir!r} failed: {type(error).__name__}: {error}. "
                "Training goes on; the writer retries with each new batch of events, and counts those it cannot "
                f"write ({dropped} so far; see .dropped, and the warning of flush() and close()).",
                RuntimeWarning,
                stacklevel=4,
            )

    def report(self, dropped: int) -> None:
        """At flush or close: warn how many items were not written, if more than at the last warning."""
        if self.on_error == "warn" and dropped > self.reported:
            self.reported = dropped
            first = "" if self.first is None else f" (first error: {type(self.first).__name__}: {self.first})"
            warnings.warn(
                f"{self.who}: {dropped} TensorBoard events were not written to {self.logdir!r}{first}",
                RuntimeWarning,
                stacklevel=4,
            )


class _Writer:
    """One open event file and the daemon thread that writes it.

    It holds no reference to its :class:`EventFile`, so an EventFile dropped without ``close()`` can be
    garbage-collected (its finalizer then closes the writer without waiting for it).
    """

    def __init__(self, logdir: str, path: str, file, max_queue: int, event_type: type, suffix: str = "") -> None:
        self.logdir, self.path, self._suffix = logdir, path, suffix
        self._file, self._event_type = file, event_type
        self._identity = _identity(file)  # (device, inode) of the open file: is it still the one at `path`?
        self._offset = 0  # bytes of whole records written
        self._written = -1  # events written to the current file (not counting the file_version header first)
        self.dropped = 0  # records lost: failed writes, a deleted file
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # unbounded; the bound is _slots
        self._slots = threading.Semaphore(max_queue)  # one per event queued
        self._lock = threading.Lock()  # orders the `closed` check with each put
        self._error_lock = threading.Lock()
        self._error: BaseException | None = None
        self._more_errors = 0
        self.closed = False
        self.orphaned = False  # its EventFile was garbage-collected: nobody will collect an error
        self._thread = threading.Thread(target=self._run, name=f"torchbp-events {os.path.basename(path)}", daemon=True)
        _live_writers.add(self)
        self._thread.start()

    # ---- calling thread ----------------------------------------------------------------------------

    def put(self, item: bytes) -> None:
        """Queue serialized event bytes; blocks while ``max_queue`` events are pending."""
        if self.closed:
            raise self._closed_error()
        while not self._slots.acquire(timeout=1.0):
            self._check_alive()
        with self._lock:
            if self.closed:
                self._slots.release()
                raise self._closed_error()
            self._queue.put(item)

    def flush(self) -> None:
        """Block until everything queued before the call is handed to the OS."""
        done = threading.Event()
        with self._lock:
            if self.closed:
                self.join()
                return
            self._queue.put(done)
        while not done.wait(timeout=1.0):
            self._check_alive()

    def close(self, wait: bool = True) -> None:
        """Write what is queued, close the file and end the thread; idempotent."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self._queue.put(_CLOSE)
        if wait:
            self.join()

    def join(self) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def abandon(self) -> None:
        """The EventFile was garbage-collected: close without blocking whoever ran the collection."""
        self.orphaned = True
        self.close(wait=False)

    def take_error(self) -> tuple[BaseException, int] | None:
        """The error the writer thread kept (if any) and how many later errors it counted; clears them."""
        if self._error is None:
            return None
        with self._error_lock:
            error, more = self._error, self._more_errors
            self._error, self._more_errors = None, 0
        return None if error is None else (error, more)

    def raise_error(self) -> None:
        """Raise, in the calling thread, the error the writer thread kept (if any)."""
        taken = self.take_error()
        if taken is not None:
            raise _write_error(self.logdir, *taken) from taken[0]

    def _closed_error(self) -> RuntimeError:
        return RuntimeError(
            f"EventFile for {self.logdir!r} is closed; call reopen() to continue in a new event file "
            "(torch's SummaryWriter reopens by itself on the next add_* call after close())"
        )

    def _check_alive(self) -> None:
        if not self._thread.is_alive():
            self.raise_error()
            raise RuntimeError(
                f"EventFile: the writer thread for {self.logdir!r} is no longer running (was the process "
                "forked?); open a new EventFile"
            )

    # ---- writer thread ------------------------------------------------------------------------------

    def _fail(self, error: BaseException, lost: int) -> None:
        self.dropped += lost
        with self._error_lock:
            if self._error is None:
                self._error = error
            else:
                self._more_errors += 1

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]

    def _write_batch(self, batch: list[bytes]) -> None:
        """Write ``batch``; where it does not fit whole, as many of its records as do, in order; drop the rest
        (counted), the file cut back to its last whole record."""
        try:
            if self._file is None or _identity(self.path) != self._identity:
                self._start_new_file()
        except BaseException as e:
            self._fail(e, len(batch))
            return
        error = self._append(b"".join(batch))
        written = len(batch) if error is None else 0
        if error is not None and len(batch) > 1:  # (a full disk may still take the first few records)
            while written < len(batch) and self._file is not None and self._append(batch[written]) is None:
                written += 1
        self._written += written
        if error is not None:
            self._fail(error, len(batch) - written)

    def _append(self, data: bytes) -> BaseException | None:
        """Write ``data`` after the last whole record; on failure cut the file back to it and return the error."""
        try:
            self._write(data)
        except BaseException as e:
            self._cut_back()
            return e
        self._offset += len(data)
        return None

    def _cut_back(self) -> None:
        """After a failed write: truncate the file to its last whole record (a partial one would stop
        TensorBoard's reader there); if even that fails, the next batch starts a new file."""
        try:
            self._file.truncate(self._offset)
            self._file.seek(self._offset)
        except BaseException:
            self._close_file()

    def _start_new_file(self) -> None:
        """The event file is gone (deleted, or its directory removed) or unusable: continue in a new one."""
        if self._file is not None:
            self._close_file()
            if self._written:  # the events of the deleted file are lost
                self._fail(FileNotFoundError(2, f"the event file {self.path!r} was deleted while being written"),
                           self._written)  # fmt: skip
        os.makedirs(self.logdir, exist_ok=True)
        file, path = _create_event_file(self.logdir, self._suffix)
        header = _record(self._event_type(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self._file, self.path, self._identity, self._offset, self._written = file, path, _identity(file), 0, 0
        self._write(header)
        self._offset = len(header)

    def _close_file(self) -> None:
        file, self._file = self._file, None
        with contextlib.suppress(BaseException):
            file.close()

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        done = False
        while not done:
            item = get()  # sleeps until there is something to do
            batch: list[bytes] = []
            size, waiters = 0, []
            deadline = time.monotonic() + FLUSH_INTERVAL_S
            while True:
                if item is _CLOSE:
                    done = True
                    break
                if isinstance(item, threading.Event):  # a flush(): write what came before it, now
                    waiters.append(item)
                    break
                batch.append(_record(item))
                size += len(batch[-1])
                self._slots.release()
                if size >= _BATCH_BYTES or time.monotonic() >= deadline:
                    break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write_batch(batch)
            for waiter in waiters:
                waiter.set()
        try:
            if self._file is not None:
                self._file.close()
        except BaseException as e:
            self._fail(e, 0)
        _live_writers.discard(self)
        if self.orphaned and self._error is not None:
            print(f"torchbp: writing TensorBoard events to {self.logdir!r} failed: {self._error!r}", file=sys.stderr)


@atexit.register
def _close_all() -> None:
    """At normal interpreter exit, write every queued event (the writer threads are daemons)."""
    for writer in list(_live_writers):
        writer.close()
        if writer._error is not None and not writer.orphaned:
            print(
                f"torchbp: writing TensorBoard events to {writer.logdir!r} failed: {writer._error!r}", file=sys.stderr
            )


class EventFile:
    """A TensorBoard event file written by a background thread (the flush policy is in this module's docstring).

    It has the interface of TensorBoard's ``EventFileWriter`` (``add_event``, ``flush``, ``close``,
    ``reopen``, ``get_logdir``) plus :meth:`add_serialized_event`. The file is named like TensorBoard's,
    ``events.out.tfevents.<time>.<host>.<pid>.torchbp<n><suffix>``, and created exclusively, so it never
    collides with a torch ``SummaryWriter``'s or another EventFile's, in this process or another.

    Args:
        logdir (str): the directory to write in; created if needed.
        filename_suffix (str): appended to the file name. Default: ``""``.
        max_queue (int): how many events may wait before ``add_event`` and ``add_serialized_event``
            block. Default: :data:`MAX_QUEUE` (256).
        on_error (str): ``"raise"``: an error of the writer thread is raised as a ``RuntimeError`` by the
            next call; ``"warn"``: it is warned of once, and ``flush()``/``close()`` warn how many events
            were not written (:attr:`dropped`). Either way the writer goes on (see the module docstring).
            Default: ``"raise"``.

    After :meth:`close`, ``add_event`` and ``add_serialized_event`` raise ``RuntimeError`` until :meth:`reopen` starts a
    new file. Events still queued at normal interpreter exit are written.

    Example::

        >>> import numpy as np
        >>> from tensorboard.compat.proto.event_pb2 import Event
        >>> from tensorboard.compat.proto.summary_pb2 import Summary
        >>> f = EventFile("runs/exp1")
        >>> f.add_event(Event(step=0, summary=scalar_summary([("loss", 0.25)])))
        >>> w = weight.detach().cpu().numpy()
        >>> counts, edges = np.histogram(w, bins=30)
        >>> value = histogram_value("w", w.min(), w.max(), w.size, w.sum(), (w * w).sum(), edges[1:], counts)
        >>> f.add_serialized_event(Event(step=0, summary=Summary(value=[value])).SerializeToString())
        >>> f.close()
    """

    def __init__(
        self, logdir: str, filename_suffix: str = "", *, max_queue: int = MAX_QUEUE, on_error: str = "raise"
    ) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"EventFile expected max_queue to be a positive int, got {max_queue!r}")
        self._Event = Event
        self._logdir, self._suffix, self._max_queue = str(logdir), filename_suffix, max_queue
        self._errors = WriteErrors(self._logdir, on_error)
        self._dropped_before = 0  # by the writers of the files before reopen()
        self._open()

    @property
    def dropped(self) -> int:
        """How many events were not written: failed writes, and the events of an event file deleted while it
        was written."""
        return self._dropped_before + self._writer.dropped

    def _report(self) -> None:
        taken = self._writer.take_error()
        if taken is not None:
            self._errors.failed(*taken, self.dropped)

    def _open(self) -> None:
        os.makedirs(self._logdir, exist_ok=True)
        file, path = _create_event_file(self._logdir, self._suffix)
        self._writer = _Writer(self._logdir, path, file, self._max_queue, self._Event, self._suffix)
        self._finalizer = weakref.finalize(self, self._writer.abandon)
        self._finalizer.atexit = False  # _close_all handles exit, and waits
        self._writer.put(self._Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    @property
    def path(self) -> str:
        """The path of the event file being written (a new one after :meth:`reopen`)."""
        return self._writer.path

    def get_logdir(self) -> str:
        """The directory the event file is in."""
        return self._logdir

    def add_event(self, event) -> None:
        """Queue ``event`` (a ``tensorboard.compat.proto.event_pb2.Event``) and return at once.

        It is serialized in the calling thread, so changing it afterwards does not change what is written.
        Blocks only while the queue is full.
        """
        if not isinstance(event, self._Event):
            raise TypeError(
                f"EventFile.add_event expected a tensorboard.compat.proto.event_pb2.Event, got "
                f"{type(event).__name__}; wrap a Summary as Event(summary=summary, step=step)"
            )
        self._writer.put(event.SerializeToString())
        self._report()

    def add_serialized_event(self, data: bytes) -> None:
        """Queue an ``Event`` already serialized (see :class:`ScalarEvents`) and return at once."""
        self._writer.put(bytes(data))
        self._report()

    def flush(self) -> None:
        """Block until everything added before the call is written and handed to the OS."""
        self._writer.flush()
        self._report()
        self._errors.report(self.dropped)

    def close(self) -> None:
        """Write everything queued, close the file and end the thread. Calling it again does nothing."""
        self._writer.close()
        self._finalizer.detach()
        self._report()
        self._errors.report(self.dropped)

    def reopen(self) -> None:
        """After :meth:`close`, continue in a new event file in the same directory; otherwise do nothing."""
        if self._writer.closed:
            self._writer.join()
            self._dropped_before += self._writer.dropped
            self._open()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class ScalarEvents:
    r"""Serialized ``Event``\ s of one fixed list of scalar tags, their values filled in by numpy.

    The protobuf encoding of ``Event(wall_time, step, summary=Summary(value=[Value(tag, simple_value)...]))``
    is built once per tag list, with a 4-byte slot for each float32 value; :meth:`event` writes a step's
    values into the slots in one numpy assignment. Building the same Event from protobuf objects costs
    ~25 µs per logged step of 21 scalars, this ~5 µs (what a monitor logging every step needs).
    Serialized summaries (histograms, images) can be appended: repeated fields concatenate.
    """

    def __init__(self, tags: list[str]) -> None:
        parts, offsets, at = [], [], 0
        for tag in tags:
            name = tag.encode()
            value = b"\x0a" + _varint(len(name)) + name + b"\x15"  # Value: 1 tag (string), 2 simple_value (float)
            head = b"\x0a" + _varint(len(value) + 4)  # Summary: 1 value (message)
            offsets.append(at + len(head) + len(value))
            parts.append(head + value + bytes(4))
            at += len(parts[-1])
        self._summary = np.frombuffer(bytearray(b"".join(parts)), dtype=np.uint8)
        self._slots = (np.array(offsets, dtype=np.int64)[:, None] + np.arange(4)).ravel()

    def event(self, step: int, wall_time: float, values, extra: bytes = b"") -> bytes:
        """The serialized Event of ``step`` with ``values`` (one per tag, in order) and serialized ``extra`` values."""
        return self.events([step], wall_time, np.asarray(values).reshape(1, -1), [extra])[0]

    def events(self, steps: list[int], wall_time: float, values: np.ndarray, extras: list[bytes]) -> list[bytes]:
        """The serialized Events of several steps at once: ``values`` has one row per step."""
        summaries = np.tile(self._summary, (len(steps), 1))
        summaries[:, self._slots] = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(len(steps), -1)
        out = []
        for step, summary, extra in zip(steps, summaries, extras):
            body = summary.tobytes() + extra
            # Event: 1 wall_time (double), 2 step (int64), 5 summary (message)
            out.append(b"\x09" + _F64.pack(wall_time) + b"\x10" + _varint(step) + b"\x2a" + _varint(len(body)) + body)
        return out


def scalar_summary(values: Iterable[tuple[str, float]]):
    """A ``Summary`` with one ``simple_value`` per ``(tag, value)`` pair."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values])


def histogram_value(tag: str, min, max, num, sum, sum_squares, bucket_limits, bucket_counts):
    """A ``Summary.Value`` holding a ``HistogramProto``; bucket ``i`` counts the values in
    ``(bucket_limits[i - 1], bucket_limits[i]]``. Sequences and numpy arrays are both accepted."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    histo = HistogramProto(
        min=min, max=max, num=num, sum=sum, sum_squares=sum_squares, bucket_limit=bucket_limits, bucket=bucket_counts
    )
    return Summary.Value(tag=tag, histo=histo)


def image_value(tag: str, png_bytes: bytes, height: int, width: int):
    """A ``Summary.Value`` holding an encoded (PNG) image of ``height`` × ``width`` pixels."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary.Value(tag=tag, image=Summary.Image(height=height, width=width, encoded_image_string=png_bytes))


def summary_writer(logdir: str, on_error: str = "raise"):
    """A ``torch.utils.tensorboard.SummaryWriter`` whose events go through an :class:`EventFile`.

    Same API as torch's (``add_scalar``, ``add_histogram``, ``add_image``, ``add_custom_scalars``,
    ``flush``, ``close``, ``get_logdir``...), with this module's flush policy: every event handed to the OS
    within about ``FLUSH_INTERVAL_S``, all of them when ``flush()`` or ``close()`` returns. ``add_scalars``
    is the exception: torch opens one of its own ``FileWriter``\\ s per tag for it. ``on_error`` is
    :class:`EventFile`'s.
    """
    WriteErrors(logdir, on_error)  # (validates it)
    return _summary_writer_class()(logdir, on_error=on_error)


_SummaryWriter: type | None = None


def _summary_writer_class() -> type:
    global _SummaryWriter
    if _SummaryWriter is None:
        from .. import _torch_private  # (here: this module imports no torch until a writer is made)

        _SummaryWriter = _torch_private.summary_writer_class(
            lambda log_dir, filename_suffix, on_error: EventFile(log_dir, filename_suffix, on_error=on_error)
        )
    return _SummaryWriter

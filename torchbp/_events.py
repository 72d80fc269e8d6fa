"""TensorBoard event files written synchronously, cheaply enough to log every training step.

``torch.utils.tensorboard.SummaryWriter`` hands each event to a background thread that checksums it
with TensorBoard's pure-Python CRC-32C (about 0.15 µs per byte, holding the GIL) and flushes to disk
every two minutes. The monitor wants each logged step on disk before training goes on, at a cost
small against a training step, so its own writer (:class:`SummaryWriter` below, a subclass of
torch's with the same API) writes and flushes every event in the calling thread, with the CRC-32C
from google-crc32c. The files are ordinary event files (TFRecord framing:
length, masked CRC of the length, payload, masked CRC of the payload).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import tempfile
import time

import google_crc32c

_counter = itertools.count()


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C of ``data`` that TFRecord framing stores, equal to TensorBoard's ``masked_crc32c``;
    the CRC-32C itself is ``google_crc32c.value(data)``."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def ensure_writable(path: str) -> None:
    """Create the log directory ``path`` if needed and check that a file can be written in it (OSError if not)."""
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".torchbp-write-test-", dir=path)  # own name: DDP ranks probe at once
    os.close(fd)
    os.remove(probe)


class _EventFile:
    """TensorBoard's ``EventFileWriter`` interface, written and flushed in the calling thread."""

    def __init__(self, logdir: str, filename_suffix: str = "") -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._logdir, self._suffix = logdir, filename_suffix
        os.makedirs(logdir, exist_ok=True)
        while True:  # a name no other writer uses ("torchbp" keeps it apart from TensorBoard's own numbering)
            name = (
                f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
                f".torchbp{next(_counter)}{filename_suffix}"
            )
            try:
                self._file = open(os.path.join(logdir, name), "xb")  # noqa: SIM115
                break
            except FileExistsError:
                continue
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def get_logdir(self) -> str:
        return self._logdir

    def add_event(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        record = header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))
        self._file.write(record)
        self._file.flush()  # to the OS: survives the process being killed

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def reopen(self) -> None:
        """After close(), continue in a new event file (as TensorBoard's writer does)."""
        if self._file.closed:
            self.__init__(self._logdir, self._suffix)


def summary_writer(logdir: str):
    """A ``torch.utils.tensorboard.SummaryWriter`` whose events are written synchronously (see above)."""
    from torch.utils.tensorboard.writer import FileWriter
    from torch.utils.tensorboard.writer import SummaryWriter as TorchSummaryWriter

    class _FileWriter(FileWriter):
        def __init__(self, log_dir: str, filename_suffix: str = "") -> None:  # no background thread
            self.event_writer = _EventFile(log_dir, filename_suffix)

    class SummaryWriter(TorchSummaryWriter):
        """torch's SummaryWriter; every event is on disk (flushed to the OS) when its call returns."""

        def _get_file_writer(self):
            if self.all_writers is None or self.file_writer is None:
                self.file_writer = _FileWriter(self.log_dir, self.filename_suffix)
                self.all_writers = {self.file_writer.get_logdir(): self.file_writer}
            return self.file_writer

    return SummaryWriter(logdir)

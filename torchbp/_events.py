"""TensorBoard event files written synchronously, cheaply enough to log every training step.

``torch.utils.tensorboard.SummaryWriter`` hands each event to a background thread that checksums it
with TensorBoard's pure-Python CRC-32C (about 0.15 µs per byte, holding the GIL) and flushes to disk
every two minutes. The monitor wants each logged step on disk before training goes on, at a cost
small against a training step, so its own writer (:class:`SummaryWriter` below, a subclass of
torch's with the same API) writes and flushes every event in the calling thread, with a CRC-32C
computed by table lookups in numpy. The files are ordinary event files (TFRecord framing:
length, masked CRC of the length, payload, masked CRC of the payload).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

import numpy as np

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_CHUNK = 4096  # bytes per table lookup pass; the tables cost 4 MiB + 512 KiB, built on first use
_counter = itertools.count()
_tables: tuple[np.ndarray, np.ndarray] | None = None


def _byte_table() -> list[int]:
    table = []
    for v in range(256):
        c = v
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        table.append(c)
    return table


_BYTE = _byte_table()
_BITS = np.arange(32, dtype=np.uint32)
_REVERSED = np.arange(_CHUNK - 1, -1, -1)


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    """``at[k, v]``: the CRC state after byte v followed by k zero bytes, from state 0;
    ``shift[m, j]``: the state after m zero bytes from state ``1 << j`` (the CRC is linear over GF(2))."""
    byte = np.array(_BYTE, np.uint32)

    def zero_byte(x: np.ndarray) -> np.ndarray:
        return byte[x & 0xFF] ^ (x >> 8)

    at = np.empty((_CHUNK, 256), np.uint32)
    shift = np.empty((_CHUNK + 1, 32), np.uint32)
    at[0] = byte
    shift[0] = np.uint32(1) << np.arange(32, dtype=np.uint32)
    for k in range(1, _CHUNK):
        at[k] = zero_byte(at[k - 1])
    for m in range(1, _CHUNK + 1):
        shift[m] = zero_byte(shift[m - 1])
    return at, shift


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data``, equal to TensorBoard's ``crc32c``."""
    global _tables
    if len(data) < 64:  # the byte-at-a-time loop is faster for short records (the 8-byte headers)
        state = 0xFFFFFFFF
        for b in data:
            state = _BYTE[(state ^ b) & 0xFF] ^ (state >> 8)
        return state ^ 0xFFFFFFFF
    if _tables is None:
        _tables = _build_tables()
    at, shift = _tables
    state = 0xFFFFFFFF
    buf = np.frombuffer(data, np.uint8)
    for start in range(0, len(buf), _CHUNK):
        chunk = buf[start : start + _CHUNK]
        m = len(chunk)
        carried = shift[m][(np.uint32(state) >> _BITS) & 1 == 1]  # the state moved through m bytes
        new = at[_REVERSED[_CHUNK - m :], chunk]  # each byte moved through the m - 1 - i bytes after it
        state = int(np.bitwise_xor.reduce(new)) ^ int(np.bitwise_xor.reduce(carried, initial=np.uint32(0)))
    return state ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def ensure_writable(path: str) -> None:
    """Create the log directory ``path`` if needed and check that a file can be written in it (OSError if not)."""
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, ".torchbp-write-test")
    with open(probe, "w"):
        pass
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

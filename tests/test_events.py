"""torchbp.monitor.events, the threaded TensorBoard event writer, against TensorBoard itself.

Every file is read back with TensorBoard's ``EventAccumulator`` and every checksum compared with
TensorBoard's ``masked_crc32c``. The flush policy is checked in a child process killed with SIGKILL
(``_events_child.py``), normal exit without ``close()`` in another, and ``ensure_writable`` from eight
processes at once.
"""

from __future__ import annotations

import gc
import io
import json
import multiprocessing
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from torchbp.monitor import events as _events
from torchbp.monitor.events import (
    EventFile,
    ensure_writable,
    scalar_summary,
    summary_writer,
)

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.compat.proto.event_pb2 import Event  # noqa: E402

CHILD = Path(__file__).resolve().with_name("_events_child.py")
ROOT = Path(__file__).resolve().parents[1]
KILL_MARGIN_S = 0.5  # FLUSH_INTERVAL_S plus room for a loaded CI machine


def read(path) -> EventAccumulator:
    """TensorBoard's reader, over a directory or one event file, keeping every event."""
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def event_files(logdir) -> list[Path]:
    return sorted(Path(logdir).glob("events.out.tfevents.*"))


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def run_child(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, str(CHILD), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


# --------------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 8, 63, 64, 507, 4095, 4096, 4097, 10_000])
def test_masked_crc_equals_tensorboards(length):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    assert _events.masked_crc32c(data) == masked_crc32c(data)


# --------------------------------------------------------------------------------------------------
# What is written reads back exactly
# --------------------------------------------------------------------------------------------------


def test_summary_writer_events_read_back_exactly(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard import SummaryWriter

    values = np.arange(-50, 50, dtype=np.float64)  # integers: the histogram's sums are exact
    pixels = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    writer = summary_writer(str(tmp_path))
    assert isinstance(writer, SummaryWriter) and writer.get_logdir() == str(tmp_path)
    for step in range(5):
        writer.add_scalar("loss", 0.25 * step, step)
    writer.add_histogram("h", values, 3)
    writer.add_image("img", torch.from_numpy(pixels), 4)
    writer.add_custom_scalars({"torchbp": {"norms": ["Multiline", [r"delta_norm/.*"]]}})
    writer.flush()

    ea = read(tmp_path)
    assert scalars(ea, "loss") == [(s, 0.25 * s) for s in range(5)]
    (h,) = ea.Histograms("h")
    assert h.step == 3
    hv = h.histogram_value
    assert (hv.num, hv.min, hv.max, hv.sum, hv.sum_squares) == (100, -50, 49, values.sum(), (values**2).sum())
    assert sum(hv.bucket) == 100
    (im,) = ea.Images("img")
    assert (im.step, im.height, im.width) == (4, 5, 7)
    np.testing.assert_array_equal(decode_png(im.encoded_image_string), pixels.transpose(1, 2, 0))
    (config,) = ea.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    assert layout.category[0].title == "torchbp"
    assert list(layout.category[0].chart[0].multiline.tag) == [r"delta_norm/.*"]
    writer.close()
    writer.close()  # torch's SummaryWriter: a second close does nothing
    writer.add_scalar("loss", 9.0, 9)  # and the next add reopens, in a new file
    writer.close()
    assert len(event_files(tmp_path)) == 2
    assert scalars(read(event_files(tmp_path)[1]), "loss") == [(9, 9.0)]


def test_add_event_writes_the_event_as_it_was_when_added(tmp_path):
    f = EventFile(str(tmp_path))
    event = Event(summary=scalar_summary([("x", 1.0)]))
    for step in range(3):  # one Event object reused: each add is a snapshot
        event.step, event.wall_time = step, 1.0 + step
        event.summary.value[0].simple_value = 10.0 * step
        f.add_event(event)
    f.close()
    assert scalars(read(f.path), "x") == [(0, 0.0), (1, 10.0), (2, 20.0)]


# --------------------------------------------------------------------------------------------------
# flush, close, reopen, errors, back-pressure
# --------------------------------------------------------------------------------------------------


def hold_writes(f, gate: threading.Event) -> threading.Event:
    """Make ``f``'s writer thread wait on ``gate`` in its next write; returns an Event set once it waits."""
    writer, waiting = f._writer, threading.Event()
    real = writer._write

    def write(data):
        writer._write = real
        waiting.set()
        gate.wait(timeout=30)
        real(data)

    writer._write = write
    return waiting


def test_flush_waits_for_a_busy_writer_thread(tmp_path):
    f = EventFile(str(tmp_path))
    f.flush()
    gate = threading.Event()
    threading.Timer(0.3, gate.set).start()
    hold_writes(f, gate)  # the thread is busy in a write while the events queue up behind
    for step in range(300):
        f.add_event(Event(step=step, wall_time=1.0, summary=scalar_summary([("x", float(step))])))
    f.flush()
    ea = read(f.path)  # read while the file is still open
    assert scalars(ea, "x") == [(s, float(s)) for s in range(300)]
    f.close()


def test_close_is_idempotent_add_after_close_raises_and_reopen_starts_a_new_file(tmp_path):
    f = EventFile(str(tmp_path), filename_suffix=".v1")
    f.add_event(Event(step=0, summary=scalar_summary([("x", 0.0)])))
    first = f.path
    f.close()
    f.close()
    f.flush()  # nothing left to do
    with pytest.raises(RuntimeError, match=r"is closed; call reopen\(\)"):
        f.add_event(Event(step=1, summary=scalar_summary([("x", 1.0)])))
    with pytest.raises(RuntimeError, match="is closed"):
        f.add_serialized_event(Event(step=1).SerializeToString())
    f.reopen()
    assert f.path != first and f.path.endswith(".v1")
    f.add_event(Event(step=2, summary=scalar_summary([("x", 2.0)])))
    f.reopen()  # not closed: nothing happens
    f.close()
    assert scalars(read(first), "x") == [(0, 0.0)]
    assert scalars(read(f.path), "x") == [(2, 2.0)]


def test_a_failing_disk_write_resurfaces_from_close(tmp_path):
    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    f = EventFile(str(tmp_path))
    f.flush()
    real, f._writer._file = f._writer._file, FullDisk()
    f.add_event(Event(step=0, summary=scalar_summary([("x", 0.0)])))
    with pytest.raises(RuntimeError, match="No space left") as info:
        f.close()
    assert isinstance(info.value.__cause__, OSError)
    real.close()


def test_bad_arguments_say_what_was_expected(tmp_path):
    f = EventFile(str(tmp_path))
    with pytest.raises(TypeError, match="expected a tensorboard.*Event, got Summary"):
        f.add_event(scalar_summary([("x", 1.0)]))
    with pytest.raises(ValueError, match="max_queue to be a positive int, got 0"):
        EventFile(str(tmp_path), max_queue=0)
    f.close()


def test_a_full_queue_blocks_the_caller_and_loses_nothing(tmp_path):
    gate = threading.Event()
    f = EventFile(str(tmp_path), max_queue=4)
    f.flush()
    waiting = hold_writes(f, gate)
    f.add_event(Event(step=0, wall_time=1.0, summary=scalar_summary([("x", 0.0)])))
    assert waiting.wait(timeout=30)  # the thread holds step 0 in its write: the queue behind it is empty
    queued = []

    def producer():
        for step in range(1, 20):
            f.add_event(Event(step=step, wall_time=1.0, summary=scalar_summary([("x", float(step))])))
            queued.append(step)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        assert thread.is_alive(), "the producer was never blocked"
        assert len(queued) == 4, f"{len(queued)} events queued behind a busy write with max_queue=4"
    finally:
        gate.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    f.close()
    assert scalars(read(f.path), "x") == [(s, float(s)) for s in range(20)]


def test_an_idle_writer_thread_does_not_spin(tmp_path):
    f = EventFile(str(tmp_path))
    f.flush()
    cpu = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - cpu < 0.1
    f.close()


def test_a_garbage_collected_event_file_is_written_and_closed(tmp_path):
    f = EventFile(str(tmp_path))
    for step in range(50):
        f.add_event(Event(step=step, wall_time=1.0, summary=scalar_summary([("x", float(step))])))
    path, name = f.path, f._writer._thread.name
    del f
    gc.collect()
    deadline = time.monotonic() + 30
    while any(t.name == name for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the writer thread of a dropped EventFile did not end"
        time.sleep(0.01)
    assert scalars(read(path), "x") == [(s, float(s)) for s in range(50)]


# --------------------------------------------------------------------------------------------------
# Several writers in one directory
# --------------------------------------------------------------------------------------------------


def test_event_files_and_summary_writers_in_one_directory_never_collide(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    theirs, ours = SummaryWriter(str(tmp_path)), summary_writer(str(tmp_path))
    a, b = EventFile(str(tmp_path)), EventFile(str(tmp_path))
    for i in range(3):
        theirs.add_scalar("theirs", float(i), i)
        ours.add_scalar("ours", float(i), i)
        a.add_event(Event(step=i, summary=scalar_summary([("a", float(i))])))
        b.add_event(Event(step=i, summary=scalar_summary([("b", float(i))])))
    for w in (theirs, ours, a, b):
        w.close()
    files = event_files(tmp_path)
    assert len(files) == 4
    found = {}
    for path in files:
        ea = read(path)
        (tag,) = ea.Tags()["scalars"]
        found[tag] = scalars(ea, tag)
    assert found == {tag: [(0, 0.0), (1, 1.0), (2, 2.0)] for tag in ("theirs", "ours", "a", "b")}


# --------------------------------------------------------------------------------------------------
# ensure_writable
# --------------------------------------------------------------------------------------------------


def _probe_many_times(path: str, start, errors) -> None:
    start.wait(timeout=30)
    for _ in range(50):
        try:
            ensure_writable(path)
        except Exception as e:
            errors.put(repr(e))
            return


def test_ensure_writable_from_eight_processes_at_once(tmp_path):
    path = str(tmp_path / "new" / "logs")
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_probe_many_times, args=(path, start, errors)) for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    failures = []
    while True:
        try:
            failures.append(errors.get(timeout=0.1))
        except queue.Empty:
            break
    assert not failures, failures
    assert os.listdir(path) == []  # the probes are gone


def test_ensure_writable_below_a_file_raises_oserror(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError):
        ensure_writable(str(tmp_path / "a_file" / "logs"))


def test_ensure_writable_in_a_read_only_directory_raises_permission_error(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as root: a read-only directory is writable")
        with pytest.raises(PermissionError):
            ensure_writable(str(read_only))
    finally:
        read_only.chmod(0o755)


# --------------------------------------------------------------------------------------------------
# The flush policy in a process that is killed, and one that exits without close()
# --------------------------------------------------------------------------------------------------


def test_every_event_older_than_the_flush_interval_survives_sigkill(tmp_path):
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "kill", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True)
    reader.start()
    reported: list[tuple[int, float]] = []
    try:
        deadline = time.monotonic() + 60
        while not reported or reported[-1][1] - reported[0][1] < 1.5:  # let it log for 1.5 s
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the child did not log for 1.5 s within 60 s"
            try:
                record = json.loads(lines.get(timeout=min(remaining, 1.0)))
            except queue.Empty:
                assert child.poll() is None, f"the child exited early: {child.stderr.read()[-2000:]}"
                continue
            reported.append((record["step"], record["t"]))
        killed_at = time.monotonic()  # CLOCK_MONOTONIC: the same clock as the child's
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL, f"the child was not killed mid-run (exit {child.returncode})"
    reader.join(timeout=10)
    while not lines.empty():
        record = json.loads(lines.get_nowait())
        reported.append((record["step"], record["t"]))

    old_enough = [step for step, t in reported if t <= killed_at - KILL_MARGIN_S]
    assert len(old_enough) > 10, f"only {len(old_enough)} steps reported {KILL_MARGIN_S} s before the kill"
    on_disk = scalars(read(tmp_path), "step")
    steps = [s for s, _ in on_disk]
    assert steps == list(range(len(steps))), "a gap or a repeat in the steps on disk"
    assert all(v == float(s) for s, v in on_disk)
    assert len(steps) > max(old_enough), (
        f"steps 0..{max(old_enough)} were reported at least {KILL_MARGIN_S} s before the SIGKILL, "
        f"but only 0..{len(steps) - 1} are on disk"
    )


def test_events_queued_at_normal_exit_are_written(tmp_path):
    result = run_child("atexit", str(tmp_path), "500")
    assert result.returncode == 0 and "queued" in result.stdout, result.stderr[-2000:]
    assert scalars(read(tmp_path), "step") == [(s, float(s)) for s in range(500)]


def test_on_error_warn_warns_once_counts_and_flush_and_close_report_without_raising(tmp_path, monkeypatch):
    f = EventFile(str(tmp_path), on_error="warn")
    f.flush()

    def full(writer, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_events._Writer, "_write", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            f.add_event(Event(step=step, summary=scalar_summary([("x", float(step))])))
            f.flush()
        f.close()  # does not raise
    messages = [str(w.message) for w in caught]
    assert all(str(tmp_path) in m for m in messages), messages
    assert sum("failed: OSError" in m and "Training goes on" in m for m in messages) == 1, messages
    assert f.dropped == 3
    assert any("3 TensorBoard events were not written" in m for m in messages), messages
    with pytest.raises(ValueError, match="on_error must be one of"):
        EventFile(str(tmp_path), on_error="ignore")


def test_a_write_that_fails_halfway_is_cut_back_so_the_file_stays_readable(tmp_path, monkeypatch):
    real_write = _events._Writer._write
    fail = {"on": False}

    def half_then_enospc(writer, data):
        if fail["on"]:
            real_write(writer, data[: len(data) // 2])  # a partial record reaches the file
            raise OSError(28, "No space left on device")
        real_write(writer, data)

    monkeypatch.setattr(_events._Writer, "_write", half_then_enospc)
    f = EventFile(str(tmp_path), on_error="warn")
    f.add_event(Event(step=0, summary=scalar_summary([("x", 0.0)])))
    f.flush()
    fail["on"] = True
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        f.add_event(Event(step=1, summary=scalar_summary([("x", 1.0)])))
        f.flush()
    fail["on"] = False
    f.add_event(Event(step=2, summary=scalar_summary([("x", 2.0)])))
    f.close()
    assert f.dropped == 1
    assert scalars(read(f.path), "x") == [(0, 0.0), (2, 2.0)]


def test_an_event_file_deleted_while_written_continues_in_a_new_file(tmp_path):
    logdir = tmp_path / "logs"
    f = EventFile(str(logdir))
    f.add_event(Event(step=0, summary=scalar_summary([("x", 0.0)])))
    f.flush()
    first = f.path
    shutil.rmtree(logdir)
    f.add_event(Event(step=1, summary=scalar_summary([("x", 1.0)])))
    with pytest.raises(RuntimeError, match="was deleted while being written"):  # (on_error="raise")
        f.flush()
    f.add_event(Event(step=2, summary=scalar_summary([("x", 2.0)])))
    f.close()
    assert f.path != first and f.dropped == 1
    assert scalars(read(logdir), "x") == [(1, 1.0), (2, 2.0)]

"""Logging never stops training: a DeltaMonitor whose logs cannot be written warns once and goes on.

A real full filesystem (a 256 KiB tmpfs, where the test may mount one), a write fault injected into the
event writer (OSError ENOSPC), a log directory removed mid-run, a SummaryWriter of the user's whose own
writer thread died, and ``on_error="raise"``. Each reads the event files back with TensorBoard's reader.
"""

from __future__ import annotations

import errno
import shutil
import threading
import warnings

import pytest
import torch
from helpers import small_tmpfs

import torchbp
from torchbp.monitor import events as _events

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

LAYERS = ["4", "2", "0"]


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torchbp.nn.Sequential(
        torchbp.nn.Linear(12, 16), torchbp.nn.ReLU(), torchbp.nn.Linear(16, 16), torchbp.nn.ReLU(),
        torchbp.nn.Linear(16, 3),
    )  # fmt: skip
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    return model, x, y


def train(model, x, y, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        torchbp.nn.CrossEntropyLoss()(model(x), y).backward()
        optimizer.step()


def logged_steps(logdir) -> list[int]:
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return sorted(e.step for e in ea.Scalars("delta_norm/0")) if "delta_norm/0" in ea.Tags()["scalars"] else []


def write_warnings(caught, logdir) -> list[str]:
    return [str(w.message) for w in caught if str(logdir) in str(w.message)]


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and permission to mount)."""
    with small_tmpfs(tmp_path / "tmpfs", "256k") as mnt:
        yield mnt


def test_a_full_disk_warns_once_training_goes_on_and_close_reports_the_dropped_events(full_disk):
    model, x, y = model_and_data()
    logdir = full_disk / "logs"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = torchbp.DeltaMonitor(model, log=logdir, every=1, histogram_every=1, image_every=50)
        train(model, x, y, 400)  # ~1 KiB of histograms per step, a δ map every 50: fills 256 KiB
        monitor.close()  # does not raise
    assert monitor.step == 399 and all(torch.isfinite(p).all() for p in model.parameters())
    assert monitor.dropped > 0
    messages = write_warnings(caught, logdir)
    errors = [m for m in messages if "No space left on device" in m and "Training goes on" in m]
    assert len(errors) == 1, messages
    assert any(f"{monitor.dropped} TensorBoard events were not written" in m for m in messages), messages
    # The file stays readable to its end (after a failed write it is cut back to its last whole record), and
    # each step whose event could not be written is counted: later, smaller batches may still fit.
    steps = logged_steps(logdir)
    assert steps[:10] == list(range(10)) and steps == sorted(set(steps)), steps[:20]
    assert 0 < 400 - len(steps) <= monitor.dropped, (len(steps), monitor.dropped)


class Fault:
    """Makes the event writer's file writes fail with ENOSPC while on."""

    def __init__(self, monkeypatch) -> None:
        self.on, self.calls = False, 0
        real = _events._Writer._write

        def write(writer, data):
            if self.on:
                self.calls += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(writer, data)

        monkeypatch.setattr(_events._Writer, "_write", write)


def test_an_injected_write_fault_drops_and_counts_those_events_and_writing_resumes(tmp_path, monkeypatch):
    fault = Fault(monkeypatch)
    model, x, y = model_and_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = torchbp.DeltaMonitor(model, log=tmp_path, every=1, histogram_every=0, image_every=0)
        train(model, x, y, 5)
        monitor.flush()
        fault.on = True
        train(model, x, y, 5)  # steps 5..9: their writes fail
        monitor.flush()  # does not raise: warns how many were not written
        fault.on = False
        train(model, x, y, 5)
        monitor.close()
    assert fault.calls > 0
    messages = write_warnings(caught, tmp_path)
    assert len([m for m in messages if "failed: OSError" in m and "No space left" in m]) == 1, messages
    assert monitor.dropped == 5, messages  # steps 5..9
    assert any("(5 so far" in m or "5 TensorBoard events were not written" in m for m in messages), messages
    assert logged_steps(tmp_path) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]


def test_a_log_directory_removed_mid_run_is_recreated_and_the_lost_events_counted(tmp_path):
    model, x, y = model_and_data()
    logdir = tmp_path / "logs"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = torchbp.DeltaMonitor(model, log=logdir, every=1, histogram_every=0, image_every=0)
        train(model, x, y, 5)
        monitor.flush()
        shutil.rmtree(logdir)
        train(model, x, y, 5)
        monitor.close()
    messages = write_warnings(caught, logdir)
    assert len([m for m in messages if "was deleted while being written" in m]) == 1, messages
    # the deleted file's: steps 0..4, the custom-scalars layout and the data flow's links
    assert monitor.dropped == 7, messages
    assert logged_steps(logdir) == [5, 6, 7, 8, 9]


def test_on_error_raise_raises_the_write_error(tmp_path, monkeypatch):
    fault = Fault(monkeypatch)
    model, x, y = model_and_data()
    monitor = torchbp.DeltaMonitor(model, log=tmp_path, every=1, on_error="raise")
    train(model, x, y, 2)
    monitor.flush()
    fault.on = True
    train(model, x, y, 2)
    with pytest.raises(RuntimeError, match="No space left on device") as info:
        monitor.flush()
    assert str(tmp_path) in str(info.value) and isinstance(info.value.__cause__, OSError)
    fault.on = False
    monitor.close()
    with pytest.raises(ValueError, match="on_error must be one of"):
        torchbp.DeltaMonitor(model, on_error="ignore")


def test_a_users_summary_writer_that_fails_does_not_stop_training(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    record_writer = writer.file_writer.event_writer._async_writer._writer

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer, "write", full)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # (tensorboard's thread dies on it)
    writer.add_scalar("loss", 1.0, 0)
    with pytest.raises(OSError):  # its thread has died: every later write raises
        writer.flush()
    model, x, y = model_and_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = torchbp.DeltaMonitor(model, log=writer, every=1, histogram_every=0, image_every=0)
        train(model, x, y, 10)
        monitor.close()
    assert monitor.dropped >= 10  # each step's event (and the δ map of close())
    messages = [str(w.message) for w in caught if "DeltaMonitor: writing TensorBoard events" in str(w.message)]
    assert len(messages) == 1 and "No space left on device" in messages[0], messages


def test_the_exit_hook_stops_the_background_thread_of_a_monitor_left_open(tmp_path):
    """A daemon thread still running when the interpreter finalizes is killed as it takes the GIL again, which
    aborts the process when that happens inside torch's C++ code: the exit hook joins it first."""
    from torchbp.monitor import host

    model, x, y = model_and_data()
    monitor = torchbp.DeltaMonitor(model, log=tmp_path, every=1, histogram_every=0, image_every=0)
    train(model, x, y, 3)
    assert monitor._host.flusher is not None and monitor._host.flusher.is_alive()
    host._write_all_at_exit()
    assert not monitor._host.flusher.is_alive()
    monitor.close()
    assert logged_steps(tmp_path) == [0, 1, 2]

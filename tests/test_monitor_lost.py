"""Nothing lost in silence: one open monitor per log directory (a resumed run appends), a name for a model that is
itself the layer, a monitor replaced by a new one on its model (its threads and files closed), and a history that
always ends at the newest logged step."""

from __future__ import annotations

import gc
import os
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
import torch
from helpers import read_events, scalar_series

import torchbp
from torchbp import report
from torchbp.cli import main
from torchbp.monitor import STATS
from torchbp.monitor.host import History

pytest.importorskip("tensorboard", reason="logging needs tensorboard")


def tiny_png() -> bytes:
    """A valid 1 × 1 PNG, for the δ map (matplotlib takes ~0.5 s a picture on a busy machine)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")
    )


@pytest.fixture(autouse=True)
def _cheap_delta_map(monkeypatch):
    """The δ map each closing monitor draws, as a tiny PNG: the path to the event file is the same."""
    from torchbp import picture

    monkeypatch.setattr(picture, "delta_map_figure", lambda history: None)
    monkeypatch.setattr(picture, "render_png", lambda figure: tiny_png())


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torchbp.nn.Linear(3, 4), torchbp.nn.ReLU(), torchbp.nn.Linear(4, 2)).double()


def train(model: torch.nn.Module, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        (model(torch.randn(8, 3, generator=gen, dtype=torch.float64)) ** 2).sum().backward()


def quiet(**options):
    """Monitor options that write no histogram and draw the δ map only on close."""
    return {"every": 1, "histogram_every": 0, "image_every": 0, **options}


def event_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if "tfevents" in name)


# --------------------------------------------------------------------------------------------------
# One log directory, one open monitor
# --------------------------------------------------------------------------------------------------


def spellings(tmp_path, name: str = "x") -> dict[str, str]:
    """One directory, named four ways (relative, absolute, with a trailing slash, through a symbolic link)."""
    directory = tmp_path / name
    directory.mkdir()
    (tmp_path / "link").symlink_to(directory)
    return {
        "relative": os.path.relpath(directory),
        "absolute": str(directory),
        "slash": str(directory) + os.sep,
        "link": str(tmp_path / "link"),
    }


@pytest.mark.parametrize("second", ["relative", "absolute", "slash", "link"])
def test_a_second_open_monitor_on_one_directory_is_refused(tmp_path, second):
    names = spellings(tmp_path)
    first_model, second_model = mlp(), mlp()
    with torchbp.DeltaMonitor(first_model, log=names["absolute"], **quiet()) as first:
        train(first_model, 3)
        files = event_files(names["absolute"])
        with pytest.raises(RuntimeError, match="already logs to the directory") as refused:
            torchbp.DeltaMonitor(second_model, log=names[second], **quiet())
        message = str(refused.value)
        assert repr(names[second]) in message and "subdirectory" in message and "close" in message
        assert event_files(names["absolute"]) == files, "the refused monitor opened no event file"
        assert torchbp.monitor_of(second_model) is None
        train(first_model, 2, seed=1)
        latest = first.latest()
    # The directory holds the first model's values only, each step once.
    ea = read_events(names["absolute"])
    series = scalar_series(ea, "delta_fro/2")
    assert sorted(series) == [0, 1, 2, 3, 4]
    assert series[4] == pytest.approx(latest["2"]["delta_fro"], rel=1e-6)
    # A subdirectory per model is accepted.
    with torchbp.DeltaMonitor(second_model, log=os.path.join(names[second], "model2"), **quiet()):
        pass


@pytest.mark.parametrize("second", ["relative", "slash", "link"])
def test_a_monitor_after_the_old_one_closed_appends(tmp_path, second):
    """A resumed run: the next monitor writes a new event file in the same directory, one run of all steps."""
    names = spellings(tmp_path)
    model, done = mlp(), [0]
    with torchbp.DeltaMonitor(model, log=names["absolute"], step=lambda: done[0], **quiet()):
        for _ in range(5):
            train(model, 1)
            done[0] += 1
    with torchbp.DeltaMonitor(model, log=names[second], step=lambda: done[0], **quiet()) as resumed:
        for _ in range(5):
            train(model, 1)
            done[0] += 1
        latest = resumed.latest()
    assert len(event_files(names["absolute"])) == 2
    run = report.read_logdir(names["absolute"])["."]
    assert run["steps"] == list(range(10)) and "warnings" not in run
    assert run["delta_fro"][-1, -1] == pytest.approx(latest["2"]["delta_fro"], rel=1e-6)


def test_monitors_on_one_summary_writer_need_different_layer_names(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    one, other = mlp(), mlp()
    head = torchbp.nn.Linear(2, 2).double()  # named "model": no tag in common with "0", "2"
    with SummaryWriter(str(tmp_path / "shared")) as writer:
        with torchbp.DeltaMonitor(one, log=writer, **quiet()):
            with pytest.raises(RuntimeError, match="already logs to the directory"):
                torchbp.DeltaMonitor(other, log=writer, **quiet())  # "0" and "2" again
            with pytest.raises(RuntimeError, match="already logs to the directory"):
                torchbp.DeltaMonitor(other, log=str(tmp_path / "shared"), **quiet())  # a writer of its own there
            with torchbp.DeltaMonitor(head, log=writer, **quiet()) as beside:
                (head(one(torch.randn(4, 3, dtype=torch.float64))) ** 2).sum().backward()
                assert set(beside.latest()) == {"model"}
    ea = read_events(tmp_path / "shared")
    assert {"delta_fro/0", "delta_fro/2", "delta_fro/model"} <= set(ea.Tags()["scalars"])


def test_a_refused_monitor_leaves_the_model_unmonitored_and_a_retry_works(tmp_path):
    model, other = mlp(), mlp()
    first = torchbp.DeltaMonitor(model, log=str(tmp_path), **quiet())
    with pytest.raises(RuntimeError):
        torchbp.DeltaMonitor(other, log=str(tmp_path), **quiet())
    assert torchbp.monitor_of(other) is None and torchbp.monitor_of(model) is first
    first.close()
    with torchbp.DeltaMonitor(other, log=str(tmp_path), **quiet()) as second:
        train(other, 1)
        assert second.step == 0


# --------------------------------------------------------------------------------------------------
# A model that is itself the layer
# --------------------------------------------------------------------------------------------------


def test_a_bare_layer_is_named_and_its_log_is_reported(tmp_path):
    layer = torchbp.nn.Linear(3, 2).double()
    twin = torch.nn.Linear(3, 2).double()
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(8, 3, dtype=torch.float64)
    with torchbp.DeltaMonitor(layer, log=str(tmp_path / "bare"), **quiet()) as monitor:
        for _ in range(3):
            (layer(x) ** 2).sum().backward()
        latest = monitor.latest()
    assert list(latest) == ["model"]
    (twin(x) ** 2).sum().backward()  # torch's ∂C/∂b = Σ_n δ_n (BP3)
    assert latest["model"]["delta_norm"] == pytest.approx(twin.bias.grad.norm().item(), rel=1e-12)
    tags = set(read_events(tmp_path / "bare").Tags()["scalars"])
    assert "delta_norm/model" in tags and not [t for t in tags if t.endswith("/")]
    assert main(["report", str(tmp_path)]) == 0
    assert report.read_logdir(tmp_path)["bare"]["layers"] == ["model"]


def test_the_report_reads_a_tag_with_an_empty_layer_name(tmp_path, capsys):
    """A log whose tags name the model itself with an empty layer name (``delta_norm/``); a tag without a slash
    (a user's own ``delta_norm``) is not a layer."""
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(0)
    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(6):
            value = float(np.exp(rng.standard_normal()))
            writer.add_scalar("delta_norm/", value, step)
            writer.add_scalar("delta_fro/", 2 * value, step)
            writer.add_scalar("delta_nonfinite/", 0.0, step)
            writer.add_scalar("delta_norm", 1.0, step)
    assert main(["report", str(tmp_path)]) == 0
    assert "run .: 1 layers (model), 6 logged steps" in capsys.readouterr().out
    assert report.read_logdir(tmp_path)["."]["layers"] == ["model"]


# --------------------------------------------------------------------------------------------------
# A monitor dropped without close()
# --------------------------------------------------------------------------------------------------


def test_monitor_of_finds_the_models_monitor():
    assert "monitor_of" in torchbp.__all__
    model, plain = mlp(), mlp()
    assert torchbp.monitor_of(model) is None
    monitor = torchbp.DeltaMonitor(model)
    assert torchbp.monitor_of(model) is monitor
    assert torchbp.monitor_of(model[2]) is monitor  # a part of the model
    assert torchbp.monitor_of(torch.nn.DataParallel(model)) is monitor  # (unwrapped, as by DeltaMonitor)
    assert torchbp.monitor_of(plain) is None
    monitor.close()
    assert torchbp.monitor_of(model) is None
    head = torchbp.DeltaMonitor(model[2])  # a monitor of a part: the model's monitor for that part
    assert torchbp.monitor_of(model) is head and torchbp.monitor_of(model[0]) is None
    head.close()


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc/self/fd")
@pytest.mark.parametrize("where", ["own directory", "one directory"])
def test_a_new_monitor_replaces_the_one_left_on_the_model(tmp_path, where):
    """20 monitors made in a loop on one model (a notebook cell run again), none closed by hand: each replaces
    the last with one warning naming its log; threads and open files stay flat; each old log is complete."""
    model = mlp()
    logs = [str(tmp_path / (f"run{i}" if where == "own directory" else "run")) for i in range(20)]
    counts, latest = [], []
    for i, log in enumerate(logs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monitor = torchbp.DeltaMonitor(model, log=log, **quiet())
        replaced = [str(w.message) for w in caught if "replaces it" in str(w.message)]
        if i == 0:
            assert replaced == []
        else:
            assert len(replaced) == 1 and repr(logs[i - 1]) in replaced[0], replaced
            assert "\n" not in replaced[0]
        assert torchbp.monitor_of(model) is monitor
        train(model, 3, seed=i)  # (starts the monitor's threads, writes its event file)
        monitor.flush()
        latest.append(monitor.latest())
        counts.append((threading.active_count(), open_files()))
        del monitor
    gc.collect()
    assert counts[-1] == counts[1], f"threads and open files per monitor made: {counts}"
    torchbp.monitor_of(model).close()
    assert threading.active_count() == counts[0][0] - 2  # (its flusher and its event file's writer ended)
    # Every log complete: its three steps, the last model's values, the δ map written on close.
    for i in range(20 if where == "own directory" else 1):
        ea = read_events(logs[i])
        assert "delta_map" in ea.Tags()["images"]
        if where == "own directory":
            series = scalar_series(ea, "delta_fro/2")
            assert sorted(series) == [0, 1, 2], i
            assert series[2] == pytest.approx(latest[i]["2"]["delta_fro"], rel=1e-6)
        else:  # one directory: 20 event files one after the other, each monitor's steps 0-2 (no step callable)
            assert len(event_files(logs[0])) == 20
            values = [e.value for e in ea.Scalars("delta_fro/2")]
            assert values == pytest.approx([stats["2"]["delta_fro"] for stats in latest for _ in range(3)], rel=0.5)
            assert values[2::3] == pytest.approx([stats["2"]["delta_fro"] for stats in latest], rel=1e-6)


def test_a_monitor_nobody_holds_keeps_logging(tmp_path):
    model = mlp()
    torchbp.DeltaMonitor(model, log=str(tmp_path), **quiet())  # (not held)
    gc.collect()
    train(model, 4)
    monitor = torchbp.monitor_of(model)
    assert monitor is not None and monitor.step == 3
    monitor.close()
    assert sorted(scalar_series(read_events(tmp_path), "delta_fro/2")) == [0, 1, 2, 3]


def test_the_monitor_of_a_model_no_longer_in_use_gives_its_directory_up(tmp_path):
    """A model and its monitor both dropped unclosed: a new monitor on their directory closes the old event
    file, with a warning, and the threads end."""
    model, before = mlp(), set(threading.enumerate())
    torchbp.DeltaMonitor(model, log=str(tmp_path), **quiet())
    train(model, 2)
    old = set(threading.enumerate()) - before
    assert len(old) == 2  # (its flusher and its event file's writer)
    del model
    with pytest.warns(UserWarning, match="no longer in use"):
        successor = torchbp.DeltaMonitor(new := mlp(), log=str(tmp_path), **quiet())
    assert not [thread.name for thread in old if thread.is_alive()]
    train(new, 1)
    successor.close()
    assert len(event_files(tmp_path)) == 2
    steps = [e.step for e in read_events(tmp_path).Scalars("delta_fro/2")]
    assert steps == [0, 1, 0]  # the old monitor's steps, complete, then the new one's


# --------------------------------------------------------------------------------------------------
# The history ends at the newest logged step
# --------------------------------------------------------------------------------------------------


def expected_history(logged: int, columns: int) -> list[int]:
    """The indices of the logged steps a history of ``columns`` holds, by brute force: the smallest power-of-two
    stride whose multiples below ``logged`` fit in ``columns - 1`` columns, and the newest step after them."""
    if columns == 1:
        return [logged - 1]
    stride = 1
    while len(range(0, logged, stride)) > columns - 1:
        stride *= 2
    held = list(range(0, logged, stride))
    return held if held[-1] == logged - 1 else [*held, logged - 1]


@pytest.mark.parametrize("columns", [1, 2, 3, 5, 8, 16])
def test_history_holds_evenly_spaced_steps_and_the_newest(columns):
    layers, stats = 2, len(STATS)
    history = History(layers, columns)
    steps = [7 + 3 * k for k in range(300)]  # (a step callable's numbers: not the indices)
    start = 0
    for size in [1, 2, 5, 1, 13, 7] * 50:  # (in batches, as the host side adds them)
        block = steps[start : start + size]
        if not block:
            break
        values = np.broadcast_to(np.array(block, dtype=np.float64)[:, None, None], (len(block), stats, layers))
        history.add(block, values)
        start += len(block)
        held, table = history.read()
        assert held == [steps[k] for k in expected_history(start, columns)]
        assert len(held) <= columns and held[-1] == block[-1]
        assert table.shape == (stats, layers, len(held)) and table[0, 0].tolist() == [float(s) for s in held]


def test_history_after_30000_logged_steps_ends_at_the_last():
    history = History(1, 2048)
    for start in range(0, 30_000, 1000):
        block = list(range(start, start + 1000))
        history.add(block, np.broadcast_to(np.array(block, float)[:, None, None], (1000, len(STATS), 1)))
    held, table = history.read()
    assert held == expected_history(30_000, 2048) and held[-1] == 29_999
    assert len(held) <= 2048 and table[0, 0, -1] == 29_999


def test_monitor_history_and_report_end_at_the_last_logged_step(tmp_path):
    model = mlp()
    with torchbp.DeltaMonitor(model, log=str(tmp_path), max_history=8, **quiet()) as monitor:
        train(model, 30)
        latest = monitor.latest()
        held = monitor.history()
        text = monitor.report()
    assert held["steps"] == expected_history(30, 8) and held["steps"][-1] == monitor.step == 29
    for i, layer in enumerate(held["layers"]):
        assert held["delta_fro"][i, -1] == pytest.approx(latest[layer]["delta_fro"], rel=1e-12)
    assert "steps 0-29" in text

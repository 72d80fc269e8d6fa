"""The demo (``torchbp demo`` / ``python -m torchbp.demo``) and the Nielsen chapter-5 example run and log.

Each run is tiny (an epoch or two); the in-process demo runs once per device and is shared by the
tests that read its output, its event files and its δ map. The command line's messages are in
test_cli.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from helpers import DEVICES

from torchbp.cli import demo

pytest.importorskip("sklearn", reason="the demo needs scikit-learn: pip install 'torchbp[demo]'")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

ROOT = pathlib.Path(__file__).resolve().parent.parent
EPOCHS, EVERY = 2, 4  # 46 steps: the last one (45) is not a logged step
STEPS = EPOCHS * -(-1438 // 64)  # 1438 training images (80% of 1797), batches of 64 (the default)
LOGGED = list(range(0, STEPS, EVERY))
LAYERS = ["hidden1", "hidden2", "hidden3", "hidden4", "output"]  # the Linear layers, input side first
OPTIONS = ["--epochs", "--batch-size", "--lr", "--hidden", "--seed", "--device", "--logdir", "--every", "--no-progress"]


def _run_in_process(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = demo.main(argv)
    return status, out.getvalue(), err.getvalue()


class _Background:
    """A command started at once in the background (imports take seconds); :meth:`result` waits for it."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"timed out after {timeout}s\n{out}\n{err}")
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory):
    """The two subprocess runs, started before the in-process tests so that they overlap with them."""
    tmp = tmp_path_factory.mktemp("subprocess")
    runs = {
        "demo": (_Background("-m", "torchbp.demo", "--epochs", "1", "--logdir", str(tmp / "demo")), tmp / "demo"),
        "nielsen": (
            _Background(str(ROOT / "examples" / "nielsen_ch5.py"), "--quick", "--logdir", str(tmp / "nielsen")),
            tmp / "nielsen",
        ),
    }
    yield runs
    for proc, _ in runs.values():
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.communicate()


def _table(out: str) -> dict[str, list[float | None]]:
    """The δ table's rows: layer name -> [sigmoid start norm, gain, end norm, gain, relu start ..., end ...]."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer") and "delta_norm" in line) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        name, _shape, *values = line.split()
        rows[name] = [None if v == "-" else float(v) for v in values]
    return rows


def _end_steps(out: str) -> list[int]:
    """The steps of the table's "end" columns, one per net."""
    return [int(step) for step in re.findall(r"end \(step (\d+)\)", out)]


def _scalars(logdir: pathlib.Path, tag: str) -> list[tuple[int, float]]:
    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module", params=DEVICES)
def demo_run(request, tmp_path_factory):
    """The demo run in-process, once per device: (status, stdout, stderr, logdir)."""
    logdir = tmp_path_factory.mktemp(f"demo-{request.param}") / "runs"
    argv = ["--epochs", str(EPOCHS), "--every", str(EVERY), "--logdir", str(logdir), "--device", request.param]
    status, out, err = _run_in_process([*argv, "--no-progress"])
    return status, out, err, logdir


def test_demo_prints_accuracy_table_and_tensorboard_command(demo_run):
    status, out, err, logdir = demo_run
    assert status == 0, err
    assert "sigmoid: test accuracy" in out and "relu: test accuracy" in out, out
    assert "delta_norm" in out and "gain" in out, out
    rows = _table(out)
    assert list(rows) == LAYERS, out  # 64→30→30→30→30→10: five Linear layers, named
    assert all(len(values) == 8 for values in rows.values()), out
    assert rows["output"][1] is None and rows["output"][3] is None, "the output layer has no gain"
    assert all(v is not None and v > 0 for v in rows["hidden1"]), out
    assert f"tensorboard --logdir {logdir}" in out.splitlines()[-1], out
    assert f"{EPOCHS} epochs, δ logged every {EVERY} steps" in out, out
    assert "%" not in err, "--no-progress printed progress"


def test_demo_sigmoid_table_shows_vanishing_gradient(demo_run):
    status, out, err, _ = demo_run
    assert status == 0, err
    rows = _table(out)
    first_hidden, last_hidden = rows["hidden1"], rows["hidden4"]
    sigmoid = first_hidden[0] / last_hidden[0]  # delta_norm at the start (step 0)
    relu = first_hidden[4] / last_hidden[4]
    assert sigmoid < 1, f"sigmoid: first hidden layer's delta_norm is not below the last one's\n{out}"
    assert sigmoid < relu, f"the ReLU net's δ should shrink less than the sigmoid net's\n{out}"
    assert all(rows[name][1] < 1 for name in LAYERS[:-1]), f"sigmoid gains at the start should be < 1\n{out}"
    assert "sigmoid: delta_norm of hidden1 / hidden4" in out and "vanishing gradient" in out, out


def test_demo_writes_event_files(demo_run):
    status, _, err, logdir = demo_run
    assert status == 0, err
    for activation in ("sigmoid", "relu"):
        run = logdir / activation
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(run)), run
        acc = event_accumulator.EventAccumulator(str(run))
        acc.Reload()
        assert {f"delta_norm/{layer}" for layer in LAYERS} <= set(acc.Tags()["scalars"])
        steps = [step for step, _ in _scalars(run, "delta_norm/hidden1")]
        assert steps == LOGGED, steps
        assert all(value > 0 for _, value in _scalars(run, "delta_norm/hidden4"))
        assert [step for step, _ in _scalars(run, "loss/train")] == steps
        assert len(_scalars(run, "accuracy/test")) == EPOCHS


def test_demo_end_statistics_are_the_last_logged_step(demo_run):
    """The table's "end" column is a step TensorBoard holds (the last logged one), with the same values."""
    status, out, err, logdir = demo_run
    assert status == 0, err
    assert STEPS - 1 not in LOGGED  # the last step is not logged: the case this test is about
    assert _end_steps(out) == [LOGGED[-1], LOGGED[-1]], out
    rows = _table(out)
    for k, activation in enumerate(("sigmoid", "relu")):
        logged = dict(_scalars(logdir / activation, "delta_norm/hidden1"))
        printed = rows["hidden1"][4 * k + 2]  # delta_norm at the end
        assert printed == pytest.approx(logged[LOGGED[-1]], rel=6e-3), (printed, logged[LOGGED[-1]])


def test_demo_draws_the_delta_map(demo_run):
    """The δ map PNG of both nets is written to the log directory, its path printed; it holds the logged steps."""
    matplotlib_image = pytest.importorskip("matplotlib.image")
    status, out, err, logdir = demo_run
    assert status == 0, err
    path = logdir / "delta_map.png"
    assert f"δ map (log10 ‖δ^l‖ per layer and logged step, both nets): {path}" in out, out
    height, width = matplotlib_image.imread(path).shape[:2]
    assert width > 800 and height > 400


def test_demo_history_is_the_logged_steps(tmp_path):
    """The δ map's history is the monitor's logged steps: delta_norm per layer, network order."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--epochs", "1", "--every", "7", "--logdir", str(tmp_path), "--hidden", "8", "8"])
    args.no_progress = True
    result = demo.train("sigmoid", demo.load_digits(0), args, torch.device("cpu"))
    history = result.history
    assert history["layers"] == ["hidden1", "hidden2", "output"]
    assert history["steps"] == list(range(0, result.steps, 7))
    assert len(history["delta_norm"]) == 3 and all(len(row) == len(history["steps"]) for row in history["delta_norm"])
    assert [row[-1] for row in history["delta_norm"]] == [
        result.end[layer]["delta_norm"] for layer in history["layers"]
    ]
    assert all(v > 0 and math.isfinite(v) for row in history["delta_norm"] for v in row)


def test_demo_as_module_subprocess(background):
    """``python -m torchbp.demo``; stderr is a pipe, so progress comes as a few plain lines, not a bar."""
    run, logdir = background["demo"]
    proc = run.result()
    assert proc.returncode == 0, proc.stderr
    assert "sigmoid: test accuracy" in proc.stdout and "relu: test accuracy" in proc.stdout, proc.stdout
    assert "delta_norm" in proc.stdout
    assert "1 epoch," in proc.stdout and "1 epochs" not in proc.stdout, proc.stdout
    assert f"tensorboard --logdir {logdir}" in proc.stdout
    assert "\r" not in proc.stderr and "100%" in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) <= 12, proc.stderr
    for activation in ("sigmoid", "relu"):
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(logdir / activation))


def test_demo_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in OPTIONS:
        assert option in text, f"{option} missing from --help"
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    documented = {opt for action in parser._actions if action.help for opt in action.option_strings}
    assert set(OPTIONS) <= documented


@pytest.mark.parametrize("tty", [True, False], ids=["tty", "pipe"])
def test_progress_bar(tty):
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    stream = Stream()
    progress = demo.Progress(8, "net", stream=stream)
    for step in range(1, 9):
        progress.update(step, "loss 1.0")
    progress.close()
    text = stream.getvalue()
    if tty:
        assert text.startswith("\r") and "8/8" in text and text.endswith("\n")
    else:
        assert "\r" not in text and text.count("\n") <= 5 and "100%" in text.splitlines()[-1]
    silent = Stream()
    demo.Progress(8, "net", enabled=False, stream=silent).update(8)
    assert silent.getvalue() == ""


def test_nielsen_ch5_example_quick(background):
    """``examples/nielsen_ch5.py --quick``: the speeds table, the training tables, one TensorBoard run per depth."""
    run, logdir = background["nielsen"]
    proc = run.result()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Speed of learning" in out and "median over 2 seeds" in out, out
    assert ", 1 epoch (seed 0)" in out, out  # --quick: one epoch, singular
    init_rows = [line for line in out.splitlines() if line.startswith("[64, 30")][:3]
    assert len(init_rows) == 3, out
    for row in init_rows:  # "[64, 30, 30, 10]   0.037   0.219   0.171   [0.012, 0.060]   0.200"
        network, rest = row.split("]", 1)
        depth = network.count(",") - 1
        speeds = [float(v) for v in rest.split()[:depth]]
        assert speeds[0] < speeds[-1], f"earlier layers should learn slower at initialisation\n{out}"
    for depth in (2, 3, 4):
        assert f"{depth} hidden layers" in out
        steps = [step for step, _ in _scalars(logdir / f"{depth}_hidden", "delta_norm/0")]
        assert steps == [0, 1], steps  # initialisation and after the one --quick epoch
    assert f"tensorboard --logdir {logdir}" in out
    png = logdir / "delta_map.png"  # ‖δ^l‖ per hidden layer and epoch, for each depth
    assert f"δ map (log10 ‖δ^l‖ of each hidden layer per epoch, each depth): {png}" in out, out
    from matplotlib import image as matplotlib_image

    height, width = matplotlib_image.imread(png).shape[:2]
    assert width > 400 and height > 300

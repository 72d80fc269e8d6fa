"""``torchbp report`` and :mod:`torchbp.report`: each finding on a synthetic history (and its absence on a healthy
one), the attention trap (a bias gradient of ~1e-10 with ordinary per-sample δ is not vanishing), reading event
files written by TensorBoard's writer and by a DeltaMonitor, the demo's two nets, the JSON and the exit statuses."""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings

import numpy as np
import pytest
import torch

import torchbp
from torchbp import report
from torchbp.cli import main

pytest.importorskip("tensorboard", reason="reading event files needs tensorboard")

LAYERS = ["hidden1", "hidden2", "hidden3", "hidden4", "output"]
STEPS = list(range(0, 100, 10))


def history(norms: np.ndarray, layers=LAYERS, steps=STEPS, links=None, **arrays) -> dict:
    """A history with ``delta_sample_norm_mean`` = norms (layers, steps) and, unless given, healthy other stats:
    ‖Σ_n δ_n‖ = 3 × the mean per-sample norm, finite everywhere."""
    norms = np.asarray(norms, dtype=np.float64)
    out = {"steps": list(steps), "layers": list(layers), "delta_sample_norm_mean": norms}
    out.setdefault("delta_norm", 3 * norms)
    out["delta_nonfinite"] = np.zeros_like(norms)
    out.update({k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})
    if links is not None:
        out["links"] = list(links)
    return out


def noisy(shape, seed=0, scale=1e-2) -> np.ndarray:
    """Positive norms that move from step to step by ~30%, as mini-batches make them."""
    rng = np.random.default_rng(seed)
    return scale * np.exp(0.3 * rng.standard_normal(shape))


def kinds(findings) -> list[str]:
    return [f.kind for f in findings]


def by_kind(findings, kind):
    matches = [f for f in findings if f.kind == kind]
    assert len(matches) == 1, findings
    return matches[0]


def geometric(gain: float) -> np.ndarray:
    """Norms that shrink by ``gain`` at each layer from the output side to the input side (noise on top)."""
    depth = np.arange(len(LAYERS))[::-1, None]  # output: 0
    return 1e-2 * gain**depth * noisy((1, len(STEPS)), seed=2, scale=1)


# --------------------------------------------------------------------------------------------------
# analyze() on synthetic histories
# --------------------------------------------------------------------------------------------------


def test_healthy_history_is_ok_with_its_numbers():
    findings = report.analyze(history(noisy((5, 10))))
    assert kinds(findings) == ["ok"]
    message = findings[0].message
    assert message.startswith("no problem found: the mean over samples of ‖δ_n‖ of hidden1 / output = ")
    assert "every δ finite" in message and findings[0].stat == "delta_sample_norm_mean"


def test_vanishing_toward_the_input():
    gains = np.full((5, 10), 0.3)
    gains[-1] = np.nan  # the output layer has no consumer
    findings = report.analyze(history(geometric(0.3), delta_gain=gains))
    f = by_kind(findings, "vanishing")
    assert f.problem and f.layers == LAYERS and f.steps == STEPS and f.stat == "delta_sample_norm_mean"
    assert f.values[0] / f.values[-1] == pytest.approx(0.3**4)
    assert "hidden1 is 0.81% of output's" in f.message, f.message
    assert "the mean over samples of ‖δ_n‖" in f.message  # which norm
    assert "At 10 of these 10 steps each of the 4 gains the log holds" in f.message, f.message
    assert "This log holds no data-flow links" in f.message  # judged in network order, and says so
    assert "ok" not in kinds(findings)


def test_a_small_first_layer_without_a_trend_is_not_vanishing():
    """A layer of another kind that is small (attention's q/k projections), not a δ shrinking with depth."""
    layers = [f"blocks.{b}.{name}" for b in range(2) for name in ("q_proj", "k_proj", "v_proj", "o_proj")] + ["head"]
    scale = np.array([0.03, 0.03, 0.1, 0.6] * 2 + [1.0])[:, None]
    findings = report.analyze(history(scale * noisy((9, 10), scale=1e-2), layers=layers))
    assert "vanishing" not in kinds(findings) and "ok" in kinds(findings), findings
    layers = [f"l{i}" for i in range(9)]  # the same first/last ratio, rising steadily: vanishing
    steady = np.geomspace(0.03, 1.0, 9)[:, None] * noisy((1, 10), scale=1e-2)
    assert "vanishing" in kinds(report.analyze(history(steady, layers=layers)))


def test_vanishing_needs_more_than_one_step():
    norms = noisy((5, 10))
    norms[:, 4] = geometric(0.3)[:, 4]
    assert "vanishing" not in kinds(report.analyze(history(norms)))
    norms[:, 5:7] = geometric(0.3)[:, 5:7]
    f = by_kind(report.analyze(history(norms)), "vanishing")
    assert f.steps == [40, 50, 60]


def test_attention_key_bias_trap_is_not_vanishing():
    """k_proj: ‖Σ_n δ_n‖ ≈ 1e-10 (the key bias's gradient is zero: softmax is shift-invariant) while each ‖δ_n‖ is
    ordinary: no vanishing finding, an information finding on the bias instead."""
    layers = ["q_proj", "k_proj", "v_proj", "o_proj", "head"]
    norms = noisy((5, 10))
    bias = 3 * norms
    bias[1] = 6e-10 * noisy((1, 10), seed=5, scale=1)[0]
    findings = report.analyze(history(norms, layers=layers, delta_norm=bias))
    assert not any(f.problem for f in findings), findings
    info = by_kind(findings, "zero_bias_gradient")
    assert info.layers == ["k_proj"] and not info.problem
    assert "not a vanishing δ" in info.message
    assert kinds(findings) == ["ok", "zero_bias_gradient"]


def test_delta_fro_is_preferred_and_named():
    norms = noisy((5, 10))  # per-sample norms healthy...
    findings = report.analyze(history(norms, delta_fro=geometric(0.3)))  # ...‖δ‖ over the batch vanishing
    f = by_kind(findings, "vanishing")
    assert f.stat == "delta_fro" and "‖δ‖ over the batch (Frobenius)" in f.message


def test_only_delta_norm_is_judged_and_says_so():
    h = {"steps": STEPS, "layers": LAYERS, "delta_norm": geometric(0.3)}
    f = by_kind(report.analyze(h), "vanishing")
    assert f.stat == "delta_norm" and "the run has no per-sample norm" in f.message


def test_exploding_toward_the_input():
    f = by_kind(report.analyze(history(geometric(1 / 0.2))), "exploding")
    assert f.problem and f.values[0] / f.values[-1] == pytest.approx(5.0**4)
    assert "δ grows toward the input" in f.message
    assert "exploding" not in kinds(report.analyze(history(geometric(1 / 0.5))))  # 16×: a healthy ReLU net's range


def test_exploding_over_time():
    norms = noisy((5, 10))
    norms[2] *= np.logspace(0, 5, 10)
    f = by_kind(report.analyze(history(norms)), "exploding")
    assert f.layers == ["hidden3"] and f.values[0] > 1e4 and "δ grows during training" in f.message
    norms = noisy((5, 10))
    norms[2] *= np.logspace(0, 3, 10)
    assert "exploding" not in kinds(report.analyze(history(norms)))


def test_dead_relu_units():
    dead = np.full((5, 10), np.nan)
    dead[:4] = 0.1
    dead[1, 3:] = 0.7
    f = by_kind(report.analyze(history(noisy((5, 10)), dead_fraction=dead)), "dead_units")
    assert f.layers == ["hidden2"] and f.values == [pytest.approx(0.7)] and f.steps == STEPS[3:]
    assert "hidden2 70%" in f.message
    dead[1] = 0.45
    assert "dead_units" not in kinds(report.analyze(history(noisy((5, 10)), dead_fraction=dead)))


def test_first_nonfinite_step_and_layer():
    flags = np.zeros((5, 10))
    flags[1:4, 6:] = 1  # from step 60, hidden2..hidden4; backward reaches hidden4 first
    flags[0, 8] = 1
    f = by_kind(report.analyze(history(noisy((5, 10)), delta_nonfinite=flags)), "nonfinite")
    assert f.steps[0] == 60 and f.steps == [60, 70, 80, 90]
    assert f.layers == ["hidden2", "hidden3", "hidden4"] and f.values == [4.0, 4.0, 4.0]
    assert f.message.startswith("δ was not finite (NaN or Inf) first at step 60, in hidden4, the first layer")
    assert "(then hidden3, hidden2)" in f.message and "4 of 10 logged steps" in f.message
    assert kinds(report.analyze(history(noisy((5, 10)), delta_nonfinite=np.zeros((5, 10))))) == ["ok"]


def test_stalled_layer():
    norms = noisy((5, 10))
    norms[2, 5:] = 0.0  # δ exactly zero from step 50 on
    f = by_kind(report.analyze(history(norms)), "stalled")
    assert f.layers == ["hidden3"] and f.steps == STEPS[5:] and "exactly zero in hidden3" in f.message
    norms[2, 5:] = 0.01 * (1 + 1e-5 * noisy((5,), seed=3, scale=1))  # moves by ~1e-5 relative: stalled
    f = by_kind(report.analyze(history(norms)), "stalled")
    assert f.layers == ["hidden3"] and f.values[0] < 1e-4 and "exactly zero" not in f.message
    norms[2, 5:] = 0.01 * (1 + 1e-2 * noisy((5,), seed=3, scale=1))  # moves by ~1e-2 relative: still moving
    assert "stalled" not in kinds(report.analyze(history(norms)))


def test_problems_come_first_and_format_lists_them():
    flags = np.zeros((5, 10))
    flags[4, 9] = 1
    h = history(geometric(0.3), delta_nonfinite=flags)
    findings = report.analyze(h)
    assert kinds(findings) == ["nonfinite", "vanishing"]
    text = report.format_report({"net": h})
    assert text.startswith("run net: 5 layers (hidden1, hidden2, hidden3, hidden4, output), 10 logged steps")
    assert "\n  NONFINITE: δ was not finite" in text and "\n  VANISHING: δ vanishes" in text
    assert text.endswith("torchbp report: 2 problems in 1 of 1 run (net)")


def test_wrong_shape_is_an_error_that_says_both():
    h = history(noisy((5, 10)))
    h["delta_gain"] = np.ones((10, 5))
    with pytest.raises(ValueError, match=r"expected an array of shape \(layers, steps\) = \(5, 10\), got shape"):
        report.analyze(h)


# --------------------------------------------------------------------------------------------------
# Reading event files
# --------------------------------------------------------------------------------------------------


def write_run(path, norms: np.ndarray, layers=LAYERS, steps=STEPS, extra_tags=(), order="backward", gains=False):
    """Events as a DeltaMonitor writes them: per step, the layers from the output side (``order="backward"``),
    or from the input side; with ``gains``, a delta_gain for every layer but the output layer."""
    from torch.utils.tensorboard import SummaryWriter

    rows = range(len(layers))
    with SummaryWriter(str(path)) as writer:
        for j, step in enumerate(steps):
            for i in reversed(rows) if order == "backward" else rows:
                if np.isfinite(norms[i, j]):
                    writer.add_scalar(f"delta_sample_norm_mean/{layers[i]}", norms[i, j], step)
                    writer.add_scalar(f"delta_norm/{layers[i]}", 3 * norms[i, j], step)
                    if gains and i < len(layers) - 1:
                        writer.add_scalar(f"delta_gain/{layers[i]}", 0.5, step)
                writer.add_scalar(f"delta_nonfinite/{layers[i]}", 0.0, step)
            for tag in extra_tags:
                writer.add_scalar(tag, 1.0, step)


def test_read_logdir_runs_layers_steps_and_gaps(tmp_path):
    vanishing, healthy = geometric(0.3), noisy((5, 10))
    healthy[3, 2] = np.nan  # a step hidden4 was not reached
    write_run(tmp_path / "a", vanishing, extra_tags=["loss/train"])
    write_run(tmp_path / "b" / "inner", healthy)
    runs = report.read_logdir(tmp_path)
    assert list(runs) == ["a", "b/inner"]
    for name, norms in (("a", vanishing), ("b/inner", healthy)):
        h = runs[name]
        assert h["layers"] == LAYERS and h["steps"] == STEPS
        assert set(h) == {"steps", "layers", "delta_sample_norm_mean", "delta_norm", "delta_nonfinite"}
        np.testing.assert_allclose(h["delta_sample_norm_mean"], norms, rtol=1e-6)  # float32 in the file
    assert math.isnan(runs["b/inner"]["delta_norm"][3, 2])
    assert kinds(report.analyze(runs["a"])) == ["vanishing"] and kinds(report.analyze(runs["b/inner"])) == ["ok"]


@pytest.mark.parametrize("order", ["backward", "network"])
def test_layer_order_from_the_gains(tmp_path, order):
    """Events written input side first are recognised by the gains (the output layer has none)."""
    write_run(tmp_path, geometric(0.3), order=order, gains=True)
    h = report.read_logdir(tmp_path)["."]
    assert h["layers"] == LAYERS
    assert np.isnan(h["delta_gain"][-1]).all() and (h["delta_gain"][:-1] == 0.5).all()
    assert kinds(report.analyze(h)) == ["vanishing"]


def test_read_logdir_of_a_delta_monitor(tmp_path):
    """The real monitor's tags and order: network order, every statistic of STATS, the logged steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchbp.nn.Linear(6, 5), torchbp.nn.ReLU(), torchbp.nn.Linear(5, 4), torchbp.nn.ReLU(), torchbp.nn.Linear(4, 3)
    )
    with torchbp.DeltaMonitor(model, log=str(tmp_path / "run"), every=2) as monitor:
        for _ in range(5):
            model.zero_grad()
            torchbp.nn.CrossEntropyLoss()(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        latest = monitor.latest()
    h = report.read_logdir(tmp_path)["run"]
    assert h["layers"] == ["0", "2", "4"] and h["steps"] == [0, 2, 4]
    assert {"delta_norm", "delta_sample_norm_mean", "delta_gain", "dead_fraction", "delta_nonfinite"} <= set(h)
    for i, layer in enumerate(h["layers"]):
        assert h["delta_sample_norm_mean"][i, -1] == pytest.approx(latest[layer]["delta_sample_norm_mean"], rel=1e-6)
    assert math.isnan(h["dead_fraction"][2, 0])  # the last layer is not followed by ReLU
    assert h["links"] == [("0", "2"), ("2", "4")] == monitor.history()["links"]  # the data flow, from the log


def test_the_links_are_a_text_summary_tensorboard_reads(tmp_path):
    """The links event: one TensorBoard text summary (the Text page), JSON of [producer, consumer] pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = torch.nn.Sequential(torchbp.nn.Linear(6, 5), torchbp.nn.ReLU(), torchbp.nn.Linear(5, 3))
    with torchbp.DeltaMonitor(model, log=str(tmp_path), every=1):
        for _ in range(3):
            model(torch.randn(4, 6)).sum().backward()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    (event,) = acc.Tensors("torchbp/links")  # written once, at the first logged step
    assert event.step == 0 and acc.SummaryMetadata("torchbp/links").plugin_data.plugin_name == "text"
    assert json.loads(event.tensor_proto.string_val[0]) == [["0", "2"]]


@pytest.mark.parametrize(
    "what, message",
    [("missing", "does not exist"), ("empty", "no TensorBoard event files"), ("file", "is a file, not a directory")],
)
def test_unreadable_input(tmp_path, what, message):
    path = {"missing": tmp_path / "missing", "empty": tmp_path, "file": tmp_path / "f"}[what]
    (tmp_path / "f").write_text("")
    with pytest.raises(report.ReportError, match=message):
        report.read_logdir(path)


def test_event_files_without_delta_statistics(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("loss/train", 1.0, 0)
    with pytest.raises(report.ReportError, match="hold no δ statistics"):
        report.read_logdir(tmp_path)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_logs(tmp_path_factory):
    """``torchbp demo``, one epoch (23 steps, 12 logged), its log directory."""
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    logdir = tmp_path_factory.mktemp("demo")
    status, out, err = run("demo", "--epochs", "1", "--every", "2", "--logdir", str(logdir), "--no-progress")
    assert status == 0, err
    assert f"What the δ statistics say: torchbp report {logdir}" in out, out
    return logdir


def test_report_on_the_demo_tells_the_sigmoid_story(demo_logs):
    status, out, err = run("report", str(demo_logs))
    assert status == 0 and err == "", err
    runs = [" ".join(block.split()) for block in out.split("\n\n")]  # the findings' lines unwrapped
    relu, sigmoid = (block for block in runs if block.startswith("run "))
    assert relu.startswith("run relu: 5 layers (hidden1, hidden2, hidden3, hidden4, output), 12 logged steps")
    assert " ok: no problem found" in relu and "VANISHING" not in relu, relu
    assert sigmoid.startswith("run sigmoid: 5 layers"), sigmoid
    assert " VANISHING: δ vanishes toward the input: ‖δ‖ over the batch (Frobenius) of hidden1 is" in sigmoid
    assert "below 10% at 12 of 12 logged steps (steps 0-22)" in sigmoid, sigmoid
    assert out.rstrip().endswith("\ntorchbp report: 1 problem in 1 of 2 runs (sigmoid)")


def test_report_json(demo_logs):
    status, out, _ = run("report", str(demo_logs), "--json")
    assert status == 0
    data = json.loads(out)
    assert set(data["runs"]) == {"sigmoid", "relu"}
    sigmoid = data["runs"]["sigmoid"]
    assert sigmoid["layers"] == LAYERS and sigmoid["steps"] == list(range(0, 23, 2))
    (finding,) = [f for f in sigmoid["findings"] if f["problem"]]
    assert finding["kind"] == "vanishing" and finding["stat"] == "delta_fro"  # (the demo logs ‖δ‖ over the batch)
    assert finding["layers"] == LAYERS and len(finding["values"]) == 5 and finding["values"][0] < finding["values"][-1]
    assert [f["kind"] for f in data["runs"]["relu"]["findings"]] == ["ok"]


def test_json_has_no_nan():
    h = history(noisy((5, 10)))
    h["delta_sample_norm_mean"][:, -1] = np.nan
    text = json.dumps(report.to_json({"x": h}), allow_nan=False)
    assert json.loads(text)["runs"]["x"]["findings"][0]["kind"] == "ok"


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_unreadable_input_is_exit_status_1_and_one_line(tmp_path, what):
    path = tmp_path / "missing" if what == "missing" else tmp_path
    status, out, err = run("report", str(path))
    assert status == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("torchbp report: error: "), err


def test_usage_error_is_exit_status_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("torchbp report: error: the following arguments are required: LOGDIR")


# --------------------------------------------------------------------------------------------------
# What could not be read is said
# --------------------------------------------------------------------------------------------------


def records(path) -> list[tuple[int, int]]:
    """(offset, payload length) of each TFRecord of an event file, from the framing's length fields."""
    data, out, offset = path.read_bytes(), [], 0
    while offset + 12 <= len(data):
        length = int.from_bytes(data[offset : offset + 8], "little")
        out.append((offset, length))
        offset += 16 + length
    return out


def step_of(data: bytes, offset: int, length: int) -> int | None:
    """The step of the scalar event in the record at ``offset`` (``None`` for another event)."""
    from tensorboard.compat.proto.event_pb2 import Event

    event = Event.FromString(bytes(data[offset + 12 : offset + 12 + length]))
    return event.step if any(v.tag.startswith("delta_fro/") for v in event.summary.value) else None


def steps_tensorboard_reads(path) -> list[int]:
    """The steps of the scalar events TensorBoard's own record reader reads before it stops (the oracle)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    reader, steps = PyRecordReader_New(str(path).encode()), []
    while True:
        try:
            reader.GetNext()
        except (errors.OutOfRangeError, errors.DataLossError):
            return steps
        event = Event.FromString(reader.record())
        if any(v.tag.startswith("delta_fro/") for v in event.summary.value):
            steps.append(event.step)


@pytest.mark.parametrize("where", ["payload", "length"])
def test_a_damaged_event_file_is_named_with_the_step_its_loss_begins(tmp_path, where):
    """A byte flipped in the middle of an event file: TensorBoard's reader stops there; the report says which
    file, and after which step its events are lost, and analyses the steps before."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(4, 5), torchbp.nn.ReLU(), torchbp.nn.Linear(5, 3))
    with torchbp.DeltaMonitor(model, log=str(tmp_path / "run"), every=1, histogram_every=0, image_every=0):
        for _ in range(100):
            torchbp.nn.CrossEntropyLoss()(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    (path,) = (tmp_path / "run").glob("events.out.tfevents.*")
    assert steps_tensorboard_reads(path) == list(range(100))
    data = bytearray(path.read_bytes())
    offset, length = next(r for r in records(path) if step_of(data, *r) == 50)  # (the record of step 50's scalars)
    data[offset + (16 + length // 2 if where == "payload" else 3)] ^= 0x5A
    path.write_bytes(bytes(data))
    readable = steps_tensorboard_reads(path)
    assert readable == list(range(50))

    h = report.read_logdir(tmp_path)["run"]
    assert h["steps"] == readable
    (warning,) = h["warnings"]
    assert path.name in warning and f"after step {readable[-1]} are lost" in warning and f"byte {offset} " in warning
    status, out, err = run("report", str(tmp_path))
    assert status == 0 and err == ""
    flat = " ".join(out.split())
    assert f"warning: {path.name} is damaged" in flat and f"after step {readable[-1]} are lost" in flat
    assert "1 warning" in out.splitlines()[-1]
    status, out, _ = run("report", "--json", str(tmp_path))
    parsed = json.loads(out)["runs"]["run"]
    assert status == 0 and parsed["warnings"] == [warning] and parsed["steps"] == readable


def test_an_intact_log_has_no_warning(tmp_path):
    write_run(tmp_path, noisy((5, 10)))
    h = report.read_logdir(tmp_path)["."]
    assert "warnings" not in h
    status, out, _ = run("report", "--json", str(tmp_path))
    assert json.loads(out)["runs"]["."]["warnings"] == []
    assert "warning" not in run("report", str(tmp_path))[1]


def test_an_event_file_cut_short_at_its_end_is_not_damage(tmp_path):
    """A record being written (a process killed mid-write, or still running): TensorBoard waits for it too."""
    write_run(tmp_path, noisy((5, 10)))
    (path,) = tmp_path.glob("events.out.tfevents.*")
    path.write_bytes(path.read_bytes()[:-7])
    assert "warnings" not in report.read_logdir(tmp_path)["."]


def test_an_all_nan_log_reports_without_numpy_warnings(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    nan = np.full((5, 10), np.nan)
    with SummaryWriter(str(tmp_path)) as writer:  # every value NaN, every statistic written
        for step in STEPS:
            for layer in reversed(LAYERS):
                for stat in ("delta_norm", "delta_fro", "delta_sample_norm_mean", "delta_gain", "dead_fraction"):
                    writer.add_scalar(f"{stat}/{layer}", math.nan, step)
                writer.add_scalar(f"delta_nonfinite/{layer}", 0.0, step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (numpy's "All-NaN slice encountered" is a RuntimeWarning)
        status, out, err = run("report", str(tmp_path))
        for arrays in ({}, {"delta_fro": nan, "dead_fraction": nan, "delta_gain": nan}):
            report.analyze(history(nan, **arrays))
    assert status == 0 and err == "", err


# Along the data flow's links
# --------------------------------------------------------------------------------------------------

CHAIN = [(a, b) for a, b in zip(LAYERS, LAYERS[1:])]


def test_vanishing_along_the_linked_layers():
    """With links, the finding names the chain, its number of gains and how many were below 1."""
    findings = report.analyze(history(geometric(0.3), links=CHAIN))
    f = by_kind(findings, "vanishing")
    assert f.layers == LAYERS and f.steps == STEPS
    assert "hidden1 is 0.81% of output's" in f.message, f.message
    assert "along the 4 gains ‖δ^l‖ / ‖δ^c‖ of the linked layers hidden1 → hidden2 → hidden3 → hidden4 → output" in (
        f.message
    )
    assert "4 of the 4 gains were below 1" in f.message and "no data-flow links" not in f.message


def test_layers_that_are_not_linked_are_not_a_chain():
    """Norms that rise with the position in the list, but only two layers linked (one gain): nothing to judge,
    and the ok finding says so (the 1-block transformer: q/k small, layers of different kinds)."""
    h = history(geometric(0.3), links=[("hidden4", "output")])
    (f,) = report.analyze(h)
    assert f.kind == "ok" and "no chain of 3 or more linked layers in the data flow (1 link)" in f.message, f.message
    with_links = report.analyze(history(geometric(0.3), links=[]))
    assert kinds(with_links) == ["ok"]


def test_vanishing_along_one_of_two_branches():
    """Two chains into the output: hidden1 → hidden2 → output shrinks 10× at each link, hidden3 → hidden4 →
    output keeps its size; the first is named, the second is not blamed."""
    norms = noisy((5, 10), seed=3)
    norms[1] = 0.1 * norms[4]
    norms[0] = 0.1 * norms[1]
    links = [("hidden1", "hidden2"), ("hidden2", "output"), ("hidden3", "hidden4"), ("hidden4", "output")]
    f = by_kind(report.analyze(history(norms, links=links)), "vanishing")
    assert f.layers == ["hidden1", "hidden2", "output"], f.message
    assert "along the 2 gains" in f.message and "2 of the 2 gains were below 1" in f.message


def test_an_exactly_zero_delta_is_not_vanishing():
    """δ = 0 in the input-side layer (dead units, a gate of 0) is stalled or dead, not a vanishing δ."""
    norms = geometric(0.3)
    norms[0] = 0.0
    assert "vanishing" not in kinds(report.analyze(history(norms, links=CHAIN)))


def test_constant_delta_norm_by_the_loss_is_not_stalled():
    """An L1 loss: the output layer's per-sample δ is sign(ŷ − y)/N, so ‖δ‖ over the batch is constant, while
    its ∂C/∂b and ∂C/∂W move with the batch: not stalled. With them still too, it is."""
    norms = noisy((5, 10))
    norms[-1] = 1 / math.sqrt(32)
    moving = noisy((5, 10), seed=5)
    learning = history(norms, links=CHAIN, delta_norm=moving, weight_grad_norm=moving)
    assert kinds(report.analyze(learning)) == ["ok"]
    still = moving.copy()
    still[-1] = 0.5
    f = by_kind(report.analyze(history(norms, links=CHAIN, delta_norm=still, weight_grad_norm=still)), "stalled")
    assert f.layers == ["output"]

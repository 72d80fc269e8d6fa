"""torchbp.DeltaMonitor against PyTorch's own autograd.

The oracle is always torch: the same model built from ``torch.nn``, with a tensor hook on every
Linear's output z^l (the pre-activation) that captures δ^l = ∂C/∂z^l from PyTorch's autograd, and
``torch.func`` for per-sample gradients. The torchbp copy is a ``copy.deepcopy`` of the torch model
passed through ``torchbp.convert``, so both start from the same weights.

Also here: the event files read back with TensorBoard's ``EventAccumulator``, the real
``tensorboard`` server read over HTTP on 127.0.0.1, a training process killed with SIGKILL
(``_monitor_train_child.py``), bad inputs, and "off means off".
"""

from __future__ import annotations

import copy
import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICES,
    MODELS,
    REL,
    REL_EVENT,
    SHAPES,
    STATS,
    DeltaOracle,
    Nested,
    assert_stats_match,
    attached_monitors,
    bp_copy,
    kill_units,
    loss_fn,
    make_models,
    mixed_mlp,
    monitored,
    read_events,
    relu_mlp,
    scalar_series,
    sigmoid_mlp,
    tfrecord_payloads,
)
from torch import nn

import torchbp

CHILD = Path(__file__).resolve().with_name("_monitor_train_child.py")


# --------------------------------------------------------------------------------------------------
# 1. Every statistic against the oracle
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("model", MODELS, ids=MODELS.keys())
def test_statistics_match_torch_autograd(model, shape, device):
    torch_model, bp_model, relu_after = make_models(MODELS[model], device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    oracle = DeltaOracle(torch_model)
    out = torch_model(x)
    target = torch.randn_like(out)
    loss_fn(out, target).backward()
    expected = oracle.stats(relu_after)

    with torchbp.DeltaMonitor(bp_model) as monitor:
        assert monitor.latest() == {} and monitor.step == -1
        loss_fn(bp_model(x), target).backward()
        ours = monitor.latest()
        assert monitor.step == 0
        assert monitor.first_nonfinite is None

    assert_stats_match(ours, expected)
    # The structure the issue names, on top of matching the oracle:
    output_layer = oracle.order[0]
    assert ours[output_layer]["delta_gain"] is None
    for name, stats in ours.items():
        assert (stats["dead_fraction"] is None) == (name not in relu_after), name
        assert stats["delta_nonfinite"] is False
    # The dead units were made on purpose: the test would notice a dead fraction stuck at 0.
    assert any(ours[name]["dead_fraction"] > 0 for name in relu_after) or not relu_after
    # BP3: ‖Σ_n δ_n‖ is the norm of torch's bias gradient.
    for name, m in oracle.modules.items():
        if m.bias is not None:
            assert math.isclose(ours[name]["delta_norm"], m.bias.grad.norm().item(), rel_tol=REL), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", MODELS, ids=MODELS.keys())
def test_statistics_match_torch_autograd_float32(model, device):
    torch_model, bp_model, relu_after = make_models(MODELS[model], device, dtype=torch.float32)
    x = torch.randn(32, 6, device=device)
    oracle = DeltaOracle(torch_model)
    out = torch_model(x)
    target = torch.randn_like(out)
    loss_fn(out, target).backward()
    with torchbp.DeltaMonitor(bp_model) as monitor:
        loss_fn(bp_model(x), target).backward()
        assert_stats_match(monitor.latest(), oracle.stats(relu_after), rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_with_autograd_grad_and_a_frozen_weight(device):
    """A step is also ``torch.autograd.grad``; a frozen weight's gradient norm is None (torch: no grad)."""
    torch_model, bp_model, relu_after = make_models(mixed_mlp, device)
    for model in (torch_model, bp_model):
        model[2].weight.requires_grad_(False)
    x = torch.randn(12, 6, dtype=torch.float64, device=device)
    oracle = DeltaOracle(torch_model)
    out = torch_model(x)
    target = torch.randn_like(out)
    loss_fn(out, target).backward()
    expected = oracle.stats(relu_after)
    assert expected["2"]["weight_grad_norm"] is None

    with torchbp.DeltaMonitor(bp_model) as monitor:
        params = [p for p in bp_model.parameters() if p.requires_grad]
        torch.autograd.grad(loss_fn(bp_model(x), target), params)
        assert monitor.step == 0
        assert_stats_match(monitor.latest(), expected)
        assert all(p.grad is None for p in bp_model.parameters())  # autograd.grad accumulates nothing


# --------------------------------------------------------------------------------------------------
# 2. Non-finite δ
# --------------------------------------------------------------------------------------------------


class Poison(nn.Module):
    """Identity forward; in backward, writes ``value`` into one entry of the gradient flowing through."""

    def __init__(self, value: float, index: int) -> None:
        super().__init__()
        self.value, self.index = value, index

    def forward(self, x):
        y = x.clone()
        y.register_hook(self._poison)
        return y

    def _poison(self, g):
        g = g.clone(memory_format=torch.contiguous_format)
        g.view(-1)[self.index] = self.value
        return g


def poisoned_mlp(where: str, value: float):
    """fc0-σ-fc1-σ-fc2-ReLU-fc3, with a Poison inserted ``where``. fc2's unit 0 is dead, unit 1 always active."""
    layers = OrderedDict(
        fc0=nn.Linear(5, 8),
        act0=nn.Sigmoid(),
        fc1=nn.Linear(8, 8),
        act1=nn.Sigmoid(),
        fc2=nn.Linear(8, 6),
        act2=nn.ReLU(),
        fc3=nn.Linear(6, 3),
    )
    kill_units(layers["fc2"], [0], bias_value=-1.0)  # a(fc2)[:, 0] = 0 for every sample
    kill_units(layers["fc2"], [1], bias_value=1.0)  # a(fc2)[:, 1] = 1 > 0 for every sample
    after = {"output": "fc3", "middle": "act1", "relu_active": "act2", "relu_inactive": "act2"}[where]
    index = {"relu_active": 1, "relu_inactive": 0}.get(where, 2)
    seq = OrderedDict()
    for name, module in layers.items():
        seq[name] = module
        if name == after:
            seq["poison"] = Poison(value, index)
    return nn.Sequential(seq)


# Expected first non-finite layer in backward order, as PyTorch's autograd shows it (asserted below too).
POISON_CASES = {
    "output": "fc3",  # the gradient of the model output: every δ from the output layer on
    "middle": "fc1",  # between fc1's sigmoid and fc2: fc3, fc2 finite; fc1, fc0 not
    "relu_active": "fc2",  # into fc2's ReLU at an active unit: δ^fc2 = g ⊙ 1[z > 0] carries it
    "relu_inactive": None,  # into fc2's ReLU at a dead unit: torch's ReLU backward gives 0 there, δ stays finite
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", POISON_CASES)
def test_nonfinite_delta_is_flagged_from_the_first_layer_on(where, value, device):
    torch_model = poisoned_mlp(where, value).to(device=device, dtype=torch.float64)
    bp_model = bp_copy(torch_model)
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    oracle = DeltaOracle(torch_model)
    out = torch_model(x)
    target = torch.randn_like(out)
    loss_fn(out, target).backward()
    torch_flags = {name: s["delta_nonfinite"] for name, s in oracle.stats(set()).items()}
    torch_first = next((name for name in oracle.order if torch_flags[name]), None)
    assert torch_first == POISON_CASES[where], f"test setup: torch's first non-finite δ is {torch_first}"

    with torchbp.DeltaMonitor(bp_model) as monitor:
        loss_fn(bp_model(x), target).backward()
        ours = {name: s["delta_nonfinite"] for name, s in monitor.latest().items()}
        first = monitor.first_nonfinite
    assert ours == torch_flags, f"delta_nonfinite: monitor {ours}, torch {torch_flags}"
    assert first == torch_first


# --------------------------------------------------------------------------------------------------
# 3. Steps and event files
# --------------------------------------------------------------------------------------------------


def expected_tags(layers, output_layer, relu_after) -> set[str]:
    tags = set()
    for name in layers:
        for stat in STATS:
            if (stat == "delta_gain" and name == output_layer) or (stat == "dead_fraction" and name not in relu_after):
                continue
            tags.add(f"{stat}/{name}")
    return tags


def train_lockstep(torch_model, bp_model, relu_after, steps, device, lr=0.05):
    """Train both models on the same batches with the same SGD; per step, torch's statistics and δs."""
    oracle = DeltaOracle(torch_model)
    opt_t = torch.optim.SGD(torch_model.parameters(), lr=lr)
    opt_b = torch.optim.SGD(bp_model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    per_step = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen, dtype=torch.float64).to(device)
        y = torch.randn(16, 4, generator=gen, dtype=torch.float64).to(device)
        oracle.reset()
        for model, opt in ((torch_model, opt_t), (bp_model, opt_b)):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
        per_step.append({"stats": oracle.stats(relu_after), "delta": dict(oracle.delta), "order": list(oracle.order)})
        opt_t.step()
        opt_b.step()
    oracle.remove()
    return per_step


@pytest.mark.parametrize("device", DEVICES)
def test_event_files_hold_exactly_the_logged_steps_and_torch_values(tmp_path, device):
    torch_model, bp_model, relu_after = make_models(mixed_mlp, device)
    every, hist_every, steps = 3, 2, 8
    with torchbp.DeltaMonitor(bp_model, log=tmp_path, every=every, histogram_every=hist_every) as monitor:
        per_step = train_lockstep(torch_model, bp_model, relu_after, steps, device)
        assert monitor.step == steps - 1
    layers, output_layer = per_step[0]["order"], per_step[0]["order"][0]
    ea = read_events(tmp_path)

    tags = set(ea.Tags()["scalars"])
    assert tags == expected_tags(layers, output_layer, relu_after)
    logged = [s for s in range(steps) if s % every == 0]
    problems = []
    for tag in sorted(tags):
        stat, name = tag.split("/", 1)
        series = scalar_series(ea, tag)
        assert sorted(series) == logged, f"{tag}: steps {sorted(series)}, expected {logged}"
        for s in logged:
            e = per_step[s]["stats"][name][stat]
            e = float(e) if isinstance(e, bool) else e
            if not math.isclose(series[s], e, rel_tol=REL_EVENT, abs_tol=1e-7):
                problems.append(f"{tag} step {s}: event {series[s]}, torch {e}")
    assert not problems, "\n".join(problems)
    # The per-step values differ (lockstep training, new batches): equal values would hide a stale write.
    assert len({round(scalar_series(ea, f"delta_norm/{output_layer}")[s], 6) for s in logged}) == len(logged)

    # Histograms of δ per layer at the histogram interval, with torch's δ's count, sum, min and max.
    hist_steps = [s for s in range(steps) if s % hist_every == 0]
    assert set(ea.Tags()["histograms"]) == {f"delta/{name}" for name in layers}
    for name in layers:
        hist = ea.Histograms(f"delta/{name}")
        assert [h.step for h in hist] == hist_steps, f"delta/{name}"
        for h in hist:
            d = per_step[h.step]["delta"][name]
            v = h.histogram_value
            assert v.num == d.numel(), f"delta/{name} step {h.step}"
            assert math.isclose(v.min, d.min().item(), rel_tol=1e-5, abs_tol=1e-7)
            assert math.isclose(v.max, d.max().item(), rel_tol=1e-5, abs_tol=1e-7)
            assert math.isclose(v.sum, d.sum().item(), rel_tol=1e-4, abs_tol=1e-6)

    # One custom-scalars chart draws every layer's delta_norm, and nothing else.
    check_custom_scalars_layout(ea, layers, tags)


def check_custom_scalars_layout(ea, layers, tags):
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    content = ea.PluginTagToContent("custom_scalars")
    assert content, "no custom-scalars layout in the event files"
    (tag,) = content
    layout = layout_pb2.Layout.FromString(ea.Tensors(tag)[-1].tensor_proto.string_val[0])
    charts = [c for cat in layout.category for c in cat.chart if c.HasField("multiline")]
    delta_norm_tags = {f"delta_norm/{name}" for name in layers}
    # The custom-scalars plugin selects a multiline chart's tags with re.match on each regex.
    selected = [{t for t in tags if any(re.match(r, t) for r in c.multiline.tag)} for c in charts]
    assert delta_norm_tags in selected, f"no multiline chart selects exactly {sorted(delta_norm_tags)}: {selected}"


@pytest.mark.parametrize(("every", "histogram_every", "steps", "hist_steps"), [(1, None, 12, [0, 10]), (2, 0, 3, [])])
def test_histogram_interval_default_and_off(tmp_path, every, histogram_every, steps, hist_steps):
    """``histogram_every`` defaults to 10 * every; 0 writes none."""
    model = bp_copy(sigmoid_mlp()[0])
    kwargs = {} if histogram_every is None else {"histogram_every": histogram_every}
    with torchbp.DeltaMonitor(model, log=tmp_path, every=every, **kwargs):
        for _ in range(steps):
            model(torch.randn(3, 6)).sum().backward()
    ea = read_events(tmp_path)
    assert sorted(scalar_series(ea, "delta_norm/0")) == list(range(0, steps, every))
    hists = ea.Tags()["histograms"]
    if not hist_steps:
        assert hists == []
    else:
        assert sorted(hists) == ["delta/0", "delta/2", "delta/4"]
        assert [h.step for h in ea.Histograms("delta/2")] == hist_steps


def test_context_manager_flushes_and_closes(tmp_path):
    model = bp_copy(relu_mlp()[0])
    before = attached_monitors()
    with torchbp.DeltaMonitor(model, log=tmp_path, every=5, histogram_every=1) as monitor:
        for _ in range(3):
            model(torch.randn(4, 6)).sum().backward()
        assert attached_monitors() == before + 1
        assert set(monitored(model)) >= set(monitor.layers)
    ea = read_events(tmp_path)
    assert sorted(scalar_series(ea, "delta_norm/0")) == [0]
    assert [h.step for h in ea.Histograms("delta/0")] == [0, 1, 2], "histograms not on disk after exit"
    assert monitor.writer.file_writer is None, "the monitor's own SummaryWriter is not closed on exit"
    assert monitored(model) == []
    assert attached_monitors() == before


def test_summary_writer_passed_in_is_used_flushed_and_left_open(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    class SpyWriter(SummaryWriter):
        """Counts flush() and close() calls (the event file's own writes happen on a background thread)."""

        flushes = closes = 0

        def flush(self):
            self.flushes += 1
            super().flush()

        def close(self):
            self.closes += 1
            super().close()

    model = bp_copy(sigmoid_mlp()[0])
    writer = SpyWriter(str(tmp_path))
    try:
        with torchbp.DeltaMonitor(model, log=writer, every=5, histogram_every=1) as monitor:
            assert monitor.writer is writer
            for _ in range(3):
                model(torch.randn(4, 6)).sum().backward()
            flushes = writer.flushes
        assert writer.flushes > flushes, "close() did not flush the SummaryWriter passed in"
        assert writer.closes == 0 and writer.file_writer is not None, (
            "the monitor closed a SummaryWriter it does not own"
        )
        ea = read_events(tmp_path)
        assert [h.step for h in ea.Histograms("delta/4")] == [0, 1, 2]
        writer.add_scalar("user/after_monitor", 1.5, 7)
        writer.flush()
    finally:
        writer.close()
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1, f"the monitor and the user's scalars should share one event file: {files}"
    ea = read_events(tmp_path)
    assert {"user/after_monitor", "delta_norm/0", "delta_norm/2", "delta_norm/4"} <= set(ea.Tags()["scalars"])
    assert scalar_series(ea, "user/after_monitor") == {7: 1.5}
    assert sorted(scalar_series(ea, "delta_norm/0")) == [0]


def test_each_event_is_encoded_once_and_reads_back_alike_through_a_directory_and_a_summary_writer(
    tmp_path, monkeypatch
):
    """The bytes the monitor builds are the bytes on disk, on both paths: nothing parses an event back to encode it
    again (torch's FileWriter takes only Event objects); TensorBoard reads the same values from both."""
    from tensorboard.compat.proto.event_pb2 import Event
    from torch.utils.tensorboard import SummaryWriter

    from torchbp.monitor import writer as monitor_writer

    built: dict[str, list[bytes]] = {"directory": [], "summary_writer": []}
    parsed = []
    real_write, real_parse = monitor_writer._Sink.write, Event.FromString
    target = "directory"

    def write(sink, data):
        built[target].append(bytes(data))
        real_write(sink, data)

    monkeypatch.setattr(monitor_writer._Sink, "write", write)
    monkeypatch.setattr(Event, "FromString", lambda data: (parsed.append(data), real_parse(data))[1])
    model = bp_copy(mixed_mlp()[0])
    for target in built:
        logdir = tmp_path / target
        log = SummaryWriter(str(logdir)) if target == "summary_writer" else logdir
        run = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(0)
        with torchbp.DeltaMonitor(run, log=log, every=1, histogram_every=2):
            for _ in range(4):
                loss_fn(run(torch.randn(8, 6, generator=gen)), torch.randn(8, 4, generator=gen)).backward()
        if target == "summary_writer":
            log.close()
        assert built[target], f"{target}: the monitor built no events"
        (file,) = logdir.glob("events.out.tfevents.*")
        on_disk = set(tfrecord_payloads(file))
        changed = [data for data in built[target] if data not in on_disk]
        assert not changed, f"{target}: {len(changed)} of {len(built[target])} events were re-encoded on the way"
    assert parsed == [], f"{len(parsed)} serialized events were parsed back (Event.FromString) to be encoded again"
    own, theirs = read_events(tmp_path / "directory"), read_events(tmp_path / "summary_writer")
    assert own.Tags()["scalars"] and sorted(own.Tags()["scalars"]) == sorted(theirs.Tags()["scalars"])
    for tag in own.Tags()["scalars"]:
        assert scalar_series(theirs, tag) == scalar_series(own, tag), tag
    assert own.Tags()["histograms"] and sorted(own.Tags()["histograms"]) == sorted(theirs.Tags()["histograms"])
    for tag in own.Tags()["histograms"]:
        assert [(h.step, h.histogram_value) for h in theirs.Histograms(tag)] == [
            (h.step, h.histogram_value) for h in own.Histograms(tag)
        ], tag


def test_detach_stops_recording_and_attach_resumes(tmp_path):
    model = bp_copy(relu_mlp()[0])
    linears = [m for m in model.modules() if isinstance(m, torchbp.nn.Linear)]
    before = attached_monitors()
    monitor = torchbp.DeltaMonitor(model, log=tmp_path, every=1)
    try:
        assert len([m for m in linears if m._torchbp_slot is not None]) == len(linears)
        for _ in range(2):
            model(torch.randn(4, 6)).sum().backward()
        last = monitor.latest()
        monitor.detach()
        assert monitored(model) == []
        assert attached_monitors() == before
        for _ in range(2):
            model(torch.randn(4, 6)).sum().backward()
        assert monitor.step == 1 and monitor.latest() == last
        monitor.attach()
        model(torch.randn(4, 6)).sum().backward()
        assert monitor.step == 2
    finally:
        monitor.close()
    assert sorted(scalar_series(read_events(tmp_path), "delta_norm/0")) == [0, 1, 2]
    assert attached_monitors() == before


# --------------------------------------------------------------------------------------------------
# 4. The real TensorBoard server, over HTTP on 127.0.0.1
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 5.0):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with opener.open(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


def test_tensorboard_server_serves_the_delta_norm_series(tmp_path):
    logdir = tmp_path / "logs"
    torch_model, bp_model, relu_after = make_models(mixed_mlp, "cpu")
    with torchbp.DeltaMonitor(bp_model, log=logdir, every=2, histogram_every=0):
        per_step = train_lockstep(torch_model, bp_model, relu_after, 5, "cpu")
    layers = per_step[0]["order"]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stderr = open(tmp_path / "tensorboard.stderr", "w+")
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
           "--port", str(port), "--load_fast=false", "--reload_interval", "1"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        tags = {}
        while time.monotonic() < deadline:
            assert server.poll() is None, f"tensorboard exited with {server.returncode}"
            try:
                tags = http_json(f"{base}/data/plugin/scalars/tags", timeout=2)
            except OSError:
                tags = {}
            if all(f"delta_norm/{name}" in tags.get(".", {}) for name in layers):
                break
            time.sleep(0.25)
        else:
            stderr.seek(0)
            pytest.fail(f"tensorboard did not serve the delta_norm tags within 60 s: {tags}\n{stderr.read()[-2000:]}")
        assert http_json(f"{base}/data/runs") == ["."]

        for name in layers:
            query = urllib.parse.urlencode({"run": ".", "tag": f"delta_norm/{name}"})
            series = http_json(f"{base}/data/plugin/scalars/scalars?{query}")  # [[wall_time, step, value], ...]
            assert [step for _, step, _ in series] == [0, 2, 4], name
            for _, step, value in series:
                expected = per_step[step]["stats"][name]["delta_norm"]
                assert math.isclose(value, expected, rel_tol=REL_EVENT), (
                    f"delta_norm/{name} step {step}: {value} vs {expected}"
                )

        # The custom-scalars plugin sees the layout, and its multiline chart draws every layer's delta_norm.
        layout = http_json(f"{base}/data/plugin/custom_scalars/layout")
        regexes = [
            r for cat in layout["category"] for c in cat["chart"] if "multiline" in c for r in c["multiline"]["tag"]
        ]
        assert regexes, layout
        query = urllib.parse.urlencode({"run": ".", "tag": regexes[0]})
        multi = http_json(f"{base}/data/plugin/custom_scalars/scalars?{query}")
        assert multi["regex_valid"] and set(multi["tag_to_events"]) >= {f"delta_norm/{n}" for n in layers}
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the session this test started (the server is its leader)
        server.wait(timeout=10)
        stderr.close()


# --------------------------------------------------------------------------------------------------
# 5. A training process killed mid-run leaves every finished log interval on disk
# --------------------------------------------------------------------------------------------------


FLUSH_MARGIN_S = 0.5  # the flush policy's ~50 ms, with room for a loaded 2-core CI machine


def test_killed_training_process_leaves_every_finished_step(tmp_path):
    """The flush policy: every step logged more than ~50 ms before a SIGKILL is on disk, with no gap."""
    logdir = tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(logdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
    reported: dict[int, dict] = {}
    try:
        deadline = time.monotonic() + 60
        while not reported or time.monotonic() < min(r["t"] for r in reported.values()) + 2 * FLUSH_MARGIN_S:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the child did not train for a second within 60 s"
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                assert child.poll() is None, f"the child exited early: {child.stderr.read()[-2000:]}"
                continue
            record = json.loads(line)
            reported[record["step"]] = record
        os.kill(child.pid, signal.SIGKILL)  # mid-run: the child trains on without pause
        killed_at = time.monotonic()
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL, f"the child was not killed mid-run (exit {child.returncode})"

    due = sorted(s for s, r in reported.items() if r["t"] < killed_at - FLUSH_MARGIN_S)
    assert len(due) >= 2, f"test setup: too few steps before the kill ({len(reported)} reported)"
    ea = read_events(logdir)
    for name in reported[0]["delta_norm"]:
        series = scalar_series(ea, f"delta_norm/{name}")
        assert set(due) <= set(series), f"delta_norm/{name}: steps due {due[-1] + 1}, on disk {sorted(series)}"
        assert sorted(series) == list(range(len(series))), f"delta_norm/{name}: a gap in {sorted(series)}"
        for step in due:
            assert math.isfinite(series[step])
            assert math.isclose(series[step], reported[step]["delta_norm"][name], rel_tol=1e-6), (name, step)
    for tag in ea.Tags()["scalars"]:
        assert set(due) <= set(scalar_series(ea, tag)), tag


# --------------------------------------------------------------------------------------------------
# 6. Per-sample gradient norms against torch.func
# --------------------------------------------------------------------------------------------------


def per_sample_model():
    """Linear(4,16): out*in = 64; Linear(16,2, bias=False): 32; Linear(2,3): 6. With T = 6 (T*T = 36)
    the first layer takes the Gram-matrix branch and the others the explicit (out, in) branch."""
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2, bias=False), nn.Sigmoid(), nn.Linear(2, 3))


PER_SAMPLE_SHAPES = {
    "N1_2d": (1, 4),
    "N8_2d": (8, 4),
    "N5_T2_3d": (5, 2, 4),  # T*T = 4 <= out*in everywhere: the Gram branch
    "N3_T6_3d": (3, 6, 4),  # both branches
    "N2_T9_3d": (2, 9, 4),  # T*T = 81 > out*in everywhere: the explicit branch
    "N1_T6_3d": (1, 6, 4),
    "N3_2x3_4d": (3, 2, 3, 4),  # (N, *, in) with two inner dims
    "unbatched": (4,),  # one sample
}


def torch_func_per_sample_norms(torch_model, x, target, reduction):
    """‖∂C_n/∂W‖ and ‖∂C_n/∂b‖ from torch.func per-sample gradients.

    C_n is sample n's term of the batch loss. With reduction='sum' the batch loss is Σ_n loss(x_n), so
    C_n = loss(x_n) with the same 'sum'. With 'mean', F.mse_loss divides by every element; the
    per-sample 'mean' divides by the elements of one sample, so the batch loss is (1/N) Σ_n loss(x_n)
    and C_n carries the 1/N (the monitor documents this): the gradients are scaled by 1/N.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in torch_model.named_parameters()}

    def loss_one(p, xn, yn):
        return F.mse_loss(functional_call(torch_model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0), reduction=reduction)

    if x.dim() == 1:  # one unbatched sample: its gradient is the whole gradient
        grads = {
            k: g.unsqueeze(0)
            for k, g in grad(lambda p: F.mse_loss(functional_call(torch_model, p, (x,)), target, reduction=reduction))(
                params
            ).items()
        }
        scale = 1.0
    else:
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, target)
        scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0
    out = {}
    for name, m in torch_model.named_modules():
        if type(m) is nn.Linear:
            out[name] = {
                "weight": grads[f"{name}.weight"].flatten(1).norm(dim=1) * scale,
                "bias": None if m.bias is None else grads[f"{name}.bias"].flatten(1).norm(dim=1) * scale,
            }
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", PER_SAMPLE_SHAPES.values(), ids=PER_SAMPLE_SHAPES.keys())
def test_per_sample_grad_norms_match_torch_func(shape, reduction, device):
    torch_model = per_sample_model().to(device=device, dtype=torch.float64)
    bp_model = bp_copy(torch_model)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    target = torch.randn(shape[:-1] + (3,), dtype=torch.float64, device=device)
    expected = torch_func_per_sample_norms(torch_model, x, target, reduction)

    with torchbp.DeltaMonitor(bp_model, per_sample_norms=True) as monitor:
        # An earlier backward with another batch size: the norms are those of the last backward.
        F.mse_loss(
            bp_model(torch.randn(7, 4, dtype=torch.float64, device=device)),
            torch.zeros(7, 3, dtype=torch.float64, device=device),
        ).backward()
        F.mse_loss(bp_model(x), target, reduction=reduction).backward()
        ours = monitor.per_sample_grad_norms()

    n = shape[0] if len(shape) > 1 else 1
    assert set(ours) == set(expected)
    for name, exp in expected.items():
        for kind in ("weight", "bias"):
            got = ours[name][kind]
            if exp[kind] is None:
                assert got is None, f"{name} {kind}: layer has no bias, monitor gives {got}"
                continue
            assert got is not None, f"{name} {kind}: monitor gives None"
            assert got.shape == (n,) and got.device == exp[kind].device, f"{name} {kind}: {got.shape} on {got.device}"
            torch.testing.assert_close(
                got.double(),
                exp[kind],
                rtol=1e-10,
                atol=1e-12,
                msg=lambda m, name=name, kind=kind: f"{name} {kind}: {m}",
            )


def test_per_sample_grad_norms_need_the_option():
    model = bp_copy(sigmoid_mlp()[0])
    with torchbp.DeltaMonitor(model) as monitor:
        model(torch.randn(3, 6)).sum().backward()
        with pytest.raises(RuntimeError, match="per_sample_norms"):
            monitor.per_sample_grad_norms()


# --------------------------------------------------------------------------------------------------
# 7. Bad inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parent_is_a_file", "path_is_a_file"])
def test_unwritable_log_directory_fails_before_training(tmp_path, kind):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    path = blocker / "logs" if kind == "parent_is_a_file" else blocker
    model = bp_copy(sigmoid_mlp()[0])
    before = attached_monitors()
    with pytest.raises(OSError) as info:
        torchbp.DeltaMonitor(model, log=path)
    assert str(path) in str(info.value), f"the error does not name the path: {info.value}"
    assert "DeltaMonitor" in str(info.value)
    # Nothing was attached: the model trains exactly as without a monitor.
    assert monitored(model) == []
    assert attached_monitors() == before


def test_model_without_torchbp_linear():
    with pytest.raises(ValueError, match=r"torchbp\.nn\.Linear") as info:
        torchbp.DeltaMonitor(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert "torchbp.convert" in str(info.value)
    with pytest.raises(ValueError, match=r"torchbp\.nn\.Linear"):
        torchbp.DeltaMonitor(nn.Sequential(torchbp.nn.ReLU(), torchbp.nn.Sigmoid()))


@pytest.mark.parametrize("every", [0, -1, 2.0, "3", True])  # (None: the default, 10 with a log, 1 without)
def test_bad_every(every):
    with pytest.raises((ValueError, TypeError), match="every"):
        torchbp.DeltaMonitor(bp_copy(sigmoid_mlp()[0]), every=every)


@pytest.mark.parametrize("histogram_every", [-1, 1.5])
def test_bad_histogram_every(histogram_every):
    with pytest.raises((ValueError, TypeError), match="histogram_every"):
        torchbp.DeltaMonitor(bp_copy(sigmoid_mlp()[0]), histogram_every=histogram_every)


@pytest.mark.parametrize(
    "model", ["model", torch.randn(3), None, [torchbp.nn.Linear(2, 2)]], ids=["str", "tensor", "None", "list"]
)
def test_not_a_module(model):
    with pytest.raises(TypeError, match="Module"):
        torchbp.DeltaMonitor(model)


def test_bad_log_argument():
    with pytest.raises(TypeError, match="log"):
        torchbp.DeltaMonitor(bp_copy(sigmoid_mlp()[0]), log=123)


def test_a_failed_monitor_on_a_monitored_layer_leaves_everything_as_it_was(tmp_path):
    """A constructor that fails (here: a log "directory" that is a file) leaves no taps on the layers and the
    monitor already on them in place; one that succeeds replaces that monitor, with a warning."""
    model = bp_copy(Nested())  # layers in order: encoder.fc1, encoder.fc2, head
    (tmp_path / "afile").write_text("")
    before = attached_monitors()
    first = torchbp.DeltaMonitor(model.head)
    with pytest.raises(OSError, match="afile"):
        torchbp.DeltaMonitor(model, log=tmp_path / "afile")
    model(torch.randn(2, 6)).sum().backward()
    assert first.step == 0 and torchbp.monitor_of(model) is first
    assert monitored(model) == ["head"], "only the first monitor's layer has a slot"
    with pytest.warns(UserWarning, match="the new one replaces it"):
        second = torchbp.DeltaMonitor(model)
    assert not first._attached and torchbp.monitor_of(model) is second
    second.close()
    leftover = monitored(model)
    assert not leftover, f"slots left behind: {leftover}"
    assert attached_monitors() == before


# --------------------------------------------------------------------------------------------------
# 8. Off means off
# --------------------------------------------------------------------------------------------------


def saved_tensors(model, x):
    """The tensors autograd saves for backward during ``model(x)`` (shape, dtype), via saved_tensors_hooks."""
    packed = []

    def pack(t):
        packed.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return packed, out


def graph_taps(out) -> list:
    """Monitor objects held by any node of ``out``'s autograd graph."""
    found, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found += [v for v in getattr(node, "__dict__", {}).values() if type(v).__module__.startswith("torchbp.monitor")]
        stack += [next_fn for next_fn, _ in node.next_functions]
    return found


@pytest.mark.parametrize("device", DEVICES)
def test_off_means_off(device, tmp_path):
    torch.manual_seed(0)
    model = bp_copy(relu_mlp()[0]).to(device)
    model[0].weight.requires_grad_(False)  # with x not requiring grad: layer 0 needs nothing saved
    pristine = copy.deepcopy(model)  # never monitored
    x = torch.randn(5, 6, device=device)
    before = attached_monitors()

    baseline, out = saved_tensors(pristine, x)
    assert graph_taps(out) == []
    # A single frozen Linear with an input that needs no grad saves nothing at all.
    single = torchbp.nn.Linear(6, 3).to(device).requires_grad_(False)
    single.bias.requires_grad_(True)
    assert saved_tensors(single, x)[0] == []

    monitor = torchbp.DeltaMonitor(model, log=tmp_path)
    _, out = saved_tensors(model, x)
    assert graph_taps(out), "test setup: a monitored forward should carry the taps"
    out.sum().backward()
    assert monitor.step == 0
    monitor.close()

    assert attached_monitors() == before
    assert monitored(model) == []
    after, out = saved_tensors(model, x)
    assert after == baseline, f"saved tensors after close {after}, never monitored {baseline}"
    assert graph_taps(out) == [], "the autograd graph still holds monitor taps after close()"
    out.sum().backward()
    assert monitor.step == 0, "a closed monitor recorded a backward pass"


def test_two_monitors_count_back_to_zero():
    before = attached_monitors()
    a, b = bp_copy(sigmoid_mlp()[0]), bp_copy(relu_mlp()[0])
    ma, mb = torchbp.DeltaMonitor(a), torchbp.DeltaMonitor(b)
    assert attached_monitors() == before + 2
    assert set(monitored(a)) >= set(ma.layers) and set(monitored(b)) >= set(mb.layers)
    ma.close()
    ma.close()  # idempotent
    assert attached_monitors() == before + 1 and monitored(a) == []
    mb.close()
    assert attached_monitors() == before == 0 and monitored(b) == []


def test_own_writer_is_a_summary_writer_on_disk_after_flush(tmp_path):
    """With a log directory, monitor.writer is a torch SummaryWriter; monitor.flush() puts every logged step on disk."""
    from torch.utils.tensorboard import SummaryWriter

    model = bp_copy(sigmoid_mlp()[0])
    with torchbp.DeltaMonitor(model, log=tmp_path, histogram_every=0) as monitor:
        assert isinstance(monitor.writer, SummaryWriter)
        model(torch.randn(3, 6)).sum().backward()
        monitor.writer.add_scalar("loss/train", 0.25, 0)
        monitor.flush()
        ea = read_events(tmp_path)  # read while the writer is still open
        assert scalar_series(ea, "loss/train") == {0: 0.25}
        assert sorted(scalar_series(ea, "delta_norm/0")) == [0]


@pytest.mark.parametrize("scale", [float("inf"), 2e38], ids=["inf", "float32-range"])
def test_histogram_of_a_delta_wider_than_float32_does_not_break_backward(tmp_path, scale):
    lin = torchbp.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="not finite"), torchbp.DeltaMonitor(lin, log=tmp_path, histogram_every=1) as m:
        (lin(torch.randn(3, 2)) * torch.tensor([scale, -scale])).sum().backward()  # (2e38: ‖δ‖ overflows float32)
        assert m.latest()["model"]["delta_nonfinite"] is True
    (hist,) = read_events(tmp_path).Histograms("delta/model")
    assert hist.histogram_value.num == 6


def test_half_precision_delta_with_large_norm_is_finite():
    """‖δ_n‖ above float16's 65504 must not read as a non-finite δ."""
    lin = torchbp.nn.Linear(4, 4096).half()
    with torchbp.DeltaMonitor(lin) as monitor:
        (lin(torch.randn(3, 4).half()) * 2000).sum().backward()
        stats = monitor.latest()["model"]
    assert stats["delta_nonfinite"] is False
    assert math.isclose(stats["delta_sample_norm_max"], 2000 * 64, rel_tol=1e-3)


# --------------------------------------------------------------------------------------------------
# 9. The δ map: history() and the TensorBoard image
# --------------------------------------------------------------------------------------------------


def test_history_holds_the_logged_steps_delta_norm_in_network_order(tmp_path):
    torch_model, bp_model, _ = make_models(mixed_mlp, "cpu")
    oracle = DeltaOracle(torch_model)
    gen = torch.Generator().manual_seed(2)
    expected = {}
    with torchbp.DeltaMonitor(bp_model, log=tmp_path, every=3, histogram_every=0, image_every=0) as monitor:
        for step in range(7):
            x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
            y = torch.randn(8, 4, generator=gen, dtype=torch.float64)
            oracle.reset()
            loss_fn(torch_model(x), y).backward()
            loss_fn(bp_model(x), y).backward()
            if step % 3 == 0:
                expected[step] = {name: s["delta_norm"] for name, s in oracle.stats(set()).items()}
        monitor.flush()
        history = monitor.history()
    assert history["layers"] == ["0", "2", "4"]  # network order, input side first
    assert history["steps"] == [0, 3, 6]
    assert history["delta_norm"].shape == (3, 3)
    for j, step in enumerate(history["steps"]):
        for i, layer in enumerate(history["layers"]):
            assert math.isclose(history["delta_norm"][i, j], expected[step][layer], rel_tol=REL)


def test_delta_map_image_in_tensorboard(tmp_path):
    """Written every image_every steps (in the background) and on close; a decodable PNG."""
    import io

    from matplotlib import image as matplotlib_image

    model = bp_copy(relu_mlp()[0])
    with torchbp.DeltaMonitor(model, log=tmp_path, every=1, image_every=4, histogram_every=0) as monitor:
        for _ in range(9):
            model(torch.randn(4, 6)).sum().backward()
            time.sleep(2 * torchbp.monitor.BATCH_S)  # each step's events built by the next backward
        if monitor._host.drawing is not None:
            monitor._host.drawing.join(timeout=60)
    with torchbp.DeltaMonitor(model, log=tmp_path / "close", every=1, image_every=100) as monitor:
        for _ in range(3):
            model(torch.randn(4, 6)).sum().backward()
    assert [i.step for i in EventAccumulatorWithImages(tmp_path / "close").Images("delta_map")] == [2], "on close"
    ea = EventAccumulatorWithImages(tmp_path)
    images = ea.Images("delta_map")
    assert [i.step for i in images] == [4, 8], "every 4th step (and on close, unless just drawn)"
    for image in images:
        pixels = matplotlib_image.imread(io.BytesIO(image.encoded_image_string), format="png")
        assert pixels.shape[:2] == (image.height, image.width) and image.width > 200


def EventAccumulatorWithImages(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_without_matplotlib_no_image_and_one_clear_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    model = bp_copy(sigmoid_mlp()[0])
    monitor = torchbp.DeltaMonitor(model, log=tmp_path, every=1, image_every=0)
    model(torch.randn(4, 6)).sum().backward()
    with pytest.warns(UserWarning, match="no δ map image.*matplotlib"):
        monitor.close()
    ea = EventAccumulatorWithImages(tmp_path)
    assert ea.Tags()["images"] == []
    assert sorted(scalar_series(ea, "delta_norm/0")) == [0]


def test_a_nonfinite_logged_step_warns_naming_the_first_layer(tmp_path):
    torch_model = poisoned_mlp("relu_active", float("nan")).double()
    bp_model = bp_copy(torch_model)
    with torchbp.DeltaMonitor(bp_model, log=tmp_path, every=1) as monitor:
        with pytest.warns(UserWarning, match=r"not finite at step 0, first in layer 'fc2'"):
            loss_fn(bp_model(torch.randn(4, 5, dtype=torch.float64)), torch.randn(4, 3, dtype=torch.float64)).backward()
            monitor.flush()


def test_normal_exit_without_close_writes_every_logged_step(tmp_path):
    script = (
        "import sys, torch, torchbp\n"
        "m = torch.nn.Sequential(torchbp.nn.Linear(3, 4), torchbp.nn.ReLU(), torchbp.nn.Linear(4, 2))\n"
        "monitor = torchbp.DeltaMonitor(m, log=sys.argv[1], every=1)\n"
        "for _ in range(5):\n"
        "    m(torch.randn(2, 3)).sum().backward()\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(scalar_series(read_events(tmp_path), "delta_norm/0")) == [0, 1, 2, 3, 4]

"""Smoke tests: the examples run and train."""

import importlib.util
import pathlib
import warnings

import pytest
import torch
from helpers import DEVICES

import torchbp

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", DEVICES)
def test_train_mlp_learns_spirals(device, capsys):
    accuracy = _load("train_mlp").main(["--steps", "300", "--device", device])
    out = capsys.readouterr().out
    worst = float(out.splitlines()[0].split("=")[1])
    assert worst < 1e-5, out  # torchbp's gradients equal torch.nn's on the first step
    assert accuracy > 0.9, out
    assert torch.isfinite(torch.tensor(accuracy))


def test_convert_warns_when_it_converts_nothing():
    """torchbp.convert, as the examples use it, says so when a model holds nothing it converts."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 2, 3)
            self.act = torch.nn.Softplus()

    with pytest.warns(UserWarning, match=r"found nothing to convert in Net: it converts torch\.nn\.Linear, ") as record:
        assert isinstance(torchbp.convert(Net()), Net)
    (message,) = [str(w.message) for w in record]
    for name in ("Linear", "Sigmoid", "ReLU", "MSELoss", "CrossEntropyLoss", "BCELoss", "BCEWithLogitsLoss"):
        assert f"torch.nn.{name}" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: something converted, or torchbp layers already there
        torchbp.convert(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()))
        model = torchbp.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        torchbp.convert(model)
        torchbp.convert(torchbp.nn.QuadraticCost())


def test_transformer_example_trains_compiled_with_the_monitor(tmp_path, capsys):
    """examples/transformer.py: torch.nn transformer, converted, torch.compile(fullgraph=True), DeltaMonitor on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _load("transformer").main(["--steps", "40", "--every", "5", "--logdir", str(tmp_path), "--seed", "1"])
    out = capsys.readouterr().out
    assert "torch.compile(fullgraph=True)" in out, out
    assert result["loss"] < 2.5, out  # from log(32) = 3.47: it learns to count
    stats = result["stats"]
    assert stats["blocks.0.fc1"]["delta_gain"] is not None and stats["blocks.0.q_proj"]["delta_gain"] is None, stats
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert [e.step for e in ea.Scalars("delta_norm/head")] == list(range(0, 40, 5))


def test_lightning_example_logs_delta_beside_the_loss(tmp_path, capsys):
    """examples/lightning_mlp.py: DeltaMonitorCallback in a lightning Trainer, accumulating two batches per step."""
    pytest.importorskip("lightning", reason="examples/lightning_mlp.py needs lightning")
    result = _load("lightning_mlp").main(["--steps", "20", "--every", "5", "--logdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "δ at global steps [0, 5, 10, 15]" in out, out
    assert sorted(result["delta_norm"]) == ["net.0", "net.2", "net.4", "net.6"], out
    assert result["delta_norm"]["net.0"] < result["delta_norm"]["net.6"], out  # sigmoid: δ shrinks toward the input


def test_hf_example_trains_gpt2_and_logs_delta_at_the_trainers_steps(tmp_path, capsys):
    """examples/hf_gpt2.py: DeltaMonitorCallback in a transformers Trainer on a tiny GPT-2."""
    pytest.importorskip("transformers", reason="examples/hf_gpt2.py needs transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    result = _load("hf_gpt2").main(["--steps", "20", "--every", "5", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert result["loss_steps"] == result["delta_steps"] == [5, 10, 15, 20], out
    assert "lm_head" in result["layers"], out
    assert result["loss"][-1] < result["loss"][0], out

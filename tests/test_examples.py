"""Smoke tests: the examples run and train."""

import importlib.util
import pathlib

import pytest
import torch
from helpers import DEVICES

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

"""``torchbp check``: the table, the exit status, and that an injected gradient mismatch is caught."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICES

import torchbp.functional
from torchbp.cli import CASES, main

FUNCTIONS = [case.name for case in CASES]


def parse_rows(output: str) -> dict[tuple[str, str, str], list[str]]:
    """The table's rows: (function, device, dtype) -> the remaining cells."""
    rows = {}
    for line in output.splitlines():
        name = line[:32].strip()
        if name in FUNCTIONS:
            device, dtype, *rest = line[32:].split()
            rows[name, device, dtype] = rest
    return rows


def run_main(capsys, *argv: str) -> tuple[int, str]:
    status = main(["check", *argv])
    return status, capsys.readouterr().out


def test_every_function_listed():
    assert FUNCTIONS == [
        "linear",
        "sigmoid",
        "relu",
        "mse_loss",
        "quadratic_cost",
        "cross_entropy (indices)",
        "cross_entropy (probs)",
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
    ]


def test_python_m_torchbp_check():
    """The command as a user runs it, in a fresh process: every row passes, exit status 0."""
    env = {**os.environ, "PYTHONWARNINGS": "error::UserWarning"}
    proc = subprocess.run(
        [sys.executable, "-m", "torchbp", "check", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"torchbp {torchbp.__version__} | torch {torch.__version__}")
    rows = parse_rows(proc.stdout)
    assert set(rows) == {(f, "cpu", d) for f in FUNCTIONS for d in ("float32", "float64")}
    assert all(cells[-1] == "ok" for cells in rows.values())
    assert lines[-1] == f"torchbp check: {len(rows)}/{len(rows)} passed on cpu"


@pytest.mark.parametrize("device", DEVICES)
def test_check_passes(capsys, device):
    status, out = run_main(capsys, "--device", device)
    assert status == 0, out
    rows = parse_rows(out)
    assert set(rows) == {(f, device, d) for f in FUNCTIONS for d in ("float32", "float64")}
    for (_, _, dtype), cells in rows.items():
        assert cells[-1] == "ok"
        assert cells[-2] == ("pass" if dtype == "float64" else "-")  # gradcheck: float64 only
    assert out.splitlines()[-1] == f"torchbp check: {len(rows)}/{len(rows)} passed on {device}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_option(capsys, device, dtype):
    status, out = run_main(capsys, "--device", device, "--dtype", dtype, "--seed", "3", "--verbose")
    assert status == 0, out
    assert set(parse_rows(out)) == {(f, device, dtype) for f in FUNCTIONS}
    assert "    weight     abs" in out  # --verbose: one line per gradient


def test_default_devices(capsys):
    status, out = run_main(capsys, "--dtype", "float32")
    assert status == 0, out
    devices = {device for _, device, _ in parse_rows(out)}
    assert devices == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})


def _wrong_sigmoid_backward(ctx, grad):
    (a,) = ctx.saved_tensors
    return 1.01 * grad * a * (1 - a)  # 1% off (gradcheck allows rtol=1e-3)


def _wrong_linear_backward(ctx, delta):
    input, weight = ctx.saved_tensors
    delta_2d = delta.reshape(-1, delta.shape[-1])
    grad_input = delta @ weight
    grad_weight = delta_2d.mT @ input.reshape(-1, input.shape[-1])
    grad_bias = delta_2d.sum(0) + 1e-3  # the bias gradient off by 1e-3
    return grad_input, grad_weight, grad_bias, None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "function_class, backward, row, worst",
    [
        ("SigmoidFunction", _wrong_sigmoid_backward, "sigmoid", "input"),
        ("LinearFunction", _wrong_linear_backward, "linear", "bias"),
    ],
    ids=["sigmoid", "linear-bias"],
)
def test_injected_mismatch_fails(capsys, monkeypatch, device, function_class, backward, row, worst):
    """A wrong hand-written backward: its rows FAIL (gradcheck too), the others pass, exit status 1."""
    monkeypatch.setattr(getattr(torchbp.functional, function_class), "backward", staticmethod(backward))
    status, out = run_main(capsys, "--device", device)
    assert status == 1, out
    rows = parse_rows(out)
    for (function, _, dtype), cells in rows.items():
        if function == row:
            assert cells[-1] == "FAIL", cells
            assert cells[-3] == worst
            assert cells[-2] == ("FAIL" if dtype == "float64" else "-")
        else:
            assert cells[-1] == "ok", (function, cells)
    assert f"FAIL {row} on {device} in float32: grad of {worst}: max abs error" in out
    assert out.splitlines()[-1] == f"torchbp check: 2 mismatches ({len(rows) - 2}/{len(rows)} passed) on {device}"


@pytest.mark.parametrize("device", DEVICES)
def test_exception_in_backward_is_a_failed_row(capsys, monkeypatch, device):
    def broken(ctx, grad):
        raise RuntimeError("broken backward")

    monkeypatch.setattr(torchbp.functional.BCEWithLogitsFunction, "backward", staticmethod(broken))
    status, out = run_main(capsys, "--device", device, "--dtype", "float64")
    assert status == 1, out
    rows = parse_rows(out)
    assert rows["binary_cross_entropy_with_logits", device, "float64"][-1] == "FAIL"
    assert "RuntimeError: broken backward" in out
    assert out.splitlines()[-1].startswith("torchbp check: 1 mismatch (8/9 passed)")


def test_tf32_setting_restored(capsys):
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        run_main(capsys, "--device", "cpu", "--dtype", "float32")
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--device", "--dtype", "--seed", "--verbose", "gradcheck", "Exit status"):
        assert option in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "check" in capsys.readouterr().err


def test_bad_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--dtype", "float16"])
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(capsys):
    assert main(["check", "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err

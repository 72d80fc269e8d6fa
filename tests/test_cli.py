"""``torchbp check``: the table, the exit status, and that an injected gradient mismatch is caught; the command
line's messages (``torchbp check`` and ``torchbp demo``): one error format, plain words, exit statuses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICES, DTYPES, assert_matches_torch

import torchbp.cli.check
import torchbp.cli.demo
import torchbp.functional
from torchbp.cli import main
from torchbp.cli.check import CASES

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


def usage_error(capsys, *argv: str) -> str:
    """``torchbp <argv>`` as a usage error: exit status 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out == "", captured
    assert len(captured.err.splitlines()) == 1, captured.err
    return captured.err.strip()


def run_main(capsys, *argv: str) -> tuple[int, str]:
    status = main(["check", *argv])
    return status, capsys.readouterr().out


def test_every_function_listed():
    assert FUNCTIONS == [
        "linear",
        "sigmoid",
        "relu",
        "gelu",
        "gelu (tanh)",
        "silu",
        "tanh",
        "layer_norm",
        "rms_norm",
        "conv1d",
        "conv2d",
        "embedding",
        "mse_loss",
        "quadratic_cost",
        "cross_entropy (indices)",
        "cross_entropy (probs)",
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_battery_cases_pass_the_suites_comparison(case, dtype):
    """The battery's cases, through the test suite's own comparison (one definition of cases and tolerances)."""
    args = case.make(torch.Generator().manual_seed(0))
    args = {k: (v.to(dtype).requires_grad_(k in case.grads) if v.is_floating_point() else v) for k, v in args.items()}
    assert_matches_torch(case.ours, case.ref, args)


def test_one_definition_of_the_tolerances():
    import helpers

    assert helpers._TOLERANCES is torchbp.cli.check.TOLERANCES
    assert helpers.quadratic_cost_formula is torchbp.cli.check.quadratic_cost_formula


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
        assert float(cells[-4]) <= 1  # tol used: ok means within the tolerance
    assert out.splitlines()[-1] == f"torchbp check: {len(rows)}/{len(rows)} passed on {device}"


def test_header_gives_the_whole_criterion(capsys):
    """rtol and atol per dtype, and a per-row 'tol used' column that makes each "ok" checkable."""
    _, out = run_main(capsys, "--device", "cpu")
    assert "|torchbp - torch| <= atol + rtol*|torch|" in out
    assert "  float32: rtol 1e-05, atol 1e-05 x max(1, max|torch|) of each tensor" in out
    assert "  float64: rtol 1e-12, atol 1e-12 x max(1, max|torch|) of each tensor" in out
    title = next(line for line in out.splitlines() if line.startswith("function"))
    assert title.split()[-6:] == ["tol", "used", "worst", "grad", "gradcheck", "result"]


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
            assert float(cells[-4]) > 1, cells
        else:
            assert cells[-1] == "ok", (function, cells)
            assert float(cells[-4]) <= 1, cells
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
    n = len(FUNCTIONS)
    assert out.splitlines()[-1].startswith(f"torchbp check: 1 mismatch ({n - 1}/{n} passed)")


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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--epochs", "abc"], "--epochs: expected a positive integer, got 'abc'"),
        (["demo", "--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["demo", "--hidden", "30", "-1"], "--hidden: expected a positive integer, got '-1'"),
        (["demo", "--lr", "nan"], "--lr: expected a positive number, got 'nan'"),
        (["demo", "--seed", "1.5"], "--seed: expected an integer, got '1.5'"),
        (["demo", "--device", "gpu0"], "--device: expected a torch device such as cpu, cuda or cuda:1, got 'gpu0'"),
        (["demo", "--logdir", ""], "--logdir: expected a directory for the TensorBoard logs, got ''"),
        (["demo", "--epochs"], "--epochs: expected one argument"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["check", "--dtype", "float16"], "--dtype: expected one of float32, float64, all, got 'float16'"),
        (["check", "--seed", "x"], "--seed: expected an integer, got 'x'"),
        (["nonsense"], "COMMAND: expected one of demo, check, report, got 'nonsense'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_usage_errors_say_what_was_expected_and_received(capsys, argv, message):
    prog = "torchbp" if argv[0] == "nonsense" else f"torchbp {argv[0]}"
    assert usage_error(capsys, *argv) == f"{prog}: error: {message} (see {prog} --help)"


def test_python_m_torchbp_demo_parses_as_torchbp_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        torchbp.cli.demo.main(["--epochs", "abc"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("torchbp demo: error: --epochs: expected a positive integer, got 'abc'")


@pytest.mark.parametrize("nested", [False, True], ids=["file", "inside-a-file"])
def test_file_as_logdir_fails_at_once_named_as_typed(capsys, monkeypatch, tmp_path, nested):
    """A file given as --logdir is named as the user typed it, before any data is loaded or imported."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(
        torchbp.cli.demo, "load_digits", lambda *a: pytest.fail("loaded the data before checking --logdir")
    )
    typed = "afile/runs" if nested else "afile"
    problem = "'afile' is a file" if nested else "it is a file"
    err = usage_error(capsys, "demo", "--logdir", typed)
    assert err.startswith(
        f"torchbp demo: error: --logdir: cannot write TensorBoard logs to '{typed}' ({problem}, not a directory); "
    ), err
    assert str(tmp_path) not in err


def test_file_as_logdir_fails_fast_in_a_fresh_process(tmp_path):
    """As a user runs it: the error comes before the data set, TensorBoard or matplotlib is imported (and
    torchbp, its command and torchbp.picture import without matplotlib)."""
    (tmp_path / "afile").write_text("")
    code = (
        "import sys\n"
        "import torchbp.picture\n"
        "from torchbp.cli import main\n"
        "try:\n"
        "    main(['demo', '--logdir', 'afile'])\n"
        "except SystemExit as e:\n"
        "    print(e.code, sorted(m for m in ('sklearn', 'tensorboard', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "2 []", proc
    assert proc.stderr.startswith("torchbp demo: error: --logdir: cannot write TensorBoard logs to 'afile'"), (
        proc.stderr
    )


def test_unwritable_run_directory_is_a_failure_before_training(capsys, tmp_path, monkeypatch):
    """--logdir is fine, but <logdir>/sigmoid is a file: exit status 1, the path named, nothing trained."""
    (tmp_path / "sigmoid").write_text("")
    monkeypatch.setattr(
        torchbp.cli.demo, "load_digits", lambda *a: pytest.fail("loaded the data before checking --logdir")
    )
    assert main(["demo", "--logdir", str(tmp_path), "--no-progress"]) == 1
    captured = capsys.readouterr()
    expected = f"torchbp demo: error: cannot write TensorBoard logs to {str(tmp_path / 'sigmoid')!r} (in --logdir"
    assert captured.err.startswith(expected), captured.err
    assert len(captured.err.splitlines()) == 1 and "test accuracy" not in captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(capsys):
    assert main(["check", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchbp check: error: --device cuda: torch.cuda.is_available() is False"), err
    assert usage_error(capsys, "demo", "--device", "cuda").startswith(
        "torchbp demo: error: --device: expected a device this machine has, got 'cuda': no CUDA device is available"
    )


@pytest.mark.parametrize("command", ["demo", "check"])
def test_ctrl_c_is_one_line_and_exit_status_130(capsys, monkeypatch, tmp_path, command):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torchbp.cli.demo, "train", interrupted)
    monkeypatch.setattr(torchbp.cli.check, "run_check", interrupted)
    argv = ["demo", "--logdir", str(tmp_path), "--no-progress"] if command == "demo" else ["check"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err == f"torchbp {command}: interrupted\n", err


def test_output_piped_into_a_reader_that_stops_is_no_traceback():
    """``torchbp check | head -1``: the pipe closes early; exit status 1, nothing on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchbp", "check", "--device", "cpu", "--dtype", "float32"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().startswith("torchbp ")
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and err == "", err


def test_plurals():
    assert [torchbp.cli.demo.plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]

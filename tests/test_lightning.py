"""torchbp.integrations.lightning.DeltaMonitorCallback in a real lightning Trainer on CPU.

The δ statistics are read back with TensorBoard's EventAccumulator and compared with an oracle outside
the monitor: a tensor hook on the logits (δ^L = ∂C/∂z^L, so ‖Σ_n δ_n‖ of the output layer) recording
the trainer's global_step of each backward pass (tests/_lightning_module.py).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the Lightning tests need lightning (pip install torchbp[integrations])")
pytest.importorskip("tensorboard", reason="the Lightning tests need tensorboard")

import lightning.pytorch as pl  # noqa: E402
from _lightning_module import Net, loader  # noqa: E402
from helpers import (  # noqa: E402
    NEEDS_CUDA,
    read_events,
    scalar_series,
)
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

import torchbp  # noqa: E402
from torchbp.integrations.lightning import DeltaMonitorCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(LeafSpec|does not have many workers|litlogger)")
OUT = "delta_norm/net.2"  # the output layer's ‖Σ_n δ_n‖
CHILD = Path(__file__).resolve().with_name("_lightning_ddp_child.py")
ROOT = CHILD.parent.parent


def trainer(tmp_path, callback, logger=True, accelerator="cpu", **kwargs) -> pl.Trainer:
    quiet = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    logger = TensorBoardLogger(str(tmp_path / "tb")) if logger is True else logger
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
        **quiet,
        **kwargs,
    )


def fit(tmp_path, module=None, fit_module=None, monitor_options=None, **kwargs):
    torch.manual_seed(0)
    module = module or Net()
    callback = DeltaMonitorCallback(**{"every": 1, **(monitor_options or {})})
    t = trainer(tmp_path, callback, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|litlogger).*")
        t.fit(fit_module if fit_module is not None else module, loader())
    return t, module, callback


def first_per_step(records) -> dict[int, float]:
    first: dict[int, float] = {}
    for step, value in records:
        first.setdefault(step, value)
    return first


def assert_closed(module, callback):
    assert callback.monitor is None
    for m in module.modules():
        assert getattr(m, "_torchbp_slot", None) is None, f"{m} still monitored"


def test_accumulate_grad_batches_logs_at_global_step_beside_the_loss(tmp_path):
    t, module, callback = fit(tmp_path, max_steps=4, accumulate_grad_batches=2)
    assert isinstance(module.net[0], torchbp.nn.Linear), "converted at fit start"
    assert_closed(module, callback)
    logdir = Path(t.logger.log_dir)
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1, "δ goes through the logger's own writer"
    ea = read_events(logdir)
    logged = scalar_series(ea, OUT)
    assert sorted(logged) == [0, 1, 2, 3] == sorted(scalar_series(ea, "train_loss"))
    # Two backward passes per optimizer step; the first of each is logged.
    assert [s for s, _ in module.records] == [0, 0, 1, 1, 2, 2, 3, 3]
    for step, value in first_per_step(module.records).items():
        assert logged[step] == pytest.approx(value, rel=1e-5), step
    assert logged[0] != pytest.approx(module.records[1][1], rel=1e-3)  # (the second pass differs)
    assert set(scalar_series(ea, "dead_fraction/net.0")) == {0, 1, 2, 3}


SCALE = 256.0  # the float16 runs' GradScaler(init_scale=...): a power of two, no overflow on this model


@pytest.mark.parametrize(
    "device, precision",
    [
        pytest.param("cpu", "bf16-mixed", id="cpu-bf16"),
        pytest.param("cpu", "16-mixed", id="cpu-fp16"),
        pytest.param("cuda", "bf16-mixed", marks=NEEDS_CUDA, id="cuda-bf16"),
        pytest.param("cuda", "16-mixed", marks=NEEDS_CUDA, id="cuda-fp16"),
    ],
)
def test_mixed_precision(tmp_path, device, precision):
    """bf16-mixed, and 16-mixed with its GradScaler: the callback hands the precision plugin's scaler to the
    monitor, which divides its scale out (the oracle's hook sees the scaled gradient: it is divided here). On
    CPU, Lightning's "16-mixed" flag means bfloat16, so the float16 run there takes the plugin itself."""
    from lightning.pytorch.plugins import MixedPrecision

    options: dict = {"accelerator": "gpu" if device == "cuda" else "cpu"}
    scale = 1.0
    if precision == "16-mixed":
        scale = SCALE
        scaler = torch.amp.GradScaler(device, init_scale=SCALE, growth_interval=1000)
        options["plugins"] = [MixedPrecision(precision, device, scaler=scaler)]
    else:
        options["precision"] = precision
    t, module, callback = fit(tmp_path, max_steps=3, **options)
    assert_closed(module, callback)
    logged = scalar_series(read_events(t.logger.log_dir), OUT)
    assert sorted(logged) == [0, 1, 2]
    for step, value in first_per_step(module.records).items():
        assert logged[step] == pytest.approx(value / scale, rel=2e-2), step  # (δ in bfloat16 / float16)


def test_compiled_module_logs_what_the_eager_module_logs(tmp_path):
    """trainer.fit(torch.compile(module)): Lightning compiles training_step; AOTAutograd traces the backward,
    with the monitor's records in it (the aot_eager backend: the same graphs as Inductor's input, no C++ build)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    eager, _, _ = fit(tmp_path / "eager", module=Net(hook=False, log=False), max_steps=3)
    torch.manual_seed(0)
    module, backend = Net(hook=False, log=False), CompileCounterWithBackend("aot_eager")
    compiled, _, callback = fit(
        tmp_path / "compiled", module=module, fit_module=torch.compile(module, backend=backend), max_steps=3
    )
    assert backend.frame_count >= 1, "training_step ran compiled"
    assert_closed(module, callback)
    expected, ea = read_events(eager.logger.log_dir), read_events(compiled.logger.log_dir)
    for tag in (OUT, "delta_norm/net.0", "weight_grad_norm/net.0", "delta_gain/net.0", "dead_fraction/net.0"):
        ours, ref = scalar_series(ea, tag), scalar_series(expected, tag)
        assert sorted(ours) == sorted(ref) == [0, 1, 2], tag
        for step in ref:
            assert ours[step] == pytest.approx(ref[step], rel=1e-5), (tag, step)


def test_a_failing_training_step_closes_the_monitor_and_keeps_the_logs(tmp_path):
    torch.manual_seed(0)
    module = Net(fail_at=3)
    callback = DeltaMonitorCallback(every=1)
    t = trainer(tmp_path, callback, max_steps=10)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        t.fit(module, loader())
    assert_closed(module, callback)
    logged = scalar_series(read_events(t.logger.log_dir), OUT)
    assert sorted(logged) == [0, 1, 2]
    for step, value in first_per_step(module.records).items():
        assert logged[step] == pytest.approx(value, rel=1e-5), step


def test_without_a_tensorboard_logger_it_logs_under_default_root_dir(tmp_path):
    for version in range(2):
        t, module, callback = fit(tmp_path, max_steps=2, logger=False)
        assert_closed(module, callback)
        logged = scalar_series(read_events(tmp_path / "delta_monitor" / f"version_{version}"), OUT)
        assert sorted(logged) == [0, 1]


def test_options_are_checked_when_the_callback_is_made():
    with pytest.raises(TypeError, match=r"unexpected option 'evry'; the options are DeltaMonitor's: log, every"):
        DeltaMonitorCallback(evry=1)
    with pytest.raises(TypeError, match=r"step= is set by the callback"):
        DeltaMonitorCallback(step=lambda: 0)
    with pytest.raises(TypeError, match=r"convert must be True or False"):
        DeltaMonitorCallback(convert="yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)
def test_ddp_on_gloo_two_processes_rank_zero_writes(tmp_path):
    """strategy=DDPStrategy(process_group_backend="gloo"), devices=2 on CPU: Lightning starts the second rank by
    running the child script again; each rank saves its oracle records, rank zero alone writes events."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("events.out.tfevents.*"))
    assert len(files) == 1, f"rank zero alone writes: {files}"
    logged = scalar_series(read_events((tmp_path / files[0]).parent), OUT)
    assert sorted(logged) == [0, 1, 2]
    for r, rec in enumerate(records):
        assert [s for s, _ in rec] == [0, 1, 2], r
    for step, value in records[0]:  # rank zero's own samples (DistributedSampler gives each rank half)
        assert logged[step] == pytest.approx(value, rel=1e-5), step
        assert not math.isclose(logged[step], records[1][step][1], rel_tol=1e-3)

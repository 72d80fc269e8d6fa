"""torchbp.integrations.hf.DeltaMonitorCallback in a real transformers.Trainer on CPU: a tiny GPT-2 built
from its config (no download) on random tokens.

The δ statistics are read back with TensorBoard's EventAccumulator from the directory where transformers'
TensorBoardCallback writes, and compared with an oracle outside the monitor: hooks on ``lm_head`` (its input
a and δ = ∂C/∂z, the gradient of its output) giving BP4's ‖Σ δᵀa‖ of each backward pass.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Trainer tests need transformers (pip install torchbp[integrations])")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install torchbp[integrations])")
pytest.importorskip("tensorboard", reason="the Trainer tests need tensorboard")

from helpers import (  # noqa: E402
    NEEDS_CUDA,
    read_events,
    scalar_series,
)
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import torchbp  # noqa: E402
from torchbp.integrations.hf import DeltaMonitorCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
WEIGHT = "weight_grad_norm/lm_head"


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the labels are the inputs (GPT2LMHeadModel shifts them)."""

    def __init__(self, n: int = 32, length: int = 16, seed: int = 0) -> None:
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # (deterministic: eager and compiled agree)
    return GPT2LMHeadModel(config)


def bp4_oracle(model, accumulation: int, scale=lambda: 1.0) -> list[tuple[int, float]]:
    """(optimizer step, numbered from 1 as the Trainer logs it; ‖∂C/∂W‖ of lm_head) per backward pass; a loss
    scaled by ``scale()`` (float16's GradScaler) is divided back."""
    records: list[tuple[int, float]] = []
    seen = [0]

    def forward_hook(module, args, output):
        a = args[0].detach()

        def grad_hook(delta):
            step = seen[0] // accumulation + 1
            seen[0] += 1
            d, x = delta.reshape(-1, delta.shape[-1]).float(), a.reshape(-1, a.shape[-1]).float()
            records.append((step, (d.mT @ x).norm().item() / scale()))

        output.register_hook(grad_hook)

    model.lm_head.register_forward_hook(forward_hook)
    return records


def train(tmp_path, model, steps=3, accumulation=2, report_to=("tensorboard",), use_cpu=True, before=None, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        logging_steps=1,
        report_to=list(report_to),
        use_cpu=use_cpu,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )
    callback = DeltaMonitorCallback(every=1)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    if before is not None:
        before(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert callback.monitor is None, "closed at train end"
    assert all(getattr(m, "_torchbp_slot", None) is None for m in model.modules())
    return trainer


def run_dir(tmp_path) -> Path:
    (run,) = (tmp_path / "runs").iterdir()
    return run


def test_gradient_accumulation_logs_beside_the_trainers_loss(tmp_path):
    model = gpt2()
    records = bp4_oracle(model, accumulation=2)
    train(tmp_path, model)
    assert isinstance(model.lm_head, torchbp.nn.Linear)
    run = run_dir(tmp_path)
    files = sorted(p.name for p in run.glob("events.out.tfevents.*"))
    assert len(files) == 2 and any(".torchbp" in name for name in files), files  # the Trainer's and ours
    ea = read_events(run)
    monitored = {tag.split("/", 1)[1] for tag in ea.Tags()["scalars"] if tag.startswith("delta_norm/")}
    assert "lm_head" in monitored and len(monitored) >= 1, monitored  # (GPT-2's Conv1D layers too, when converted)
    logged = scalar_series(ea, WEIGHT)
    assert sorted(logged) == [1, 2, 3] == sorted(scalar_series(ea, "train/loss"))
    assert [step for step, _ in records] == [1, 1, 2, 2, 3, 3]
    first = {}
    for step, value in records:
        first.setdefault(step, value)
    for step, value in first.items():  # the first backward pass of each optimizer step
        assert logged[step] == pytest.approx(value, rel=1e-5), step
    assert logged[1] != pytest.approx(records[1][1], rel=1e-3)


@pytest.mark.parametrize(
    "device, precision",
    [
        pytest.param("cpu", "bf16", id="cpu-bf16"),
        pytest.param("cuda", "bf16", marks=NEEDS_CUDA, id="cuda-bf16"),
        pytest.param("cuda", "fp16", marks=NEEDS_CUDA, id="cuda-fp16"),
    ],
)
def test_mixed_precision(tmp_path, device, precision):
    """bf16=True, and fp16=True with the Trainer's GradScaler (CUDA only: accelerate scales no loss on CPU),
    which the callback takes from the optimizer it is passed and the monitor divides out."""
    model, found = gpt2(), {}
    scale = (lambda: found["scaler"].get_scale()) if precision == "fp16" else (lambda: 1.0)
    records = bp4_oracle(model, accumulation=2, scale=scale)

    def before(trainer):
        found["scaler"] = trainer.accelerator.scaler
        assert (found["scaler"] is not None) == (precision == "fp16")

    train(tmp_path, model, use_cpu=device == "cpu", before=before, **{precision: True})
    logged = scalar_series(read_events(run_dir(tmp_path)), WEIGHT)
    first = {}
    for step, value in records:
        first.setdefault(step, value)
    assert sorted(logged) and set(logged) <= set(first), (logged, first)
    if precision == "bf16":
        assert sorted(logged) == [1, 2, 3]  # (no scaler: no step skipped)
    for step, value in logged.items():
        assert value == pytest.approx(first[step], rel=3e-2), step  # (δ in bfloat16 / float16)


def test_the_trainers_grad_scaler_reaches_the_monitor(tmp_path):
    """fp16's GradScaler lives on accelerate's AcceleratedOptimizer, which the Trainer passes to on_train_begin;
    a scaler the user gave wins."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainers, mine = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for callback, expected in ((DeltaMonitorCallback(), trainers), (DeltaMonitorCallback(scaler=mine), mine)):
        state = TrainerState(is_world_process_zero=False)
        optimizer = SimpleNamespace(scaler=trainers)
        callback.on_train_begin(args, state, TrainerControl(), model=gpt2(), optimizer=optimizer)
        try:
            assert callback.monitor.scaler is expected
        finally:
            callback.on_train_end(args, state, TrainerControl())
    callback = DeltaMonitorCallback()
    callback.on_train_begin(args, TrainerState(is_world_process_zero=False), TrainerControl(), model=gpt2())
    assert callback.monitor.scaler is None, "no optimizer, no scaler"
    callback.close()


def test_torch_compile_logs_what_eager_logs_in_tensorboard_logging_dir(tmp_path, monkeypatch):
    """torch_compile=True (the aot_eager backend: AOTAutograd's graphs without a C++ build); the run's
    directory from TENSORBOARD_LOGGING_DIR, as transformers' TensorBoardCallback reads it."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "eager_tb"))
    train(tmp_path / "eager", gpt2(), steps=2)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "compiled_tb"))
    counters.clear()
    train(tmp_path / "compiled", gpt2(), steps=2, torch_compile=True, torch_compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1, "the model ran compiled"
    expected, ea = read_events(tmp_path / "eager_tb"), read_events(tmp_path / "compiled_tb")
    assert not (tmp_path / "compiled" / "runs").exists()
    for tag in (WEIGHT, "delta_norm/lm_head", "delta_sample_norm_max/lm_head"):
        ours, ref = scalar_series(ea, tag), scalar_series(expected, tag)
        assert sorted(ours) == sorted(ref) == [1, 2], tag
        for step in ref:
            assert ours[step] == pytest.approx(ref[step], rel=1e-5), (tag, step)
    assert sorted(scalar_series(ea, "train/loss")) == [1, 2]


def test_without_the_tensorboard_report_it_logs_where_that_would(tmp_path):
    train(tmp_path, gpt2(), steps=2, accumulation=1, report_to=())
    run = run_dir(tmp_path)
    assert run.name.endswith("_" + socket.gethostname())  # runs/<date>_<host>, as transformers names it
    assert [p.name.split(".")[-1].rstrip("0123456789") for p in run.glob("events.out.tfevents.*")] == ["torchbp"]
    assert sorted(scalar_series(read_events(run), WEIGHT)) == [1, 2]


def test_close_after_a_failing_training_keeps_the_logged_steps(tmp_path):
    """The Trainer calls no callback when training raises: callback.close() in a finally detaches and writes."""
    model = gpt2()
    calls = [0]

    def fail_on_the_fourth_forward(module, args):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("forward failed on purpose")

    model.lm_head.register_forward_pre_hook(fail_on_the_fourth_forward)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=5,
        logging_steps=1,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    callback = DeltaMonitorCallback(every=1)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    try:
        with pytest.raises(RuntimeError, match="failed on purpose"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        assert callback.monitor is not None and model.lm_head._torchbp_slot is not None
    finally:
        callback.close()
    assert callback.monitor is None and getattr(model.lm_head, "_torchbp_slot", None) is None
    assert sorted(scalar_series(read_events(run_dir(tmp_path)), WEIGHT)) == [1, 2, 3]


def test_only_the_main_process_writes(tmp_path):
    from transformers import TrainerControl, TrainerState

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model, callback = gpt2(), DeltaMonitorCallback(every=1)
    callback.on_train_begin(args, TrainerState(is_world_process_zero=False), TrainerControl(), model=model)
    try:
        assert callback.monitor is not None and callback.monitor.writer is None, "a monitor that does not write"
        model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
        assert "lm_head" in callback.monitor.latest()
    finally:
        callback.on_train_end(args, TrainerState(), TrainerControl())
    assert not (tmp_path / "runs").exists()


def test_options_are_checked_when_the_callback_is_made():
    with pytest.raises(TypeError, match=r"unexpected option 'evry'"):
        DeltaMonitorCallback(evry=1)
    with pytest.raises(TypeError, match=r"model= is set by the callback"):
        DeltaMonitorCallback(model=torch.nn.Linear(2, 2))

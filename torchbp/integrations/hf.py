"""A Hugging Face ``transformers.Trainer`` callback that watches δ^l = ∂C/∂z^l of the model it trains.

Example::

    from transformers import Trainer, TrainingArguments
    from torchbp.integrations.hf import DeltaMonitorCallback

    args = TrainingArguments("out", report_to=["tensorboard"], logging_steps=10)
    trainer = Trainer(model, args, train_dataset=data, callbacks=[DeltaMonitorCallback(every=10)])
    trainer.train()  # δ statistics beside the loss in out/runs/<date>_<host>, at the same steps

Needs ``transformers`` and ``accelerate`` (``pip install torchbp[integrations]``).
"""

from __future__ import annotations

import glob
import os
import socket
from datetime import datetime
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError(
        f"torchbp.integrations.hf needs the transformers package ({e}); "
        "pip install transformers accelerate, or pip install torchbp[integrations]"
    ) from e

from ..monitor import DeltaMonitor
from ..nn import convert as _convert
from ._common import check_options, close_quietly, with_scaler

__all__ = ["DeltaMonitorCallback"]


class DeltaMonitorCallback(TrainerCallback):
    r"""Attach a :class:`torchbp.DeltaMonitor` to the model for the length of ``Trainer.train``.

    At train begin (the model built, the optimizer made) the callback converts the model with
    :func:`torchbp.convert` (in place: the optimizer, the Trainer's wrappers and ``torch_compile=True`` keep
    working) and makes a monitor that logs into the run's TensorBoard directory, where transformers'
    ``TensorBoardCallback`` writes (``report_to=["tensorboard"]``): ``$TENSORBOARD_LOGGING_DIR`` if set,
    else its ``<output_dir>/runs/<date>_<host>`` (found by its event file of this process); without that
    callback, a new ``<output_dir>/runs/<date>_<host>``. The monitor writes its own event file there, which
    TensorBoard shows as one run with the Trainer's.

    **Steps.** A backward pass is numbered ``state.global_step + 1``: the optimizer step it contributes to,
    numbered as the Trainer numbers the loss and ``grad_norm`` it logs for that step, so δ and the loss
    share the x-axis. ``every`` counts optimizer steps; under ``gradient_accumulation_steps`` the first
    backward pass of a logged step is recorded. Every process has a monitor (``global_stats=True`` needs them
    all); only the main process (``state.is_world_process_zero``) writes. With ``fp16=True`` the monitor gets
    the Trainer's ``GradScaler`` (its scale divided out of the statistics; an overflowing step flagged, as the
    scaler skips it). The monitor is closed at train end.

    The Trainer calls no callback when training raises: call :meth:`close` in a ``finally`` to detach the
    monitor and write what it holds (at interpreter exit it is written anyway).

    Args:
        convert: convert the model's ``torch.nn`` layers to torchbp's at train begin; turn off for a model
            built from :mod:`torchbp.nn` already. Default: ``True``.
        **monitor_options: keyword arguments of :class:`torchbp.DeltaMonitor` (``every``,
            ``histogram_every``, ``image_every``, ``per_sample_norms``, ``global_stats``...); ``log`` replaces
            the run's directory (main process only). ``model`` and ``step`` are set by the callback.

    Attributes:
        monitor: the :class:`torchbp.DeltaMonitor` of the current training (``None`` before and after it).
    """

    def __init__(self, convert: bool = True, **monitor_options: Any) -> None:
        if not isinstance(convert, bool):
            raise TypeError(f"DeltaMonitorCallback: convert must be True or False, got {convert!r}")
        self.convert = convert
        self.monitor_options = check_options("DeltaMonitorCallback", monitor_options)
        self.monitor: DeltaMonitor | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        self.close()  # (a previous training's, had it not ended)
        if model is None:
            raise RuntimeError("DeltaMonitorCallback: the Trainer passed no model to on_train_begin; use Trainer.train")
        if self.convert:
            _convert(model)
        options = dict(self.monitor_options)
        log = options.pop("log", None)
        if state.is_world_process_zero:
            log = log if log is not None else _tensorboard_dir(args)
        else:
            log = None
        # fp16=True: the optimizer the Trainer passes is accelerate's AcceleratedOptimizer, holding its GradScaler.
        options = with_scaler(options, getattr(kwargs.get("optimizer"), "scaler", None))
        self.monitor = DeltaMonitor(model, log=log, step=lambda: state.global_step + 1, **options)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.close()

    def close(self) -> None:
        """Close the monitor (detach it from the model, write what it holds); nothing when there is none."""
        monitor, self.monitor = self.monitor, None
        close_quietly(monitor, "DeltaMonitorCallback")


def _tensorboard_dir(args) -> str:
    """Where transformers' TensorBoardCallback writes (it runs first: the Trainer puts reporting callbacks before
    the user's), or where it would."""
    if os.getenv("TENSORBOARD_LOGGING_DIR"):
        return os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"])
    if getattr(args, "logging_dir", None):  # transformers 4: TrainingArguments.logging_dir, the callback's directory
        return args.logging_dir
    runs = os.path.join(args.output_dir, "runs")
    host = socket.gethostname()
    if "tensorboard" in (args.report_to or []):
        pattern = os.path.join(glob.escape(runs), "**", f"events.out.tfevents.*.{host}.{os.getpid()}.*")
        ours = glob.glob(pattern, recursive=True)  # (also a hyperparameter-search trial's subdirectory)
        if ours:
            return os.path.dirname(max(ours, key=os.path.getmtime))
    return os.path.join(runs, datetime.now().strftime("%b%d_%H-%M-%S") + "_" + host)

"""A Lightning callback that watches δ^l = ∂C/∂z^l of the LightningModule it trains.

Example::

    from lightning.pytorch import Trainer
    from torchbp.integrations.lightning import DeltaMonitorCallback

    trainer = Trainer(max_steps=100, callbacks=[DeltaMonitorCallback(every=10)])
    trainer.fit(module)  # δ statistics in the logger's TensorBoard run, at trainer.global_step

Needs ``lightning`` (``pip install torchbp[integrations]``).
"""

from __future__ import annotations

import os
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError as e:
    raise ImportError(
        f"torchbp.integrations.lightning needs the lightning package ({e}); "
        "pip install lightning, or pip install torchbp[integrations]"
    ) from e

from ..monitor import DeltaMonitor
from ..nn import convert as _convert
from ._common import check_options, close_quietly, with_scaler

__all__ = ["DeltaMonitorCallback"]


class DeltaMonitorCallback(pl.Callback):
    r"""Attach a :class:`torchbp.DeltaMonitor` to the LightningModule for the length of ``trainer.fit``.

    At fit start (after ``configure_model`` and the strategy's setup, before the first batch) the callback
    converts the module with :func:`torchbp.convert` (in place: the optimizers, a ``DistributedDataParallel``
    wrapper and a ``torch.compile`` of the module keep working) and makes a monitor that logs:

    - into the trainer's :class:`~lightning.pytorch.loggers.TensorBoardLogger` (the first one among
      ``trainer.loggers``): through its ``experiment`` writer, so δ lands in the same event file as the loss;
    - otherwise (another logger, or none) into its own directory,
      ``<trainer.default_root_dir>/delta_monitor/version_<n>``.

    The monitor's step is ``trainer.global_step`` (optimizer steps), the x-axis Lightning logs metrics on:
    ``every`` counts optimizer steps, and under ``accumulate_grad_batches`` the first backward pass of a
    logged step is recorded. Every rank has a monitor (``global_stats=True`` needs them all); only global
    rank zero writes. Under ``precision="16-mixed"`` the monitor gets the precision plugin's ``GradScaler``
    (its scale divided out of the statistics; an overflowing step flagged, as the scaler skips it). The
    monitor is closed (its events written) when fitting ends or fails (``on_fit_end``, ``on_exception``,
    ``teardown``); a failure to write warns and does not fail the run.

    Args:
        convert: convert the module's ``torch.nn`` layers to torchbp's at fit start; turn off for a module
            built from :mod:`torchbp.nn` already. Default: ``True``.
        **monitor_options: keyword arguments of :class:`torchbp.DeltaMonitor` (``every``,
            ``histogram_every``, ``image_every``, ``per_sample_norms``, ``global_stats``...); ``log`` replaces
            the logger's directory (rank zero only). ``model`` and ``step`` are set by the callback.

    Attributes:
        monitor: the :class:`torchbp.DeltaMonitor` of the current fit (``None`` before and after it).
    """

    def __init__(self, convert: bool = True, **monitor_options: Any) -> None:
        super().__init__()
        if not isinstance(convert, bool):
            raise TypeError(f"DeltaMonitorCallback: convert must be True or False, got {convert!r}")
        self.convert = convert
        self.monitor_options = check_options("DeltaMonitorCallback", monitor_options)
        self.monitor: DeltaMonitor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()  # (a previous fit's, had it not ended)
        if self.convert:
            _convert(pl_module)
        options = dict(self.monitor_options)
        log = options.pop("log", None)
        if trainer.is_global_zero:
            log = log if log is not None else _log_target(trainer)
        else:
            log = None
        options = with_scaler(options, getattr(trainer.precision_plugin, "scaler", None))  # ("16-mixed")
        self.monitor = DeltaMonitor(pl_module, log=log, step=lambda: trainer.global_step, **options)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close()

    def close(self) -> None:
        """Close the monitor (detach it from the module, write what it holds); nothing when there is none."""
        monitor, self.monitor = self.monitor, None
        close_quietly(monitor, "DeltaMonitorCallback")


def _log_target(trainer: pl.Trainer) -> Any:
    """The first TensorBoardLogger's writer (or its log_dir), else a new version directory of our own."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            if type(writer).__module__.startswith("torch.utils.tensorboard"):
                return writer
            return logger.log_dir  # (a tensorboardX writer: the monitor writes its own file beside it)
    root = os.path.join(trainer.default_root_dir, "delta_monitor")
    names = os.listdir(root) if os.path.isdir(root) else []
    taken = [int(name[8:]) for name in names if name.startswith("version_") and name[8:].isdigit()]
    return os.path.join(root, f"version_{max(taken, default=-1) + 1}")

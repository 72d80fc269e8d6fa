"""Callbacks that put a :class:`torchbp.DeltaMonitor` on a model trained by someone else's loop.

- :mod:`torchbp.integrations.lightning`: ``DeltaMonitorCallback``, a ``lightning.pytorch.Callback``.
- :mod:`torchbp.integrations.hf`: ``DeltaMonitorCallback``, a ``transformers.TrainerCallback``.

Each submodule imports its framework; this package imports none of them (``pip install torchbp[integrations]``
installs lightning, transformers, accelerate and wandb).
"""

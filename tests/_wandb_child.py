"""The W&B run of test_wandb.py, in its own process (wandb's TensorBoard patch stays for the process's life).

Usage: python _wandb_child.py ROOT

An offline run (``WANDB_MODE=offline``) under ROOT/wandb with ``sync_tensorboard=True``, and two monitors
training the same small model: one logging to the directory ROOT/tb/dir, one to a ``SummaryWriter`` of
ROOT/tb/writer. ``wandb.tensorboard.patch(root_logdir=ROOT/tb)`` first names the TensorBoard root, which
spares the run wandb's wait (10 s, at finish) for finding one.
"""

import os
import sys

import torch
import wandb
from torch.utils.tensorboard import SummaryWriter

import torchbp

root = os.path.abspath(sys.argv[1])
torch.set_num_threads(1)
wandb.tensorboard.patch(root_logdir=os.path.join(root, "tb"))
run = wandb.init(mode="offline", dir=root, project="torchbp-test", sync_tensorboard=True)
writer = SummaryWriter(os.path.join(root, "tb", "writer"))
for log in (os.path.join(root, "tb", "dir"), writer):
    torch.manual_seed(0)
    model = torchbp.convert(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)))
    with torchbp.DeltaMonitor(model, log=log, every=1):
        for _ in range(3):
            torchbp.nn.CrossEntropyLoss()(model(torch.randn(8, 3)), torch.randint(0, 2, (8,))).backward()
writer.close()
run.finish()

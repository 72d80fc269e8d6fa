"""Child process for test_monitor.py's kill test: trains a small torchbp MLP with a DeltaMonitor.

Usage: python _monitor_train_child.py LOGDIR

After each finished step it prints one JSON line {"step": s, "t": time.monotonic(), "delta_norm": {layer: value}}
and flushes stdout. It trains without pause until killed, and stops by itself after 60 s or 100000
steps, so it can never outlive a test that lost track of it.
"""

import json
import sys
import time

import torch

import torchbp

torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(
    torchbp.nn.Linear(8, 32),
    torchbp.nn.ReLU(),
    torchbp.nn.Linear(32, 32),
    torchbp.nn.Sigmoid(),
    torchbp.nn.Linear(32, 4),
)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = torchbp.nn.MSELoss()
monitor = torchbp.DeltaMonitor(model, log=sys.argv[1], every=1)
start = time.monotonic()
for _ in range(100000):
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    values = {name: stats["delta_norm"] for name, stats in monitor.latest().items()}
    print(json.dumps({"step": monitor.step, "t": time.monotonic(), "delta_norm": values}), flush=True)
    if time.monotonic() - start > 60:
        break
monitor.close()

"""One rank of test_monitor_ddp.py: a converted model, data-parallel over gloo, with a DeltaMonitor.

Usage: python _ddp_child.py RANK WORLD PORT OUTDIR LOGDIR MODE

MODE is ``ddp`` (DistributedDataParallel, the monitor's statistics of this rank's samples), ``ddp-global``
(the same with ``global_stats=True``) or ``fsdp`` (``torch.distributed.fsdp.fully_shard``). Each rank
trains on its slice of the same global batches and saves, per step, its gradients and
``monitor.latest()`` to OUTDIR/rank<RANK>.pt. The process group has a 60 s timeout and the test kills
what is left after its own deadline, so no rank can hang the test.
"""

import datetime
import gc
import sys

import torch
import torch.distributed as dist

import torchbp

rank, world, port, outdir, logdir, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:7]
torch.set_num_threads(1)
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
)


def build():
    """The model of test_monitor_ddp.build_model (seeded: the same weights on every rank)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 4)
    ).double()
    with torch.no_grad():  # two dead units, on every rank
        m[0].weight[:2] = 0.0
        m[0].bias[:2] = -1.0
    return m


def batches(steps=3, n=16):
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,), generator=gen))
        for _ in range(steps)
    ]


model = torchbp.convert(build())
if mode == "fsdp":
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    wrapped = model
else:
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
monitor = torchbp.DeltaMonitor(wrapped, log=logdir, every=1, global_stats=mode == "ddp-global")
record = {"grads": [], "latest": [], "writer": monitor.writer is not None}
for x, y in batches():
    share = x.shape[0] // world
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    optimizer.zero_grad(set_to_none=True)
    torchbp.nn.CrossEntropyLoss()(wrapped(x), y).backward()
    grads = []
    for p in model.parameters():
        g = p.grad
        grads.append((g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone())
    record["grads"].append(grads)
    record["latest"].append(monitor.latest())
    optimizer.step()
monitor.close()
torch.save(record, f"{outdir}/rank{rank}.pt")
# Tear down while the interpreter is fully alive. DistributedDataParallel keeps the process group (and gloo's
# worker and transport threads) alive: destroy_process_group() alone would leave those threads running into
# interpreter finalization and exit. With the model freed first, it destroys the group and joins its threads.
del wrapped, optimizer, model
gc.collect()
dist.destroy_process_group()

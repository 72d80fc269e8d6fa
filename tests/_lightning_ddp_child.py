"""The DDP run of test_lightning.py: Lightning's "ddp" strategy on gloo, 2 CPU processes, with the callback.

Usage: python _lightning_ddp_child.py OUTDIR

Lightning starts rank 1 by running this script again (with LOCAL_RANK set). Each rank saves the oracle
records of its backward passes to OUTDIR/rank<r>.pt; the logger writes under OUTDIR/tb (rank zero).
"""

import sys
import warnings

import lightning.pytorch as pl
import torch
from _lightning_module import Net, loader
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from torchbp.integrations.lightning import DeltaMonitorCallback

warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|litlogger).*")
out = sys.argv[1]
torch.set_num_threads(1)
torch.manual_seed(0)
module = Net()
trainer = pl.Trainer(
    accelerator="cpu",
    devices=2,
    strategy=DDPStrategy(process_group_backend="gloo", timeout=__import__("datetime").timedelta(seconds=60)),
    max_steps=3,
    logger=TensorBoardLogger(f"{out}/tb"),
    callbacks=[DeltaMonitorCallback(every=1)],
    log_every_n_steps=1,
    default_root_dir=out,
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
)
trainer.fit(module, loader())
torch.save(module.records, f"{out}/rank{trainer.global_rank}.pt")

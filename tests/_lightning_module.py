"""The LightningModule of test_lightning.py and its DDP child: a converted-at-fit-start MLP on random data.

``records`` holds, per backward pass, (trainer.global_step, ‖Σ_n δ_n‖ of the output layer) from a tensor hook
on the logits (δ^L = ∂C/∂z^L): an oracle independent of the monitor.
"""

import lightning.pytorch as pl
import torch


class Net(pl.LightningModule):
    def __init__(self, fail_at: int | None = None, hook: bool = True, log: bool = True) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        self.fail_at, self.hook, self.log_loss = fail_at, hook, log
        self.records: list[tuple[int, float]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.trainer.global_step == self.fail_at:
            raise RuntimeError("training_step failed on purpose")
        x, y = batch
        logits = self(x)
        if self.hook:
            step = self.trainer.global_step
            logits.register_hook(lambda g: self.records.append((step, g.float().sum(0).norm().item())))
        loss = torch.nn.functional.cross_entropy(logits, y)
        if self.log_loss:  # (self.log in a torch.compile'd training_step fails in dynamo: lightning 2.6, torch 2.13)
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int = 64, batch_size: int = 4, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)

"""Watch δ in a Lightning run: a sigmoid MLP trained by lightning.pytorch.Trainer, with DeltaMonitorCallback.

The callback converts the LightningModule's torch.nn layers to torchbp's at fit start and logs δ's statistics
into the TensorBoardLogger's run, at trainer.global_step, beside the loss. Two interleaved spirals, a
2-16-16-16-2 sigmoid network (δ shrinks toward the input: Nielsen, ch. 5), SGD, two batches per step.

    python examples/lightning_mlp.py [--steps 100] [--logdir runs/lightning_mlp]
    tensorboard --logdir runs/lightning_mlp
"""

import argparse
import math
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from torchbp.integrations.lightning import DeltaMonitorCallback


class SpiralNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers = [torch.nn.Linear(2, 16), torch.nn.Sigmoid(), torch.nn.Linear(16, 16), torch.nn.Sigmoid()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(16, 16), torch.nn.Sigmoid(), torch.nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0, momentum=0.9)


def spirals(n: int, generator: torch.Generator) -> torch.utils.data.TensorDataset:
    t = torch.rand(n, generator=generator) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    angle = t + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], 1) / (3 * math.pi)
    return torch.utils.data.TensorDataset(x, label)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    parser.add_argument("--every", type=int, default=10, help="log δ every this many steps (default: 10)")
    parser.add_argument("--logdir", default="runs/lightning_mlp", help="TensorBoardLogger save_dir")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = spirals(4096, torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    module = SpiralNet()
    trainer = pl.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(args.logdir, name="spirals"),
        callbacks=[DeltaMonitorCallback(every=args.every)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec)")
        trainer.fit(module, loader)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    layers = [tag.split("/", 1)[1] for tag in events.Tags()["scalars"] if tag.startswith("delta_norm/")]
    last = {layer: events.Scalars(f"delta_norm/{layer}")[-1] for layer in layers}
    loss = events.Scalars("train_loss")[-1]
    steps = [e.step for e in events.Scalars("delta_norm/net.6")]
    print(f"logged to {trainer.logger.log_dir}: δ at global steps {steps}, the loss at every step")
    print(f"train_loss at step {loss.step}: {loss.value:.4f}")
    for layer in sorted(layers):
        print(f"  ‖δ‖ (delta_norm/{layer}) at step {last[layer].step}: {last[layer].value:.3g}")
    return {"logdir": trainer.logger.log_dir, "loss": loss.value, "delta_norm": {k: v.value for k, v in last.items()}}


if __name__ == "__main__":
    main()

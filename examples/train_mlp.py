"""Train a small MLP built from torchbp layers, and check its gradients against torch.nn's.

Two interleaved spirals in 2-D, a 2-32-32-2 ReLU network, SGD with momentum. Every backward pass
runs torchbp's hand-written BP1-BP4; at the start the same network built from torch.nn is run once
to show that both give the same gradients.

    python examples/train_mlp.py [--steps 400] [--device cpu]
"""

import argparse
import copy
import math

import torch

import torchbp


def spirals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of two interleaved spirals, labels 0 and 1."""
    t = torch.rand(n, generator=generator) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    angle = t + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], 1) / (3 * math.pi)
    return x + 0.02 * torch.randn(n, 2, generator=generator), label


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="SGD steps (default: 400)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, y = spirals(2000, g)
    x, y = x.to(args.device), y.to(args.device)
    reference = torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
    ).to(args.device)
    model = torchbp.convert(copy.deepcopy(reference))  # the same weights, torchbp's backward
    loss_fn = torchbp.nn.CrossEntropyLoss()

    # One step of each: the hand-written gradients equal autograd's.
    torch.nn.CrossEntropyLoss()(reference(x), y).backward()
    loss_fn(model(x), y).backward()
    worst = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
    print(f"max |grad torchbp - grad torch.nn| = {worst:.2e}")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(args.steps + 1):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if step % (args.steps // 4 or 1) == 0:
            accuracy = (model(x).argmax(1) == y).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()

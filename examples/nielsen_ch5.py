r"""Nielsen's "speed of learning" of each hidden layer (*Neural Networks and Deep Learning*, ch. 5).

Nielsen measures how fast each hidden layer l of a sigmoid network learns by the norm of its bias
gradient, ‖δ^l‖ = ‖∂C/∂b^l‖ (BP3), over 1000 training images, and finds that earlier layers learn
slower: [0.012, 0.060] for the two hidden layers of [784, 30, 30, 10] on MNIST. This script repeats
the measurement with torchbp layers and a :class:`torchbp.DeltaMonitor` on scikit-learn's digits
(8×8 images, so 64 inputs instead of 784), with Nielsen's setup:

- sigmoid layers, 2, 3 and 4 hidden layers of 30 units, 10 sigmoid outputs;
- cross-entropy on the sigmoid outputs: binary cross-entropy summed over the 10 outputs, averaged
  over the samples, with one-hot targets (so δ^L = a − y);
- weights N(0, 1/n_in), biases N(0, 1);
- the first 1000 images, pixels scaled to [0, 1].

The monitor's ``delta_norm`` of a layer, ‖Σ_n δ_n‖, is exactly Nielsen's measure when the cost
carries the 1/n: it is the norm of the bias gradient of the cost averaged over the 1000 images.

It prints the speeds at initialisation (median over ``--seeds`` seeds), then trains each network
(the first seed) with mini-batch SGD and measures the speeds over the same 1000 images after every
epoch, logging them to TensorBoard under ``<logdir>/<k>_hidden`` (one run per depth; the monitor
step is the epoch).

    python examples/nielsen_ch5.py [--seeds 5] [--epochs 20] [--logdir runs/nielsen_ch5] [--device cpu]
    tensorboard --logdir runs/nielsen_ch5
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

import torchbp
import torchbp.functional as F

DEPTHS = (2, 3, 4)
HIDDEN = 30
#: Nielsen's values at initialisation (MNIST, [784, 30, ..., 30, 10], one network each), from ch. 5.
NIELSEN = {2: [0.012, 0.060], 3: [0.003, 0.017, 0.070], 4: [0.002, 0.005, 0.029, 0.109]}


def load_data(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` digits (training) and the rest (test): pixels in [0, 1], labels 0-9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("nielsen_ch5.py needs scikit-learn for the digits data: pip install 'torchbp[demo]'")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    return x[:n], y[:n], x[n:], y[n:]


def network(depth: int, seed: int, n_in: int = 64) -> torch.nn.Sequential:
    """``depth`` sigmoid hidden layers of 30 units and 10 sigmoid outputs; w ~ N(0, 1/n_in), b ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [n_in] + [HIDDEN] * depth + [10]
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        linear = torchbp.nn.Linear(a, b)
        with torch.no_grad():
            torch.nn.init.normal_(linear.weight, 0.0, a**-0.5, generator=g)  # Nielsen's default initializer
            torch.nn.init.normal_(linear.bias, 0.0, 1.0, generator=g)
        layers += [linear, torchbp.nn.Sigmoid()]
    return torch.nn.Sequential(*layers)


def cost(model: torch.nn.Module, x: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
    """C = −(1/n) Σ_x Σ_j [y_j ln a_j + (1 − y_j) ln(1 − a_j)], Nielsen's cross-entropy cost."""
    return F.binary_cross_entropy(model(x), y_onehot, reduction="sum") / len(x)


def hidden_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the hidden Linear layers, input side first (the last Linear is the output)."""
    return [name for name, m in model.named_modules() if isinstance(m, torchbp.nn.Linear)][:-1]


def speeds(model: torch.nn.Module, monitor: torchbp.DeltaMonitor, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """‖∂C/∂b^l‖ of each hidden layer over the whole batch, from one backward pass with the monitor on."""
    monitor.attach()
    try:
        cost(model, x, y).backward()
    finally:
        monitor.detach()  # training steps run without the taps: the monitor's step is the epoch
        model.zero_grad(set_to_none=True)
    latest = monitor.latest()
    return [latest[name]["delta_norm"] for name in hidden_names(model)]


def accuracy(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == labels).float().mean().item()


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join(fmt(r).rstrip() for r in [header, *rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=5, help="networks per depth for the speeds at initialisation (default: 5)"
    )
    parser.add_argument(
        "--epochs", type=int, default=20, help="SGD epochs over the 1000 images, per depth (default: 20)"
    )
    parser.add_argument("--batch-size", type=int, default=10, help="SGD mini-batch size (default: 10, as Nielsen)")
    parser.add_argument(
        "--lr", type=float, default=0.5, help="SGD learning rate η (default: 0.5, Nielsen's η for this cost in ch. 3)"
    )
    parser.add_argument(
        "--logdir",
        default=os.path.join("runs", "nielsen_ch5"),
        help="TensorBoard log directory (default: runs/nielsen_ch5)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="a tiny run for the smoke test: 2 seeds, 1 epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = min(args.seeds, 2), min(args.epochs, 1)
    if args.seeds < 1 or args.epochs < 0 or args.batch_size < 1:
        parser.error("--seeds and --batch-size must be >= 1, --epochs >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available")
    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(1)  # 30-unit layers: one thread is faster than several
    started = time.perf_counter()

    x, labels, x_test, labels_test = (t.to(args.device) for t in load_data())
    y = torch.nn.functional.one_hot(labels, 10).to(x.dtype)

    # 1. At initialisation, over seeds.
    init = {}
    for depth in DEPTHS:
        per_seed = []
        for seed in range(args.seeds):
            model = network(depth, seed).to(args.device)
            with torchbp.DeltaMonitor(model) as monitor:
                per_seed.append(speeds(model, monitor, x, y))
        init[depth] = [statistics.median(layer) for layer in zip(*per_seed)]
    print(f"Speed of learning ‖δ^l‖ = ‖∂C/∂b^l‖ of each hidden layer at initialisation, over the first {len(x)} digits")
    print(
        f"(median over {args.seeds} seed{'' if args.seeds == 1 else 's'}; Nielsen's MNIST values, 784 inputs, for comparison)\n"
    )
    header = ["network", *(f"hidden {i + 1}" for i in range(max(DEPTHS))), "1st/last", "Nielsen (MNIST)", "1st/last"]
    rows = []
    for depth in DEPTHS:
        ours, theirs = init[depth], NIELSEN[depth]
        cells = [f"{v:.3f}" for v in ours] + [""] * (max(DEPTHS) - depth)
        nielsen = "[" + ", ".join(f"{v:.3f}" for v in theirs) + "]"
        ratios = [f"{ours[0] / ours[-1]:.3f}", nielsen, f"{theirs[0] / theirs[-1]:.3f}"]
        rows.append([str([64] + [HIDDEN] * depth + [10]), *cells, *ratios])
    print(table(header, rows))

    # 2. While training (the first seed), with the speeds measured over the 1000 images after each epoch.
    epochs = f"{args.epochs} epoch{'' if args.epochs == 1 else 's'}"
    print(
        f"\nWhile training: SGD, mini-batches of {args.batch_size}, η = {args.lr}, {epochs} "
        f"(seed 0); speeds over the {len(x)} images after each epoch"
    )
    shown = sorted({0, 1, 2, args.epochs} | set(range(0, args.epochs + 1, max(1, args.epochs // 5))))
    trained, histories = {}, {}
    for depth in DEPTHS:
        model = network(depth, 0).to(args.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        shuffle = torch.Generator().manual_seed(0)
        rows, history = [], []
        with torchbp.DeltaMonitor(model, log=os.path.join(args.logdir, f"{depth}_hidden"), every=1) as monitor:
            writer = monitor.writer
            for epoch in range(args.epochs + 1):
                if epoch:
                    order = torch.randperm(len(x), generator=shuffle).to(args.device)
                    for i in range(0, len(x), args.batch_size):
                        batch = order[i : i + args.batch_size]
                        optimizer.zero_grad(set_to_none=True)
                        cost(model, x[batch], y[batch]).backward()
                        optimizer.step()
                speed = speeds(model, monitor, x, y)  # logged as delta_norm/<layer> at step = epoch
                history.append(speed)
                with torch.no_grad():
                    c = cost(model, x, y).item()
                acc, test_acc = accuracy(model, x, labels), accuracy(model, x_test, labels_test)
                writer.add_scalar("cost/train", c, epoch)
                writer.add_scalar("accuracy/train", acc, epoch)
                writer.add_scalar("accuracy/test", test_acc, epoch)
                for i, s in enumerate(speed):
                    writer.add_scalar(f"speed/hidden_{i + 1}", s, epoch)
                if epoch in shown:
                    rows.append([str(epoch), *(f"{s:.2e}" for s in speed), f"{c:.3f}", f"{acc:.3f}", f"{test_acc:.3f}"])
        trained[depth] = speed
        histories[f"{depth} hidden layers"] = {
            "steps": list(range(args.epochs + 1)),
            "layers": [f"hidden {i + 1}" for i in range(depth)],
            "delta_norm": [list(layer) for layer in zip(*history)],  # (layers, epochs)
        }
        header = ["epoch", *(f"hidden {i + 1}" for i in range(depth)), "cost", "train acc", f"test acc ({len(x_test)})"]
        print(f"\n{depth} hidden layers, {[64] + [HIDDEN] * depth + [10]}")
        print(table(header, rows))

    torch.set_num_threads(threads)
    plateau = -(math.log(0.1) + 9 * math.log(0.9))  # every output 0.1, the frequency of each class
    print(
        "\nWhat to look for (Nielsen, ch. 5): earlier layers learn slower, at initialisation and while a network\n"
        f"sits on the plateau of cost {plateau:.2f} where every output is 0.1; deeper networks stay there longer."
    )
    print(
        "\nTensorBoard: speeds (delta_norm/<layer>, speed/hidden_<l>), cost and accuracy per epoch, one run per depth"
    )
    print(f"  tensorboard --logdir {args.logdir}")
    try:  # the δ map: ‖δ^l‖ of each hidden layer per epoch, one row per layer, for each depth
        from torchbp import picture

        path = picture.save_delta_map(histories, os.path.join(args.logdir, "delta_map.png"))
        print(f"δ map (log10 ‖δ^l‖ of each hidden layer per epoch, each depth): {path}")
    except ImportError as e:
        print(f"no δ map picture: {e}")
    print(f"({time.perf_counter() - started:.1f}s)")
    return {"init": init, "trained": trained}


if __name__ == "__main__":
    main()

r"""``torchbp demo``: watch the error δ^l = ∂C/∂z^l travel back through a sigmoid and a ReLU network.

Trains two deep MLPs of torchbp layers on scikit-learn's handwritten digits (1797 8×8 images that
ship inside the scikit-learn package: nothing is downloaded), 64→30→30→30→30→10 by default. The two
nets differ only in their hidden activation, sigmoid or ReLU: same layer sizes, same initial weights
(He-normal, zero biases), same mini-batches, same optimizer. A :class:`torchbp.DeltaMonitor` on each
records every layer's δ in the hand-written backward and writes it to TensorBoard.

At the end it prints each net's test accuracy and a per-layer table of

- ``delta_norm`` = ‖Σ_n δ_n‖ = ‖∂C/∂b^l‖ (BP3), Nielsen's "speed of learning" of the layer, and
- ``gain`` = ‖δ^l‖ / ‖δ^{l+1}‖, how much the error shrinks (< 1) or grows (> 1) crossing one layer,

at the first and at the last logged training step, and draws the δ map of both nets
(:mod:`torchbp.picture`: log10 ‖δ^l‖ per layer and logged step) to ``<logdir>/delta_map.png``.
σ'(z) ≤ 1/4, so in the sigmoid net δ shrinks at every layer on its way back and the first hidden layer
learns far slower than the last: the vanishing gradient. ReLU's σ'(z) is 0 or 1 and, with He
initialisation, δ keeps its size.

The layers are named ``hidden1`` … ``hidden<k>``, ``act1`` …, ``output``, so the TensorBoard tags read
``delta_norm/hidden1``.

Run it as ``torchbp demo`` or ``python -m torchbp.demo``; ``--help`` lists the options. :func:`add_parser`
registers the subcommand with :mod:`torchbp.cli.main`.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

import torchbp
from torchbp.monitor.events import ensure_writable

from ._args import Parser, dispatch, integer, positive_float, positive_int

__all__ = ["DESCRIPTION", "add_arguments", "add_parser", "run", "main"]

#: One line for the ``torchbp demo`` subcommand's help.
DESCRIPTION = (
    "Train a sigmoid and a ReLU MLP on scikit-learn's handwritten digits with the δ monitor on, print each "
    "layer's δ norms (the sigmoid net's vanishing gradient), write TensorBoard logs and draw the δ map of both nets "
    "(<logdir>/delta_map.png)."
)

ACTIVATIONS = ("sigmoid", "relu")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def plural(count: int, noun: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"expected a device this machine has, got {text!r}: no CUDA device is available "
            f"(torch {torch.__version__}); use --device cpu"
        )
    return text


def _logdir(text: str) -> str:
    """The log directory as typed, if it is a directory that can be created or written to (checked
    before anything is loaded; nothing is created here)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory for the TensorBoard logs, got ''")
    existing = text
    while not os.path.exists(existing):  # the nearest part of the path that exists
        parent = os.path.dirname(existing.rstrip("/" + os.sep))
        if parent == existing:
            break
        existing = parent or "."
    if not os.path.isdir(existing):
        what = "it is a file" if existing == text else f"{existing!r} is a file"
        problem = f"{what}, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "no permission to write in it" if existing == text else f"no permission to write in {existing!r}"
    else:
        return text
    raise argparse.ArgumentTypeError(
        f"cannot write TensorBoard logs to {text!r} ({problem}); pass a writable directory"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (used by ``torchbp demo`` and :func:`main`)."""
    parser.add_argument("--epochs", type=positive_int, default=40, help="passes over the training set (default: 40)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="mini-batch size (default: 64)")
    parser.add_argument(
        "--lr", type=positive_float, default=0.1, help="learning rate of SGD with momentum 0.9 (default: 0.1)"
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        nargs="+",
        default=[30, 30, 30, 30],
        metavar="SIZE",
        help="hidden layer sizes, input side first (default: 30 30 30 30, i.e. 64→30→30→30→30→10)",
    )
    parser.add_argument(
        "--seed",
        type=integer,
        default=0,
        help="seed of the train/test split, the initial weights and the batch order (default: 0)",
    )
    parser.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="torch device to train on: cpu, cuda, cuda:1, ... (default: cpu)",
    )
    parser.add_argument(
        "--logdir",
        type=_logdir,
        default=os.path.join("runs", "demo"),
        help="TensorBoard log directory; each net logs to <logdir>/sigmoid and <logdir>/relu, and the δ map "
        "picture goes to <logdir>/delta_map.png (default: runs/demo)",
    )
    parser.add_argument(
        "--every",
        type=positive_int,
        default=10,
        help="log the δ statistics and the loss every this many steps; the δ map and the table's end step are "
        "logged steps (default: 10; on a CPU, logging every step costs about 12-14%% of a training step, "
        "every 10th about 5%%)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar on stderr (without a terminal, a few plain progress lines are printed instead of a bar)",
    )


#: Shown after the options in ``--help``.
EPILOG = (
    "Exit status: 0 done, 1 a failure (a package missing, logs not writable), 2 a usage error, "
    "130 interrupted (Ctrl-C)."
)


def add_parser(subparsers: Any) -> None:
    """Register ``torchbp demo`` with the ``torchbp`` command's subparsers."""
    p = subparsers.add_parser(
        "demo",
        help="train sigmoid and ReLU MLPs on the digits data and show how δ propagates (TensorBoard logs, δ map)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m torchbp.demo [options]``: the same as ``torchbp demo [options]`` (the same parser, messages
    and exit statuses, from :mod:`torchbp.cli._args`)."""
    parser = Parser(prog="torchbp demo", description=DESCRIPTION, epilog=EPILOG)
    add_arguments(parser)
    parser.set_defaults(func=run, command="demo")
    return dispatch(parser, sys.argv[1:] if argv is None else argv)


# --------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------


class DemoError(Exception):
    """A problem the user can fix (missing package, bad device, unwritable log directory)."""


def load_digits(seed: int, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as float32 pixels in [0, 1], split into train and test sets by ``seed``.

    Returns ``(x_train, y_train, x_test, y_test)``: inputs of shape (N, 64), int64 labels 0-9.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise DemoError(
            "the demo trains on scikit-learn's handwritten digits, and scikit-learn is not installed: "
            "pip install 'torchbp[demo]'"
        ) from e
    digits = sklearn_load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixels are 0..16
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def build_mlp(sizes: Sequence[int], activation: str, seed: int) -> torch.nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` between them (none after the last: logits).

    The layers are named ``hidden1``, ``act1``, ``hidden2``, ..., ``output`` (TensorBoard tags such as
    ``delta_norm/hidden1``). Weights are He-normal, N(0, 2/n_in), biases zero, drawn from a generator
    seeded by ``seed``: the sigmoid and ReLU nets start from the same weights.
    """
    generator = torch.Generator().manual_seed(seed)
    layers: OrderedDict[str, torch.nn.Module] = OrderedDict()
    n_hidden = len(sizes) - 2
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = torchbp.nn.Linear(n_in, n_out)
        with torch.no_grad():
            torch.nn.init.kaiming_normal_(linear.weight, nonlinearity="relu", generator=generator)
            linear.bias.zero_()
        if i < n_hidden:
            layers[f"hidden{i + 1}"] = linear
            layers[f"act{i + 1}"] = torchbp.nn.Sigmoid() if activation == "sigmoid" else torchbp.nn.ReLU()
        else:
            layers["output"] = linear
    return torch.nn.Sequential(layers)


# --------------------------------------------------------------------------------------------------
# Progress bar (stderr)
# --------------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; otherwise a plain line at the first step and every quarter.

    Args:
        total: number of steps.
        label: shown before the bar.
        enabled: ``False`` prints nothing.
        stream: where to write. Default: ``sys.stderr``.
    """

    width = 30

    def __init__(self, total: int, label: str, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.start = time.perf_counter()
        self.last_draw = -math.inf
        self.next_quarter = 0
        self._last_len = 0

    def due(self, done: int) -> bool:
        """Whether :meth:`update` would draw now (so the caller fetches its postfix only then)."""
        if not self.enabled:
            return False
        if self.tty:
            return done >= self.total or time.perf_counter() - self.last_draw >= 0.1
        return done * 4 >= self.next_quarter * self.total

    def update(self, done: int, postfix: str = "") -> None:
        if not self.due(done):
            return
        elapsed = time.perf_counter() - self.start
        if self.tty:
            filled = int(self.width * done / self.total)
            bar = "█" * filled + "·" * (self.width - filled)
            line = f"\r{self.label} |{bar}| {done}/{self.total} {elapsed:5.1f}s {postfix}"
            self.stream.write(line.ljust(self._last_len))  # blank out a longer previous line
            self._last_len = len(line)
            self.last_draw = time.perf_counter()
        else:
            self.stream.write(
                f"{self.label}: {100 * done // self.total:3d}% ({done}/{self.total} steps, {elapsed:.1f}s) {postfix}\n"
            )
            while done * 4 >= self.next_quarter * self.total:
                self.next_quarter += 1
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    activation: str
    start: dict[str, dict[str, Any]] = field(default_factory=dict)  # monitor.latest() after step 0
    end: dict[str, dict[str, Any]] = field(default_factory=dict)  # ... after the last logged step
    end_step: int = 0
    history: dict[str, Any] = field(default_factory=dict)  # delta_norm per layer at the logged steps
    steps: int = 0
    loss: float = math.nan
    accuracy: float = math.nan
    seconds: float = 0.0


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(activation: str, data, args: argparse.Namespace, device: torch.device) -> Result:
    """Train one net with a :class:`torchbp.DeltaMonitor` logging to ``<logdir>/<activation>``.

    On each logged step (every ``args.every``-th, from step 0) it keeps the statistics, so the table's
    "end" is the last step TensorBoard holds; the δ map is drawn from ``monitor.history()``.
    """
    x_train, y_train, x_test, y_test = data
    sizes = [x_train.shape[1], *args.hidden, 10]
    model = build_mlp(sizes, activation, args.seed).to(device)
    loss_fn = torchbp.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / args.batch_size)
    result = Result(activation)
    progress = Progress(args.epochs * steps_per_epoch, f"{activation:>7}", enabled=not args.no_progress)
    shuffle = torch.Generator().manual_seed(args.seed)  # the same batch order for both nets
    started = time.perf_counter()
    try:
        with torchbp.DeltaMonitor(model, log=os.path.join(args.logdir, activation), every=args.every) as monitor:
            writer = monitor.writer
            step = 0
            for epoch in range(args.epochs):
                order = torch.randperm(n, generator=shuffle).to(device)
                for i in range(0, n, args.batch_size):
                    batch = order[i : i + args.batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x_train[batch]), y_train[batch])
                    loss.backward()  # every torchbp.nn.Linear hands its δ to the monitor here
                    optimizer.step()
                    if monitor.step % args.every == 0:  # a step the monitor logged
                        writer.add_scalar("loss/train", loss.item(), monitor.step)
                        result.end, result.end_step = monitor.latest(), monitor.step
                        if monitor.step == 0:
                            result.start = result.end
                    step += 1
                    if progress.due(step):
                        progress.update(step, f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f}")
                writer.add_scalar("accuracy/test", _accuracy(model, x_test, y_test), step - 1)
            result.steps = step
            result.loss = loss.item()
        result.history = monitor.history()  # delta_norm of the logged steps, for the δ map
    finally:
        progress.close()
    result.accuracy = _accuracy(model, x_test, y_test)
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def delta_table(results: Sequence[Result], sizes: Sequence[int]) -> str:
    """The per-layer table: delta_norm and gain at the first and the last logged step, the nets side by side."""
    names = results[0].history["layers"]  # network order, input side first
    width = max(7, *(len(name) for name in names)) + 2
    cell = 20  # "delta_norm   gain   " under each (net, time)
    lead = width + 10
    head1 = " " * lead + "".join(f"{r.activation:<{2 * cell}}" for r in results)
    head2 = " " * lead + "".join(f"{'start (step 0)':<{cell}}{f'end (step {r.end_step})':<{cell}}" for r in results)
    head3 = f"{'layer':<{width}}{'shape':<10}" + "delta_norm   gain   " * 2 * len(results)
    lines = [head1.rstrip(), head2.rstrip(), head3.rstrip()]
    for k, name in enumerate(names):
        row = f"{name:<{width}}{f'{sizes[k]}→{sizes[k + 1]}':<10}"
        for r in results:
            for stats in (r.start[name], r.end[name]):
                row += f"{_num(stats['delta_norm'], '.2e'):>10} {_num(stats['delta_gain'], '6.2f'):>6}   "
        lines.append(row.rstrip())
    return "\n".join(lines)


def vanishing_summary(result: Result) -> str:
    """One line: the first hidden layer's delta_norm over the last hidden layer's, at the start."""
    names = result.history["layers"]
    if len(names) < 3:
        return f"{result.activation:>7}: one hidden layer, no earlier layer to compare"
    first, last = result.start[names[0]]["delta_norm"], result.start[names[-2]]["delta_norm"]
    ratio = first / last if last else math.nan
    if ratio < 0.5:
        verdict = f"δ shrinks on its way back, {names[0]} learns {1 / ratio:.0f}× slower: vanishing gradient"
    elif ratio > 2:
        verdict = f"δ grows on its way back, {names[0]} learns {ratio:.0f}× faster: exploding gradient"
    else:
        verdict = "δ keeps its size on its way back: no vanishing gradient"
    return (
        f"{result.activation:>7}: delta_norm of {names[0]} / {names[-2]} at the start = "
        f"{first:.2e} / {last:.2e} = {ratio:.3f}: {verdict}"
    )


def save_picture(results: Sequence[Result], sizes: Sequence[int], args: argparse.Namespace) -> str | None:
    """The δ map of the nets side by side, to ``<logdir>/delta_map.png``; ``None`` without matplotlib."""
    try:
        from torchbp.picture import save_delta_map

        return save_delta_map(
            {r.activation: r.history for r in results},
            os.path.join(args.logdir, "delta_map.png"),
            title=f"torchbp demo: MLP {'→'.join(map(str, sizes))} on the digits, "
            f"‖δ^l‖ at the logged steps (every {plural(args.every, 'step').removeprefix('1 ')})",
        )
    except ImportError as e:
        print(f"torchbp demo: note: no δ map picture: {e}", file=sys.stderr)
        return None
    except OSError as e:
        raise DemoError(f"cannot write the δ map picture to {e.filename!r} ({e.strerror})") from None


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed options (see :func:`add_arguments`); returns the exit status."""
    for stream in (sys.stdout, sys.stderr):
        _tolerate_unencodable(stream)
    out = sys.stdout
    device = torch.device(args.device)  # checked when parsed
    threads = torch.get_num_threads()
    try:
        for activation in ACTIVATIONS:  # before the data: a bad --logdir fails at once
            _check_logdir(args.logdir, activation)
        data = tuple(t.to(device) for t in load_digits(args.seed))
        sizes = [data[0].shape[1], *args.hidden, 10]
        if device.type == "cpu" and max(sizes) <= 128:
            torch.set_num_threads(1)  # layers this narrow run faster on one thread than on several
        print(
            f"torchbp demo: digits {len(data[0])} train / {len(data[2])} test images, MLP "
            f"{'→'.join(map(str, sizes))}, sigmoid vs ReLU, SGD lr {args.lr} momentum 0.9, batch {args.batch_size}, "
            f"{plural(args.epochs, 'epoch')}, δ logged every {plural(args.every, 'step')}, on {device}",
            file=out,
            flush=True,
        )
        results = [train(activation, data, args, device) for activation in ACTIVATIONS]
        picture = save_picture(results, sizes, args)
    except DemoError as e:
        print(f"torchbp demo: error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)

    print(file=out)
    for r in results:
        print(
            f"{r.activation:>7}: test accuracy {100 * r.accuracy:.1f}%  (final batch loss {r.loss:.3g}, "
            f"{plural(r.steps, 'step')} in {r.seconds:.1f}s)",
            file=out,
        )
    print(file=out)
    print("δ per layer: delta_norm = ‖Σ_n δ_n‖ = ‖∂C/∂b‖ (BP3), the layer's speed of learning;", file=out)
    print("             gain = ‖δ^l‖ / ‖δ^(l+1)‖, < 1: the error shrinks on its way back to the input;", file=out)
    print("             at the first and the last logged step (the values TensorBoard holds)", file=out)
    print(file=out)
    print(delta_table(results, sizes), file=out)
    print(file=out)
    for r in results:
        print(vanishing_summary(r), file=out)
    print(file=out)
    if picture is not None:
        print(f"δ map (log10 ‖δ^l‖ per layer and logged step, both nets): {picture}", file=out)
    print(f"What the δ statistics say: torchbp report {shlex.quote(os.fspath(args.logdir))}", file=out)
    print(f"TensorBoard logs (delta_norm/<layer>, delta_gain/<layer>, loss, accuracy): {args.logdir}", file=out)
    print(f"  tensorboard --logdir {shlex.quote(os.fspath(args.logdir))}", file=out, flush=True)
    return 0


def _tolerate_unencodable(stream: TextIO) -> None:
    """On a console that cannot show δ, ‖ or █ (a legacy code page), print escapes instead of failing."""
    encoding = getattr(stream, "encoding", None)
    if encoding and hasattr(stream, "reconfigure"):
        try:
            "δ‖→█·×".encode(encoding)
        except (UnicodeEncodeError, LookupError):
            stream.reconfigure(errors="backslashreplace")


def _check_logdir(logdir: str, run: str) -> None:
    """Create ``<logdir>/<run>`` and fail before training when it is not writable; note earlier runs in it."""
    path = os.path.join(logdir, run)
    try:
        ensure_writable(path)
    except OSError as e:
        where = repr(logdir) if e.filename in (None, logdir) else f"{path!r} (in --logdir {logdir!r})"
        raise DemoError(f"cannot write TensorBoard logs to {where} ({e.strerror}); pass a writable --logdir") from None
    if any(name.startswith("events.out.tfevents") for name in os.listdir(path)):
        print(
            f"torchbp demo: note: {path} already holds event files from an earlier run; TensorBoard will show "
            "both (remove them or pass another --logdir)",
            file=sys.stderr,
        )
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise DemoError(
            "the demo writes TensorBoard logs and tensorboard is not installed: pip install 'torchbp[demo]'"
        ) from e


if __name__ == "__main__":
    sys.exit(main())

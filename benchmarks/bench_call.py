r"""Per-call Python cost: one forward + backward of a small tensor, torchbp's Functions against torch's own ops.

On a (32, 10) tensor the arithmetic is negligible and what a call costs is its Python and dispatch overhead.
Each row times one call, forward and backward, three ways:

- ``torch``: the native op (``torch.nn.functional``'s, or plain tensor ops);
- ``torchbp``: ``torchbp.functional``'s (a run of layers: ``torchbp.nn.Sequential``, the backprop loop);
- the floor: a bare custom ``torch.autograd.Function`` (``x * 2`` forward, ``g * 2`` backward) against the
  native ``x * 2``: what any Python Function costs above a native op.

``excess`` is torchbp's time above torch's, less the floor's: what torchbp spends above the cost of any Python
Function, in argument checks, casting and branches (target: at most ~10 µs).

Timing: ``--repeats`` times, a block of ``--calls`` calls of every row, in an order that rotates each repeat
(interleaved, so that load drift hits every row alike); a block's time / calls is one sample. The table gives the
median over repeats and the interquartile range. The clock is the process's CPU time (``time.process_time``) by
default: on a machine shared with other work it leaves out the time the process waits for a core, which would
otherwise swamp these few microseconds; ``--clock wall`` takes ``time.perf_counter``. One torch thread by default
(``--threads``): on a tensor this small, intra-op threads only add their wake-up cost, which on a loaded machine
swamps the Python cost.

    python benchmarks/bench_call.py                   # 30 x 200 calls
    python benchmarks/bench_call.py --repeats 10 --calls 100
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's torchbp

import torchbp  # noqa: E402
import torchbp.functional as BF  # noqa: E402


class Double(torch.autograd.Function):
    """The bare custom Function: the floor of any Python Function's cost."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def cases() -> list[tuple[str, object, object]]:
    """(name, torch's call, torchbp's call); each call runs forward and backward once."""
    torch.manual_seed(0)
    x = torch.randn(32, 10, requires_grad=True)
    p = torch.rand(32, 10).clamp(0.05, 0.95).requires_grad_()
    y = torch.randint(0, 10, (32,))
    t = torch.randn(32, 10)
    b = torch.rand(32, 10).round()
    ref_loop = nn.Sequential(nn.Linear(10, 10), nn.Sigmoid(), nn.Linear(10, 10))
    bp_loop = torchbp.convert(nn.Sequential(nn.Linear(10, 10), nn.Sigmoid(), nn.Linear(10, 10)))
    bp_loop.load_state_dict(ref_loop.state_dict())
    assert bp_loop.chained_runs() == [(0, 3)]
    n = x.shape[0]
    return [
        ("floor: x * 2", lambda: (x * 2).sum().backward(), lambda: Double.apply(x).sum().backward()),
        ("cross_entropy", lambda: F.cross_entropy(x, y).backward(), lambda: BF.cross_entropy(x, y).backward()),
        ("mse_loss", lambda: F.mse_loss(x, t).backward(), lambda: BF.mse_loss(x, t).backward()),
        (
            "quadratic_cost",
            lambda: ((x - t).pow(2).sum() / (2 * n)).backward(),
            lambda: BF.quadratic_cost(x, t).backward(),
        ),
        (
            "binary_cross_entropy",
            lambda: F.binary_cross_entropy(p, b).backward(),
            lambda: BF.binary_cross_entropy(p, b).backward(),
        ),
        (
            "bce_with_logits",
            lambda: F.binary_cross_entropy_with_logits(x, b).backward(),
            lambda: BF.binary_cross_entropy_with_logits(x, b).backward(),
        ),
        ("linear", lambda: F.linear(x, t[:10], None).sum().backward(), lambda: BF.linear(x, t[:10]).sum().backward()),
        ("loop: Linear-σ-Linear", lambda: ref_loop(x).sum().backward(), lambda: bp_loop(x).sum().backward()),
    ]


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)


CLOCK = {"process": time.process_time, "wall": time.perf_counter}


def block(fn, calls: int, clock=time.process_time) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls * 1e6  # µs per call


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="process")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = cases()
    fns = [f for _, ref, bp in rows for f in (ref, bp)]
    for f in fns:  # warm up
        block(f, 20)
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(args.repeats):
        order = list(range(len(fns)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            samples[i].append(block(fns[i], args.calls, CLOCK[args.clock]))
    med = [statistics.median(s) for s in samples]
    iqr = [(quantile(s, 0.25), quantile(s, 0.75)) for s in samples]
    floor = med[1] - med[0]  # the bare Function above x * 2
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, Python {platform.python_version()}; clock: {args.clock}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(f"one forward + backward of a (32, 10) tensor; median of {args.repeats} blocks of {args.calls} calls (IQR)\n")
    print("| call | torch µs | torchbp µs | torchbp − torch µs | excess over the floor µs |")
    print("| --- | --- | --- | --- | --- |")
    for k, (name, _, _) in enumerate(rows):
        (t_ref, t_bp), (q_ref, q_bp) = med[2 * k : 2 * k + 2], iqr[2 * k : 2 * k + 2]
        excess = "(the floor)" if k == 0 else f"{t_bp - t_ref - floor:+.1f}"
        print(
            f"| {name} | {t_ref:.1f} ({q_ref[0]:.1f}–{q_ref[1]:.1f}) | {t_bp:.1f} ({q_bp[0]:.1f}–{q_bp[1]:.1f}) "
            f"| {t_bp - t_ref:+.1f} | {excess} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

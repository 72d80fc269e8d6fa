r"""Where torchbp's extra step time goes: swap one kind of module at a time, then profile.

Companion to ``bench_step.py``. For one MLP size (default the smallest, [64, 32, 32, 10] at batch
32, where the per-call overhead of a Python ``autograd.Function`` matters most) it times a full
training step (zero_grad, forward, backward, SGD step) of

    torch        the torch.nn model
    +Linear      only the Linear layers converted to torchbp
    +act         only the activations converted
    +loss        only the CrossEntropyLoss converted
    torchbp      everything converted

interleaved (every variant once per repeat, the order rotating), and prints each variant's median
step time and its median extra time over torch per step. The per-component extras roughly add up
to the total; the difference is the interaction (e.g. the first Python node in a backward pass).

Timing is CPU time of the main thread (``time.thread_time``) with ``torch.set_num_threads(1)``
by default, so that other processes on a shared machine disturb it less than wall time; pass
``--wall`` and ``--threads N`` for wall-clock time as ``bench_step.py`` measures it.

``--cprofile`` then runs cProfile (thread-time clock) over torchbp's steps and prints the top
functions by own time; ``--torch-profiler`` prints torch.profiler's operator table for one step of
each model (operator counts show how many aten calls each backward makes).

    python benchmarks/profile_overhead.py
    python benchmarks/profile_overhead.py --size medium --activation sigmoid --cprofile
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import sys
import time

import torch
from bench_step import N_BATCHES, SIZES
from harness import ACTIVATIONS, Trainer, build_mlp
from torch import nn

import torchbp


def convert_only(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) in kinds:
            torchbp.convert(m)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=[s[0] for s in SIZES], default="small")
    p.add_argument("--activation", choices=list(ACTIVATIONS), default="relu")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--block-ms", type=float, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wall", action="store_true", help="wall-clock time instead of the thread's CPU time")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--torch-profiler", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.thread_time
    _, sizes, batch, _ = next(s for s in SIZES if s[0] == args.size)
    act = ACTIVATIONS[args.activation]
    torch.manual_seed(0)
    model, loss_fn = build_mlp(sizes, act), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch, sizes[0], generator=g), torch.randint(0, sizes[-1], (batch,), generator=g))
        for _ in range(N_BATCHES)
    ]
    bp_loss = torchbp.convert(copy.deepcopy(loss_fn))
    variants = {
        "torch": Trainer(copy.deepcopy(model), loss_fn, "sgd", batches),
        "+Linear": Trainer(convert_only(model, (nn.Linear,)), loss_fn, "sgd", batches),
        "+act": Trainer(convert_only(model, (act,)), loss_fn, "sgd", batches),
        "+loss": Trainer(copy.deepcopy(model), bp_loss, "sgd", batches),
        "torchbp": Trainer(torchbp.convert(copy.deepcopy(model)), bp_loss, "sgd", batches),
    }
    for tr in variants.values():
        for _ in range(5):
            tr.step()
    t0 = clock()
    for _ in range(5):
        variants["torch"].step()
    k = max(1, round(args.block_ms / 1e3 / ((clock() - t0) / 5)))

    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            tr = variants[n]
            t0 = clock()
            for _ in range(k):
                tr.step()
            times[n].append((clock() - t0) / k * 1e6)

    ref = times["torch"]
    kind = "wall" if args.wall else "thread CPU"
    print(
        f"{sizes} batch {batch}, {args.activation}; {kind} time, {torch.get_num_threads()} thread(s), "
        f"{args.repeats} repeats of {k} steps"
    )
    print(f"{'variant':10s} {'step us':>10s} {'extra us':>10s} {'ratio':>7s}")
    for n in names:
        extra = statistics.median(t - r for t, r in zip(times[n], ref))
        ratio = statistics.median(t / r for t, r in zip(times[n], ref))
        print(f"{n:10s} {statistics.median(times[n]):10.1f} {extra:10.1f} {ratio:7.3f}")

    if args.cprofile:
        prof = cProfile.Profile(time.thread_time)
        tr = variants["torchbp"]
        prof.enable()
        for _ in range(max(k, 200)):
            tr.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        for n in ("torch", "torchbp"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                variants[n].step()
            print(f"===== {n}: one step")
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())

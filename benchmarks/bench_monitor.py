r"""What the DeltaMonitor costs: a torchbp training step with the monitor logging every step vs without.

The MLP is [784, 512, 512, 10] at batch 256 (sigmoid and ReLU), trained with SGD and
``CrossEntropyLoss`` as in ``bench_step.py`` (whose models, steps and timer this script reuses).
Three copies of the same torchbp model (same initial weights) are timed, interleaved:

    off          torchbp, no monitor attached (the baseline)
    record only  DeltaMonitor(model): every statistic computed on every backward pass, nothing logged
    log every 10 DeltaMonitor(model, log=<tmp dir>, every=10): recorded every step, written every 10th
    monitor      DeltaMonitor(model, log=<tmp dir>, every=1): every statistic computed on every
                 backward pass and written to TensorBoard every step (one host transfer and one
                 flushed event per step), histograms of δ every 10 steps (the default)
    +per-sample  the same with per_sample_norms=True, and ``per_sample_grad_norms()`` read after
                 every step

Targets: monitor <= 1.05 x off, +per-sample <= 1.10 x off. Each repeat times one block of ``k``
steps of every variant (the order rotating each repeat); a monitor is attached only during its own
model's block, so the baseline runs with no tap anywhere. The table gives the median step time of
each variant and the median over repeats of the per-repeat ratio to ``off``, with its interquartile
range.

    python benchmarks/bench_monitor.py                 # CPU, and CUDA if available
    python benchmarks/bench_monitor.py --quick         # smoke test
    python benchmarks/bench_monitor.py --markdown      # the README's table
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import ACTIVATIONS, Timer, Trainer, build_mlp, cpu_model, log, quantile, select_devices  # noqa: E402

import torchbp  # noqa: E402

LAYERS, BATCH = [784, 512, 512, 10], 256
TARGETS = {"monitor": 1.05, "+per-sample": 1.10}


class Variant:
    def __init__(self, name: str, trainer: Trainer, monitor: torchbp.DeltaMonitor | None, read_per_sample: bool):
        self.name, self.trainer, self.monitor, self.read_per_sample = name, trainer, monitor, read_per_sample
        self.times: list[float] = []
        self.ratios: list[float] = []
        if monitor is not None:
            monitor.detach()  # attached only while its block runs

    def step(self) -> None:
        self.trainer.step()
        if self.read_per_sample:
            self.monitor.per_sample_grad_norms()

    def block(self, timer: Timer, k: int) -> float:
        if self.monitor is not None:
            self.monitor.attach()
        try:
            return timer.block(self, k)  # Timer.block calls .step() k times
        finally:
            if self.monitor is not None:
                self.monitor.detach()


def run(device: torch.device, act: str, logdir: str, args) -> list[Variant]:
    torch.manual_seed(0)
    model = torchbp.convert(build_mlp(LAYERS, ACTIVATIONS[act]).to(device))
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(BATCH, LAYERS[0], generator=g).to(device),
            torch.randint(0, LAYERS[-1], (BATCH,), generator=g).to(device),
        )
        for _ in range(8)
    ]
    loss_fn = torchbp.nn.CrossEntropyLoss()

    def trainer() -> Trainer:
        return Trainer(copy.deepcopy(model), loss_fn, "sgd", batches)

    off, rec, ten = trainer(), trainer(), trainer()
    mon, per = trainer(), trainer()
    variants = [
        Variant("off", off, None, False),
        Variant("record only", rec, torchbp.DeltaMonitor(rec.model), False),
        Variant(
            "log every 10",
            ten,
            torchbp.DeltaMonitor(ten.model, log=os.path.join(logdir, f"{device.type}-{act}-ten"), every=10),
            False,
        ),
        Variant(
            "monitor",
            mon,
            torchbp.DeltaMonitor(mon.model, log=os.path.join(logdir, f"{device.type}-{act}-monitor")),
            False,
        ),
        Variant(
            "+per-sample",
            per,
            torchbp.DeltaMonitor(
                per.model, log=os.path.join(logdir, f"{device.type}-{act}-per"), per_sample_norms=True
            ),
            True,
        ),
    ]
    timer = Timer(device)
    for v in variants:
        for _ in range(args.warmup):
            v.block(timer, 1)
    probe = min(variants[0].block(timer, 1) for _ in range(3))
    k = max(1, round(args.block_ms / 1e3 / probe))
    for r in range(args.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        times = {v.name: v.block(timer, k) for v in order}
        for v in variants:
            v.times.append(times[v.name])
            v.ratios.append(times[v.name] / times["off"])
    for v in variants:
        if v.monitor is not None:
            v.monitor.close()
    return variants


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--repeats", type=int, default=None, help="default 40; 4 with --quick")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block-ms", type=float, default=None, help="default 200; 30 with --quick")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (4 if args.quick else 40)
    args.block_ms = args.block_ms or (30 if args.quick else 200)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = select_devices(args.device)
    if devices is None:
        return 2

    rows = []
    with tempfile.TemporaryDirectory(prefix="torchbp-bench-monitor-") as logdir:
        for device in devices:
            for act in ACTIVATIONS:
                t0 = time.perf_counter()
                variants = run(device, act, logdir, args)
                base = statistics.median(variants[0].times)
                for v in variants:
                    ratio = statistics.median(v.ratios)
                    target = TARGETS.get(v.name)
                    rows.append(
                        [
                            str(device),
                            act,
                            v.name,
                            f"{statistics.median(v.times) * 1e3:.3f}",
                            f"{(statistics.median(v.times) - base) * 1e3:+.3f}",
                            f"{ratio:.3f} [{quantile(v.ratios, 0.25):.3f}-{quantile(v.ratios, 0.75):.3f}]",
                            "" if target is None else f"<= {target:.2f}",
                            "" if target is None else ("pass" if ratio <= target else "FAIL"),
                        ]
                    )
                log(
                    f"{device} {act}: "
                    + ", ".join(f"{v.name} {statistics.median(v.ratios):.3f}" for v in variants)
                    + f" [{time.perf_counter() - t0:.1f} s]"
                )

    gpu = [f"GPU: {torch.cuda.get_device_name(d)}" for d in devices if d.type == "cuda"]
    head = "; ".join(
        [f"machine: {cpu_model()}, {os.cpu_count()} cores, torch.get_num_threads()={torch.get_num_threads()}"]
        + gpu
        + [
            f"torch {torch.__version__}",
            f"torchbp {torchbp.__version__}",
            f"date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"model {LAYERS} batch {BATCH}, SGD, CrossEntropyLoss",
            f"{args.repeats} interleaved blocks of ~{args.block_ms:g} ms" + (" (--quick)" if args.quick else ""),
        ]
    )
    cols = ["device", "act", "variant", "step ms", "vs off ms", "ratio to off [IQR]", "target", "result"]
    if args.markdown:
        print(head + "\n")
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        print(head)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        for r in [cols, *rows]:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

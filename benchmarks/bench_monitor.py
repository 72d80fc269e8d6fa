r"""What the DeltaMonitor costs: a torchbp training step with the monitor on, against the same model without.

Models (each converted with ``torchbp.convert``, trained with SGD, ``CrossEntropyLoss``):

    mlp-sigmoid, mlp-relu   [784, 512, 512, 10] at batch 256 (the models of ``bench_step.py``)
    transformer             examples/transformer.py's TinyTransformer (torch.nn modules, converted): vocab 64,
                            dim 128, 4 heads, 2 blocks, 64 tokens, batch 16

Variants of each model (deep copies: the same initial weights), timed interleaved in one process:

    torch             the unconverted torch.nn model, no monitor
    torch + hooks     the same with hand-rolled hooks every step: a forward hook on each nn.Linear registering
                      ``output.register_hook`` that computes ‖Σ_n δ_n‖, ‖δ‖, mean and max ‖δ_n‖, and
                      ‖∂C/∂W‖ of every layer after backward (``torch._foreach_norm``); records counted
    off               torchbp, converted, no monitor
    unlogged steps    DeltaMonitor(model, log=<tmp>, every=10**9): logs its first step, then never: what an
                      unlogged step costs (its one finiteness flag per layer)
    raise_nonfinite   the same with raise_nonfinite=True: the flag read back every step (a host sync)
    detect_anomaly    torchbp, no monitor, each step under torch.autograd.detect_anomaly()
    log every 10      DeltaMonitor(model, log=<tmp>) (the default every=10): records only on logged steps,
                      δ histograms every 100th
    log every step    DeltaMonitor(model, log=<tmp>, every=1): recorded and written every step, histograms
                      every 10th
    log every step, re-encoded   the same with each event parsed back (``Event.FromString``) and handed to
                      torch's ``FileWriter.add_event``, which encodes it again: how every logged step was written
                      before the monitor handed its serialized events on as they are (the logged step before)
    log every step, SummaryWriter   log=torch.utils.tensorboard.SummaryWriter(<tmp>), a writer of the user's:
                      the monitor's bytes appended by that writer's own thread, framed with TensorBoard's
                      pure-Python CRC (the monitor's own event files: google-crc32c; the header says which)
    log every step, SummaryWriter re-encoded   the same, each event parsed back and encoded again (before)
    +per-sample       the same with per_sample_norms=True and per_sample_grad_norms() read every step
    compiled off      torch.compile(model, fullgraph=True), no monitor (the baseline of the compiled rows)
    compiled, log every 10 / every step   torch.compile(model, fullgraph=True) with the DeltaMonitor
    compiled, unlogged steps              the same with every=10**9 (the finiteness flag only)

Targets, each against a reference variant of the same run (``TARGETS``): unlogged steps <= 1.01 x off;
compiled, unlogged steps <= 1.005 x compiled off; log every 10 <= 1.01 x off;
log every step <= 1.00 x torch + hooks (MLP); +per-sample <= 1.10 x torch (MLP); compiled, log every 10
<= 1.01 x compiled off; compiled, log every step <= 1.03 x compiled off. Each repeat times one block of
``k`` steps of every variant, the order rotating each repeat; the table gives each variant's median step
time and the median over repeats of its per-repeat ratio to its reference, with the interquartile range.
All monitors stay attached for the whole run (as in training).

    python benchmarks/bench_monitor.py                 # CPU, and CUDA if available
    python benchmarks/bench_monitor.py --quick         # smoke test
    python benchmarks/bench_monitor.py --markdown      # the table of docs/benchmarks.md
    python benchmarks/bench_monitor.py --models mlp-relu --no-compile
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
import warnings

import torch
from harness import (
    LENGTH,
    MLP,
    MLP_BATCH,
    TOKENS_BATCH,
    Timer,
    Trainer,
    build,
    cpu_model,
    log,
    quantile,
    select_devices,
)
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import torchbp

MODELS = ("mlp-sigmoid", "mlp-relu", "transformer")
# variant: (reference variant, most ratio to it); MLP rows only where marked
TARGETS = {
    "unlogged steps": ("off", 1.01),
    "compiled, unlogged steps": ("compiled off", 1.005),
    "log every 10": ("off", 1.01),
    "log every step": ("torch + hooks", 1.00),
    "+per-sample": ("torch", 1.10),
    "compiled, log every 10": ("compiled off", 1.01),
    "compiled, log every step": ("compiled off", 1.03),
}
MLP_ONLY = {"log every step", "+per-sample"}
# the reference of a variant without a target
BASELINE = {
    "torch + hooks": "torch",
    "off": "torch",
    "unlogged steps": "off",
    "raise_nonfinite": "off",
    "detect_anomaly": "off",
    "compiled off": "torch",
    "log every step, re-encoded": "log every step",
    "log every step, SummaryWriter": "log every step",
    "log every step, SummaryWriter re-encoded": "log every step, SummaryWriter",
}


def re_encoded(monitor):
    """``monitor`` writing as it did before its events were handed on serialized: each parsed back into an
    ``Event`` for the file writer's ``add_event``, which encodes it again (the logged step's former cost)."""
    sink = monitor._sink
    sink._file_writer = sink.writer._get_file_writer()
    sink._add = sink._parse_and_add
    return monitor


def crc_used() -> str:
    """Which CRC-32C frames the events: the monitor's own event files, and a SummaryWriter of the user's."""
    from importlib.metadata import version

    import google_crc32c

    kind = "C extension" if google_crc32c.implementation == "c" else "pure Python fallback"
    return (
        f"CRC: own event files google-crc32c {version('google-crc32c')} ({kind}); "
        f"a SummaryWriter of the user's tensorboard {version('tensorboard')}'s pure-Python masked_crc32c"
    )


class HandRolledHooks:
    """What a user would write without torchbp: tensor hooks on each nn.Linear's output for the δ statistics,
    and the weight-gradient norms after backward. Keeps the last step's records; counts them."""

    def __init__(self, model: nn.Module) -> None:
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.records = 0
        self.current: list[torch.Tensor] = []
        self.last = None
        for m in self.linears:
            m.register_forward_hook(self._forward)

    def _forward(self, module, inputs, out) -> None:
        if out.requires_grad:
            out.register_hook(self._delta)

    def _delta(self, d: torch.Tensor) -> None:
        with torch.no_grad():
            per = d.reshape(d.shape[0], -1).norm(dim=1)  # ‖δ_n‖
            bias_grad = d.reshape(-1, d.shape[-1]).sum(0)  # Σ_n δ_n
            self.current.append(torch.stack([bias_grad.norm(), per.norm(), per.mean(), per.amax()]))

    def after_backward(self) -> None:
        grads = [m.weight.grad for m in self.linears if m.weight.grad is not None]
        self.last = (self.current, torch._foreach_norm(grads))
        self.records += len(self.current)
        self.current = []


class Variant:
    def __init__(
        self,
        name: str,
        trainer: Trainer,
        monitor=None,
        read_per_sample: bool = False,
        hooks=None,
        writer=None,
        anomaly=False,
    ) -> None:
        self.name, self.trainer, self.monitor, self.read_per_sample = name, trainer, monitor, read_per_sample
        self.hooks, self.writer = hooks, writer  # (writer: a SummaryWriter passed to the monitor, closed after it)
        if anomaly:  # every step of this trainer under torch.autograd.detect_anomaly()
            plain_step = trainer.step

            def step_under_anomaly():
                with torch.autograd.detect_anomaly(check_nan=True):
                    plain_step()

            trainer.step = step_under_anomaly
        self.times: list[float] = []
        self.ratios: list[float] = []

    def step(self) -> None:
        self.trainer.step()
        if self.read_per_sample:
            self.monitor.per_sample_grad_norms()
        if self.hooks is not None:
            self.hooks.after_backward()


def variants(name: str, device: torch.device, logdir: str, compile_too: bool) -> list[Variant]:
    plain, model, batches = build(name, device)
    loss_fn = torchbp.nn.CrossEntropyLoss()

    def trainer(compiled: bool = False, source: nn.Module = model) -> tuple[Trainer, nn.Module]:
        m = copy.deepcopy(source)
        t = Trainer(m, loss_fn, "sgd", batches)
        if compiled:
            t.model = torch.compile(m, fullgraph=True)
        return t, m

    def path(tag: str) -> str:
        return os.path.join(logdir, f"{device.type}-{name}-{tag}")

    out = [Variant("torch", trainer(source=plain)[0])]
    t, m = trainer(source=plain)
    out.append(Variant("torch + hooks", t, hooks=HandRolledHooks(m)))
    out.append(Variant("off", trainer()[0]))
    t, m = trainer()
    out.append(Variant("unlogged steps", t, torchbp.DeltaMonitor(m, log=path("never"), every=10**9)))
    t, m = trainer()
    raising = torchbp.DeltaMonitor(m, log=path("raise"), every=10**9, raise_nonfinite=True)
    out.append(Variant("raise_nonfinite", t, raising))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (detect_anomaly warns that it slows training down)
        out.append(Variant("detect_anomaly", trainer()[0], anomaly=True))
    t, m = trainer()
    out.append(Variant("log every 10", t, torchbp.DeltaMonitor(m, log=path("every10"))))
    t, m = trainer()
    out.append(Variant("log every step", t, torchbp.DeltaMonitor(m, log=path("every1"), every=1)))
    t, m = trainer()
    monitor = re_encoded(torchbp.DeltaMonitor(m, log=path("every1-re-encoded"), every=1))
    out.append(Variant("log every step, re-encoded", t, monitor))
    t, m = trainer()
    writer = SummaryWriter(path("every1-writer"))
    out.append(Variant("log every step, SummaryWriter", t, torchbp.DeltaMonitor(m, log=writer, every=1), writer=writer))
    t, m = trainer()
    writer = SummaryWriter(path("every1-writer-re-encoded"))
    monitor = re_encoded(torchbp.DeltaMonitor(m, log=writer, every=1))
    out.append(Variant("log every step, SummaryWriter re-encoded", t, monitor, writer=writer))
    t, m = trainer()
    per = torchbp.DeltaMonitor(m, log=path("per"), every=1, per_sample_norms=True)
    out.append(Variant("+per-sample", t, per, read_per_sample=True))
    if compile_too:
        out.append(Variant("compiled off", trainer(compiled=True)[0]))
        t, m = trainer(compiled=True)
        never = torchbp.DeltaMonitor(m, log=path("compiled-never"), every=10**9)
        out.append(Variant("compiled, unlogged steps", t, never))
        t, m = trainer(compiled=True)
        out.append(Variant("compiled, log every 10", t, torchbp.DeltaMonitor(m, log=path("compiled10"))))
        t, m = trainer(compiled=True)
        out.append(Variant("compiled, log every step", t, torchbp.DeltaMonitor(m, log=path("compiled"), every=1)))
    return out


def reference(name: str) -> str:
    return TARGETS[name][0] if name in TARGETS else BASELINE.get(name, name)


class CPUTimer:
    """CPU seconds of this process per step (every thread's, background ones included): the work a step does,
    which a machine shared with other jobs changes far less than the wall-clock time (``--cpu-time``)."""

    def block(self, trainer, k: int) -> float:
        t0 = time.process_time()
        for _ in range(k):
            trainer.step()
        return (time.process_time() - t0) / k


def run(name: str, device: torch.device, logdir: str, args) -> list[Variant]:
    vs = variants(name, device, logdir, args.compile)
    timer = CPUTimer() if args.cpu_time and device.type == "cpu" else Timer(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the monitor's note that compiled steps record no histograms)
        for v in vs:  # warm-up: compiles the compiled variants, and reads the data flow
            for _ in range(args.warmup):
                v.step()
        log(f"{device} {name}: warm-up (compiling) {time.perf_counter() - t0:.1f} s")
        probe = min(timer.block(vs[0], 1) for _ in range(3))
        k = max(1, round(args.block_ms / 1e3 / probe))
        for r in range(args.repeats):
            order = vs[r % len(vs) :] + vs[: r % len(vs)]
            times = {v.name: timer.block(v, k) for v in order}
            for v in vs:
                v.times.append(times[v.name])
                v.ratios.append(times[v.name] / times[reference(v.name)])
    for v in vs:
        if v.monitor is not None:
            v.monitor.close()
        if v.writer is not None:
            v.writer.close()
    return vs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--repeats", type=int, default=None, help="default 30; 3 with --quick")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block-ms", type=float, default=None, help="default 200; 30 with --quick")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled variants")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu-time", action="store_true", help="CPU time of the process, not wall-clock (shared machines)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 30)
    args.block_ms = args.block_ms or (30 if args.quick else 200)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = select_devices(args.device)
    if devices is None:
        return 2

    rows = []
    with tempfile.TemporaryDirectory(prefix="torchbp-bench-monitor-") as logdir:
        for device in devices:
            for name in args.models:
                t0 = time.perf_counter()
                vs = run(name, device, logdir, args)
                for v in vs:
                    if v.hooks is not None and v.hooks.records == 0:
                        log(f"{device} {name}: {v.name} recorded nothing")
                    ratio = statistics.median(v.ratios)
                    target = TARGETS.get(v.name)
                    if target is not None and name == "transformer" and v.name in MLP_ONLY:
                        target = None
                    ms = statistics.median(v.times) * 1e3
                    ref = reference(v.name)
                    rows.append(
                        [
                            str(device),
                            name,
                            v.name,
                            f"{ms:.3f}",
                            "" if ref == v.name else ref,
                            f"{ratio:.3f} [{quantile(v.ratios, 0.25):.3f}-{quantile(v.ratios, 0.75):.3f}]",
                            "" if target is None else f"<= {target[1]:g}",
                            "" if target is None else ("pass" if ratio <= target[1] else "FAIL"),
                        ]
                    )
                log(
                    f"{device} {name}: "
                    + ", ".join(f"{v.name} {statistics.median(v.ratios):.3f}" for v in vs)
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
            f"MLP {MLP} batch {MLP_BATCH}; transformer dim 128, 2 blocks, {LENGTH} tokens, batch {TOKENS_BATCH}; SGD",
            crc_used(),
            f"{args.repeats} interleaved blocks of ~{args.block_ms:g} ms"
            + (" (--quick)" if args.quick else "")
            + ("; CPU time of the process (--cpu-time)" if args.cpu_time else ""),
        ]
    )
    cols = ["device", "model", "variant", "step ms", "reference", "ratio to reference [IQR]", "target", "result"]
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

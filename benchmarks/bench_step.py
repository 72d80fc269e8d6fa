r"""Training-step speed and memory: torchbp's hand-written backward against torch's autograd.

For each MLP below, with sigmoid and with ReLU hidden activations and a ``CrossEntropyLoss``, the
script builds the model from ``torch.nn`` (seeded), makes the torchbp twin with
``torchbp.convert(copy.deepcopy(model))`` -- the very same initial weights -- and gives each its own
optimizer (SGD with momentum 0.9 by default, or Adam; the same for both). Both then train, in one
process, on the same cycle of random batches.

    layers                          batch   time target (torchbp / torch)
    [64, 32, 32, 10]                   32   <= 1.25
    [784, 512, 512, 10]               256   <= 1.00
    [784, 1024, 1024, 1024, 10]      1024   <= 1.00
    the converted transformer          16   <= 1.02
    compiled (small and medium)             <= 1.02
    memory (saved bytes, peak)              <= 1.00 everywhere

What is measured
----------------
Step time. One step is ``zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()``. After a
first step that checks both models give the same loss and gradients, and ``--warmup`` steps each,
the step time of torch is used to size a *block* of ``k`` steps lasting about ``--block-ms``.
Then ``--repeats`` times: time a block of torch and a block of torchbp, back to back, alternating
which goes first, so that load drift and cache effects hit both the same way. A block's time / k is
one step-time sample; the table gives the median over repeats of each model's step time and the
median over repeats of the per-repeat ratio torchbp / torch, with its interquartile range.
On CPU the clock is ``time.perf_counter``; on CUDA, CUDA events around each block (synchronized
before and after). Threads: ``torch.get_num_threads()`` is left at torch's default unless
``--threads`` is given. Python's garbage collector is left on (it is part of a real step's cost).

Saved bytes. One forward (model and loss, grad enabled) under
``torch.autograd.graph.saved_tensors_hooks``: the pack hook sees every tensor autograd keeps for
backward. *saved* counts each distinct storage once (dedup by ``untyped_storage().data_ptr()``,
storage size ``untyped_storage().nbytes()``), so a tensor saved by two nodes (a ReLU's output that is
also the next Linear's input) and the weights that both keep are counted once; the parameters are
included, as both sides keep the same ones. The naive sum of ``t.nbytes`` over pack calls is in the
``--json`` output and the plain (non-Markdown) table.

Peak memory of a step, defined the same on both devices:
``peak = live(step start) + max over the step of (allocated bytes - allocated at step start)``,
where ``live(step start)`` is the distinct storages of the model's parameters, their ``.grad``, the
optimizer state and the batch (the training state both sides hold), and the growth term is measured
over one steady-state step (grads from the previous step present, freed by ``zero_grad``):

- CUDA: ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated() -
  memory_allocated()`` across the step (the caching allocator's own accounting; the other model's
  tensors on the device are in both terms and cancel).
- CPU: torch has no allocator counters on CPU, and ``tracemalloc`` does not see tensor memory. We
  use ``torch.profiler.profile(profile_memory=True)``: the CPU allocator then reports every
  allocation and free as a ``[memory]`` event with its signed byte count and a timestamp. The
  profiler runs over two steps (the grads are set to ``None`` first, so every block freed inside the
  window was allocated inside it and its size is known); the running sum of the events, ordered by
  time, gives the allocated bytes, and its maximum inside the second step, minus its value when that
  step began, is the growth. The CPU allocator does not cache, so this is the true live tensor
  memory; the profiler only slows the step down, it does not change what is allocated.

``dPeak`` (the growth term alone) is shown too, as it is the part the backward implementation
controls. Targets are checked on ``saved`` and ``peak``, with a relative tolerance of 1e-4 (a few
bytes of 0-d tensors that wrap Python scalars are not a miss); torchbp's excess bytes, if any, are
printed next to the ratio, and ``--json`` has every byte count.

Usage
-----
    python benchmarks/bench_step.py                    # CPU, and CUDA if available
    python benchmarks/bench_step.py --markdown > benchmarks/results_cpu.md
    python benchmarks/bench_step.py --quick            # smoke test, < 30 s on 2 cores
    python benchmarks/bench_step.py --device cuda --repeats 50 --optimizer adam
    python benchmarks/bench_step.py --sizes small --activations relu --json out.json

Progress goes to stderr; the table to stdout. Exit status is 0 even when a target is missed (the
table says which); 2 on a setup error, 3 if the two models disagree at the first step.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from harness import (
    ACTIVATIONS,
    LENGTH,
    VOCAB,
    Timer,
    Trainer,
    build_mlp,
    cpu_model,
    log,
    quantile,
    select_devices,
    transformer_lm,
)
from torch import nn

import torchbp

# name, layer sizes, batch, step-time target torchbp/torch
SIZES = [
    ("small", [64, 32, 32, 10], 32, 1.25),  # two Python Functions (the loop and the loss) are the floor
    ("medium", [784, 512, 512, 10], 256, 1.00),
    ("large", [784, 1024, 1024, 1024, 10], 1024, 1.00),
]
COMPILED_TARGET = 1.02  # torch.compile(fullgraph=True) of both models (small and medium)
TRANSFORMER_TARGET = 1.02  # examples/transformer.py's TinyTransformer, converted (dim 128, 2 blocks, 64 tokens)
MODES = ("eager", "compiled", "transformer")
MEMORY_TARGET = 1.00
# Memory ratios pass up to 1.00 * (1 + MEMORY_TOLERANCE): a few bytes of transient scalar tensors (a Python
# number in a tensor op is wrapped in a 0-d tensor) should not read as a miss; any real buffer is far above it.
MEMORY_TOLERANCE = 1e-4
SOURCE_STATE = "unknown"
N_BATCHES = 4  # a cycle of distinct batches, the same sequence for both models


# --------------------------------------------------------------------------------------------------
# Models and steps
# --------------------------------------------------------------------------------------------------


def check_same(ref: Trainer, bp: Trainer) -> str | None:
    """The first step's loss and gradients agree (both models start from the same weights)."""
    out = []
    for tr in (ref, bp):
        x, y = tr.batches[0]
        tr.model.zero_grad(set_to_none=True)
        loss = tr.loss_fn(tr.model(x), y)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in tr.model.parameters()]))
        tr.model.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = out
    try:
        torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    except AssertionError as e:
        return str(e)
    if not any(type(m).__module__.startswith("torchbp") for m in bp.model.modules()):
        return "torchbp.convert() converted nothing"
    return None


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def time_pair(ref: Trainer, bp: Trainer, timer: Timer, repeats: int, warmup: int, block_s: float):
    for _ in range(warmup):
        ref.step()
        bp.step()
    probe = min(timer.block(ref, 1) for _ in range(2))
    k = max(1, round(block_s / probe))
    t_ref, t_bp, ratios = [], [], []
    for r in range(repeats):
        order = (ref, bp) if r % 2 == 0 else (bp, ref)
        times = {id(tr): timer.block(tr, k) for tr in order}
        t_ref.append(times[id(ref)])
        t_bp.append(times[id(bp)])
        ratios.append(t_bp[-1] / t_ref[-1])
    return k, t_ref, t_bp, ratios


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def saved_bytes(trainer: Trainer) -> tuple[int, int, int]:
    """(distinct-storage bytes, naive sum of t.nbytes, number of pack calls) over one forward."""
    storages: dict[int, int] = {}
    naive = [0, 0]

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        naive[0] += t.nbytes
        naive[1] += 1
        return t

    x, y = trainer.batches[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.loss_fn(trainer.model(x), y)
    del loss
    return sum(storages.values()), naive[0], naive[1]


def peak_growth_cuda(trainer: Trainer) -> int:
    trainer.step()  # steady state: grads present
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainer.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_growth_cpu(trainer: Trainer) -> int:
    from torch.profiler import ProfilerActivity, profile, record_function

    trainer.step()
    # Every block freed inside the profiled window must be allocated inside it, or the CPU
    # allocator cannot report its size: drop the grads (what zero_grad would free) first.
    trainer.opt.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.step()  # allocates the grads that the next step's zero_grad frees
        with record_function("bench_step.measured_step"):
            trainer.step()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as e:  # a private attribute; fail clearly if a torch release moves it
        raise RuntimeError(f"cannot read the profiler's raw memory events in torch {torch.__version__}: {e}") from e
    window = [e for e in events if e.name() == "bench_step.measured_step"]
    if len(window) != 1:
        raise RuntimeError("profiler did not record the measured step")
    t0, t1 = window[0].start_ns(), window[0].end_ns()
    mem = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    if not mem:
        raise RuntimeError("profiler recorded no memory events (profile_memory unsupported?)")
    live = at_start = peak = 0
    started = False
    for ts, nbytes in mem:
        if ts >= t0 and not started:
            at_start, peak, started = live, live, True
        if ts > t1:
            break
        live += nbytes
        if started:
            peak = max(peak, live)
    return peak - at_start


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    device: str
    size: str
    layers: list[int] | str
    batch: int
    activation: str
    time_target: float
    mode: str = "eager"
    steps_per_block: int = 0
    torch_ms: float = 0.0
    torchbp_ms: float = 0.0
    ratio: float = 0.0
    ratio_q1: float = 0.0
    ratio_q3: float = 0.0
    saved_torch: int = 0
    saved_torchbp: int = 0
    saved_naive_torch: int = 0
    saved_naive_torchbp: int = 0
    saved_calls_torch: int = 0
    saved_calls_torchbp: int = 0
    live_torch: int = 0
    live_torchbp: int = 0
    dpeak_torch: int = 0
    dpeak_torchbp: int = 0
    timing_s: float = 0.0
    raw_torch_s: list[float] = field(default_factory=list)
    raw_torchbp_s: list[float] = field(default_factory=list)

    @property
    def peak_torch(self) -> int:
        return self.live_torch + self.dpeak_torch

    @property
    def peak_torchbp(self) -> int:
        return self.live_torchbp + self.dpeak_torchbp

    @property
    def saved_ratio(self) -> float:
        return self.saved_torchbp / self.saved_torch

    @property
    def peak_ratio(self) -> float:
        return self.peak_torchbp / self.peak_torch

    @property
    def dpeak_ratio(self) -> float:
        return self.dpeak_torchbp / self.dpeak_torch if self.dpeak_torch else float("nan")

    @property
    def time_ok(self) -> bool:
        return self.ratio <= self.time_target

    @property
    def saved_ok(self) -> bool:
        return self.saved_ratio <= MEMORY_TARGET * (1 + MEMORY_TOLERANCE)

    @property
    def peak_ok(self) -> bool:
        return self.peak_ratio <= MEMORY_TARGET * (1 + MEMORY_TOLERANCE)

    @property
    def ok(self) -> bool:
        return self.time_ok and self.saved_ok and self.peak_ok


def run_case(device, size, sizes, batch, target, act, args, mode: str = "eager") -> Row:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if mode == "transformer":
        model = transformer_lm().to(device)
        batches = []
        for _ in range(N_BATCHES):
            tokens = torch.randint(0, VOCAB, (batch, LENGTH + 1), generator=g)
            batches.append((tokens[:, :-1].to(device), tokens[:, 1:].reshape(-1).to(device)))
    else:
        model = build_mlp(sizes, ACTIVATIONS[act]).to(device)
        batches = [
            (
                torch.randn(batch, sizes[0], generator=g).to(device),
                torch.randint(0, sizes[-1], (batch,), generator=g).to(device),
            )
            for _ in range(N_BATCHES)
        ]
    loss_fn = nn.CrossEntropyLoss()
    bp_model = torchbp.convert(copy.deepcopy(model))
    bp_loss = torchbp.convert(copy.deepcopy(loss_fn))
    ref = Trainer(model, loss_fn, args.optimizer, batches)
    bp = Trainer(bp_model, bp_loss, args.optimizer, batches)
    err = check_same(ref, bp)
    if err:
        log(f"error: torch and torchbp disagree on {sizes} {act} at the first step:\n{err}")
        sys.exit(3)
    if mode == "compiled":  # the model and the loss, each compiled whole (the optimizers hold the same parameters)
        ref.model, ref.loss_fn = torch.compile(model, fullgraph=True), torch.compile(loss_fn, fullgraph=True)
        bp.model, bp.loss_fn = torch.compile(bp_model, fullgraph=True), torch.compile(bp_loss, fullgraph=True)

    row = Row(str(device), size, sizes, batch, act, target, mode)
    t0 = time.perf_counter()
    block_s = (args.block_ms if args.block_ms is not None else (20 if args.quick else 100)) / 1e3
    k, t_ref, t_bp, ratios = time_pair(ref, bp, Timer(device), args.repeats, args.warmup, block_s)
    row.steps_per_block = k
    row.raw_torch_s, row.raw_torchbp_s = t_ref, t_bp
    row.torch_ms = statistics.median(t_ref) * 1e3
    row.torchbp_ms = statistics.median(t_bp) * 1e3
    row.ratio = statistics.median(ratios)
    row.ratio_q1, row.ratio_q3 = quantile(ratios, 0.25), quantile(ratios, 0.75)

    row.timing_s = time.perf_counter() - t0
    row.saved_torch, row.saved_naive_torch, row.saved_calls_torch = saved_bytes(ref)
    row.saved_torchbp, row.saved_naive_torchbp, row.saved_calls_torchbp = saved_bytes(bp)
    peak_growth = peak_growth_cuda if device.type == "cuda" else peak_growth_cpu
    row.dpeak_torch = peak_growth(ref)
    row.live_torch = ref.live_state_bytes()
    row.dpeak_torchbp = peak_growth(bp)
    row.live_torchbp = bp.live_state_bytes()
    return row


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def excess(n: int) -> str:
    """torchbp's extra bytes, shown next to a memory ratio when there are any."""
    return f" (+{fmt_bytes(n)})" if n > 0 else ""


def mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def source_state() -> str:
    """The torchbp source measured: git commit, and whether torchbp/ differs from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(torchbp.__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "torchbp"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "unknown"
    return commit + (" + uncommitted changes in torchbp/" if dirty else "")


def header(devices, args) -> str:
    cores = os.cpu_count()
    parts = [
        f"machine: {cpu_model()}, {cores} cores, torch.get_num_threads()={torch.get_num_threads()}",
    ]
    for d in devices:
        if d.type == "cuda":
            parts.append(f"GPU: {torch.cuda.get_device_name(d)}")
    opt = "SGD(lr=0.01, momentum=0.9)" if args.optimizer == "sgd" else "Adam(lr=1e-3)"
    parts += [
        f"torch {torch.__version__}",
        f"torchbp {torchbp.__version__} ({SOURCE_STATE})",
        f"device: {', '.join(str(d) for d in devices)}",
        f"date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"optimizer: {opt}",
        f"repeats: {args.repeats} interleaved blocks of ~{args.block_ms if args.block_ms is not None else (20 if args.quick else 100)} ms"
        + (" (--quick)" if args.quick else ""),
    ]
    return "; ".join(parts)


COLUMNS = [
    "device",
    "layers",
    "batch",
    "act",
    "torch ms",
    "torchbp ms",
    "time ratio [IQR]",
    "target",
    "saved torch",
    "saved torchbp",
    "saved ratio",
    "peak torch",
    "peak torchbp",
    "peak ratio",
    "dPeak ratio",
    "result",
]


def cells(r: Row) -> list[str]:
    return [
        r.device,
        str(r.layers) + (" compiled" if r.mode == "compiled" else ""),
        str(r.batch),
        r.activation,
        f"{r.torch_ms:.3f}",
        f"{r.torchbp_ms:.3f}",
        f"{r.ratio:.3f} [{r.ratio_q1:.2f}-{r.ratio_q3:.2f}] {mark(r.time_ok)}",
        f"<= {r.time_target:.2f}",
        fmt_bytes(r.saved_torch),
        fmt_bytes(r.saved_torchbp),
        f"{r.saved_ratio:.3f} {mark(r.saved_ok)}{excess(r.saved_torchbp - r.saved_torch)}",
        fmt_bytes(r.peak_torch),
        fmt_bytes(r.peak_torchbp),
        f"{r.peak_ratio:.3f} {mark(r.peak_ok)}{excess(r.peak_torchbp - r.peak_torch)}",
        f"{r.dpeak_ratio:.3f}",
        "PASS"
        if r.ok
        else "FAIL: "
        + ", ".join(n for n, ok in (("time", r.time_ok), ("saved", r.saved_ok), ("peak", r.peak_ok)) if not ok),
    ]


def render(rows: list[Row], devices, args) -> str:
    lines = []
    body = [cells(r) for r in rows]
    if args.markdown:
        lines.append(f"_{header(devices, args)}_")
        lines.append("")
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "|".join("---" if i < 4 else "---:" for i in range(len(COLUMNS) - 1)) + "|---|")
        lines += ["| " + " | ".join(c) + " |" for c in body]
    else:
        lines.append(header(devices, args))
        widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(COLUMNS)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(cs, widths)) for cs in body]
        lines.append("")
        lines.append("saved tensors, naive sum of t.nbytes over pack calls (torch / torchbp):")
        for r in rows:
            lines.append(
                f"  {r.device} {r.layers} {r.activation}: {fmt_bytes(r.saved_naive_torch)} in {r.saved_calls_torch} "
                f"/ {fmt_bytes(r.saved_naive_torchbp)} in {r.saved_calls_torchbp}"
            )
    lines.append("")
    lines.append(
        "time: median over repeats of each model's step time (zero_grad + forward + backward + optimizer step) and "
        "the median [interquartile range] of the per-repeat ratio torchbp/torch; saved: distinct storages kept "
        "for backward by one forward (parameters included); peak: training state live at step start + the step's "
        "largest allocation growth; dPeak ratio: the growth alone."
    )
    missed = [r for r in rows if not r.ok]
    if missed:
        lines.append("")
        lines.append(
            "Missed targets: "
            + "; ".join(
                f"{r.device} {r.layers} {r.activation}: "
                + ", ".join(
                    s
                    for s, ok in (
                        (f"time {r.ratio:.3f} > {r.time_target:.2f}", r.time_ok),
                        (f"saved {r.saved_ratio:.3f} > {MEMORY_TARGET:.2f}", r.saved_ok),
                        (f"peak {r.peak_ratio:.3f} > {MEMORY_TARGET:.2f}", r.peak_ok),
                    )
                    if not ok
                )
                for r in missed
            )
            + "."
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="'all' (default): CPU, and CUDA when torch.cuda.is_available()",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="interleaved timing repeats per case (default 60; 5 with --quick)"
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per model (default 5; 2 with --quick)")
    p.add_argument(
        "--block-ms", type=float, default=None, help="target duration of one timed block (default 100; 20 with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="few repeats: a smoke test (< 30 s on 2 CPU cores)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table with a machine/date header line")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--sizes", default="small,medium,large", help="comma-separated subset of small,medium,large")
    p.add_argument("--activations", default="sigmoid,relu", help="comma-separated subset of sigmoid,relu")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated subset of eager (the MLPs), compiled (small and medium MLPs under torch.compile), "
        "transformer (examples/transformer.py's model, converted)",
    )
    p.add_argument("--json", metavar="PATH", help="also write every row, with the raw per-repeat step times, as JSON")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 60
    if args.warmup is None:
        args.warmup = 2 if args.quick else 5
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= set(MODES):
        p.error(f"--modes takes a subset of {','.join(MODES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = select_devices(args.device)
    if devices is None:
        return 2
    sizes = [s for s in SIZES if s[0] in args.sizes.split(",")]
    acts = [a for a in ACTIVATIONS if a in args.activations.split(",")]
    if not sizes or not acts:
        log("error: no case selected; --sizes takes small,medium,large and --activations sigmoid,relu")
        return 2

    global SOURCE_STATE
    SOURCE_STATE = source_state()  # before the run: the code that is imported now is what is measured
    rows = []
    t_start = time.perf_counter()
    cases = []
    for device in devices:
        if "eager" in args.modes:
            cases += [(device, *size, act, "eager") for size in sizes for act in acts]
        if "compiled" in args.modes:
            cases += [
                (device, size, layers, batch, COMPILED_TARGET, act, "compiled")
                for size, layers, batch, _ in sizes
                if size != "large"
                for act in acts
            ]
        if "transformer" in args.modes:
            cases.append((device, "transformer", "transformer", 16, TRANSFORMER_TARGET, "gelu", "transformer"))
    for device, size, layers, batch, target, act, mode in cases:
        t0 = time.perf_counter()
        row = run_case(device, size, layers, batch, target, act, args, mode)
        rows.append(row)
        log(
            f"{device} {layers} batch {batch} {act}: {row.torch_ms:.3f} / {row.torchbp_ms:.3f} ms, "
            f"ratio {row.ratio:.3f} ({row.steps_per_block} steps/block), saved {row.saved_ratio:.3f}, "
            f"peak {row.peak_ratio:.3f} (dPeak {row.dpeak_ratio:.3f}) [{time.perf_counter() - t0:.1f} s, "
            f"{row.timing_s:.1f} s timing]"
        )
    log(f"total {time.perf_counter() - t_start:.1f} s")
    print(render(rows, devices, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "header": header(devices, args),
                    "rows": [
                        asdict(r) | {"peak_torch": r.peak_torch, "peak_torchbp": r.peak_torchbp, "ok": r.ok}
                        for r in rows
                    ],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

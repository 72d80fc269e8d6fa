r"""What recording per-layer gradient statistics costs: torchbp's DeltaMonitor against what a user would otherwise use.

One model and one cycle of batches (``--models``: ``mlp``, [784, 512, 512, 10] ReLU at batch 256, and/or
``transformer``, the TinyTransformer of ``bench_step.py`` at 16 × 64 tokens), SGD with momentum 0.9,
``CrossEntropyLoss``, every variant a deep copy of the same ``torch.nn`` model (the same initial weights), eager
and ``torch.compile(model)``:

    torch                         plain torch.nn, nothing recorded (the baseline)
    torchbp                       torchbp.convert(model), no monitor
    monitor every 10              torchbp + DeltaMonitor(log=<tmp>) (the default every=10)
    monitor every step            torchbp + DeltaMonitor(log=<tmp>, every=1)
    monitor per-sample            the same with per_sample_norms=True, per_sample_grad_norms() read every step
    hooks every step              a forward hook on each nn.Linear registering output.register_hook, computing
                                  ‖Σ_n δ_n‖, ‖δ‖, mean and max of ‖δ_n‖, and ‖∂C/∂W‖ after backward
                                  (the monitor's statistics but the gain and dead units)
    hooks every 10th              the same, on every 10th step only (the forward hook reads a flag)
    full backward hook            register_full_backward_hook on each nn.Linear, the same statistics
    debug_grad_log                torch.utils.debug_log.debug_grad_log on each nn.Linear's output (‖δ‖ only,
                                  logged through ``logging``), where this torch has it
    BackPACK BatchL2Grad          per-sample squared gradient norms of every parameter (backpack-for-pytorch)
    wandb.watch every 10 / 1      wandb.watch(model, log="gradients", log_freq=10 or 1), offline
                                  (WANDB_MODE=offline), and wandb.log({"loss": ...}) every step

Every variant counts what it recorded: the monitor's ``delta_norm`` events read back from its event file
(one per layer and logged step), per-sample norms read, hook calls that computed a record, BackPACK's
``batch_l2`` attributes present after backward (deleted after each count), ``debug_grad_log``'s log records,
the histograms ``wandb.watch`` handed to wandb. The row gives the count against what that variant should
record; a variant that recorded nothing says so. Under ``torch.compile``, a hooked model compiled after a
structurally identical model without hooks can reuse that model's graph, so that its hooks never run: the
count catches it. Graph breaks of each compiled variant's warm-up are counted
(``torch._dynamo.utils.counters["graph_break"]``); any graph break means ``fullgraph=True`` fails, and the row
gives the first reason. A variant that raises is reported with the first line of its error.

Timing (the method of ``bench_monitor.py``): after ``--warmup`` steps of every variant (compiling the compiled
ones; at least 11, so that recorded and unrecorded steps are both compiled), each round times one block of
``k`` steps (``--block-ms``) of every variant, the order rotating each round. The table gives the median step
time and the median over rounds of the per-round ratio to plain torch, eager rows to eager torch and compiled
rows to compiled torch, with the spread [min–max] of the per-round ratios.

    python benchmarks/bench_peers.py                        # MLP, eager and compiled, 20 rounds
    python benchmarks/bench_peers.py --quick                # a short run
    python benchmarks/bench_peers.py --models mlp transformer --json peers.json
    python benchmarks/bench_peers.py --peers torch torchbp monitor1 hooks1 --no-compile

Progress goes to stderr; the Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch
from harness import MLP, MLP_BATCH, Timer, Trainer, build, cpu_model, log
from torch import nn

import torchbp

MODELS = {"mlp": "mlp-relu", "transformer": "transformer"}


# --------------------------------------------------------------------------------------------------
# The peers: each installs itself on a model copy, acts around backward, and counts its records
# --------------------------------------------------------------------------------------------------


class Skip(Exception):
    """The peer cannot run here (not installed, not in this torch); the message says why and the fix."""


class Peer:
    """Records nothing (plain torch, torchbp without a monitor); the base of the others.

    ``begin(i)`` says whether step ``i`` is recorded, ``backward()`` is the context of ``loss.backward()``,
    ``end(loss, due)`` runs after it; ``records`` counts what was recorded, ``per_step`` what a recorded
    step should add to it."""

    torchbp = False  # runs on the torchbp-converted copy
    every = 1
    per_step = 0
    loss_fn: nn.Module | None = None

    def __init__(self) -> None:
        self.records = 0
        self.due_steps = 0
        self.notes: list[str] = []

    def install(self, model: nn.Module, ctx: Context) -> None:
        pass

    def begin(self, i: int) -> bool:
        due = i % self.every == 0
        self.due_steps += due
        return due

    def backward(self):
        return contextlib.nullcontext()

    def end(self, loss: torch.Tensor, due: bool) -> None:
        pass

    def finish(self) -> None:
        """After the last step: close, and count what can only be counted at the end."""

    @property
    def expected(self) -> int:
        return self.due_steps * self.per_step


class TorchBP(Peer):
    torchbp = True


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


class Monitor(TorchBP):
    """torchbp.DeltaMonitor logging to a temporary directory; records: its ``delta_norm`` events."""

    def __init__(self, every: int, per_sample: bool = False) -> None:
        super().__init__()
        self.every, self.per_sample = every, per_sample

    def install(self, model, ctx) -> None:
        self.logdir = ctx.logdir(f"monitor-{self.every}-{int(self.per_sample)}")
        self.monitor = torchbp.DeltaMonitor(model, log=self.logdir, every=self.every, per_sample_norms=self.per_sample)
        self.per_step = len(self.monitor.layers)
        if self.per_sample:
            self.every = 1  # read every step
            self.per_sample_records = 0

    def end(self, loss, due) -> None:
        if self.per_sample:
            norms = self.monitor.per_sample_grad_norms()
            self.per_sample_records += sum(v["weight"] is not None for v in norms.values())

    def finish(self) -> None:
        self.monitor.close()
        if self.per_sample:  # the row's records: per-sample norms read; the events are checked too
            events = _count_scalars(self.logdir, "delta_norm/")
            if events < self.expected:
                self.notes.append(f"delta_norm events {events} of {self.expected}")
            self.records = self.per_sample_records
        else:
            self.records = _count_scalars(self.logdir, "delta_norm/")


def _count_scalars(logdir: str, prefix: str) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir, size_guidance={"scalars": 0})
    ea.Reload()
    return sum(len(ea.Scalars(tag)) for tag in ea.Tags()["scalars"] if tag.startswith(prefix))


def delta_stats(delta: torch.Tensor) -> torch.Tensor:
    """‖Σ_n δ_n‖, ‖δ‖, mean and max over samples n of ‖δ_n‖: what a hand-rolled hook computes from δ = ∂C/∂z."""
    n = delta.shape[0]
    per_sample = torch.linalg.vector_norm(delta.reshape(n, -1), dim=1)
    bias_grad = delta.reshape(-1, delta.shape[-1]).sum(0)
    return torch.stack([torch.linalg.vector_norm(bias_grad), torch.linalg.vector_norm(per_sample),
                        per_sample.mean(), per_sample.amax()])  # fmt: skip


class _LayerRecords(Peer):
    """Per-layer records of δ gathered during backward, then ‖∂C/∂W‖ of each layer; one row per step kept."""

    def install(self, model, ctx) -> None:
        self.layers = _linears(model)
        self.per_step = len(self.layers)
        self.pending: list[torch.Tensor] = []
        self.last = None

    def record(self, delta: torch.Tensor) -> None:
        self.pending.append(delta_stats(delta.detach()))

    def end(self, loss, due) -> None:
        if self.pending:
            weights = [m.weight.grad for m in self.layers if m.weight.grad is not None]
            weight_norms = torch.stack([torch.linalg.vector_norm(g) for g in weights])
            self.last = (torch.stack(self.pending).tolist(), weight_norms.tolist())  # what would be logged
            self.records += len(self.pending)
            self.pending = []


class TensorHooks(_LayerRecords):
    """A forward hook on each Linear registers a tensor hook on its output z: the hook receives δ = ∂C/∂z."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.due = True

    def install(self, model, ctx) -> None:
        super().install(model, ctx)
        for m in self.layers:
            m.register_forward_hook(self._forward)

    def _forward(self, module, args, output) -> None:
        if self.due and output.requires_grad:
            output.register_hook(self.record)

    def begin(self, i) -> bool:
        self.due = super().begin(i)
        return self.due


class FullBackwardHooks(_LayerRecords):
    """register_full_backward_hook on each Linear: grad_output[0] is δ."""

    def install(self, model, ctx) -> None:
        super().install(model, ctx)
        for m in self.layers:
            m.register_full_backward_hook(lambda module, grad_input, grad_output: self.record(grad_output[0]))


class DebugGradLog(Peer):
    """torch.utils.debug_log.debug_grad_log(z) on each Linear's output z: logs ‖δ‖ in backward."""

    def install(self, model, ctx) -> None:
        if importlib.util.find_spec("torch.utils.debug_log") is None:
            raise Skip(f"torch.utils.debug_log is not in torch {torch.__version__}")
        from torch.utils.debug_log import debug_grad_log

        peer = self

        class Count(logging.Handler):
            def emit(self, record) -> None:
                peer.records += peer.active  # (every peer's handler sees every record: count during its own step)

        self.active = False
        self.logger = logging.getLogger("torch.utils.debug_log")
        self.handler = Count(logging.INFO)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        layers = _linears(model)
        self.per_step = len(layers)
        for m in layers:
            m.register_forward_hook(lambda module, args, output: debug_grad_log(output))

    def begin(self, i) -> bool:
        self.active = True
        return super().begin(i)

    def end(self, loss, due) -> None:
        self.active = False

    def finish(self) -> None:
        self.logger.removeHandler(self.handler)


class BackPACK(Peer):
    """BackPACK's BatchL2Grad: ``p.batch_l2``, each sample's ‖∂C_n/∂p‖², for every parameter p."""

    def install(self, model, ctx) -> None:
        try:
            from backpack import backpack, extend
            from backpack.extensions import BatchL2Grad
        except ImportError as e:
            raise Skip(f"backpack is not importable ({e}): pip install backpack-for-pytorch") from None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.per_step = len(self.params)
        extend(model)
        self.loss_fn = extend(nn.CrossEntropyLoss())
        self._context = lambda: backpack(BatchL2Grad())

    def backward(self):
        return self._context()

    def end(self, loss, due) -> None:
        for p in self.params:
            if getattr(p, "batch_l2", None) is not None:
                self.records += 1
                del p.batch_l2  # a stale value must not count at the next step


class Wandb(Peer):
    """wandb.watch(model, log="gradients", log_freq=every), offline, and wandb.log of the loss every step;
    records: the gradient histograms wandb.watch handed to the run (one per parameter and logged step)."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every

    def install(self, model, ctx) -> None:
        self.wandb = ctx.wandb()
        ctx.watched += 1
        self.wandb.watch(model, log="gradients", log_freq=self.every, idx=ctx.watched)  # idx > 0: its own prefix
        self.names = set(model._wandb_hook_names)
        self.per_step = len(self.names)
        self.counts = ctx.histograms

    def begin(self, i) -> bool:  # wandb.watch logs the log_freq-th backward pass, then every log_freq-th
        due = (i + 1) % self.every == 0
        self.due_steps += due
        return due

    def end(self, loss, due) -> None:
        self.wandb.log({"loss": loss.detach().item()})

    def finish(self) -> None:
        self.records = sum(self.counts.get(name, 0) for name in self.names)


PEERS = {  # key: (row name, the peer's class and arguments)
    "torch": ("torch", Peer),
    "torchbp": ("torchbp, no monitor", TorchBP),
    "monitor10": ("torchbp + DeltaMonitor, every 10 (default)", lambda: Monitor(10)),
    "monitor1": ("torchbp + DeltaMonitor, every step", lambda: Monitor(1)),
    "monitor1-per-sample": ("torchbp + DeltaMonitor, every step, per-sample norms read", lambda: Monitor(1, True)),
    "hooks1": ("tensor hooks (forward hook + output.register_hook), every step", lambda: TensorHooks(1)),
    "hooks10": ("tensor hooks, every 10th step", lambda: TensorHooks(10)),
    "full-backward-hook": ("register_full_backward_hook on each Linear", FullBackwardHooks),
    "debug_grad_log": ("torch.utils.debug_log.debug_grad_log", DebugGradLog),
    "backpack": ("BackPACK BatchL2Grad", BackPACK),
    "wandb10": ('wandb.watch(log="gradients", log_freq=10)', lambda: Wandb(10)),
    "wandb1": ('wandb.watch(log="gradients", log_freq=1)', lambda: Wandb(1)),
}


class Context:
    """What the peers of one run share: a temporary directory, one offline wandb run."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._wandb = None
        self.watched = 0
        self.histograms: dict[str, int] = {}
        self._dirs = 0

    def logdir(self, tag: str) -> str:
        self._dirs += 1
        return os.path.join(self.root, f"{self._dirs}-{tag}")

    def wandb(self):
        if self._wandb is None:
            if importlib.util.find_spec("wandb") is None:
                raise Skip("wandb is not installed: pip install wandb")
            os.environ["WANDB_MODE"] = "offline"
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            run = wandb.init(mode="offline", dir=self.root, project="torchbp-bench-peers")
            original = run._torch.log_tensor_stats

            def counted(tensor, name):  # count what wandb.watch logs, then log it
                self.histograms[name] = self.histograms.get(name, 0) + 1
                return original(tensor, name)

            run._torch.log_tensor_stats = counted  # (this run's TorchHistory only)
            self._wandb = wandb
        return self._wandb

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


# --------------------------------------------------------------------------------------------------
# Variants: a peer on a model copy, eager or compiled, timed like bench_monitor's
# --------------------------------------------------------------------------------------------------


class Variant(Trainer):
    """A model copy with one peer, trained on the shared batches; ``step()`` is one training step."""

    def __init__(self, key: str, compiled: bool, model: nn.Module, batches, ctx: Context) -> None:
        name, factory = PEERS[key]
        self.key, self.name, self.compiled = key, name, compiled
        self.peer = factory()
        self.times: list[float] = []
        self.ratios: list[float] = []
        self.error: str | None = None
        self.graph_breaks: int | None = None
        m = copy.deepcopy(model)
        if self.peer.torchbp:
            m = torchbp.convert(m)
        self.peer.install(m, ctx)
        super().__init__(m, self.peer.loss_fn or torchbp.nn.CrossEntropyLoss(), "sgd", batches)
        if compiled:
            self.model = torch.compile(m)

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        due = self.peer.begin(self.i)
        self.i += 1
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        with self.peer.backward():
            loss.backward()
        self.peer.end(loss, due)
        self.opt.step()

    @property
    def mode(self) -> str:
        return "compiled" if self.compiled else "eager"


def _first_line(e: BaseException) -> str:
    """The error's type and first line (and the next one, where the first says little: 'AssertionError:')."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and len(lines[0]) < 30 else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}"[:160]


def make_variants(model_name: str, keys: list[str], compile_too: bool, ctx: Context):
    """The variants (eager, then compiled) and the rows of the peers that could not be set up."""
    model, _, batches = build(MODELS[model_name], torch.device("cpu"))
    made, skipped = [], []
    for compiled in [False, True] if compile_too else [False]:
        for key in keys:
            try:
                made.append(Variant(key, compiled, model, batches, ctx))
            except Skip as e:
                skipped.append((key, compiled, f"skipped: {e}"))
            except Exception as e:  # the peer cannot be set up on this model
                skipped.append((key, compiled, f"failed to set up: {_first_line(e)}"))
    return made, skipped


def warm_up(vs: list[Variant], steps: int) -> None:
    from torch._dynamo.utils import counters

    for v in vs:
        counters.clear()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                for _ in range(steps):
                    v.step()
            except Exception as e:
                v.error = _first_line(e)
        if v.compiled:
            breaks = counters["graph_break"]
            v.graph_breaks = sum(breaks.values())
            if v.graph_breaks:
                reason = next(iter(breaks)).strip().splitlines()[0][:120]
                v.peer.notes.append(f"{v.graph_breaks} graph breaks (fullgraph=True fails: {reason})")
        seen = sorted({str(w.message).strip()[:80] for w in caught if "DeltaMonitor" not in str(w.message)})
        if seen:
            more = f" (and {len(seen) - 2} more)" if len(seen) > 2 else ""
            v.peer.notes.append("warns: " + "; ".join(s.splitlines()[0] for s in seen[:2]) + more)
        log(f"  warm-up {v.mode} {v.key}: {time.perf_counter() - t0:.1f} s" + (f" ({v.error})" if v.error else ""))


def time_rounds(vs: list[Variant], rounds: int, block_ms: float) -> None:
    timer = Timer(torch.device("cpu"))
    live = [v for v in vs if v.error is None]
    base = {m: next((v for v in live if v.key == "torch" and v.mode == m), None) for m in ("eager", "compiled")}
    probe = min(timer.block(live[0], 1) for _ in range(3))
    k = max(1, round(block_ms / 1e3 / probe))
    for r in range(rounds):
        order = live[r % len(live) :] + live[: r % len(live)]
        times = {}
        for v in order:
            try:
                times[v.name, v.mode] = timer.block(v, k)
            except Exception as e:
                v.error = _first_line(e)
        live = [v for v in live if v.error is None]
        for v in live:
            v.times.append(times[v.name, v.mode])
            b = base[v.mode]
            if b is not None and b.error is None:
                v.ratios.append(v.times[-1] / times[b.name, b.mode])


def run_model(model_name: str, args, root: str) -> list[dict]:
    ctx = Context(root)
    t0 = time.perf_counter()
    vs, skipped = make_variants(model_name, args.peers, args.compile, ctx)
    try:
        warm_up(vs, args.warmup)
        log(f"{model_name}: warm-up {time.perf_counter() - t0:.1f} s; timing {args.rounds} rounds")
        time_rounds(vs, args.rounds, args.block_ms)
    finally:
        for v in vs:
            try:
                v.peer.finish()
            except Exception as e:
                v.error = v.error or f"finish: {_first_line(e)}"
        ctx.close()
    rows = []
    for v in vs:
        p = v.peer
        notes = list(p.notes)
        if v.error:
            notes.insert(0, f"failed: {v.error}")
        if p.per_step and not p.expected:
            notes.insert(0, "no recorded step was due in this run")
        elif p.per_step:
            if p.records == 0:
                why = " (under torch.compile: see the module docstring)" if v.compiled else ""
                notes.insert(0, "recorded nothing" + why)
            elif p.records < p.expected:
                notes.insert(0, f"recorded only {p.records} of {p.expected}")
        rows.append(
            {
                "model": model_name,
                "variant": v.name,
                "key": v.key,
                "mode": v.mode,
                "step_ms": statistics.median(v.times) * 1e3 if v.times else None,
                "ratio": statistics.median(v.ratios) if v.ratios else None,
                "ratio_min": min(v.ratios) if v.ratios else None,
                "ratio_max": max(v.ratios) if v.ratios else None,
                "records": p.records,
                "expected": p.expected,
                "graph_breaks": v.graph_breaks,
                "notes": notes,
            }
        )
    for key, compiled, why in skipped:
        rows.append(
            {"model": model_name, "variant": PEERS[key][0], "key": key, "mode": "compiled" if compiled else "eager",
             "step_ms": None, "ratio": None, "ratio_min": None, "ratio_max": None, "records": 0, "expected": None,
             "graph_breaks": None, "notes": [why]}
        )  # fmt: skip
    return rows


def machine(args) -> dict:
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchbp": torchbp.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "setup": f"models: {', '.join(args.models)} (mlp: {MLP} ReLU, batch {MLP_BATCH}; transformer: bench_step's, "
        f"dim 128, 2 blocks, 16 x 64 tokens); SGD (momentum 0.9); {args.rounds} interleaved rounds of "
        f"~{args.block_ms:g} ms blocks; {args.warmup} warm-up steps" + (" (--quick)" if args.quick else ""),
    }


def render(rows: list[dict], info: dict) -> str:
    out = [
        f"machine: {info['platform']}; CPU: {info['cpu']}, {info['cores']} cores, torch.get_num_threads()="
        f"{info['threads']}; torch {info['torch']}, torchbp {info['torchbp']}, Python {info['python']}; "
        f"date: {info['date']}",
        info["setup"] + "; ratio: median over rounds of the step time / plain torch's (eager rows: eager torch; "
        "compiled rows: compiled torch), [min–max] over rounds",
        "",
        "| model | what records per-layer statistics | mode | step ms | ratio to torch [min–max] | records | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = "–" if r["step_ms"] is None else f"{r['step_ms']:.2f}"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f} [{r['ratio_min']:.3f}–{r['ratio_max']:.3f}]"
        records = "–" if not r["expected"] else f"{r['records']} / {r['expected']}"
        notes = "; ".join(r["notes"]).replace("|", "/")
        out.append(f"| {r['model']} | {r['variant']} | {r['mode']} | {ms} | {ratio} | {records} | {notes} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["mlp"])
    p.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    p.add_argument("--rounds", type=int, default=None, help="default 20; 3 with --quick")
    p.add_argument("--warmup", type=int, default=12, help="steps per variant before timing (>= 11: see above)")
    p.add_argument("--block-ms", type=float, default=None, help="default 200; 30 with --quick")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager variants only")
    p.add_argument("--quick", action="store_true", help="3 rounds of 30 ms blocks")
    p.add_argument("--json", metavar="PATH", help="also write the machine and the rows as JSON")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 20)
    args.block_ms = args.block_ms or (30 if args.quick else 200)
    if "torch" not in args.peers:
        args.peers = ["torch", *args.peers]  # the baseline of every ratio
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchbp-bench-peers-") as root:
        for name in args.models:
            rows += run_model(name, args, os.path.join(root, name))
    info = machine(args)
    print(render(rows, info))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The pieces the benchmark scripts share: the models and their batches, a training step, the timer, the
machine's description. Each script imports it by name (``python benchmarks/x.py`` puts ``benchmarks/`` on
``sys.path``); importing it puts this checkout's root first on ``sys.path``, so the scripts measure this
checkout's torchbp, not an installed one.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (this checkout's torchbp)
import torchbp  # noqa: E402


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def build_mlp(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


VOCAB, LENGTH = 64, 64


def transformer_lm() -> nn.Module:
    """examples/transformer.py's TinyTransformer (dim 128, 4 heads, 2 blocks), logits flattened to (tokens, vocab)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from transformer import TinyTransformer

    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyTransformer(vocab=VOCAB, dim=128, heads=4, layers=2, length=LENGTH)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.net(tokens).reshape(-1, VOCAB)

    return LanguageModel()


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-3)


class Trainer:
    """A model, its loss and optimizer, and a cycle of batches; ``step()`` is one training step."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: str, batches) -> None:
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.opt = make_optimizer(optimizer, model.parameters())
        self.i = 0

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad()
        self.loss_fn(self.model(x), y).backward()
        self.opt.step()

    def live_state_bytes(self) -> int:
        """Distinct storages of parameters, their grads, optimizer state and the current batch."""
        tensors = []
        for p in self.model.parameters():
            tensors += [p, p.grad]
        for state in self.opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += list(self.batches[self.i % len(self.batches)])
        seen: dict[tuple, int] = {}
        for t in tensors:
            if t is not None:
                s = t.untyped_storage()
                seen[(t.device, s.data_ptr())] = s.nbytes()
        return sum(seen.values())


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def block(self, trainer: Trainer, k: int) -> float:
        """Seconds per step over a block of ``k`` steps."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(k):
                trainer.step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / k
        t0 = time.perf_counter()
        for _ in range(k):
            trainer.step()
        return (time.perf_counter() - t0) / k


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def select_devices(choice: str) -> list[torch.device] | None:
    """--device cpu|cuda|all -> the devices to run on ('all': CPU, and CUDA when available); None if
    CUDA was asked for and is not available."""
    if choice == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda, but torch.cuda.is_available() is False")
        return None
    devices = [torch.device("cpu")] if choice in ("cpu", "all") else []
    if choice == "cuda" or (choice == "all" and torch.cuda.is_available()):
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
MLP, MLP_BATCH = [784, 512, 512, 10], 256
TOKENS_BATCH = 16


def build(name: str, device: torch.device):
    """(torch.nn model, its torchbp twin, batches) with the same weights and data for every variant."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "transformer":
        model = transformer_lm()
        batches = []
        for _ in range(8):
            tokens = torch.randint(0, VOCAB, (TOKENS_BATCH, LENGTH + 1), generator=g)
            batches.append((tokens[:, :-1].to(device), tokens[:, 1:].reshape(-1).to(device)))
    else:
        model = build_mlp(MLP, ACTIVATIONS[name.split("-")[1]])
        batches = [
            (
                torch.randn(MLP_BATCH, MLP[0], generator=g).to(device),
                torch.randint(0, MLP[-1], (MLP_BATCH,), generator=g).to(device),
            )
            for _ in range(8)
        ]
    model = model.to(device)
    return model, torchbp.convert(copy.deepcopy(model)), batches

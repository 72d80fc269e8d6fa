"""Train a small transformer built from torch.nn, converted to torchbp, compiled, with the δ monitor on.

A decoder-only, pre-norm transformer (token embedding, blocks of LayerNorm -> q/k/v/o projections with
``scaled_dot_product_attention`` -> residual, LayerNorm -> MLP with GELU -> residual, a final LayerNorm and
a linear head), written with ``torch.nn`` modules as usual. ``torchbp.convert`` swaps every
``nn.Linear`` for torchbp's, whose hand-written backward hands each layer's error δ^l = ∂C/∂z^l to a
``torchbp.DeltaMonitor``; the model is then compiled with ``torch.compile`` and trained on a synthetic
task (continue a sequence that counts up by a random stride, modulo the vocabulary size).

    python examples/transformer.py [--steps 200] [--device cpu] [--no-compile] [--logdir runs/transformer]

At the end it prints each layer's δ statistics and the gain ‖δ^fc1‖ / ‖δ^fc2‖ across each MLP's GELU
(q/k/v/o and fc2 feed attention, residual additions and LayerNorm: they have no Linear consumer to
compare with, so no gain), and TensorBoard logs are in ``--logdir``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import torchbp


class Block(nn.Module):
    """A pre-norm transformer block of torch.nn modules: x + attn(ln1(x)), then h + mlp(ln2(h))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        h = self.ln1(x)

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, heads, T, D / heads)
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), is_causal=True
        )
        x = x + self.o_proj(a.transpose(1, 2).reshape(batch, length, dim))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token embedding, learned positions, ``layers`` pre-norm blocks, a final LayerNorm and a linear head."""

    def __init__(self, vocab: int = 32, dim: int = 64, heads: int = 4, layers: int = 2, length: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(length, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, 4 * dim) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))


def counting_batch(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences that count up from a random start by a random stride (1 to 3), modulo ``vocab``."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    stride = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + stride * torch.arange(length + 1)) % vocab


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="AdamW steps (default: 200)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--no-compile", action="store_true", help="run eagerly instead of torch.compile")
    parser.add_argument("--logdir", default="runs/transformer", help="TensorBoard log directory")
    parser.add_argument("--every", type=int, default=10, help="log every this many steps (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vocab, length = 32, 32
    model = torchbp.convert(TinyTransformer(vocab=vocab, length=length)).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = torchbp.nn.CrossEntropyLoss()
    monitor = torchbp.DeltaMonitor(model, log=args.logdir, every=args.every)
    step_fn = model if args.no_compile else torch.compile(model, fullgraph=True)

    start = time.perf_counter()
    for step in range(args.steps):
        tokens = counting_batch(args.batch_size, length, vocab, generator).to(args.device)
        logits = step_fn(tokens[:, :-1])
        loss = loss_fn(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # each torchbp Linear hands its δ^l to the monitor here
        optimizer.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    stats = monitor.latest()
    monitor.close()

    mode = "eager" if args.no_compile else "torch.compile(fullgraph=True)"
    print(f"\n{args.steps} steps in {elapsed:.1f} s ({mode}, {args.device}); δ per layer at step {monitor.step}:")
    print(f"{'layer':<18} {'delta_norm':>10} {'weight_grad':>11} {'gain':>6}")
    for name, s in stats.items():
        gain = "-" if s["delta_gain"] is None else f"{s['delta_gain']:.2f}"
        print(f"{name:<18} {s['delta_norm']:10.2e} {s['weight_grad_norm']:11.2e} {gain:>6}")
    print(f"\nTensorBoard logs: {args.logdir}  (tensorboard --logdir {args.logdir})")
    return {"loss": loss.item(), "stats": stats}


if __name__ == "__main__":
    main()

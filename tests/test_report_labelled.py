"""``torchbp report`` on a labelled set of real training runs whose truth is known by construction: every problem
is found, and no false alarm is raised.

Each run trains a tiny model for STEPS steps with a :class:`torchbp.DeltaMonitor` logging every EVERY steps,
writes its event files, and the report reads them back (:func:`torchbp.report.read_logdir`, so the data flow's
links travel through the log). The runs are built once per session (a module-scoped fixture): all of them
about 30 s on two busy CPU cores, most of it the transformers.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbp
from torchbp import report

pytest.importorskip("tensorboard", reason="reading event files needs tensorboard")

STEPS = 120
EVERY = 4
NAN_STEP = 60  # a logged step (a multiple of EVERY)
WIDTH = 32
BATCH = 32


@dataclasses.dataclass
class Case:
    """A run, the problems it has by construction (each must be found), and the others it may show as their
    consequence (found or not)."""

    name: str
    build: Callable[[], nn.Module]
    expected: frozenset[str]
    allowed: frozenset[str] = frozenset()
    loss: str = "cross_entropy"  # or "l1", "huber", "mse"
    lr: float = 0.05
    optimizer: str = "sgd"  # or "adam"
    inject: str = ""  # "nan_weight", "nan_gradient"
    data: str = "blobs"  # or "tokens"


def mlp(depth: int, activation: str, init: str = "default", gain: float = 1.0, bias: float | None = None) -> nn.Module:
    """``depth`` hidden layers of WIDTH units (torchbp's Sequential: the backprop loop), then 4 outputs."""
    act = {"sigmoid": torchbp.nn.Sigmoid, "relu": torchbp.nn.ReLU, "none": None}[activation]
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = torchbp.nn.Linear(WIDTH, WIDTH)
        if init == "kaiming":  # He et al.: Var w = 2 / fan_in keeps ‖δ‖ through a ReLU layer of equal widths
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            linear.weight.data.mul_(gain)
            nn.init.zeros_(linear.bias)
        layers += [linear] if act is None else [linear, act()]
    layers.append(torchbp.nn.Linear(WIDTH, 4))
    model = torchbp.nn.Sequential(*layers)
    if bias is not None:
        nn.init.constant_(model[0].bias, bias)  # the first hidden layer's units: z < 0 for every input
    return model


class GatedResidual(nn.Module):
    """x → stem → h; h + gate · branch(h) with gate = 0, so the branch gets δ = 0 exactly; → head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torchbp.nn.Linear(WIDTH, WIDTH)
        self.branch_in = torchbp.nn.Linear(WIDTH, WIDTH)
        self.branch_out = torchbp.nn.Linear(WIDTH, WIDTH)
        self.head = torchbp.nn.Linear(WIDTH, 4)
        self.register_buffer("gate", torch.zeros(()))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.gate * self.branch_out(torch.relu(self.branch_in(h)))
        return self.head(torch.relu(h))


class Block(nn.Module):
    """A pre-norm transformer block: torchbp Linears, torch's LayerNorm and attention between them."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (torchbp.nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = torchbp.nn.Linear(dim, 4 * dim), torchbp.nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, blocks: int, vocab: int = 16, dim: int = 16, length: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(length, dim))
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(blocks)))
        self.ln = nn.LayerNorm(dim)
        self.head = torchbp.nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(self.ln(self.blocks(self.embed(tokens) + self.position)))


def relu(depth: int, **kwargs) -> Callable[[], nn.Module]:
    return lambda: mlp(depth, "relu", "kaiming", **kwargs)


CASES = [
    Case("deep_sigmoid", lambda: mlp(6, "sigmoid"), frozenset({"vanishing"}), lr=0.1),
    Case("deep_relu_kaiming", relu(6), frozenset(), lr=0.01),
    Case("kaiming_x3", relu(6, gain=3.0), frozenset({"exploding"}), lr=1e-7),
    # The dead layer passes δ = 0 back and has δ = 0 itself: stalled is its consequence.
    Case("dead_biases", relu(3, bias=-10.0), frozenset({"dead_units"}), frozenset({"stalled"}), lr=0.01),
    Case("nan_weight", relu(3), frozenset({"nonfinite"}), inject="nan_weight", lr=0.01),
    Case("nan_gradient", relu(3), frozenset({"nonfinite"}), inject="nan_gradient", lr=0.01),
    Case("gated_residual", GatedResidual, frozenset({"stalled"})),
    *(
        Case(f"transformer_{n}", lambda n=n: Transformer(n), frozenset(), lr=1e-3, optimizer="adam", data="tokens")
        for n in (1, 2, 3, 4)
    ),
    Case("shallow_sigmoid", lambda: mlp(1, "sigmoid"), frozenset(), lr=0.5),
    # ‖δ‖ of the output layer is constant by the loss's construction: |∂C/∂ŷ| = 1/(N·outputs) per element.
    Case("l1_regression", relu(2), frozenset(), loss="l1", lr=0.01),
    Case("huber_regression", relu(2), frozenset(), loss="huber", lr=0.01),
    # Divergence: a linear net on a quadratic cost with a learning rate far above 2 / the curvature: the weights,
    # and with them δ, grow geometrically until they overflow.
    Case(
        "diverging_lr", lambda: mlp(3, "none"), frozenset({"nonfinite"}), frozenset({"exploding"}), loss="mse", lr=2.0
    ),
]


def batches(case: Case, generator: torch.Generator):
    """The data of a run: Gaussian blobs of 4 classes (or a regression target from them), or token sequences
    that count up by a random stride (next-token prediction)."""
    if case.data == "tokens":
        start = torch.randint(0, 16, (BATCH, 1), generator=generator)
        stride = torch.randint(1, 4, (BATCH, 1), generator=generator)
        seq = (start + stride * torch.arange(9)) % 16
        return seq[:, :-1], seq[:, 1:]
    centres = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (BATCH,), generator=generator)
    x = centres[labels] + 0.5 * torch.randn(BATCH, WIDTH, generator=generator)
    if case.loss == "cross_entropy":
        return x, labels
    return x, torch.nn.functional.one_hot(labels, 4).double().to(x.dtype) + 0.1 * labels[:, None]


def loss_of(case: Case, output, target):
    if case.loss == "l1":
        return F.l1_loss(output, target)
    if case.loss == "mse":
        return F.mse_loss(output, target)
    if case.loss == "huber":
        return F.huber_loss(output, target, delta=1e-6)
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def train(case: Case, logdir: pathlib.Path) -> list[tuple[str, str]]:
    """Train ``case`` with a monitor logging to ``logdir / case.name``; the links of its history()."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = case.build()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=case.lr) if case.optimizer == "adam" else torch.optim.SGD(params, lr=case.lr)
    with warnings.catch_warnings(), torchbp.DeltaMonitor(model, log=str(logdir / case.name), every=EVERY) as monitor:
        warnings.filterwarnings("ignore", message="DeltaMonitor: δ is not finite")  # (the runs with a NaN)
        for step in range(STEPS):
            if case.inject == "nan_weight" and step == NAN_STEP:
                with torch.no_grad():
                    model[2].weight[0, 0] = math.nan  # the second hidden layer
            x, y = batches(case, generator)
            opt.zero_grad()
            output = model(x)
            if case.inject == "nan_gradient" and step == NAN_STEP:
                output.register_hook(lambda g: g * math.nan)
            loss_of(case, output, y).backward()
            if case.inject == "nan_gradient" and step == NAN_STEP:
                continue  # the step is skipped, as a GradScaler skips an overflowing one
            opt.step()
        return monitor.history()["links"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, tuple[dict, list[report.Finding], list[tuple[str, str]]]]:
    """Every case trained once: {name: (history read from its log, its findings, the links of history())}."""
    logdir = tmp_path_factory.mktemp("labelled")
    links = {case.name: train(case, logdir) for case in CASES}
    runs = report.read_logdir(logdir)
    return {case.name: (runs[case.name], report.analyze(runs[case.name]), links[case.name]) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_problem_found_and_no_false_alarm(labelled, case):
    history, findings, _ = labelled[case.name]
    found = {f.kind for f in findings if f.problem}
    text = report.format_report({case.name: history}, {case.name: findings})
    assert case.expected <= found, f"missed {sorted(case.expected - found)}:\n{text}"
    assert found <= case.expected | case.allowed, f"false alarm {sorted(found - case.expected - case.allowed)}:\n{text}"


def test_the_links_are_the_data_flow_and_travel_through_the_log(labelled):
    """The links by construction: a plain run of Linears links each to the next; in a pre-norm transformer only
    fc1 → fc2 (GELU) is element-wise (LayerNorm and attention are not); the gated residual links the stem to
    the branch and to the head (the addition) and the branch's end to the head (the gate's product)."""
    for case in CASES:
        history, _, live = labelled[case.name]
        assert history["links"] == live, case.name  # read_logdir gives what monitor.history() gives
    assert labelled["deep_sigmoid"][0]["links"] == [(str(i), str(i + 2)) for i in range(0, 12, 2)]
    for n in (1, 2, 3, 4):
        assert labelled[f"transformer_{n}"][0]["links"] == [(f"blocks.{b}.fc1", f"blocks.{b}.fc2") for b in range(n)]
    assert set(labelled["gated_residual"][0]["links"]) == {
        ("stem", "branch_in"),
        ("stem", "head"),
        ("branch_in", "branch_out"),
        ("branch_out", "head"),
    }


def test_nonfinite_at_the_step_it_was_injected(labelled):
    for name in ("nan_weight", "nan_gradient"):
        _, findings, _ = labelled[name]
        (f,) = [f for f in findings if f.kind == "nonfinite"]
        assert f.steps[0] == NAN_STEP, (name, f.message)
    (f,) = [f for f in labelled["nan_gradient"][1] if f.kind == "nonfinite"]
    assert f.steps == [NAN_STEP]  # the step was skipped: the run is finite again after it


def test_the_one_block_transformer_message_claims_only_what_was_measured(labelled):
    """One gain (fc1 → fc2) is all the data flow gives: the report judges no chain and says so."""
    history, findings, _ = labelled["transformer_1"]
    (ok,) = [f for f in findings if f.kind == "ok"]
    assert "no chain of 3 or more linked layers in the data flow (1 link)" in ok.message, ok.message
    assert "median gain" in ok.message and "(1 of the 7 layers have one)" in ok.message

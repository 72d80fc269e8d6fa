"""Shared test helpers: the device list, torch's reference functions and ``assert_matches_torch``.

Every comparison here is against PyTorch's own result (or, for ``quadratic_cost``, its formula written
with torch ops), never against torchbp itself.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import subprocess
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchbp
from torchbp.cli.check import TOLERANCES, quadratic_cost_formula

#: The reason a CUDA variant skips on a machine without a GPU (the test summary sums these up in one line).
CUDA_SKIP_REASON = "no CUDA device"
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
REDUCTIONS = ("mean", "sum", "none")

# Tolerances per dtype, and the quadratic cost's formula: one definition, shared with ``torchbp check``; the
# reasons for each tolerance are in torchbp/cli/check.py (TOLERANCES). The formula is torch ops, not torchbp.
_TOLERANCES = TOLERANCES


#: torch's counterparts of torchbp.functional, under the same names.
torch_ref = SimpleNamespace(
    linear=F.linear,
    sigmoid=torch.sigmoid,
    relu=F.relu,
    gelu=F.gelu,
    silu=F.silu,
    tanh=torch.tanh,
    layer_norm=F.layer_norm,
    rms_norm=F.rms_norm,
    embedding=F.embedding,
    conv1d=F.conv1d,
    conv2d=F.conv2d,
    mse_loss=F.mse_loss,
    quadratic_cost=quadratic_cost_formula,
    cross_entropy=F.cross_entropy,
    binary_cross_entropy=F.binary_cross_entropy,
    binary_cross_entropy_with_logits=F.binary_cross_entropy_with_logits,
)


def layer_norm_formula(input: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """LayerNorm written with plain torch ops: (x − μ)/√(var(x) + ε) · γ + β over the last dims (biased variance).

    The reference for LayerNorm's Hessian: torch 2.13's ``torch.func.hessian`` of ``F.layer_norm`` gives an
    asymmetric block ∂²C/∂γ∂x ≠ (∂²C/∂x∂γ)ᵀ for inputs with two or more batch dims and a bias (its
    native_layer_norm double backward under torch.func), while this formula's is symmetric and agrees with
    finite differences.
    """
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    y = (input - mean) / torch.sqrt((input - mean).pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def leaf_copy(x: Any) -> Any:
    """An independent leaf with the same values, dtype, device, strides and ``requires_grad``."""
    if not isinstance(x, Tensor):
        return x
    with torch.no_grad():
        y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        y.copy_(x)
    return y.requires_grad_(x.requires_grad)


def tolerance(expected: Tensor, rtol: float | None = None, atol: float | None = None) -> dict:
    """assert_close keyword arguments for a comparison with ``expected`` (torch's result), per its dtype.

    ``rtol``/``atol`` given: used as they are. Otherwise ``_TOLERANCES[dtype]``, the atol scaled by
    ``max(1, max|expected|)`` over the finite elements. Other dtypes (integers, complex): assert_close's defaults.
    """
    if rtol is not None or atol is not None:
        return {"rtol": rtol, "atol": atol}
    if expected.dtype not in _TOLERANCES:
        return {}
    r, a = _TOLERANCES[expected.dtype]
    finite = expected[torch.isfinite(expected)] if expected.numel() else expected
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return {"rtol": r, "atol": a * scale}


def assert_close_labelled(actual: Any, expected: Any, label: str, *, rtol=None, atol=None, equal_nan=False) -> None:
    """``torch.testing.assert_close`` whose failure message starts with ``label``."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{label}: ours gives {actual!r}, torch gives {expected!r}"
        return
    tol = tolerance(expected, rtol, atol) if isinstance(expected, Tensor) else {}
    torch.testing.assert_close(actual, expected, equal_nan=equal_nan, msg=lambda m: f"{label}: {m}", **tol)


def assert_matches_torch(
    ours: Callable,
    ref: Callable,
    inputs: Mapping[str, Any],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    equal_nan: bool = False,
    seed: int = 0,
) -> None:
    """Check ours against torch's reference: the forward value, then every gradient.

    ``inputs`` maps each keyword argument's name (also used in failure messages: ``"grad of weight"``) to
    its value; ``ours(**inputs)`` and ``ref(**inputs)`` are called with copies.
    Each side gets its own leaf copies (same values, strides and ``requires_grad``), so the two never
    share ``.grad``. Every floating tensor input that requires grad is differentiated, under the same
    random upstream gradient for both. Where torch gives no gradient, ours must give none (or zeros).
    """
    names = list(inputs)
    ours_args = [leaf_copy(v) for v in inputs.values()]
    ref_args = [leaf_copy(v) for v in inputs.values()]
    out = ours(**dict(zip(names, ours_args)))
    expected = ref(**dict(zip(names, ref_args)))
    assert_close_labelled(out, expected, "forward value", rtol=rtol, atol=atol, equal_nan=equal_nan)

    wrt = [
        i for i, v in enumerate(inputs.values()) if isinstance(v, Tensor) and v.requires_grad and v.is_floating_point()
    ]
    if not wrt or not expected.requires_grad:
        return
    assert out.requires_grad, "forward value: torch's output requires grad, ours does not"
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(expected.dtype)
    upstream = upstream.to(expected.device)
    grads_ref = torch.autograd.grad(expected, [ref_args[i] for i in wrt], upstream.clone(), allow_unused=True)
    grads_ours = torch.autograd.grad(out, [ours_args[i] for i in wrt], upstream.clone(), allow_unused=True)
    for i, g_ours, g_ref in zip(wrt, grads_ours, grads_ref):
        label = f"grad of {names[i]}"
        if g_ref is None:
            assert g_ours is None or not g_ours.any(), f"{label}: torch gives no gradient, ours gives {g_ours}"
            continue
        assert g_ours is not None, f"{label}: torch gives a gradient, ours gives None"
        assert_close_labelled(g_ours, g_ref, label, rtol=rtol, atol=atol, equal_nan=equal_nan)


GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear"})


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op that runs inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def gemms(self) -> list[str]:
        return [op for op in self.ops if op in GEMM_OPS]


# --------------------------------------------------------------------------------------------------
# The monitor's tests: the documented statistics, the oracle, models built twice (torch.nn and torchbp)
# --------------------------------------------------------------------------------------------------

# The documented statistics (DeltaMonitor's docstring), also its TensorBoard tag prefixes.
STATS = (
    "delta_norm",
    "delta_fro",
    "delta_sample_norm_mean",
    "delta_sample_norm_max",
    "weight_grad_norm",
    "delta_gain",
    "dead_fraction",
    "delta_nonfinite",
)
REL = 1e-12  # float64 models: the monitor records in float64
REL_EVENT = 1e-5  # values read back from event files (float32)


# --------------------------------------------------------------------------------------------------
# The oracle: δ^l from PyTorch's autograd, via tensor hooks on each torch.nn.Linear's output
# --------------------------------------------------------------------------------------------------


class DeltaOracle:
    """Captures z^l (forward) and δ^l = ∂C/∂z^l (backward, in the order autograd produces them).

    The tensor hook is registered on the Linear's output before any (in-place) activation runs, so it
    receives the gradient with respect to z^l itself (PyTorch's documented hook semantics).
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
        assert self.modules, "the oracle model must be built from torch.nn.Linear"
        self.handles = [m.register_forward_hook(self._forward_hook(name)) for name, m in self.modules.items()]
        self.reset()

    def reset(self) -> None:
        self.z: dict[str, torch.Tensor] = {}
        self.delta: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # backward order

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _forward_hook(self, name: str):
        def hook(module, inputs, z):
            self.z[name] = z.detach().clone()  # clone: an in-place ReLU overwrites z afterwards

            def on_grad(g):
                self.delta[name] = g.detach().clone()
                self.order.append(name)

            if z.requires_grad:
                z.register_hook(on_grad)

        return hook

    def stats(self, relu_after: set[str]) -> dict[str, dict[str, float | bool | None]]:
        """Every documented statistic, from torch's δ, z and W.grad (zeroed before the backward)."""
        out: dict[str, dict] = {}
        previous = None
        for name in self.order:
            d, m = self.delta[name], self.modules[name]
            n = d.shape[0] if d.dim() > 1 else 1  # an unbatched (in,) input is one sample
            per_sample = d.reshape(n, -1).norm(dim=1)  # norm over all non-batch dims of sample n
            fro = d.norm()
            dead = None
            if name in relu_after:  # σ'(z) = 0 for every sample <=> z <= 0 for every sample
                z = self.z[name]
                dead = (z <= 0).reshape(-1, z.shape[-1]).all(0).double().mean().item()
            out[name] = {
                "delta_norm": d.reshape(-1, d.shape[-1]).sum(0).norm().item(),  # ‖Σ_n δ_n‖ over all batch dims
                "delta_fro": fro.item(),  # ‖δ‖ over the whole batch
                "delta_sample_norm_mean": per_sample.mean().item(),
                "delta_sample_norm_max": per_sample.max().item(),
                "weight_grad_norm": None if m.weight.grad is None else m.weight.grad.norm().item(),
                "delta_gain": None if previous is None else (fro / previous).item(),
                "dead_fraction": dead,
                "delta_nonfinite": not bool(torch.isfinite(d).all()),
            }
            previous = fro
        return out


def assert_stats_match(ours: dict, expected: dict, rel: float = REL, label: str = "") -> None:
    """Every layer, every statistic; a failure lists all mismatches, labelled by layer and statistic."""
    assert set(ours) == set(expected), f"{label}layers: monitor has {sorted(ours)}, torch model has {sorted(expected)}"
    problems = []
    for name, exp in expected.items():
        got = ours[name]
        if set(got) != set(STATS):
            problems.append(f"{name}: statistics {sorted(got)}, documented {sorted(STATS)}")
            continue
        for stat in STATS:
            o, e = got[stat], exp[stat]
            if e is None or o is None or isinstance(e, bool):
                ok = o is e if isinstance(e, bool) else (o is None and e is None)
            else:
                ok = math.isclose(o, e, rel_tol=rel, abs_tol=1e-9) or (math.isnan(o) and math.isnan(e))
            if not ok:
                problems.append(f"{label}layer {name!r} {stat}: monitor {o!r}, torch {e!r}")
    assert not problems, "\n".join(problems)


def monitored(model: nn.Module) -> list[str]:
    """The layers of ``model`` that carry a monitor's slot right now."""
    return [name for name, m in model.named_modules() if m.__dict__.get("_torchbp_slot") is not None]


def attached_monitors() -> int:
    """How many DeltaMonitors are attached to a model right now (the monitor objects alive, found by the gc; one
    whose constructor failed is not attached)."""
    return sum(1 for o in gc.get_objects() if type(o) is torchbp.DeltaMonitor and getattr(o, "_attached", False))


def bp_copy(torch_model: nn.Module) -> nn.Module:
    """The torchbp twin: same weights, converted."""
    return torchbp.convert(copy.deepcopy(torch_model))


def kill_units(linear: nn.Linear, rows: list[int], bias_value: float = -1.0) -> None:
    """Make units dead on purpose: weight row 0 and bias < 0 gives z = bias for every sample.

    ``bias_value=0.0`` (or a layer without bias) gives z = 0 exactly, where σ'(0) = 0 (as torch).
    """
    with torch.no_grad():
        linear.weight[rows] = 0.0
        if linear.bias is not None:
            linear.bias[rows] = bias_value


# --------------------------------------------------------------------------------------------------
# Models (torch.nn; converted copies are monitored). Each builder returns (model, relu_after): the
# Linear layers whose output goes straight into a ReLU.
# --------------------------------------------------------------------------------------------------


def mixed_mlp():
    m = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8, bias=False), nn.Sigmoid(), nn.Linear(8, 4))
    kill_units(m[0], [0, 1])
    kill_units(m[0], [2], bias_value=0.0)  # z = 0 exactly: dead, as σ'(0) = 0
    return m, {"0"}


def relu_mlp(inplace: bool = False):
    m = nn.Sequential(
        nn.Linear(6, 12),
        nn.ReLU(inplace),
        nn.Linear(12, 10, bias=False),
        nn.ReLU(inplace),
        nn.Linear(10, 8),
        nn.ReLU(inplace),
        nn.Linear(8, 3),
    )
    kill_units(m[0], [0, 3, 5])
    kill_units(m[2], [1])  # bias=False: z = 0 exactly
    kill_units(m[4], [7], bias_value=-3.0)
    return m, {"0", "2", "4"}


def sigmoid_mlp():
    m = nn.Sequential(nn.Linear(6, 10), nn.Sigmoid(), nn.Linear(10, 8), nn.Sigmoid(), nn.Linear(8, 3), nn.Sigmoid())
    return m, set()


class Nested(nn.Module):
    """Qualified names ("encoder.fc1"), a functional sigmoid in forward, a ReLU inside a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 10), act=nn.ReLU(), fc2=nn.Linear(10, 8)))
        self.head = nn.Linear(8, 3, bias=False)
        kill_units(self.encoder.fc1, [4, 9])

    def forward(self, x):
        return self.head(torch.sigmoid(self.encoder(x)))


def nested():
    return Nested(), {"encoder.fc1"}


MODELS = {
    "mixed": mixed_mlp,
    "relu": relu_mlp,
    "relu_inplace": lambda: relu_mlp(inplace=True),
    "sigmoid": sigmoid_mlp,
    "nested": nested,
}
SHAPES = {"2d": (16, 6), "3d": (4, 5, 6), "1d": (6,)}


def make_models(builder, device, dtype=torch.float64):
    torch_model, relu_after = builder()
    torch_model = torch_model.to(device=device, dtype=dtype)
    bp_model = bp_copy(torch_model)
    # The oracle's tensor hooks on z^l do not fire once an in-place ReLU rebases a view z^l (1-D and
    # 3-D inputs), so the torch model runs its ReLUs out of place: the same δ, the same gradients.
    for m in torch_model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return torch_model, bp_model, relu_after


def loss_fn(out, target):
    return F.mse_loss(out, target)  # torch's loss on both sides: only the layers differ


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalar_series(ea, tag) -> dict[int, float]:
    events = ea.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: a step was written twice: {steps}"
    return {e.step: e.value for e in events}


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``, e.g. ``"256k"``) mounted at ``mnt`` (created) while the ``with``
    block runs: a real filesystem that fills up. Skips the test where it cannot be mounted (needs root and
    permission to mount)."""
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def tfrecord_payloads(path) -> list[bytes]:
    """The payloads (serialized ``Event``\\ s) of a TensorBoard event file, in order: each TFRecord is the length
    (8 bytes, little-endian), its masked CRC (4), the payload, the payload's masked CRC (4)."""
    import struct

    data, pos, payloads = Path(path).read_bytes(), 0, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        payloads.append(data[pos + 12 : pos + 12 + length])
        pos += 16 + length
    return payloads

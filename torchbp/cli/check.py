r"""``torchbp check``: the parity battery (and ``python -m torchbp check``).

``torchbp check`` verifies an install on this machine's devices: every function of
:mod:`torchbp.functional` against ``torch.nn.functional`` (``quadratic_cost`` against its formula
written with torch ops), forward value and every gradient, under a random upstream gradient, plus
``torch.autograd.gradcheck`` in float64. One table row per function x device x dtype; exit status 1
on any mismatch.

The battery uses torchbp's public API only, like any user. :data:`CASES` and :data:`TOLERANCES` are
the one definition of the battery's functions and of the tolerance per dtype; the test suite imports
them from here. :func:`add_parser` registers the subcommand with :mod:`torchbp.cli.main`.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

import torchbp
import torchbp.functional as bp

from ._args import integer

__all__ = ["CASES", "TOLERANCES", "Case", "run_check", "add_parser"]


# --------------------------------------------------------------------------------------------------
# torchbp check: the parity battery
# --------------------------------------------------------------------------------------------------

#: (rtol, atol) per dtype, the one definition used by ``torchbp check`` and by the test suite (tests/helpers.py).
#: An element passes when |ours - torch| <= atol * max(1, max|torch|) + rtol * |torch|: the absolute error of
#: a sum of many terms, or of a difference that cancels, grows with the size of its terms, and the largest
#: reference value (over the finite elements) stands for that size; the inputs are O(1), hence the floor of 1.
#:
#: float64, rtol 1e-12, atol 1e-12: two float64 computations of one formula in a different order differ by a
#: few ulps per operation; the sums here have at most a few hundred terms, so |error| <= n * 2^-53 * Σ|terms|
#: stays below 1e-13 * scale, a margin of 10x. A float32 value anywhere on the path (a coefficient, a constant,
#: an intermediate) carries a relative error up to 2^-24 ≈ 6e-8, 10^4 times the tolerance: it fails.
#:
#: float32, rtol 1e-5, atol 1e-5: the same reasoning one precision down. An element-wise chain of ten
#: operations in another order is off by ~10 * 2^-24 ≈ 6e-7 relative, 16x inside 1e-5; sums are covered by
#: the scaled atol. A half-precision step on a float32 path (float16 ≈ 5e-4, bfloat16 ≈ 4e-3 relative) is
#: 50x or more outside it and fails. (A rtol of 1e-4 would pass every comparison too, with no case that needs
#: it: measured on CPU over the whole test suite's float32 comparisons, torch 2.13.)
#:
#: bfloat16 and float16 (the tests' autocast and low-precision cases; ``torch check`` runs float32 and
#: float64): a relative tolerance of a few units of their precision, and an absolute one scaled the same way.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}

#: The dtypes ``torchbp check --dtype`` offers.
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def quadratic_cost_formula(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Nielsen's quadratic cost C = 1/(2n) Σ_x ‖y(x) − a(x)‖², written with torch ops (the reference for
    ``quadratic_cost``, which torch does not have).

    n is the batch size (dim 0) for inputs of two or more dims; a 1-D input is one sample. 'sum' drops
    the 1/n; 'none' gives ½‖y − a‖² per sample. An empty batch gives nan for 'mean', like torch's losses.
    """
    half_sq = 0.5 * (target - input) ** 2
    per_sample = half_sq.flatten(1).sum(1) if input.dim() >= 2 else half_sq.sum()
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()  # Σ_x / n


@dataclass(frozen=True)
class Case:
    """One function of the battery.

    ``make(gen)`` returns the arguments as float64 (or int64) CPU tensors drawn from ``gen``; they are
    cast to the row's dtype and moved to its device. ``grads`` names the arguments differentiated (those
    torch gives a gradient for). ``gradcheck_args``, when given, adjusts the arguments for gradcheck
    (e.g. moves ReLU's inputs off its kink at 0, where finite differences are meaningless).
    """

    name: str
    ours: Callable[..., Tensor]
    ref: Callable[..., Tensor]
    make: Callable[[torch.Generator], dict[str, Tensor]]
    grads: tuple[str, ...]
    gradcheck_args: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rand(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def _make_relu(gen: torch.Generator) -> dict[str, Tensor]:
    x = _randn(gen, 4, 6)
    x[0, :3] = 0.0  # ReLU's gradient at exactly 0 is 0, as torch's
    return {"input": x}


def _relu_off_kink(args: dict[str, Tensor]) -> dict[str, Tensor]:
    x = args["input"]
    x = torch.where(x.abs() < 0.1, torch.full_like(x, 0.5), x)
    return {"input": x}


CASES: tuple[Case, ...] = (
    Case(
        "linear",
        bp.linear,
        F.linear,
        lambda g: {"input": _randn(g, 2, 3, 5), "weight": _randn(g, 4, 5), "bias": _randn(g, 4)},
        ("input", "weight", "bias"),
    ),
    Case("sigmoid", bp.sigmoid, torch.sigmoid, lambda g: {"input": 3 * _randn(g, 4, 6)}, ("input",)),
    Case("relu", bp.relu, F.relu, _make_relu, ("input",), _relu_off_kink),
    Case("gelu", bp.gelu, F.gelu, lambda g: {"input": 2 * _randn(g, 4, 6)}, ("input",)),
    Case(
        "gelu (tanh)",
        lambda input: bp.gelu(input, approximate="tanh"),
        lambda input: F.gelu(input, approximate="tanh"),
        lambda g: {"input": 2 * _randn(g, 4, 6)},
        ("input",),
    ),
    Case("silu", bp.silu, F.silu, lambda g: {"input": 2 * _randn(g, 4, 6)}, ("input",)),
    Case("tanh", bp.tanh, torch.tanh, lambda g: {"input": 2 * _randn(g, 4, 6)}, ("input",)),
    Case(
        "layer_norm",
        lambda input, weight, bias: bp.layer_norm(input, (6,), weight, bias),
        lambda input, weight, bias: F.layer_norm(input, (6,), weight, bias),
        # each sample's mean within a few std of 0: well conditioned
        lambda g: {"input": 1 + _randn(g, 2, 3, 6), "weight": _randn(g, 6), "bias": _randn(g, 6)},
        ("input", "weight", "bias"),
    ),
    Case(
        "rms_norm",
        lambda input, weight: bp.rms_norm(input, (6,), weight),
        lambda input, weight: F.rms_norm(input, (6,), weight),
        lambda g: {"input": _randn(g, 2, 3, 6), "weight": _randn(g, 6)},
        ("input", "weight"),
    ),
    Case(
        "conv1d",
        lambda input, weight, bias: bp.conv1d(input, weight, bias, stride=2, padding=1),
        lambda input, weight, bias: F.conv1d(input, weight, bias, stride=2, padding=1),
        lambda g: {"input": _randn(g, 2, 3, 9), "weight": _randn(g, 4, 3, 3), "bias": _randn(g, 4)},
        ("input", "weight", "bias"),
    ),
    Case(
        "conv2d",
        lambda input, weight, bias: bp.conv2d(input, weight, bias, padding=1, groups=2),
        lambda input, weight, bias: F.conv2d(input, weight, bias, padding=1, groups=2),
        lambda g: {"input": _randn(g, 2, 4, 5, 5), "weight": _randn(g, 4, 2, 3, 3), "bias": _randn(g, 4)},
        ("input", "weight", "bias"),
    ),
    Case(
        "embedding",
        bp.embedding,
        F.embedding,
        lambda g: {"input": torch.randint(0, 7, (3, 5), generator=g), "weight": _randn(g, 7, 4)},
        ("weight",),
    ),
    Case(
        "mse_loss",
        bp.mse_loss,
        F.mse_loss,
        lambda g: {"input": _randn(g, 4, 6), "target": _randn(g, 4, 6)},
        ("input", "target"),
    ),
    Case(
        "quadratic_cost",
        bp.quadratic_cost,
        quadratic_cost_formula,
        lambda g: {"input": _randn(g, 4, 6), "target": _randn(g, 4, 6)},
        ("input", "target"),
    ),
    Case(
        "cross_entropy (indices)",
        bp.cross_entropy,
        F.cross_entropy,
        lambda g: {"input": 2 * _randn(g, 8, 5), "target": torch.randint(0, 5, (8,), generator=g)},
        ("input",),
    ),
    Case(
        "cross_entropy (probs)",
        bp.cross_entropy,
        F.cross_entropy,
        lambda g: {"input": 2 * _randn(g, 8, 5), "target": torch.softmax(_randn(g, 8, 5), dim=1)},
        ("input", "target"),
    ),
    Case(
        "binary_cross_entropy",
        bp.binary_cross_entropy,
        F.binary_cross_entropy,
        # probabilities kept inside [0.1, 0.9], so gradcheck's perturbations stay in (0, 1)
        lambda g: {"input": 0.1 + 0.8 * _rand(g, 4, 6), "target": _rand(g, 4, 6)},
        ("input", "target"),
    ),
    Case(
        "binary_cross_entropy_with_logits",
        bp.binary_cross_entropy_with_logits,
        F.binary_cross_entropy_with_logits,
        lambda g: {"input": 3 * _randn(g, 4, 6), "target": _rand(g, 4, 6)},
        ("input", "target"),
    ),
)


@dataclass
class Error:
    """Max absolute and relative error of one tensor, and the fraction of the tolerance it uses."""

    abs: float = 0.0
    rel: float = 0.0
    ratio: float = 0.0  # max |ours - torch| / (atol + rtol |torch|); > 1 fails
    problem: str = ""  # shape, dtype or None-ness mismatch

    @property
    def ok(self) -> bool:
        return not self.problem and self.ratio <= 1.0


def _compare(ours: Tensor | None, ref: Tensor | None, dtype: torch.dtype) -> Error:
    if ref is None or ours is None:
        if ref is None and ours is None:
            return Error()
        return Error(
            math.inf,
            math.inf,
            math.inf,
            f"torchbp gives {'no' if ours is None else 'a'} gradient, torch gives {'no' if ref is None else 'one'}",
        )
    if ours.shape != ref.shape or ours.dtype != ref.dtype or ours.device != ref.device:
        return Error(
            math.inf,
            math.inf,
            math.inf,
            f"torchbp gives {tuple(ours.shape)} {ours.dtype} on {ours.device}, "
            f"torch gives {tuple(ref.shape)} {ref.dtype} on {ref.device}",
        )
    rtol, atol = TOLERANCES[dtype]
    a, e = ours.detach().double(), ref.detach().double()
    if not e.numel():
        return Error()
    finite = e[torch.isfinite(e)]
    if finite.numel():
        atol = atol * max(1.0, finite.abs().max().item())
    both_nan = a.isnan() & e.isnan()
    same_inf = torch.isinf(e) & (a == e)
    diff = torch.where(both_nan | same_inf, torch.zeros_like(a), (a - e).abs())
    diff = torch.where(diff.isnan(), torch.full_like(diff, math.inf), diff)  # NaN on one side only
    nonzero = e != 0
    rel = (diff[nonzero] / e[nonzero].abs()).max().item() if nonzero.any() else 0.0
    # An element with torch's value exactly 0 and ours not has no finite relative error.
    if (diff[~nonzero] > 0).any():
        rel = math.inf
    ratio = (diff / (atol + rtol * e.abs().nan_to_num(posinf=0.0))).max().item()
    return Error(diff.max().item(), rel, ratio)


@dataclass
class Row:
    function: str
    device: str
    dtype: str
    forward: Error
    grads: dict[str, Error]
    gradcheck: bool | None  # None: not run (float32)
    error: str = ""  # an exception raised by torchbp or the comparison

    @property
    def worst_grad(self) -> str:
        if not self.grads:
            return "-"
        return max(self.grads, key=lambda k: (not self.grads[k].ok, self.grads[k].ratio))

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.forward.ok
            and all(e.ok for e in self.grads.values())
            and self.gradcheck is not False
        )

    def problems(self) -> list[str]:
        """What failed, one line each."""
        where = f"{self.function} on {self.device} in {self.dtype}"
        out = []
        if self.error:
            out.append(f"{where}: {self.error}")
        for label, err in [("forward value", self.forward)] + [(f"grad of {k}", e) for k, e in self.grads.items()]:
            if err.problem:
                out.append(f"{where}: {label}: {err.problem}")
            elif not err.ok:
                out.append(
                    f"{where}: {label}: max abs error {err.abs:.3g}, max rel error {err.rel:.3g}, "
                    f"{err.ratio:.3g}x the tolerance"
                )
        if self.gradcheck is False:
            out.append(f"{where}: torch.autograd.gradcheck failed (hand-written backward vs finite differences)")
        return out


def _leaves(args: dict[str, Tensor], grads: Sequence[str]) -> dict[str, Tensor]:
    return {k: v.detach().clone().requires_grad_(k in grads) for k, v in args.items()}


def _run_case(case: Case, device: str, dtype: torch.dtype, seed: int, index: int) -> Row:
    dtype_name = str(dtype).removeprefix("torch.")
    row = Row(case.name, device, dtype_name, Error(), {}, None)
    gen = torch.Generator().manual_seed(seed * 1009 + index)  # each row independent of the others
    args = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in case.make(gen).items()}
    try:
        ours_args, ref_args = _leaves(args, case.grads), _leaves(args, case.grads)
        ours = case.ours(**ours_args)
        ref = case.ref(**ref_args)
        row.forward = _compare(ours, ref, dtype)
        upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        ours_grads = torch.autograd.grad(ours, [ours_args[k] for k in case.grads], upstream, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, [ref_args[k] for k in case.grads], upstream, allow_unused=True)
        row.grads = {k: _compare(o, r, dtype) for k, o, r in zip(case.grads, ours_grads, ref_grads)}
        if dtype == torch.float64:
            gc_args = case.gradcheck_args(args) if case.gradcheck_args else args
            gc_args = _leaves(gc_args, case.grads)
            names = list(gc_args)
            row.gradcheck = torch.autograd.gradcheck(
                lambda *xs: case.ours(**dict(zip(names, xs))), tuple(gc_args.values()), raise_exception=False
            )
    except Exception as exc:  # a failure to report in the table, not to crash the whole check
        row.error = f"{type(exc).__name__}: {exc}"
    return row


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.1e}"


_COLUMNS = (
    ("function", 32, "<"),
    ("device", 6, "<"),
    ("dtype", 7, "<"),
    ("fwd abs", 8, ">"),
    ("fwd rel", 8, ">"),
    ("grad abs", 8, ">"),
    ("grad rel", 8, ">"),
    ("tol used", 8, ">"),
    ("worst grad", 10, "<"),
    ("gradcheck", 9, "<"),
    ("result", 6, "<"),
)


def _line(cells: Sequence[str]) -> str:
    return " ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, _COLUMNS)).rstrip()


def _format_row(row: Row) -> str:
    if row.grads:
        grad_abs = max(e.abs for e in row.grads.values())
        grad_rel = max(e.rel for e in row.grads.values())
    else:
        grad_abs = grad_rel = math.nan
    errors = [row.forward, *row.grads.values()]
    used = math.inf if row.error or any(e.problem for e in errors) else max(e.ratio for e in errors)
    gradcheck = "-" if row.gradcheck is None else ("pass" if row.gradcheck else "FAIL")
    if row.error and row.gradcheck is None and row.dtype == "float64":
        gradcheck = "?"
    return _line(
        [
            row.function,
            row.device,
            row.dtype,
            _fmt(row.forward.abs),
            _fmt(row.forward.rel),
            _fmt(grad_abs) if row.grads else "-",
            _fmt(grad_rel) if row.grads else "-",
            _fmt(used),
            row.worst_grad,
            gradcheck,
            "ok" if row.ok else "FAIL",
        ]
    )


def _devices(choice: str) -> list[str]:
    if choice == "cpu":
        return ["cpu"]
    if choice == "cuda":
        return ["cuda"]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _header(devices: Sequence[str], seed: int) -> str:
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA build"
    parts = [
        f"torchbp {torchbp.__version__}",
        f"torch {torch.__version__} ({cuda})",
        f"python {platform.python_version()}",
    ]
    names = []
    for d in devices:
        names.append(f"cuda ({torch.cuda.get_device_name()})" if d == "cuda" else "cpu")
    parts.append("devices: " + ", ".join(names))
    parts.append(f"seed {seed}")
    return " | ".join(parts)


def run_check(
    devices: Sequence[str],
    dtypes: Sequence[torch.dtype],
    seed: int = 0,
    verbose: bool = False,
    out: TextIO | None = None,
) -> int:
    """Run the battery, print the table, return the exit status (0: all passed, 1: any mismatch)."""
    out = out or sys.stdout
    print(_header(devices, seed), file=out)
    print("criterion: an element passes when |torchbp - torch| <= atol + rtol*|torch|, with", file=out)
    for d in dtypes:
        rtol, atol = TOLERANCES[d]
        scaled = " x max(1, max|torch|) of each tensor"
        print(f"  {str(d).removeprefix('torch.')}: rtol {rtol:g}, atol {atol:g}{scaled}", file=out)
    print(
        "'tol used' = the row's largest |torchbp - torch| / (atol + rtol*|torch|) over the forward value and", file=out
    )
    print("every gradient: ok when <= 1 (so a large 'rel' at a tiny |torch| can pass on atol)", file=out)
    print(file=out)
    title = _line([name for name, _, _ in _COLUMNS])
    print(title, file=out)
    print("-" * len(title), file=out)
    rows: list[Row] = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would put torch's own matmuls ~1e-3 off
    try:
        for device in devices:
            for dtype in dtypes:
                for index, case in enumerate(CASES):
                    row = _run_case(case, device, dtype, seed, index)
                    rows.append(row)
                    print(_format_row(row), file=out, flush=True)
                    if verbose:
                        for label, err in [("forward", row.forward)] + list(row.grads.items()):
                            print(
                                f"    {label:<10} abs {_fmt(err.abs):>8}  rel {_fmt(err.rel):>8}  "
                                f"{err.ratio:.2g}x tolerance",
                                file=out,
                            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    failed = [row for row in rows if not row.ok]
    print(file=out)
    for row in failed:
        for problem in row.problems():
            print(f"FAIL {problem}", file=out)
    where = " and ".join(devices)
    if failed:
        print(
            f"torchbp check: {len(failed)} mismatch{'es' if len(failed) != 1 else ''} "
            f"({len(rows) - len(failed)}/{len(rows)} passed) on {where}",
            file=out,
        )
        return 1
    print(f"torchbp check: {len(rows)}/{len(rows)} passed on {where}", file=out)
    return 0


def _check(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "torchbp check: error: --device cuda: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu",
            file=sys.stderr,
        )
        return 2
    dtypes = list(DTYPES.values()) if args.dtype == "all" else [DTYPES[args.dtype]]
    return run_check(_devices(args.device), dtypes, seed=args.seed, verbose=args.verbose)


def add_parser(subparsers: Any) -> None:
    functions = ", ".join(case.name for case in CASES)
    p = subparsers.add_parser(
        "check",
        help="verify torchbp's gradients against torch's on this machine's devices",
        description=(
            "Run a parity battery on this machine's devices: each torchbp.functional function against "
            "torch.nn.functional (quadratic_cost against 0.5*((a-y)**2).sum()/N), forward value and every "
            "gradient torch gives (input, weight, bias, target), under a random upstream gradient, plus "
            "torch.autograd.gradcheck in float64. One row per function x device x dtype. "
            f"Functions: {functions}."
        ),
        epilog=(
            "columns: fwd abs/rel = max absolute/relative error of the forward value; grad abs/rel = the "
            "largest over the gradients; tol used = the largest error as a fraction of the allowed one, "
            "|torchbp - torch| / (atol + rtol*|torch|), over the forward value and the gradients (ok when <= 1); "
            "worst grad = the gradient closest to (or past) its tolerance; "
            "gradcheck = torch.autograd.gradcheck of torchbp's backward against finite differences "
            "(float64 rows only, '-' for float32). Tolerances: |torchbp - torch| <= atol + rtol*|torch|, "
            + ", ".join(
                f"{name} rtol={TOLERANCES[d][0]:g}, atol={TOLERANCES[d][1]:g}*max(1, max|torch|)"
                for name, d in (("float64", torch.float64), ("float32", torch.float32))
            )
            + ". "
            "TF32 matmuls are turned off during the check. "
            "Exit status: 0 all rows passed, 1 any mismatch or gradcheck failure, 2 usage error."
        ),
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "all"),
        default="all",
        help="device(s) to check; 'all' is cpu plus cuda when torch.cuda.is_available() (default: all)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64", "all"),
        default="all",
        help="dtype(s) to check; gradcheck runs in float64 only (default: all)",
    )
    p.add_argument(
        "--seed", type=integer, default=0, help="seed of the random inputs and upstream gradients (default: 0)"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also print the errors of the forward value and each gradient"
    )
    p.set_defaults(func=_check)

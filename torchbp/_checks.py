"""Argument validation for torchbp's public functions, kept apart so that functional.py reads like the math.

Each check raises what torch raises for the same mistake (exception type and, where it helps, wording),
saying what was expected, what was received, and how to fix it. Checks run at the public entry points
only, never inside a backward pass; data-dependent checks are skipped while tracing (torch.compile,
torch.func), where the values are not known.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import _torch_private


def is_traced(*tensors: Tensor | None) -> bool:
    """True under torch.compile or inside a torch.func transform, where data-dependent checks can't run."""
    if torch.compiler.is_compiling():
        return True
    if not _torch_private.functorch_transforms_active():  # (one C call: outside a transform nothing is wrapped)
        return False
    wrapped = _torch_private.is_functorch_wrapped
    return any(t is not None and wrapped(t) for t in tensors)


def check_tensor(fn: str, name: str, value: object, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        kind = "Tensor or None" if optional else "Tensor"
        raise TypeError(f"{fn}(): argument '{name}' must be a {kind}, got {type(value).__name__}")


def check_device(fn: str, input: Tensor, name: str, other: Tensor | None) -> None:
    if other is not None and other.device != input.device:
        raise RuntimeError(
            f"{fn}(): expected {name} on the same device as input ({input.device}), got {other.device}; "
            f"move it with {name}.to(input.device)"
        )


def check_dtype(fn: str, input: Tensor, name: str, other: Tensor | None) -> None:
    if other is not None and other.dtype != input.dtype:
        raise RuntimeError(
            f"{fn}(): expected {name} of dtype {input.dtype} like input, got {other.dtype}; "
            f"cast one of them with .to(dtype)"
        )


def check_float(fn: str, name: str, t: Tensor) -> None:
    if not t.is_floating_point():  # torch's kernels: "not implemented for 'Long'"
        raise NotImplementedError(f"{fn}(): expected a floating-point {name}, got dtype {t.dtype}; use {name}.float()")


REDUCTIONS = ("none", "mean", "sum")


def resolve_reduction(fn: str, reduction: str, size_average: bool | None = None, reduce: bool | None = None) -> str:
    """The reduction string, from the legacy ``size_average``/``reduce`` pair when one is given."""
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        return "none" if not reduce else ("mean" if size_average else "sum")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction; {fn}() expects 'none', 'mean' or 'sum'")
    return reduction


def check_not_differentiable(fn: str, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"{fn}(): '{name}' is not differentiable, as in torch.nn.functional; pass {name}.detach()"
            )


def check_linear(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))):
        check_tensor("linear", "input", input)
        check_tensor("linear", "weight", weight)
        check_tensor("linear", "bias", bias, optional=True)
    if weight.dim() != 2:
        raise RuntimeError(
            f"linear(): expected a 2-D weight (out_features, in_features) (or 1-D without bias), "
            f"got shape {tuple(weight.shape)}"
        )
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"linear(): expected input with last dimension {weight.shape[1]} (in_features), "
            f"got shape {tuple(input.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:  # torch also takes a bias that broadcasts
        out_shape = input.shape[:-1] + weight.shape[:1]
        try:
            ok = torch.broadcast_shapes(bias.shape, out_shape) == out_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise RuntimeError(
                f"linear(): expected bias of shape ({weight.shape[0]},) (or broadcastable to the output "
                f"{tuple(out_shape)}), got {tuple(bias.shape)}"
            )
    dtype, device = input.dtype, input.device
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != device:
            check_device("linear", input, name, t)
        if t is not None and t.dtype != dtype and not _torch_private.any_autocast_enabled():
            check_dtype("linear", input, name, t)


def check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing) -> bool:
    """Validate; returns whether some target may equal ``ignore_index`` (False only when known)."""
    if (  # the common case, (N, C) logits and (N,) int64 indices, in few checks
        weight is None
        and isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dim() == 2
        and target.dtype == torch.int64
        and target.shape == input.shape[:1]
        and input.is_floating_point()
        and target.device == input.device
        and label_smoothing <= 1.0
    ):
        return check_class_indices(input, target, input.shape[1], ignore_index)
    fn = "cross_entropy"
    check_tensor(fn, "input", input)
    check_tensor(fn, "target", target)
    check_tensor(fn, "weight", weight, optional=True)
    if input.dim() == 0:
        raise RuntimeError(f"{fn}(): expected input of shape (C,), (N, C) or (N, C, d1, ...), got a 0-D tensor")
    check_float(fn, "input", input)
    check_device(fn, input, "target", target)
    check_device(fn, input, "weight", weight)
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    if not label_smoothing <= 1.0:  # torch ignores a negative one
        raise RuntimeError(f"{fn}(): label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if weight is not None and tuple(weight.shape) != (n_classes,):
        raise RuntimeError(f"{fn}(): expected weight of shape ({n_classes},), one per class, got {tuple(weight.shape)}")
    if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"{fn}(): expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({target.shape[0]}); got input {tuple(input.shape)} and target {tuple(target.shape)}"
        )
    if target.is_floating_point():
        if target.shape != input.shape:
            raise RuntimeError(
                f"{fn}(): expected probabilities target of the input's shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}; for class indices pass an int64 target"
            )
        return False
    expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"{fn}(): expected class-index target of dtype torch.int64, got {target.dtype}; use target.long()"
        )
    if input.dim() >= 2 and target.dim() == 0:
        raise ValueError(
            f"{fn}(): expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"(none: 0-D target); target shape should be {tuple(expected)}"
        )
    if input.dim() == 1 and target.dim() == 1 and target.shape != (1,):
        raise ValueError(
            f"{fn}(): for 1-D input (C,) the class-index target must be 0-D or of shape (1,), "
            f"got shape {tuple(target.shape)}"
        )
    if input.dim() == 1 and target.shape == (1,):
        expected = target.shape  # torch takes (1,) for one unbatched sample too
    if target.shape != expected:
        raise RuntimeError(f"{fn}(): expected target of shape {tuple(expected)}, got {tuple(target.shape)}")
    return check_class_indices(input, target, n_classes, ignore_index)


def check_class_indices(input: Tensor, target: Tensor, n_classes: int, ignore_index: int) -> bool:
    """Raise IndexError for a class index out of range; returns whether one may be ``ignore_index``."""
    if is_traced(input, target):
        return True
    if not target.numel():
        return False
    if target.is_cpu:
        lo, hi = (t.item() for t in torch.aminmax(target))
    else:
        lo, hi = torch.stack(torch.aminmax(target)).tolist()  # one host read (a sync on CUDA)
    if not (0 <= lo and hi < n_classes):
        bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
        if bad.any():
            raise IndexError(
                f"cross_entropy(): target {target[bad][0].item()} is out of bounds: expected class indices "
                f"in [0, {n_classes - 1}] or ignore_index={ignore_index}"
            )
    return lo <= ignore_index <= hi


def within_0_1(t: Tensor) -> bool:
    lo, hi = torch.aminmax(t.detach())
    lo, hi = (lo.item(), hi.item()) if t.is_cpu else torch.stack((lo, hi)).tolist()  # (CUDA: one host read)
    return lo >= 0 and hi <= 1  # NaN fails, as in torch


def check_binary(fn: str, input, target, weight, reduction, size_average, reduce, pos_weight=None) -> str:
    if (  # the common call, plain tensors of one shape and one device, in few checks
        weight is None
        and pos_weight is None
        and size_average is None
        and reduce is None
        and isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and reduction in REDUCTIONS
        and target.shape == input.shape
        and input.is_floating_point()
        and target.device == input.device
    ):
        return reduction
    check_tensor(fn, "input", input)
    check_tensor(fn, "target", target)
    check_tensor(fn, "weight", weight, optional=True)
    check_tensor(fn, "pos_weight", pos_weight, optional=True)
    reduction = resolve_reduction(fn, reduction, size_average, reduce)
    if target.shape != input.shape:
        raise ValueError(f"{fn}(): expected target of the input's size {tuple(input.shape)}, got {tuple(target.shape)}")
    check_float(fn, "input", input)
    for name, t in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
        check_device(fn, input, name, t)
        if t is not None:
            try:
                torch.broadcast_shapes(t.shape, input.shape)
            except RuntimeError:
                raise RuntimeError(
                    f"{fn}(): expected {name} broadcastable to the input's shape {tuple(input.shape)}, "
                    f"got {tuple(t.shape)}"
                ) from None
    if pos_weight is not None and torch.broadcast_shapes(pos_weight.shape, input.shape) != input.shape:
        raise RuntimeError(
            f"{fn}(): expected pos_weight broadcastable to the input's shape {tuple(input.shape)}, "
            f"got {tuple(pos_weight.shape)}"
        )
    check_not_differentiable(fn, weight=weight, pos_weight=pos_weight)
    return reduction


def check_mse_loss(input, target, weight, reduction, size_average, reduce) -> str:
    """Validate mse_loss's arguments; returns the reduction."""
    if (  # the common call, plain tensors of one shape and one device, in few checks
        weight is None
        and size_average is None
        and reduce is None
        and isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and reduction in REDUCTIONS
        and target.shape == input.shape
        and target.device == input.device
    ):
        return reduction
    for name, t in (("input", input), ("target", target)):
        check_tensor("mse_loss", name, t)
    check_tensor("mse_loss", "weight", weight, optional=True)
    reduction = resolve_reduction("mse_loss", reduction, size_average, reduce)
    check_device("mse_loss", input, "target", target)
    check_device("mse_loss", input, "weight", weight)
    if target.shape != input.shape:
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
    try:
        torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError as e:
        raise RuntimeError(
            f"mse_loss(): target of shape {tuple(target.shape)} does not broadcast to input of shape "
            f"{tuple(input.shape)}: {e}"
        ) from None
    if weight is not None and weight.shape != input.shape:  # the input's own shape, as torch
        raise ValueError(
            f"mse_loss(): weights and input must have the same size: expected {tuple(input.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    return reduction


def check_quadratic_cost(input, target, reduction) -> str:
    """Validate quadratic_cost's arguments; returns the reduction."""
    check_tensor("quadratic_cost", "input", input)
    check_tensor("quadratic_cost", "target", target)
    reduction = resolve_reduction("quadratic_cost", reduction)
    if input.dim() == 0 or target.shape != input.shape:
        raise ValueError(
            f"quadratic_cost(): expected target of the input's shape {tuple(input.shape)} (at least 1-D), "
            f"got {tuple(target.shape)}"
        )
    check_device("quadratic_cost", input, "target", target)
    check_float("quadratic_cost", "input", input)
    return reduction


def check_conv1d(input: Tensor, weight: Tensor, bias: Tensor) -> None:
    """Conv1D's arguments: what ``torch.addmm`` would reject, said in the layer's own terms."""
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        check_tensor("Conv1D", name, t)
    if weight.dim() != 2:
        raise RuntimeError(f"Conv1D expected a 2-D weight (nx, nf), got shape {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[0]:
        raise RuntimeError(
            f"Conv1D expected input with last dimension {weight.shape[0]} (nx), got shape {tuple(input.shape)}"
        )
    if bias.shape != weight.shape[1:]:
        raise RuntimeError(f"Conv1D expected bias of shape ({weight.shape[1]},) (nf), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != input.device:
            check_device("Conv1D", input, name, t)
        if t.dtype != input.dtype and not _torch_private.any_autocast_enabled():
            check_dtype("Conv1D", input, name, t)


def normalized_shape(fn: str, input: Tensor, shape, params: dict[str, Tensor | None]) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple (an int is one dim), checked against the input's last dims and each parameter's
    shape, as torch's ``layer_norm`` and ``rms_norm`` check them (the same RuntimeError)."""
    check_tensor(fn, "input", input)
    if isinstance(shape, int) or not all(isinstance(d, int) for d in shape):  # (torch.nn's modules take an int)
        raise TypeError(
            f"{fn}(): argument 'normalized_shape' must be a tuple of ints, got {shape!r}; pass ({shape},) for one dim"
        )
    shape = tuple(shape)
    for name, t in params.items():
        check_tensor(fn, name, t, optional=True)
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(
                f"{fn}(): Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                f"{list(t.shape)} and normalized_shape = {list(shape)}; make {name} of shape {shape}"
            )
        if t is not None:
            check_device(fn, input, name, t)
    if not shape or tuple(input.shape[input.dim() - len(shape) :]) != shape or input.dim() < len(shape):
        raise RuntimeError(
            f"{fn}(): Given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size{list(input.shape)}"
        )
    return shape


def check_embedding(input: Tensor, weight: Tensor, padding_idx: int | None) -> int | None:
    """Validate as torch's ``embedding``; returns ``padding_idx`` made non-negative (or ``None``)."""
    check_tensor("embedding", "input", input)
    check_tensor("embedding", "weight", weight)
    if weight.dim() != 2:
        raise RuntimeError(
            f"embedding(): 'weight' must be 2-D (num_embeddings, embedding_dim), got shape {tuple(weight.shape)}"
        )
    if input.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(
            "embedding(): Expected tensor for argument #1 'indices' to have one of the following scalar types: "
            f"Long, Int; but got {input.dtype} instead; use input.long()"
        )
    check_device("embedding", weight, "input", input)
    n = weight.shape[0]
    if padding_idx is not None:
        if not -n <= padding_idx < n:
            raise AssertionError(  # (torch's type for this mistake)
                f"embedding(): Padding_idx must be within num_embeddings: expected -{n} <= padding_idx < {n}, "
                f"got {padding_idx}"
            )
        padding_idx = padding_idx + n if padding_idx < 0 else padding_idx
    if not is_traced(input) and input.numel() and not (0 <= int(input.min()) and int(input.max()) < n):
        raise IndexError(
            f"embedding(): index out of range in self: expected indices in [0, {n}), got values in "
            f"[{int(input.min())}, {int(input.max())}]"
        )
    return padding_idx
